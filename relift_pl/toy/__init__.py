"""The toy reasoning world: arithmetic levels, a char tokenizer and a cached warm-started base.

It lets the whole ReLIFT pipeline run, and mean something, on a laptop CPU in minutes.
"""

from relift_pl.toy.base import ensure_toy_base, tiny_qwen2_config
from relift_pl.toy.tokenizer import build_toy_tokenizer
from relift_pl.toy.world import LEVELS, ToyWorldConfig, level_pool, make_rows

__all__ = [
    "LEVELS",
    "ToyWorldConfig",
    "build_toy_tokenizer",
    "ensure_toy_base",
    "level_pool",
    "make_rows",
    "tiny_qwen2_config",
]

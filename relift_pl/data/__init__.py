from relift_pl.data.datamodule import ReLIFTDataModule
from relift_pl.data.templates import prompt_text, resolve_chat_template
from relift_pl.data.token_ids import prompt_ids

__all__ = ["ReLIFTDataModule", "prompt_ids", "prompt_text", "resolve_chat_template"]

#!/usr/bin/env python3
"""Ship a toy base: train it on this machine and put it in the repository, pinned by sha256.

    python scripts/ship_toy_base.py tiny2                 # model=tiny2 -> relift_pl/toy/bases/tiny2/
    python scripts/ship_toy_base.py tiny2 model.build.seed=1 --name tiny2_seed1

For whoever changes a toy world or its base's recipe: every number the README and docs/results
quote was measured on the shipped base, so a new recipe means a new shipped base, then new
numbers. Any Hydra override of the training config selects the settings (``model.build.*``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import relift_pl.train  # noqa: E402,F401  (registers the config's relift_root resolver)
from relift_pl.toy.shipped import SHIPPED_DIR, write_sums  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the model config to build (conf/model/<model>.yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.build.seed=1")
    parser.add_argument("--name", help="folder name under relift_pl/toy/bases (default: model)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model gains nothing from more; under load they cost 10x
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", "model.build.rebuild=true", *args.overrides])
    built = Path(instantiate(cfg.model.build)())
    target = SHIPPED_DIR / (args.name or args.model)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(built, target)
    write_sums(target)
    print(f"shipped {built} as {target.relative_to(ROOT)}:")
    print((target / "SHA256SUMS").read_text(), end="")


if __name__ == "__main__":
    main()

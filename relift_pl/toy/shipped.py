"""The toy bases that ship with the repository, pinned by hash.

A toy base is trained from scratch by SFT. Float kernels differ between CPUs and the SFT amplifies
the difference, so two machines build two different networks from the same settings (each
bitwise stable on its own machine). The README's and the study's numbers rest on one network:
it ships in ``relift_pl/toy/bases/<name>/`` (weights, tokenizer, ``toy_base.json`` with the
settings it was built with) with the sha256 of every file in ``SHA256SUMS`` (``sha256sum -c``
format), and :func:`relift_pl.toy.base.ensure_toy_base` returns it whenever the requested
settings are its settings. A rebuild (``model.build.rebuild=true``) trains anew and says whether
this machine's network is the shipped one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

SHIPPED_DIR = Path(__file__).resolve().parent / "bases"
SUMS_FILE = "SHA256SUMS"
WEIGHTS_FILE = "model.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_shipped(settings: dict[str, Any], metadata_file: str, figures: set[str]) -> Path | None:
    """The shipped base built with exactly ``settings``: its ``metadata_file`` holds them and the
    build's own ``figures`` (final loss, ...), nothing else, so a setting a request leaves out
    (the first world's bases have no ``task_fraction``) never matches a base that has it."""
    wanted = json.loads(json.dumps(settings))  # as the file holds them (tuples become lists)
    for meta_path in sorted(SHIPPED_DIR.glob(f"*/{metadata_file}")):
        meta = json.loads(meta_path.read_text())
        if {key: value for key, value in meta.items() if key not in figures} == wanted:
            return meta_path.parent
    return None


def verify_shipped(path: Path) -> None:
    """Checks every file ``SHA256SUMS`` lists; a changed or missing one is an error that names it."""
    sums = path / SUMS_FILE
    if not sums.exists():
        raise ValueError(f"{sums} is missing: the shipped toy base cannot be verified; restore it "
                         "(git checkout -- relift_pl/toy/bases) or set model.build.rebuild=true")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        file = path / name.lstrip("*")
        if not file.exists() or sha256(file) != digest:
            raise ValueError(
                f"{file} does not match its sha256 in {sums}: the shipped toy base was changed; "
                "restore it (git checkout -- relift_pl/toy/bases) or set model.build.rebuild=true "
                "to train one on this machine")


def write_sums(path: Path) -> None:
    """Records the sha256 of every file of a base directory (when a base is shipped)."""
    names = sorted(f.name for f in path.iterdir() if f.is_file() and f.name != SUMS_FILE)
    (path / SUMS_FILE).write_text("".join(f"{sha256(path / n)}  {n}\n" for n in names))


def compare_to_shipped(built: Path, shipped: Path) -> str:
    """One line: whether a rebuilt base's weights are the shipped ones, and how far apart if not."""
    if sha256(built / WEIGHTS_FILE) == sha256(shipped / WEIGHTS_FILE):
        return f"rebuilt toy base {built} is bitwise the shipped one ({shipped})"
    ours, theirs = load_file(built / WEIGHTS_FILE), load_file(shipped / WEIGHTS_FILE)
    gap = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    scale = max(theirs[k].abs().max().item() for k in theirs)
    return (f"rebuilt toy base {built} differs from the shipped one ({shipped}): largest weight "
            f"difference {gap:.3g} (largest weight {scale:.3g}). Float kernels differ between "
            "CPUs and the from-scratch SFT amplifies it; the README's numbers were measured on "
            f"the shipped base (torch {torch.__version__} here)")

"""Build-once directories keyed by their settings (the toy bases, the rehearsal's tiny Qwen2)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cached_build(
    cache_dir: str | Path, prefix: str, settings: dict[str, Any], metadata_file: str,
    build: Callable[[Path], dict[str, Any] | None],
) -> Path:  # fmt: skip
    """``cache_dir/<prefix>-<key>``, the key a short hash of ``settings``; built by ``build(tmp)``
    the first time (its returned dict joins ``settings`` in ``metadata_file``, whose presence marks
    a finished build). The build happens in a temporary directory renamed into place at the end,
    so a killed run never leaves a half-written one, and two processes racing keep the first."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{prefix}-{key}"
    if (target / metadata_file).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        extra = build(tmp) or {}
        (tmp / metadata_file).write_text(json.dumps({**settings, **extra}, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same build first: keep theirs
            if not (target / metadata_file).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

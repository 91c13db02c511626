"""The demo runs as a newcomer runs it, and does what the README says."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_demo():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    sparsity = float(re.search(r"^total \(4\).*?([0-9.]+)%", out, flags=re.M).group(1))
    assert accuracy >= 0.95
    assert sparsity >= 50.0
    assert "reloaded plain state_dict: predictions identical" in out

"""The examples run end to end (on the 64-token fixture, so the test stays short)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_offload_real_qkv_example(server, tmp_path):
    env = dict(os.environ, FQ_SHARED_DATA_DIR=str(tmp_path / "absent"))  # use tests/data
    r = subprocess.run([sys.executable, str(EXAMPLES / "offload_real_qkv.py"), f"--server={server.target}"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "tests/data" in lines[0]
    ratios = [float(m) for m in re.findall(r"\(([\d.]+)x, \d+ bytes saved\)", r.stdout)]
    cosines = [float(m) for m in re.findall(r"cosine ([\d.]+)", r.stdout)]
    assert len(ratios) == 2 and all(x > 2 for x in ratios), r.stdout
    assert len(cosines) == 2 and all(0.9 < x <= 1 for x in cosines), r.stdout

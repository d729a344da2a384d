"""The README demo runs end to end on 2 CPU ranks through torchrun (few steps)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_losses_and_bytes():
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "scripts/demo.py",
        "--steps",
        "60",
        "--log-every",
        "20",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    rows = dict(re.findall(r"^(CD-Adam|1-bit Adam|Adam \(fp32\))\s+(.+)$", text, flags=re.MULTILINE))
    assert set(rows) == {"CD-Adam", "1-bit Adam", "Adam (fp32)"}, text[-2000:]
    loss, _acc, _mb, ratio = rows["CD-Adam"].split()
    assert float(loss) < 1.5  # learned: chance is ln(10) = 2.30
    assert float(ratio.rstrip("x")) >= 28.0  # ~32x fewer bytes than the fp32 all-reduce
    assert float(rows["1-bit Adam"].split()[3].rstrip("x")) > 1.0

"""The README demo runs end to end on 2 CPU ranks through torchrun (few steps)."""

import re
import sys
from pathlib import Path

from tests.launch import run_checked


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
    text = run_checked(cmd, timeout=300)
    rows = dict(re.findall(r"^(CD-Adam|1-bit Adam|Adam \(fp32\))\s+(.+)$", text, flags=re.MULTILINE))
    assert set(rows) == {"CD-Adam", "1-bit Adam", "Adam (fp32)"}, text[-2000:]
    loss, _acc, _mb, ratio = rows["CD-Adam"].split()
    assert float(loss) < 1.5  # learned: chance is ln(10) = 2.30
    assert float(ratio.rstrip("x")) >= 28.0  # ~32x fewer bytes than the fp32 all-reduce
    assert float(rows["1-bit Adam"].split()[3].rstrip("x")) > 1.0

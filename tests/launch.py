"""Starting the `deepspeed` launcher from tests: a free port, the launcher beside this Python, checked output."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(world_size: int, script: str, *script_args: str) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args...`` (on CPU, N ranks)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(world_size), "--master_port", str(free_port()), script, *script_args]


def run_checked(cmd: list[str], timeout: float = 400) -> str:
    """Run ``cmd`` from the repository root; fail the test with the output's tail unless it exits 0.

    Returns stdout followed by stderr (launched scripts log to either)."""
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr

"""The MPI transport (mpi4py + mpich from pip): optimizers over mpiexec equal the simulator."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import max_abs_diff, run_reference

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("world_size", [2, 3])
def test_mpi_matches_simulator(tmp_path, world_size):
    cmd = [MPIEXEC, "-n", str(world_size), sys.executable, "tests/comm/mpi_worker.py", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for case in ("cdadam", "onebit"):
        expected = run_reference(case, world_size, 20)
        for rank in range(world_size):
            got = torch.load(tmp_path / f"{case}-{rank}.pt")
            assert max_abs_diff(got["history"], expected) <= 1e-12, (case, rank)
            assert got["bytes_sent"] > 0
    total = sum(range(1, world_size + 1))  # reduce_scatter of arange(2n) * (rank + 1)
    for rank in range(world_size):
        got = torch.load(tmp_path / f"collectives-{rank}.pt")
        assert got["reduce_scatter"].tolist() == [2.0 * rank * total, (2.0 * rank + 1) * total]
        assert got["sub_sum"].item() == sum(range(rank % 2, world_size, 2)) and got["sub_rank"] == rank // 2

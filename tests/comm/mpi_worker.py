"""Run by `mpiexec -n N python tests/comm/mpi_worker.py OUT_DIR`: harness cases over MpiTransport."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed_cdadam.comm.mpi import MpiTransport
from tests.harness import run_optimizer

transport = MpiTransport()
for case in ("cdadam", "onebit"):
    history, stats = run_optimizer(case, transport.rank, transport, 20)
    torch.save({"history": history, "bytes_sent": stats.bytes_sent}, f"{sys.argv[1]}/{case}-{transport.rank}.pt")

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

# reduce_scatter and subgroups: ranks split into even and odd
n, r = transport.world_size, transport.rank
rs = transport.reduce_scatter_sum(torch.arange(2.0 * n) * (r + 1))
sub = transport.split([list(range(0, n, 2)), list(range(1, n, 2))])
in_group = sub.all_reduce_sum(torch.tensor([float(r)]))
torch.save({"reduce_scatter": rs, "sub_sum": in_group, "sub_rank": sub.rank}, f"{sys.argv[1]}/collectives-{r}.pt")

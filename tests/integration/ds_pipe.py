"""Pipeline engine (1 stage, data parallel over 2 ranks) with "CDAdam": run by the deepspeed launcher.

deepspeed --num_gpus 2 tests/integration/ds_pipe.py --deepspeed_config cfg.json --out DIR
"""

from __future__ import annotations

import argparse
import datetime

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from ds_common import count_allreduce_calls

import deepspeed_cdadam  # noqa: F401

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
parser.add_argument("--out", required=True)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
torch.set_num_threads(1)  # the launchers differ (mpiexec binds a core per rank): same kernels, same bits
deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
rank = torch.distributed.get_rank()

torch.manual_seed(0)
layers = [torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5)]
model = PipelineModule(layers=layers, num_stages=1, loss_fn=torch.nn.MSELoss())
x0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
calls = count_allreduce_calls(engine)


def batches():
    step = 0
    while True:
        step += 1
        gen = torch.Generator().manual_seed(1000 * step + rank)
        yield torch.randn(8, 13, generator=gen), torch.randn(8, 5, generator=gen)


data = batches()
params = []
for _ in range(4):
    engine.train_batch(data_iter=data)
    params.append(torch.cat([p.detach().reshape(-1).clone() for p in engine.module.parameters()]))
torch.save(
    {
        "x0": x0,
        "params": params,
        "allreduce_calls": calls["allreduce"],
        "optimizer": type(engine.basic_optimizer).__name__,
        "pipeline_allreduce": engine.pipeline_enable_backward_allreduce,
    },
    f"{args.out}/pipe{rank}.pt",
)
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # see ds_train.py

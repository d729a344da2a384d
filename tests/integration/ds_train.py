"""Training script for the DeepSpeed integration tests, run by the `deepspeed` launcher.

    deepspeed --num_gpus 2 tests/integration/ds_train.py --deepspeed_config cfg.json --out DIR --steps 8 [--save-at 4]

Records, per rank: initial flat parameters, the local gradient handed to the optimizer at each
step, the parameters after each step, and how often the engine's own all-reduce ran. With
``--save-at k`` it also trains a second engine to step k, saves a checkpoint, loads it into a third
engine (started from other weights) and continues to ``--steps``.
"""

from __future__ import annotations

import argparse
import datetime
import json

import deepspeed
import torch
from ds_common import count_allreduce_calls

import deepspeed_cdadam  # noqa: F401  (registers "CDAdam" and "OneBitAdam")

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--save-at", type=int, default=0)
parser.add_argument("--inf-at", default="", help="RANK:STEP, feed that rank an inf input at that step (fp16 overflow)")
parser.add_argument(
    "--model",
    choices=("mlp", "single", "layers"),
    default="mlp",
    help="single: one weight tensor, 128 params; layers: 3 Linear layers, 6 tensors of sizes 520, 40, 960, 24, 120, 5",
)
parser.add_argument(
    "--upstream", action="store_true", help="DeepSpeed's own OnebitAdam / OnebitLamb / ZeroOneAdam on a CPU backend"
)
parser.add_argument("--mpu", action="store_true", help="pass a model-parallel unit (model parallel size 1)")
parser.add_argument("--load-from", default="", help="only load this checkpoint (any world size), record, train 2 steps")
parser.add_argument(
    "--drop-deepspeed-overflow-agreement",
    action="store_true",
    help="DeepSpeed's fp16 overflow check without its data-parallel all-reduce (as if a release removed it)",
)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
torch.set_num_threads(1)  # the launchers differ (mpiexec binds a core per rank): same kernels, same bits
with open(args.deepspeed_config) as fh:
    if json.load(fh).get("fp16", {}).get("enabled"):
        from deepspeed.accelerator import get_accelerator

        # The CPU accelerator says fp16 is unsupported (it is slow, not wrong): allow it for the tests.
        get_accelerator().is_fp16_supported = lambda: True
deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))  # nothing waits forever
rank = torch.distributed.get_rank()

if args.drop_deepspeed_overflow_agreement:
    from deepspeed.runtime.utils import CheckOverflow

    def local_overflow_only(self, params, has_moe_params=None):
        """DeepSpeed's has_overflow minus its branch that all-reduces the flag over the data-parallel
        ranks when the engine's gradient all-reduce is off (kept upstream for its 1-bit optimizers)."""
        return bool(self.has_overflow_serial(params))

    CheckOverflow.has_overflow = local_overflow_only


IN, OUT = (13, 5) if args.model == "mlp" else (16, 8)
if args.upstream:
    import upstream_cpu_backend

    from deepspeed_cdadam.integration.deepspeed import unregister

    unregister()  # "OneBitAdam" goes to deepspeed.runtime.fp16.onebit.adam.OnebitAdam again
    upstream_cpu_backend.install()


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if args.model == "single":
        return torch.nn.Linear(IN, OUT, bias=False)
    if args.model == "layers":
        return torch.nn.Sequential(
            torch.nn.Linear(IN, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, OUT)
        )
    return torch.nn.Sequential(torch.nn.Linear(IN, 17), torch.nn.Tanh(), torch.nn.Linear(17, OUT))


INF_RANK, INF_STEP = (int(v) for v in args.inf_at.split(":")) if args.inf_at else (-1, -1)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, IN, generator=gen), torch.randn(8, OUT, generator=gen)
    if (rank, step) == (INF_RANK, INF_STEP):
        x[0, 0] = float("inf")
    return x.to(dtype), y.to(dtype)


def flat(model: torch.nn.Module, grads: bool = False) -> torch.Tensor:
    return torch.cat([(p.grad if grads else p.detach()).reshape(-1).clone() for p in model.parameters()])


def train(engine, first: int, last: int, record: dict | None = None) -> None:
    dtype = next(engine.module.parameters()).dtype
    for step in range(first, last + 1):
        x, y = batch(step, dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        if record is not None:
            record["grads"].append(flat(engine.module, grads=True))
        engine.step()
        if record is not None:
            record["params"].append(flat(engine.module))
            state = next(iter(engine.basic_optimizer.state.values()), {}) if not args.upstream else {}
            record["opt_state"].append({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
            if hasattr(engine.basic_optimizer, "get_lamb_coeffs"):  # 1-bit LAMB, ours and upstream's
                record.setdefault("lamb_coeffs", []).append(engine.basic_optimizer.get_lamb_coeffs())


class ModelParallelUnit:
    """A Megatron-style mpu with model-parallel size 1: data parallelism over every rank."""

    def __init__(self) -> None:
        world = torch.distributed.get_world_size()
        singles = [torch.distributed.new_group(ranks=[r]) for r in range(world)]  # every rank creates every group
        self.model_group = singles[rank]
        self.data_group = torch.distributed.new_group(ranks=list(range(world)))

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_rank(self) -> int:
        return torch.distributed.get_rank(group=self.data_group)

    def get_data_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(group=self.data_group)

    def get_model_parallel_group(self):
        return self.model_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


MPU = ModelParallelUnit() if args.mpu else None


def initialize(seed: int):
    model = make_model(seed)
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(), mpu=MPU)
    return engine, optimizer, count_allreduce_calls(engine)


if args.load_from:
    engine, optimizer, _ = initialize(seed=7)
    engine.load_checkpoint(args.load_from)
    (state,) = engine.basic_optimizer.state.values()
    record = {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
    record["params"] = flat(engine.module)
    train(engine, 100, 101)
    torch.save(record, f"{args.out}/loaded_rank{rank}.pt")
    raise SystemExit(0)

engine, optimizer, calls = initialize(seed=0)
# Upstream ZeroOneAdam counts every call in its schedule, so it gets its initialising call only, which
# under fp16 the fused wrapper's set-up step() has made already (a zero-gradient update would shift it).
upstream_zero_one = args.upstream and type(engine.basic_optimizer).__name__ == "ZeroOneAdam"
if args.upstream and not (upstream_zero_one and engine.basic_optimizer.initialize):
    # Upstream's first step() only initialises its buffers and moves nothing; with a zero gradient
    # it also leaves m and v at zero, so the recorded steps below line up with a fresh optimizer.
    engine.backward(0.0 * engine(torch.zeros(8, IN, dtype=next(engine.module.parameters()).dtype)).float().sum())
    engine.step()
    calls["allreduce"] = 0
record = {"x0": flat(engine.module), "grads": [], "params": [], "opt_state": [], "optimizer": type(engine.basic_optimizer).__name__}
train(engine, 1, args.steps, record)
record["allreduce_calls"] = calls["allreduce"]
record["bytes_sent"] = getattr(getattr(engine.basic_optimizer, "comm_stats", None), "bytes_sent", None)
record["skipped_steps"] = engine.skipped_steps

if args.save_at:
    ckpt = f"{args.out}/ckpt"
    first, _, _ = initialize(seed=0)
    train(first, 1, args.save_at)
    first.save_checkpoint(ckpt)
    second, _, _ = initialize(seed=123)  # other weights: everything must come from the checkpoint
    second.load_checkpoint(ckpt)
    train(second, args.save_at + 1, args.steps)
    record["resumed_params"] = flat(second.module)

torch.save(record, f"{args.out}/rank{rank}.pt")
if rank == 0:
    with open(f"{args.out}/done.json", "w") as fh:
        json.dump({"steps": args.steps}, fh)
# Leave the process group before exit: otherwise its threads can outlive the interpreter and the
# rank aborts at exit ("terminate called without an active exception", seen with DeepSpeed 0.19.8).
torch.distributed.barrier()
torch.distributed.destroy_process_group()

"""Train one task with plain PyTorch DDP + AdamW, optionally with a gradient-compression comm hook.

    torchrun --nproc_per_node 2 scripts/ddp_train.py --deepspeed_config configs/resnet_adam.json \\
        --task resnet18-fashion --hook powersgd1

The baseline a PyTorch user would run instead of DeepSpeed: the same tasks, flags, batches, seeds,
lr schedule, evaluation and output files (``steps.csv``, ``summary.json``, same columns) as
``scripts/train.py``, whose helpers it imports. The optimizer is ``torch.optim.AdamW`` with the
hyperparameters and micro batch of the DeepSpeed JSON config given (an ``Adam``/``AdamW`` config,
e.g. ``configs/resnet_adam.json``: DeepSpeed builds ``torch.optim.AdamW`` from it too, so the two
runs differ only in how gradients are averaged). ``--hook`` picks the averaging:

* ``none``: DDP's built-in fp32 all-reduce;
* ``bf16``: ``default_hooks.bf16_compress_hook`` (gradients all-reduced as bfloat16; registered
  through a wrapper of another name, as DDP refuses it by name without CUDA + NCCL, while gloo
  all-reduces bfloat16 on the CPU);
* ``powersgd1`` / ``powersgd4``: ``powerSGD_hook`` with ``PowerSGDState(matrix_approximation_rank=1``
  or ``4``, ``start_powerSGD_iter=`` PowerSGDState's default (1000) unless ``--powersgd-start-iter``
  is given; every other argument its default: error feedback and warm start on,
  ``min_compression_rate`` 2).

DDP itself: default buckets (``bucket_cap_mb`` unset: a 1 MiB first bucket, 25 MiB after; see
``--bucket-cap-mb``), ``broadcast_buffers=False`` (as DeepSpeed's engine: BatchNorm statistics stay
per rank, and no buffer traffic), parameters broadcast once at construction (not counted, as
``train.py`` does not count DeepSpeed's initial broadcast). The whole loss computation runs inside
DDP's forward (``TaskLoss``), since ``bert-mlm``'s loss calls the model's sub-modules directly.

Bytes (what one rank sent, ring accounting as ``deepspeed_cdadam.comm.accounting`` and ``train.py``:
an all-reduce of B bytes sends ``2 (n-1) / n x B``, counted half up, half down), per step, with N the
trainable parameters' element count:

* ``none``: ``2 (n-1)/n x 4 N`` (the same as train.py counts for DeepSpeed's fp32 all-reduce);
* ``bf16``: ``2 (n-1)/n x 2 N``;
* ``powersgd<r>``: steps 1..``start_powerSGD_iter`` are vanilla fp32 all-reduces (``4 N`` as
  ``none``; the hook's iteration counter passes the start after that many steps); every later
  step all-reduces, in fp32, per bucket: the uncompressed tensors (concatenated), the P matrices,
  then the Q matrices. Summed over parameters (the split is per tensor, so buckets do not matter):
  a parameter of shape ``(n0, ...)`` is the matrix ``n0 x m`` (``m = numel / n0``) with rank
  ``k = min(n0, m, r)``; it is compressed iff ``(n0 + m) k x min_compression_rate < n0 m``, and
  then contributes ``n0 k`` to P and ``m k`` to Q, else its ``numel`` to the uncompressed part (so
  1-D tensors, biases and norms, are always uncompressed). Step bytes: ``2 (n-1)/n x 4 (U + P + Q)``.

The hooks' own ``dist.all_reduce`` calls are also counted as they happen (input bytes, ring
formula); ``summary.json`` gives that total as ``bytes_measured`` and says in ``bytes_check``
whether it equals the formula's count at every step (for ``none`` DDP's C++ reducer makes the
calls: nothing to measure).

PowerSGD on gloo: ``powerSGD_hook``'s future callbacks block in ``wait()`` on gloo's worker threads
and issue collectives from them, so with two or more buckets in flight they take both of gloo's
worker threads and the ranks deadlock (seen here at the first compressed step with torch 2.13).
``--hook powersgd*`` therefore chains the buckets: bucket k's hook starts when bucket k-1's future has
completed (the same collectives, maths and bytes; less overlap between buckets).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402  (train.py's helpers: flags, schedule, log, evaluation)
from tasks import TASKS  # noqa: E402

from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent  # noqa: E402

HOOKS = ("none", "bf16", "powersgd1", "powersgd4")
#: PowerSGDState's own defaults (its "default warm-up" is start_powerSGD_iter)
POWERSGD_DEFAULTS = {
    k: v.default for k, v in inspect.signature(powersgd.PowerSGDState.__init__).parameters.items() if k != "self"
}


def parse_args() -> argparse.Namespace:
    """``train.py``'s flags plus ``--hook``, ``--powersgd-start-iter`` and ``--bucket-cap-mb``."""
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--hook", choices=HOOKS, default="none", help="DDP comm hook (none: fp32 all-reduce)")
    ours.add_argument(
        "--powersgd-start-iter",
        type=int,
        default=POWERSGD_DEFAULTS["start_powerSGD_iter"],
        help=f"PowerSGD's vanilla all-reduce steps (default: PowerSGDState's, "
        f"{POWERSGD_DEFAULTS['start_powerSGD_iter']}; >= 2)",
    )
    ours.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket_cap_mb (default: DDP's)")
    if "-h" in sys.argv or "--help" in sys.argv:
        own = ours.format_help()
        print(__doc__.splitlines()[0] + "\n\nDDP " + own[own.index("options:") :] + "\ntrain.py's flags:")
    extra, rest = ours.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = train.parse_args()  # train.py's flags, checks and --help
    for name in ("save_every", "resume", "stop_at"):
        if getattr(args, name):
            raise SystemExit(f"ddp_train.py: --{name.replace('_', '-')} is train.py's (DeepSpeed checkpoints) only")
    if not args.deepspeed_config:
        raise SystemExit("ddp_train.py: --deepspeed_config (an Adam/AdamW config) gives the optimizer and batch")
    if extra.hook.startswith("powersgd") and extra.powersgd_start_iter < 2:
        raise SystemExit("ddp_train.py: --powersgd-start-iter must be >= 2 (PowerSGD's error feedback needs it)")
    return argparse.Namespace(**vars(args), **vars(extra))


def adamw_from_config(config: dict, params) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` as DeepSpeed builds it from an ``Adam``/``AdamW`` config with ``torch_adam``."""
    opt = config.get("optimizer", {})
    kind = str(opt.get("type", "")).lower()
    p = dict(opt.get("params", {}))
    if kind not in ("adam", "adamw"):
        raise SystemExit(f"ddp_train.py: the config's optimizer must be Adam or AdamW, got {opt.get('type')!r}")
    if kind == "adam" and not p.get("adam_w_mode", True):
        raise SystemExit("ddp_train.py: adam_w_mode false (L2 Adam) is not supported")
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled", False):
            raise SystemExit(f"ddp_train.py: {key} is not supported (fp32 DDP)")
    if config.get("zero_optimization", {}).get("stage", 0):
        raise SystemExit("ddp_train.py: ZeRO is not supported (plain DDP)")
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise SystemExit("ddp_train.py: gradient_accumulation_steps must be 1")
    return torch.optim.AdamW(
        params,
        lr=p.get("lr", 1e-3),
        betas=tuple(p.get("betas", (0.9, 0.999))),
        eps=p.get("eps", 1e-8),
        weight_decay=p.get("weight_decay", 0.01),
    )


class TaskLoss(nn.Module):
    """The task's loss as one module, so that DDP's forward (which arms its backward hooks) covers it."""

    def __init__(self, task, model: nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch):
        return self.task.loss_and_hits(self.model, batch)


def powersgd_split(shapes: list[torch.Size], rank: int, min_compression_rate: float) -> tuple[int, int, int]:
    """(uncompressed elements, P elements, Q elements) of one compressed PowerSGD step (``powerSGD_hook``'s
    per-tensor rule, see the module docstring)."""
    u = p = q = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) == 0:
            u += 1
            continue
        n, m = shape[0], numel // shape[0]
        k = min(n, m, rank)
        if (n + m) * k * min_compression_rate < n * m:
            p, q = p + n * k, q + m * k
        else:
            u += numel
    return u, p, q


def step_bytes(hook: str, shapes: list[torch.Size], world: int, step: int, start_iter: int, min_rate: float) -> float:
    """Bytes one rank sends in training step ``step`` (1-based) under ``hook`` (module docstring)."""
    numel = sum(math.prod(s) for s in shapes)
    if hook == "none":
        return all_reduce_bytes_sent(4 * numel, world)
    if hook == "bf16":
        return all_reduce_bytes_sent(2 * numel, world)
    if step <= start_iter:
        return all_reduce_bytes_sent(4 * numel, world)
    u, p, q = powersgd_split(shapes, int(hook.removeprefix("powersgd")), min_rate)
    return all_reduce_bytes_sent(4 * (u + p + q), world)


class HandedBytes:
    """Counts the bytes of the ``dist.all_reduce`` calls made while ``counting()`` (the comm hooks' own)."""

    def __init__(self, world: int) -> None:
        self.world, self.sent, self._active, self._lock = world, 0.0, False, threading.Lock()
        original = dist.all_reduce

        def counting_all_reduce(tensor, *a, **k):
            if self._active:
                with self._lock:
                    self.sent += all_reduce_bytes_sent(tensor.numel() * tensor.element_size(), self.world)
            return original(tensor, *a, **k)

        dist.all_reduce = counting_all_reduce  # the hooks call it through the module: torch.distributed

    @contextlib.contextmanager
    def counting(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False


def chained(hook):
    """PowerSGD's ``hook`` with its compressed buckets run one after the other (the module docstring's
    gloo deadlock). Its vanilla steps (before ``start_powerSGD_iter``: every bucket of a step alike)
    run as they are."""
    last: list[torch.futures.Future | None] = [None]

    def run(state, bucket):
        if state.iter < state.start_powerSGD_iter:
            return hook(state, bucket)
        prev = last[0]
        if prev is None or prev.done():
            fut = hook(state, bucket)
        else:
            fut = torch.futures.Future()

            def forward(inner):
                try:
                    fut.set_result(inner.value())
                except Exception as err:  # noqa: BLE001 - handed to DDP, which raises it in backward
                    fut.set_exception(err)

            def start(_):
                try:
                    hook(state, bucket).add_done_callback(forward)
                except Exception as err:  # noqa: BLE001
                    fut.set_exception(err)

            prev.add_done_callback(start)
        last[0] = fut
        return fut

    return run


def bf16_compress_hook_gloo(process_group, bucket):  # no annotations: DDP would compare them as strings
    """``default_hooks.bf16_compress_hook`` itself. DDP refuses that function by name unless CUDA and NCCL
    (or XPU) are present; gloo all-reduces bfloat16 on the CPU, so it is registered under this name."""
    return default_hooks.bf16_compress_hook(process_group, bucket)


def register_hook(model: nn.Module, hook: str, start_iter: int):
    """Register ``hook`` on the DDP ``model``; returns PowerSGD's state (None for the others)."""
    if hook == "bf16":
        model.register_comm_hook(None, bf16_compress_hook_gloo)
    elif hook.startswith("powersgd"):
        state = powersgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(hook.removeprefix("powersgd")),
            start_powerSGD_iter=start_iter,
        )
        model.register_comm_hook(state, chained(powersgd.powerSGD_hook))
        return state
    return None


def train_step(ctx: SimpleNamespace, step: int) -> tuple[torch.Tensor, int, int]:
    """One optimizer step: batch, forward + backward (DDP averages the gradients), AdamW, lr schedule."""
    batch = ctx.task.train_batch(step, ctx.batch_size)
    loss, hits, count = ctx.ddp(batch)
    ctx.optimizer.zero_grad(set_to_none=True)
    with ctx.handed.counting():
        loss.backward()
    if ctx.clip > 0:
        nn.utils.clip_grad_norm_(ctx.ddp.parameters(), ctx.clip)
    ctx.optimizer.step()
    ctx.scheduler.step()
    return loss, hits, count


def main() -> None:
    args = parse_args()
    config = json.loads(Path(args.deepspeed_config).read_text())
    torch.set_num_threads(args.threads)
    dist.init_process_group(train.collective_backend(), timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() != "gloo":
        raise SystemExit("ddp_train.py runs on CPU (gloo) only")

    task = TASKS[args.task](args, rank, world)
    if getattr(args, "seq_len", 0):  # train.py's --seq-len, where it has one
        if not hasattr(task, "seq_len"):
            raise SystemExit(f"--seq-len: task {args.task} has no sequence length")
        task.seq_len = args.seq_len
    task.load_data()
    torch.manual_seed(args.seed)  # the same initial weights on every rank (as train.py)
    model = task.build_model()
    torch.manual_seed(args.seed * 1000 + rank + 1)  # dropout differs per rank
    trainable = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in trainable]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        ddp = nn.parallel.DistributedDataParallel(
            TaskLoss(task, model), broadcast_buffers=False, bucket_cap_mb=args.bucket_cap_mb
        )
    state = register_hook(ddp, args.hook, args.powersgd_start_iter)
    min_rate = state.min_compression_rate if state is not None else POWERSGD_DEFAULTS["min_compression_rate"]
    optimizer = adamw_from_config(config, trainable)
    ctx = SimpleNamespace(
        task=task,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=train.lr_schedule(args)(optimizer),
        batch_size=int(config.get("train_micro_batch_size_per_gpu", 1)),
        clip=float(config.get("gradient_clipping", 0.0) or 0.0),
        handed=HandedBytes(world),
    )
    evaluator = SimpleNamespace(basic_optimizer=optimizer, module=model, device=torch.device("cpu"))
    label = f"AdamW (DDP, {args.hook})"

    out = Path(args.out)
    sent, check = 0.0, "ok" if args.hook != "none" else "not measured (DDP's C++ reducer)"
    start = time.perf_counter()
    progress = tqdm(range(1, args.steps + 1), disable=rank != 0, desc=f"{args.task} {label}")
    test_loss = test_acc = float("nan")
    with train.StepLog(out / "steps.csv" if rank == 0 else None, 1) as log:
        for step in progress:
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            loss, hits, count = train_step(ctx, step)
            sent += step_bytes(args.hook, shapes, world, step, args.powersgd_start_iter, min_rate)
            if args.hook != "none" and check == "ok" and not math.isclose(ctx.handed.sent, sent, rel_tol=1e-9):
                check = f"mismatch from step {step}: measured {ctx.handed.sent:.0f}, formula {sent:.0f}"
                print(f"ddp_train.py: bytes {check}", file=sys.stderr)
            mean_loss, all_hits, all_count = train.mean_over_ranks([loss.item(), hits, count])
            row = {
                "step": step, "lr": lr, "loss": mean_loss / world, "acc": all_hits / all_count,
                "bytes_up": sent / 2, "bytes_down": sent / 2, "bytes_total": sent,
                "wall_s": time.perf_counter() - start, "test_loss": "", "test_acc": "",
            }  # fmt: skip
            if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                test_loss, test_acc = train.evaluate(evaluator, task, ctx.batch_size)
                row.update(test_loss=test_loss, test_acc=test_acc)
            max_loss = getattr(args, "max_loss", 0.0)  # train.py's --max-loss, where it has one
            if not math.isfinite(row["loss"]) or (max_loss and row["loss"] > max_loss):
                raise FloatingPointError(f"Training loss is {row['loss']} at step {step}: lower the lr.")
            log.write(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", MB=f"{sent / 1e6:.1f}")

    summary = None
    if rank == 0:
        summary = {
            "task": args.task,
            "optimizer": label,
            "world_size": world,
            "steps": args.steps,
            "params": sum(p.numel() for p in trainable),
            "final_train_loss": row["loss"],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "bytes_up": sent / 2,
            "bytes_down": sent / 2,
            "bytes_total": sent,
            "wall_s": row["wall_s"],
            "hook": args.hook,
            "powersgd_start_iter": args.powersgd_start_iter if args.hook.startswith("powersgd") else None,
            "bytes_measured": ctx.handed.sent if args.hook != "none" else None,
            "bytes_check": check,
            "config": config,
        }
    train.finish(out, summary)


if __name__ == "__main__":
    main()

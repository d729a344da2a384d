"""Train one task with any optimizer a DeepSpeed JSON config names (CDAdam, OneBitAdam, EF21, Adam, ...).

    deepspeed --num_gpus 2 scripts/train.py --deepspeed_config configs/resnet_cdadam.json --task resnet18-fashion

(on CPU, ``--num_gpus N`` starts N ranks.) Writes to ``--out``: ``steps.csv`` (one row per step:
loss and accuracy averaged over ranks, lr, bytes this rank sent up/down so far, wall time; test
loss/accuracy every ``--eval-every`` steps) and ``summary.json``. Bytes are counted as in
``deepspeed_cdadam.comm.accounting`` (ring / pairwise collectives): our optimizers count their
own exchanges; the engine's fp32 gradient all-reduce (Adam, and 1-bit Adam's warm-up) is counted
here. The per-step loss all-reduce for logging is not counted (it is monitoring, not training).
``--save-dir`` with ``--save-every`` writes DeepSpeed checkpoints; ``--resume`` continues from the
latest one (same batches, same CSV).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import TASKS

import deepspeed_cdadam  # noqa: F401  (registers CDAdam, OneBitAdam, EF21 with DeepSpeed)
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent

FIELDS = ["step", "lr", "loss", "acc", "bytes_up", "bytes_down", "bytes_total", "wall_s", "test_loss", "test_acc"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--out", default="runs/latest", help="folder for steps.csv and summary.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-decay-at", type=float, nargs="*", default=[], help="fractions of --steps, e.g. 0.5 0.75")
    parser.add_argument("--lr-decay-factor", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    parser.add_argument("--eval-examples", type=int, default=2000, help="test examples (or text rows) evaluated")
    parser.add_argument("--width", type=int, default=16, help="resnet18-fashion: first-stage channels (64 = ResNet-18)")
    parser.add_argument("--size", choices=("tiny", "minilm"), default="tiny", help="bert-*: model size")
    parser.add_argument("--text-limit", type=int, default=30000, help="text tasks: glosses read")
    parser.add_argument("--seq-len", type=int, default=0, help="text tasks: tokens per row (0: the task's own)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="timeout of every collective")
    parser.add_argument("--save-dir", default="", help="DeepSpeed checkpoint folder")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    parser.add_argument(
        "--max-loss",
        type=float,
        default=0.0,
        help="stop as diverged (FloatingPointError) when the training loss exceeds this (0: only on NaN/inf)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="stop after this step, as if interrupted (lr schedule still spans --steps)",
    )
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    for name in ("steps", "eval_examples", "width", "text_limit", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 0 or args.seq_len == 1:
        parser.error(f"--seq-len must be 0 (the task's own) or >= 2, got {args.seq_len}")
    if any(not 0.0 < f < 1.0 for f in args.lr_decay_at):
        parser.error(f"--lr-decay-at takes fractions in (0, 1), got {args.lr_decay_at}")
    if (args.save_every or args.resume) and not args.save_dir:
        parser.error("--save-every and --resume need --save-dir")
    return args


def lr_schedule(args: argparse.Namespace):
    """Step decay: lr x factor at each fraction of the run in ``--lr-decay-at`` (the paper: 0.5 and 0.75)."""
    milestones = sorted(math.ceil(f * args.steps) for f in args.lr_decay_at)

    def factor(done: int) -> float:
        return args.lr_decay_factor ** sum(done >= m for m in milestones)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BytesMeter:
    """Bytes this rank sent: our optimizer's own count plus the engine's fp32 gradient all-reduces."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.engine_bytes = 0.0
        original = engine.allreduce_gradients
        numel_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters() if p.requires_grad)
        per_call = all_reduce_bytes_sent(numel_bytes, engine.dp_world_size)

        def counting_allreduce(*a, **k):
            self.engine_bytes += per_call
            return original(*a, **k)

        engine.allreduce_gradients = counting_allreduce

    def up_down(self) -> tuple[float, float]:
        stats = getattr(self.engine.basic_optimizer, "comm_stats", None)
        up = down = self.engine_bytes / 2  # ring all-reduce: reduce-scatter half, all-gather half
        if stats is not None:
            up += stats.bytes_up + stats.bytes_control
            down += stats.bytes_down
        return up, down


class StepLog:
    """``steps.csv``, written by rank 0 only (``path`` None elsewhere), flushed every row.

    Resuming at step ``first`` keeps the rows before it and drops later ones (written after the
    checkpoint, before an interruption), so the file reads as if the run never stopped.
    """

    def __init__(self, path: Path | None, first: int) -> None:
        self.path, self.first, self.file, self.writer = path, first, None, None

    def __enter__(self) -> StepLog:  # noqa: PYI034
        if self.path is None:
            return self
        kept = []
        if self.first > 1 and self.path.exists():
            with open(self.path) as fh:
                kept = [r for r in csv.DictReader(fh) if int(r["step"]) < self.first]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", newline="")  # closed in __exit__
        self.writer = csv.DictWriter(self.file, FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        return self

    def write(self, row: dict) -> None:
        if self.writer is not None:
            self.writer.writerow(row)
            self.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def collective_backend() -> str:
    """NCCL when there is a GPU (the model, the data and every collective then live on it), gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def evaluate(engine, task, batch_size: int) -> tuple[float, float]:
    """Test loss and accuracy, totalled over the ranks' evaluations. Where the ranks' models differ
    (LIEC-SGD between its averages) the model evaluated is their average, as its authors evaluate,
    and each rank's own model is put back afterwards."""
    own = None
    if getattr(engine.basic_optimizer, "PARAMETERS_PER_RANK", False):
        own = [p.detach().clone() for p in engine.module.parameters()]
        for p in engine.module.parameters():  # monitoring, not training: these bytes are not counted
            dist.all_reduce(p.data)
            p.data.div_(dist.get_world_size())
    engine.module.eval()
    total = torch.zeros(3, dtype=torch.float64, device=collective_device())  # loss x count, hits, count
    with torch.no_grad():
        for batch in task.eval_batches(batch_size):
            loss, hits, count = task.loss_and_hits(engine.module, batch.to(engine.device))
            total += torch.tensor([loss.item() * count, hits, count], dtype=torch.float64, device=total.device)
    engine.module.train()
    if own is not None:
        for p, mine in zip(engine.module.parameters(), own):
            p.data.copy_(mine)
    dist.all_reduce(total)
    return float(total[0] / total[2]), float(total[1] / total[2])


def finish(out: Path, summary: dict | None) -> None:
    """The end of a run: the rank holding ``summary`` writes ``summary.json`` and prints it (without the
    config); then every rank waits for the others and leaves the process group (a live group's threads
    can abort the interpreter's exit)."""
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    backend = collective_backend()
    if backend == "nccl":  # before any collective: NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()

    task = TASKS[args.task](args, rank, world)
    if args.seq_len:
        if not hasattr(task, "seq_len"):
            raise SystemExit(f"--seq-len: task {args.task} has no sequence length")
        task.seq_len = args.seq_len  # read by load_data (and by the models sized by it)
    task.load_data()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = task.build_model()
    torch.manual_seed(args.seed * 1000 + rank + 1)  # dropout differs per rank
    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lr_schedule(args),
    )
    meter = BytesMeter(engine)
    batch_size = engine.train_micro_batch_size_per_gpu()

    out = Path(args.out)
    first, wall_before = 1, 0.0
    if args.resume and os.path.exists(os.path.join(args.save_dir, "latest")):
        _, client = engine.load_checkpoint(args.save_dir)
        first = engine.global_steps + 1
        meter.engine_bytes = client["engine_bytes"]
        wall_before = client["wall_s"]
    start = time.perf_counter() - wall_before
    last = min(args.steps, args.stop_at) if args.stop_at else args.steps
    progress = tqdm(range(first, last + 1), disable=rank != 0, desc=f"{args.task} {engine.optimizer_name()}")
    test_loss = test_acc = float("nan")
    with StepLog(out / "steps.csv" if rank == 0 else None, first) as log:
        for step in progress:
            lr = engine.get_lr()[0]  # the lr this step uses
            loss, hits, count = task.loss_and_hits(engine, task.train_batch(step, batch_size).to(engine.device))
            engine.backward(loss)
            engine.step()
            mean_loss, all_hits, all_count = mean_over_ranks([loss.item(), hits, count])
            up, down = meter.up_down()
            row = {
                "step": step, "lr": lr, "loss": mean_loss / world, "acc": all_hits / all_count,
                "bytes_up": up, "bytes_down": down, "bytes_total": up + down, "wall_s": time.perf_counter() - start,
                "test_loss": "", "test_acc": "",
            }  # fmt: skip
            if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                test_loss, test_acc = evaluate(engine, task, batch_size)
                row.update(test_loss=test_loss, test_acc=test_acc)
            if not math.isfinite(row["loss"]) or (args.max_loss and row["loss"] > args.max_loss):
                raise FloatingPointError(f"Training loss is {row['loss']} at step {step}: lower the lr.")
            log.write(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", MB=f"{(up + down) / 1e6:.1f}")
            if args.save_every and step % args.save_every == 0:
                client = {"engine_bytes": meter.engine_bytes, "wall_s": row["wall_s"]}
                engine.save_checkpoint(args.save_dir, client_state=client)

    summary = None
    if rank == 0 and last == args.steps and first <= last:
        up, down = meter.up_down()
        summary = {
            "task": args.task,
            "optimizer": engine.optimizer_name(),
            "world_size": world,
            "steps": args.steps,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "final_train_loss": row["loss"],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_total": up + down,
            "wall_s": row["wall_s"],
            "config": json.loads(Path(args.deepspeed_config).read_text()),
        }
    finish(out, summary)


if __name__ == "__main__":
    main()

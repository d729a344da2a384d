"""Time to accuracy on the emulated cluster: whole training runs of every method over a rate-limited network.

    sudo python benchmarks/time_to_accuracy.py [--tasks resnet bert] [--rates 1gbit 10gbit] [--worlds 2 4]
        [--methods adamw ddp_powersgd1 ...] [--steps N] [--quick]

For each world size, ``emulated_cluster.Cluster`` puts one rank per network namespace (veth +
bridge, ``tc`` tbf at each rate); for each rate, task and method, one whole training run goes over
it: ``scripts/train.py`` (DeepSpeed methods: the committed ``configs/<task>_*.json`` scaled as
``scripts/compare.py`` scales them, with its step counts, micro batches and flags; CD-Adam: the task's
recommended config, ``compare.Study.cdadam_config``, blocks of 256 on BERT) or
``scripts/ddp_train.py`` (PyTorch DDP + AdamW with the task's Adam config and a comm hook). Methods
(``METHODS``): AdamW with DeepSpeed's fp32 all-reduce; DDP with PowerSGD (rank 1, 4; its default
warm-up, ``--powersgd-start-iter``), DDP with the bf16 compression hook; 1-bit Adam; CD-Adam
without and with ``overlap`` (``--overlap-bucket-mb``); and, not by default, DDP's plain fp32
all-reduce (``ddp_fp32``). Each rank runs this script's ``--worker``, which calls the trainer's
``main()`` with the trainer's own flags (DeepSpeed runs: plus ``--local_rank``; env ``LOCAL_RANK``,
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` as the launchers set them), after wrapping a few
seams for the profiler (``install_probes``; nothing in the trainers changes).

Per (task, rate, world): the target loss L is the worst final training loss (EMA over 20 steps,
``compare.ema``) among the runs that finished without diverging (``compare.diverged``), as
``compare.py``'s table; then for each run the wall time (``wall_s``: the trainer's clock from the
first step, process start-up and data loading excluded), step and bytes at which its EMA loss first
reached L, the final test loss and accuracy, and the speed-up over AdamW (its time to L / the run's).

Exposed communication, measured with ``torch.profiler`` (``profile_all_threads``) on ranks' steps
``--profile-steps`` (default: the three steps before the last, so after 1-bit Adam's warm-up and
PowerSGD's whenever they end within the run). A step's window runs from the call fetching its batch to
the end of ``optimizer.step()`` (the logging all-reduce after it is left out). Within it:

* communication (``comm_s``): the union of the intervals of collective events (``gloo:*`` /
  ``nccl:*``: a collective in flight on the backend's worker thread), the collective-launch ops on any
  thread (``c10d::*``) and every op on a thread other than the training (main) thread: the DDP comm
  hooks' callbacks (PowerSGD's compression), CD-Adam's communication thread (``overlap``: encoding,
  collectives, decoding; its fused kernels are marked ``tta::kernel::*`` here so that they show);
* compute: the union of the main thread's ops other than the ``c10d::*`` ones (forward, backward,
  optimizer arithmetic, the fused kernels when they run on the main thread); ranges opened from
  Python with ``record_function`` (``Optimizer.step#...``, ``DistributedDataParallel.forward``) are
  not ops: they can enclose a wait (the ops inside them count);
* ``exposed_s`` = the length of (communication minus compute): time in which communication is under way
  and the training thread computes nothing, i.e. waits for it (a wait, or a collective's launch; Python
  run between ops while a collective is in flight counts too, an overestimate of microseconds per op).

Reported per step: the median over the profiled steps, averaged over ranks. The profiled steps are
slower (every op is recorded; ``profiler_overhead_s``: the profiler's start and stop), and they count in
the run's wall time: 3 steps of hundreds. For CD-Adam with overlap
also the optimizer's own counters over the whole run: ``_overlap.exposed_s`` (what ``step()`` waited
for) over ``_overlap.prepare_s`` (the communication thread's exchange seconds).

Writes ``<results>/time_to_accuracy.{csv,md,json}``, one figure per rate
``time_to_accuracy_<rate>.png`` (EMA loss against wall time and against MB sent, one row per task
and world size), and each run's folder under ``<results>/time_to_accuracy/<task>_<rate>_w<world>/<method>/``
(``steps.csv``, ``summary.json``, per-rank logs and profiles). A run whose folder holds the same
settings and a summary is kept (``--fresh`` reruns). Without root or ``ip netns`` it says so and
exits 0. Runs that fail are reported as failed and the study goes on; the namespaces are removed at
the end, on error and on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCRIPTS = ROOT / "scripts"
DEFAULT_RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(SCRIPTS))

MARK = "tta::step"
KERNEL_MARK = "tta::kernel::"
COMM_PREFIXES = ("gloo:", "nccl:", "mpi:", "c10d::")
TARGET_SPEEDUP_1GBIT = 5.0  # issue 16: CD-Adam reaches L >= 5x sooner than AdamW-fp32 at 1 Gbit/s


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    trainer: str  # "ds": scripts/train.py; "ddp": scripts/ddp_train.py
    config: str  # configs/<task prefix>_<config>.json
    hook: str | None = None  # ddp_train.py --hook
    params: dict = field(default_factory=dict)  # added to the config's optimizer.params


METHODS = {
    m.name: m
    for m in (
        Method("adamw", "AdamW (DeepSpeed, fp32 all-reduce)", "ds", "adam"),
        Method("ddp_powersgd1", "DDP + PowerSGD rank 1", "ddp", "adam", "powersgd1"),
        Method("ddp_powersgd4", "DDP + PowerSGD rank 4", "ddp", "adam", "powersgd4"),
        Method("ddp_bf16", "DDP + bf16 compression hook", "ddp", "adam", "bf16"),
        Method("onebitadam", "1-bit Adam", "ds", "onebitadam"),
        Method("cdadam", "CD-Adam", "ds", "cdadam"),
        Method("cdadam_overlap", "CD-Adam, overlap", "ds", "cdadam", params={"overlap": True}),
        Method("ddp_fp32", "DDP, fp32 all-reduce", "ddp", "adam", "none"),
    )
}
DEFAULT_METHODS = [m for m in METHODS if m != "ddp_fp32"]
BASELINE = "adamw"
CDADAM_METHODS = ("cdadam", "cdadam_overlap")
RIVALS = ("ddp_powersgd1", "ddp_powersgd4", "ddp_bf16")  # what the targets compare CD-Adam with
TASK_ALIASES = {"resnet": "resnet", "bert": "bert_mlm", "bert_mlm": "bert_mlm"}


# ----------------------------------------------------------------------------- studies
def studies(quick: bool, steps: int | None) -> dict:
    """compare.py's studies (steps, micro batch, flags); ``quick``: tiny models and data, 12 steps."""
    import compare

    out = {s.name: s for s in compare.studies(quick=False)}
    if quick:
        out["resnet"] = compare.Study(
            "resnet", "resnet18-fashion", "resnet", 12, 16, ("--width", "4", "--eval-examples", "64")
        )
        out["bert_mlm"] = compare.Study(
            "bert_mlm", "bert-mlm", "bert", 12, 4,
            ("--size", "tiny", "--text-limit", "2000", "--eval-examples", "32"), cdadam_config="cdadam_block256",
        )  # fmt: skip
    if steps:
        out = {k: compare.Study(**{**vars(s), "steps": steps}) for k, s in out.items()}
    return out


def default_profile_steps(steps: int) -> list[int]:
    """The three steps before the last (at least step 1)."""
    return sorted({max(1, s) for s in range(steps - 3, steps)}) or [1]


def run_spec(study, method: Method, args: argparse.Namespace, out: Path) -> dict:
    """What the worker runs: trainer, its argv (config written into ``out``), the profiled steps."""
    import compare

    # CD-Adam runs the task's recommended config (blocks of 256 on BERT: compare.Study.cdadam_config)
    name = study.cdadam_config if method.config == "cdadam" else method.config
    config_path = compare.write_config(study, name, None, study.steps, out / "config.json")
    config = json.loads(config_path.read_text())
    params = dict(method.params)
    if args.lr:
        params["lr"] = args.lr
    if params.get("overlap") and args.overlap_bucket_mb:
        params["bucket_cap_mb"] = args.overlap_bucket_mb
    if params:
        config["optimizer"]["params"].update(params)
        config["_description"] += f" [time_to_accuracy.py: {params}]"
        config_path.write_text(json.dumps(config, indent=1))
    argv = ["--deepspeed_config", str(config_path), "--task", study.task, "--steps", str(study.steps),
            "--out", str(out), "--threads", str(args.threads), *study.flags]  # fmt: skip
    if method.hook:
        argv += ["--hook", method.hook]
        if method.hook.startswith("powersgd") and args.powersgd_start_iter:
            argv += ["--powersgd-start-iter", str(args.powersgd_start_iter)]
    return {
        "method": method.name,
        "trainer": method.trainer,
        "argv": argv,
        "profile_steps": args.profile_steps or default_profile_steps(study.steps),
        "trace": args.trace,
        "config": config,
        "out": str(out),
    }


# ----------------------------------------------------------------------------- worker (one rank)
class StepProfiler:
    """Profiles the steps ``steps`` of this rank: ``begin(step)`` when the step's batch is fetched,
    ``end()`` when the trainer logs the step (after ``optimizer.step()``)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps, self.prof, self.mark, self.current, self.overhead_s = steps, None, None, None, 0.0
        self.active = False

    def begin(self, step: int) -> None:
        import torch

        if step not in self.steps:
            return
        if self.prof is None:
            start = time.perf_counter()
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True),
            )
            self.prof.start()
            self.active = True
            self.overhead_s += time.perf_counter() - start
        self.current = step
        self.mark = torch.autograd.profiler.record_function(MARK)
        self.mark.__enter__()

    def end(self) -> None:
        if self.mark is None:
            return
        self.mark.__exit__(None, None, None)
        self.mark = None
        if self.current == max(self.steps):
            self.stop()

    def stop(self) -> None:
        if self.active:
            start = time.perf_counter()
            self.prof.stop()
            self.active = False
            self.overhead_s += time.perf_counter() - start

    def events(self) -> list[tuple[str, int, float, float, bool]]:
        """(name, thread, start us, end us, whether a ``record_function`` range) of every profiled event."""
        if self.prof is None:
            return []
        self.stop()
        return [
            (e.name, e.thread, e.time_range.start, e.time_range.end, bool(e.is_user_annotation))
            for e in self.prof.events()
        ]


def install_probes(profiler: StepProfiler) -> dict:
    """Wrap the trainers' seams (nothing in them changes): the task's ``train_batch`` (a step begins),
    ``train.mean_over_ranks`` (the step's update is done), CD-Adam's fused-kernel calls (marked, so the
    profiler sees them) and ``deepspeed.initialize`` (to read the optimizer's overlap counters)."""
    import deepspeed
    import tasks
    import torch
    import train

    import deepspeed_cdadam.kernels as kernels

    seen: dict = {}
    train_batch = tasks.Task.train_batch

    def timed_train_batch(self, step, batch_size):
        profiler.begin(step)
        return train_batch(self, step, batch_size)

    tasks.Task.train_batch = timed_train_batch
    mean_over_ranks = train.mean_over_ranks

    def step_done(values):
        profiler.end()
        return mean_over_ranks(values)

    train.mean_over_ranks = step_done
    call = kernels._call

    def marked_call(name, *a):
        if not profiler.active:
            return call(name, *a)
        with torch.autograd.profiler.record_function(KERNEL_MARK + name):
            return call(name, *a)

    kernels._call = marked_call
    initialize = deepspeed.initialize

    def keep_engine(*a, **k):
        result = initialize(*a, **k)
        seen["engine"] = result[0]
        return result

    deepspeed.initialize = keep_engine
    return seen


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    os.environ.setdefault("LOCAL_RANK", str(rank))
    if spec["trainer"] == "ds":
        import train as trainer

        argv = [*spec["argv"], "--local_rank", str(rank)]
    else:
        import ddp_train as trainer

        argv = spec["argv"]
    profiler = StepProfiler(spec["profile_steps"])
    seen = install_probes(profiler)
    sys.argv = [trainer.__file__, *argv]
    try:
        trainer.main()
    finally:
        record = {"rank": rank, "profile_steps": spec["profile_steps"], "profiler_overhead_s": profiler.overhead_s}
        events = profiler.events()
        record["per_step"] = comm_breakdown(events, spec["profile_steps"])
        if spec.get("trace") and rank == 0:
            Path(spec["out"], "trace_rank0.json").write_text(json.dumps(events))
        engine = seen.get("engine")
        opt = getattr(engine, "basic_optimizer", None)
        overlap = getattr(opt, "_overlap", None)
        if overlap is not None:
            record["overlap"] = {
                "prepare_s": overlap.prepare_s,
                "exposed_s": overlap.exposed_s,
                "started_during_backward": overlap.started_during_backward,
                "buckets": len(opt.buckets()),
                "steps": int(engine.global_steps),
            }
        Path(spec["out"], f"profile_rank{rank}.json").write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- exposed communication
def _union(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _subtract(a, b) -> list[tuple[float, float]]:
    """``a`` minus ``b`` (both unions: sorted, disjoint)."""
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, cur = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _clip(a, lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(s, lo), min(e, hi)) for s, e in a if e > lo and s < hi]


def _length(a) -> float:
    return sum(e - s for s, e in a)


def is_comm(name: str) -> bool:
    return name.startswith(COMM_PREFIXES)


def comm_breakdown(events: list[tuple[str, int, float, float, bool]], steps: list[int]) -> list[dict]:
    """Per profiled step (windows: the ``tta::step`` events, in order): ``step_s``, ``comm_s``,
    ``compute_s`` and ``exposed_s`` as the module docstring defines them. ``events`` are
    (name, thread, start us, end us, whether a ``record_function`` range). Ranges opened by Python code
    (``Optimizer.step#CDAdam.step``, ``DistributedDataParallel.forward``, ...) can enclose a wait for
    communication, so they are not compute themselves (the ops inside them are); the ``tta::kernel::``
    ranges are (they enclose one fused-kernel call each)."""
    windows = sorted((s, e, t) for n, t, s, e, _ in events if n == MARK)
    if not windows:
        return []
    main = windows[0][2]
    comm = _union((s, e) for n, t, s, e, _ in events if n != MARK and (is_comm(n) or t != main))
    launches = _union((s, e) for n, t, s, e, _ in events if t == main and is_comm(n))
    ops = _union(
        (s, e)
        for n, t, s, e, annotation in events
        if t == main and n != MARK and not is_comm(n) and (not annotation or n.startswith(KERNEL_MARK))
    )
    compute = _subtract(ops, launches)
    out = []
    for step, (lo, hi, _) in zip(steps, windows):
        c = _clip(comm, lo, hi)
        out.append({
            "step": step,
            "step_s": (hi - lo) / 1e6,
            "comm_s": _length(c) / 1e6,
            "compute_s": _length(_clip(compute, lo, hi)) / 1e6,
            "exposed_s": _length(_subtract(c, compute)) / 1e6,
        })  # fmt: skip
    return out


# ----------------------------------------------------------------------------- launching
def launch(cluster, spec_path: Path, out: Path, timeout_s: float) -> str | None:
    """Run the worker once per rank in its namespace (``Cluster.run_ranks``, output to ``out/rank<r>.log``).
    Returns None, or why the run failed."""
    try:
        cluster.run_ranks([str(spec_path)], timeout_s, script=str(Path(__file__).resolve()), logs_dir=out, cwd=ROOT)
    except RuntimeError as err:
        return str(err)
    return None


def error_of(out: Path, world: int) -> str:
    """The last exception line of the ranks' logs."""
    for rank in range(world):
        log = out / f"rank{rank}.log"
        if log.exists():
            lines = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x or "error" in x]
            if lines:
                return lines[-1].strip()[:300]
    return ""


def run_one(cluster, study, method: Method, rate: str, args: argparse.Namespace) -> dict:
    """One whole training run (or the kept one); returns its record for the report."""
    tag = f"{study.task}/{rate}/w{cluster.world}/{method.name}"
    out = args.results / "time_to_accuracy" / f"{study.name}_{rate}_w{cluster.world}" / method.name
    out.mkdir(parents=True, exist_ok=True)
    spec = run_spec(study, method, args, out)
    spec.update(rate=rate, world=cluster.world)
    spec_path = out / "spec.json"
    old = json.loads(spec_path.read_text()) if spec_path.exists() else None
    record = {"task": study.task, "study": study.name, "rate": rate, "world": cluster.world, "method": method.name,
              "steps": study.steps, "micro_batch": study.micro_batch, "out": out}  # fmt: skip
    if old == spec and (out / "summary.json").exists() and not args.fresh:
        print(f"[time_to_accuracy] {tag}: done before with these settings, kept", flush=True)
        return {**record, "status": "ok"}
    for stale in ("steps.csv", "summary.json", *[p.name for p in out.glob("profile_rank*.json")]):
        (out / stale).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    print(f"[time_to_accuracy] {tag}: {study.steps} steps ...", flush=True)
    started = time.perf_counter()
    failure = launch(cluster, spec_path, out, args.run_timeout)
    status = "ok"
    if failure:
        reason = error_of(out, cluster.world)
        status = "diverged" if "FloatingPointError" in reason else f"failed: {failure}; {reason}"
    print(f"[time_to_accuracy] {tag}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {**record, "status": status}


# ----------------------------------------------------------------------------- report
def _read(record: dict) -> tuple[list[dict], dict, list[dict]]:
    import compare

    out = record["out"]
    rows = compare.read_rows(out) if (out / "steps.csv").exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    profiles = [json.loads(p.read_text()) for p in sorted(out.glob("profile_rank*.json"))]
    return rows, summary, profiles


def _mean(values: list[float]) -> float | str:
    """Mean over ranks; "" when there is nothing (the method has no such counter)."""
    return statistics.fmean(values) if values else ""


def _median_over_steps_mean_over_ranks(profiles: list[dict], key: str) -> float:
    per_rank = [statistics.median(s[key] for s in p["per_step"]) for p in profiles if p.get("per_step")]
    return statistics.fmean(per_rank) if per_rank else float("nan")


def warmup_steps(method: str, spec: dict) -> int | None:
    """Steps the method runs uncompressed first: 1-bit Adam's ``freeze_step``, PowerSGD's ``start_powerSGD_iter``."""
    if method == "onebitadam":
        return int(spec["config"]["optimizer"]["params"].get("freeze_step", 0))
    if method.startswith("ddp_powersgd"):
        argv = spec["argv"]
        if "--powersgd-start-iter" in argv:
            return int(argv[argv.index("--powersgd-start-iter") + 1])
        from ddp_train import POWERSGD_DEFAULTS

        return int(POWERSGD_DEFAULTS["start_powerSGD_iter"])
    return None


def _phase(method: str, step: int, spec: dict) -> str:
    """What the profiled steps ran: the compressed phase or a warm-up's fp32 all-reduce."""
    warmup = warmup_steps(method, spec)
    if warmup is not None and step <= warmup:
        return "warm-up (fp32)"
    return "compressed" if method not in ("adamw", "ddp_fp32") else "fp32"


def analyse(records: list[dict]) -> list[dict]:
    """One report row per run, with the group's target loss and each run's time to it."""
    import compare

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["study"], r["rate"], r["world"]), []).append(r)
    table = []
    for (_, rate, world), runs in groups.items():
        loaded = {r["method"]: (r, *_read(r)) for r in runs}
        done = {m: x for m, x in loaded.items() if x[0]["status"] == "ok" and x[1] and x[2]}
        finals = {m: compare.ema([row["loss"] for row in x[1]])[-1] for m, x in done.items()}
        good = [m for m, x in done.items() if not compare.diverged(x[1])]
        target = max((finals[m] for m in good), default=float("nan"))
        reach: dict[str, dict | None] = {}
        for m, (r, rows, summary, profiles) in loaded.items():
            reach[m] = None
            if m in good:
                for row, smooth in zip(rows, compare.ema([x["loss"] for x in rows])):
                    if smooth <= target:
                        reach[m] = row
                        break
        base = reach.get(BASELINE)
        for m, (r, rows, summary, profiles) in loaded.items():
            status = r["status"]
            if status == "ok" and m in done and m not in good:
                status = "diverged"
            spec = json.loads((r["out"] / "spec.json").read_text())
            hit = reach[m]
            overlaps = [p["overlap"] for p in profiles if p.get("overlap")]
            steps_run = len(rows)
            row = {
                "task": r["task"], "rate": rate, "world": world, "method": m, "label": METHODS[m].label,
                "status": status, "steps": r["steps"], "micro_batch": r["micro_batch"],
                "params": summary.get("params", ""),
                "final_ema_loss": finals.get(m, float("nan")), "target_loss": target,
                "wall_to_target_s": hit["wall_s"] if hit else float("nan"),
                "steps_to_target": int(hit["step"]) if hit else "",
                "bytes_to_target": hit["bytes_total"] if hit else float("nan"),
                "speedup_vs_adamw": (base["wall_s"] / hit["wall_s"]) if (hit and base) else float("nan"),
                "test_loss": summary.get("test_loss", float("nan")), "test_acc": summary.get("test_acc", float("nan")),
                "wall_s": rows[-1]["wall_s"] if rows else float("nan"),
                "s_per_step": rows[-1]["wall_s"] / steps_run if rows else float("nan"),
                "bytes_total": rows[-1]["bytes_total"] if rows else float("nan"),
                "bytes_per_step": rows[-1]["bytes_total"] / steps_run if rows else float("nan"),
                "warmup_steps": warmup_steps(m, spec) if warmup_steps(m, spec) is not None else "",
                "profiled_steps": " ".join(str(s) for s in spec["profile_steps"]),
                "profiled_phase": _phase(m, max(spec["profile_steps"]), spec),
                "prof_step_s": _median_over_steps_mean_over_ranks(profiles, "step_s"),
                "prof_compute_s": _median_over_steps_mean_over_ranks(profiles, "compute_s"),
                "prof_comm_s": _median_over_steps_mean_over_ranks(profiles, "comm_s"),
                "exposed_comm_s": _median_over_steps_mean_over_ranks(profiles, "exposed_s"),
                "overlap_prepare_s_per_step": _mean([o["prepare_s"] / max(o["steps"], 1) for o in overlaps]),
                "overlap_exposed_s_per_step": _mean([o["exposed_s"] / max(o["steps"], 1) for o in overlaps]),
                "overlap_exposed_over_prepare": _mean([o["exposed_s"] / o["prepare_s"] for o in overlaps
                                                       if o["prepare_s"] > 0]),
                "overlap_buckets": overlaps[0]["buckets"] if overlaps else "",
                "profiler_overhead_s": max((p.get("profiler_overhead_s", 0.0) for p in profiles), default=""),
                "run_dir": "/".join(r["out"].parts[-3:]),
            }  # fmt: skip
            table.append(row)
    return table


def _fmt(v, spec: str = ".3f") -> str:
    if v == "" or v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def speedup_bound(baseline: dict) -> float | None:
    """The most any method can gain per step over AdamW by cutting communication: AdamW's profiled step
    time over that time less its exposed communication (every other cost unchanged)."""
    step, exposed = baseline.get("prof_step_s"), baseline.get("exposed_comm_s")
    measured = all(isinstance(v, float) and math.isfinite(v) for v in (step, exposed))  # NaN: not profiled
    if not measured or step <= exposed:
        return None
    return step / (step - exposed)


def target_lines(table: list[dict]) -> list[str]:
    """The issue's targets, per (task, world): at 1gbit CD-Adam >= 5x sooner than AdamW and sooner than
    PowerSGD and bf16 DDP; at 10gbit no slower than any of them."""
    lines = []
    keys = dict.fromkeys((r["task"], r["rate"], r["world"]) for r in table)
    for task, rate, world in keys:
        by = {r["method"]: r for r in table if (r["task"], r["rate"], r["world"]) == (task, rate, world)}
        for cd in CDADAM_METHODS:
            if cd not in by:
                continue
            t = by[cd]["wall_to_target_s"]
            if not isinstance(t, float) or math.isnan(t):
                lines.append(f"- {task}, {rate}, {world} ranks: {METHODS[cd].label} did not reach L")
                continue
            checks = []
            others = [m for m in (BASELINE, *RIVALS) if m in by]
            if rate == "1gbit" and BASELINE in by:
                s = by[cd]["speedup_vs_adamw"]
                ok = isinstance(s, float) and s >= TARGET_SPEEDUP_1GBIT
                bound = speedup_bound(by[BASELINE])
                checks.append(f">= {TARGET_SPEEDUP_1GBIT:.0f}x sooner than AdamW: {_fmt(s, '.2f')}x "
                              f"({'meets' if ok else 'misses'}; per step at most {_fmt(bound, '.2f')}x here, "
                              "AdamW's step without its exposed communication)")  # fmt: skip
            for m in others if rate != "1gbit" else [m for m in RIVALS if m in by]:
                o = by[m]["wall_to_target_s"]
                if rate == "1gbit":
                    ok = math.isnan(o) or t < o
                    checks.append(f"sooner than {METHODS[m].label}: {_fmt(t, '.1f')} s vs {_fmt(o, '.1f')} s "
                                  f"({'meets' if ok else 'misses'})")  # fmt: skip
                else:
                    ok = math.isnan(o) or t <= o
                    checks.append(f"no slower than {METHODS[m].label}: {_fmt(t, '.1f')} s vs {_fmt(o, '.1f')} s "
                                  f"({'meets' if ok else 'misses'})")  # fmt: skip
            lines.append(f"- {task}, {rate}, {world} ranks, {METHODS[cd].label}: " + "; ".join(checks))
    return lines


def report(table: list[dict], machine: str, args: argparse.Namespace) -> list[str]:
    lines = [
        "# Time to accuracy on the emulated cluster",
        "",
        f"Written by `benchmarks/time_to_accuracy.py`{' --quick (a smoke test, not a result)' if args.quick else ''}. "
        f"machine: {machine}. Ranks in network namespaces (veth + bridge, tc tbf per rank), gloo, "
        f"{args.threads} torch thread(s) per rank. L: the worst final EMA training loss among the runs that "
        "finished without diverging; times are the trainers' wall clocks from the first step. Exposed "
        "communication: median over the profiled steps of the time communication was under way while the "
        "training thread computed nothing (definition in the script's docstring), mean over ranks.",
        "",
    ]
    groups = dict.fromkeys((r["task"], r["rate"], r["world"]) for r in table)
    for task, rate, world in groups:
        rows = [r for r in table if (r["task"], r["rate"], r["world"]) == (task, rate, world)]
        lines += [
            f"## {task}, {rate}, {world} ranks ({rows[0]['steps']} steps, micro batch {rows[0]['micro_batch']}, "
            f"{_fmt(rows[0]['params'], ',')} params); L = {_fmt(rows[0]['target_loss'], '.4f')}",
            "",
            "| method | status | final loss (EMA) | wall s to L | speed-up vs AdamW | step to L | MB to L | test acc "
            "| wall s | s/step | MB/step | profiled (phase) | step s | comm s | exposed comm s/step "
            "| overlap exposed/prepare |",
            "|---" * 16 + "|",
        ]
        for r in rows:
            lines.append(
                f"| {r['label']} | {r['status']} | {_fmt(r['final_ema_loss'], '.4f')} "
                f"| {_fmt(r['wall_to_target_s'], '.1f')} "
                f"| {_fmt(r['speedup_vs_adamw'], '.2f')} | {_fmt(r['steps_to_target'], 'd')} "
                f"| {_fmt(r['bytes_to_target'] / 1e6 if isinstance(r['bytes_to_target'], float) else '', '.1f')} "
                f"| {_fmt(r['test_acc'], '.4f')} | {_fmt(r['wall_s'], '.1f')} | {_fmt(r['s_per_step'], '.3f')} "
                f"| {_fmt(r['bytes_per_step'] / 1e6 if isinstance(r['bytes_per_step'], float) else '', '.3f')} "
                f"| {r['profiled_steps']} ({r['profiled_phase']}) | {_fmt(r['prof_step_s'], '.3f')} "
                f"| {_fmt(r['prof_comm_s'], '.3f')} | {_fmt(r['exposed_comm_s'], '.3f')} "
                f"| {_fmt(r['overlap_exposed_over_prepare'], '.2f')} |"
            )
        base = next((r for r in rows if r["method"] == BASELINE), None)
        bound = speedup_bound(base) if base else None
        if bound is not None:
            lines += ["", f"AdamW's profiled step: {base['prof_step_s']:.3f} s, of which {base['exposed_comm_s']:.3f} s "
                      f"exposed communication: removing all of it would make a step at most {bound:.2f}x faster."]  # fmt: skip
        for r in rows:
            if r["warmup_steps"] != "" and r["warmup_steps"] >= r["steps"]:
                lines += ["", f"Note: {r['label']}'s warm-up ({r['warmup_steps']} uncompressed steps) spans the "
                          f"whole {r['steps']}-step run: it never compressed."]  # fmt: skip
        lines += ["", f"![{rate}](time_to_accuracy_{rate}.png)", ""]
    lines += ["## Targets (issue 16)", "", *target_lines(table), ""]
    return lines


def plot(table: list[dict], records: list[dict], results: Path) -> list[Path]:
    import compare
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for rate in dict.fromkeys(r["rate"] for r in table):
        keys = list(dict.fromkeys((r["task"], r["world"]) for r in table if r["rate"] == rate))
        fig, axes = plt.subplots(len(keys), 2, figsize=(13, 4 * len(keys)), squeeze=False)
        for (task, world), ax_row in zip(keys, axes):
            mine = [r for r in table if (r["task"], r["rate"], r["world"]) == (task, rate, world)]
            status, target = {r["method"]: r["status"] for r in mine}, mine[0]["target_loss"]
            kept = []
            for rec in records:
                if (rec["task"], rec["rate"], rec["world"]) != (task, rate, world):
                    continue
                rows = _read(rec)[0]
                if not rows:
                    continue
                smooth = compare.ema([x["loss"] for x in rows])
                label = METHODS[rec["method"]].label
                if status[rec["method"]] == "ok":
                    kept += smooth
                else:
                    label += f" ({status[rec['method']].split(':')[0]})"
                ax_row[0].plot([x["wall_s"] for x in rows], smooth, label=label)
                ax_row[1].plot([max(x["bytes_total"], 1.0) / 1e6 for x in rows], smooth, label=label)
            for ax in ax_row:
                if not math.isnan(target):
                    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"L = {target:.3f}")
                if kept:  # the runs that trained; a diverged one leaves the top of the plot
                    low, high = min(kept), max(kept)
                    ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            ax_row[0].set(xlabel="wall s", ylabel="training loss (EMA 20)",
                          title=f"{task}, {rate}, {world} ranks: loss vs wall time")  # fmt: skip
            ax_row[1].set(xlabel="MB sent by one rank (log)", xscale="log", ylabel="training loss (EMA 20)",
                          title=f"{task}, {rate}, {world} ranks: loss vs bytes")  # fmt: skip
        fig.tight_layout()
        path = results / f"time_to_accuracy_{rate}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["resnet", "bert"], choices=sorted(TASK_ALIASES))
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="steps of every run (default: compare.py's per task)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 12 steps: a smoke test")
    parser.add_argument("--lr", type=float, default=None,
                        help="every method's lr (default: the configs'; --quick: 3e-3)")  # fmt: skip
    parser.add_argument("--profile-steps", type=int, nargs="+", default=None,
                        help="steps profiled (default: the three before the last)")  # fmt: skip
    parser.add_argument("--powersgd-start-iter", type=int, default=None,
                        help="PowerSGD's warm-up (default: PowerSGDState's own, 1000; --quick: 2)")  # fmt: skip
    parser.add_argument("--overlap-bucket-mb", type=float, default=None,
                        help="CD-Adam overlap's bucket_cap_mb (default: CD-Adam's, 25)")  # fmt: skip
    parser.add_argument("--trace", action="store_true",
                        help="also keep rank 0's profiled events (trace_rank0.json in each run's folder)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--run-timeout", type=float, default=4 * 3600.0, help="seconds per run")
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already have a summary")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    if args.quick and args.powersgd_start_iter is None:
        args.powersgd_start_iter = 2
    if args.quick and args.lr is None:
        args.lr = 3e-3  # so that 12 steps lower the loss (a run whose loss does not fall counts as diverged)
    if args.powersgd_start_iter is not None and args.powersgd_start_iter < 2:
        parser.error("--powersgd-start-iter must be >= 2")
    args.results = args.results.resolve()
    return args


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    args = parse_args()
    from emulated_cluster import Cluster, begin

    machine = begin("time_to_accuracy")
    if machine is None:
        return
    all_studies = studies(args.quick, args.steps)
    chosen = [all_studies[TASK_ALIASES[t]] for t in dict.fromkeys(args.tasks)]
    args.results.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    records, namespaces = [], []
    for world in args.worlds:
        with Cluster(world) as cluster:
            namespaces += cluster.namespaces + [cluster.bridge]
            for rate in args.rates:
                cluster.limit(rate)
                for study in chosen:
                    for name in args.methods:
                        records.append(run_one(cluster, study, METHODS[name], rate, args))
    table = analyse(records)
    lines = report(table, machine, args)
    print("\n".join(lines))
    (args.results / "time_to_accuracy.md").write_text("\n".join(lines) + "\n")
    with open(args.results / "time_to_accuracy.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(table, records, args.results)
    meta = {"started": started, "machine": machine, "argv": sys.argv[1:], "namespaces_and_bridges": namespaces}
    (args.results / "time_to_accuracy.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()

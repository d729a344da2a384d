"""LLM fine-tuning head-to-head on 2 CPU ranks: SmolLM2-135M-Instruct, AdamW vs CD-Adam vs 1-bit Adam.

    python scripts/llm_compare.py              # the whole study (11 runs of 80 steps, ~75-90 min on 2 cores)
    python scripts/llm_compare.py --quick      # a smoke version (a few steps per run; not a result)
    python scripts/llm_compare.py --diagnose   # also (first) the short lr-4e-4 runs of issue 16's divergence
    python scripts/llm_compare.py --gap        # also where CD-Adam's gap to AdamW comes from (~80 min more)
    python scripts/llm_compare.py --report     # only rewrite the tables and plots from the runs on disk

Stages, each run one ``deepspeed --num_gpus 2 scripts/train.py`` with a config built from a committed
``configs/llm_*.json`` (micro batch, lr, 1-bit Adam's ``freeze_step`` = 13% of the run, written to
``results/llm/configs/``):

1. lr sweep: every optimizer at each lr of ``SWEEP_LRS``, seed 0, the full run length;
2. seeds: each optimizer at its best sweep lr (lowest final eval loss), seeds ``SEEDS`` (seed 0 is the
   sweep's run, kept).

Resumable at the granularity of a run: a run whose ``summary.json`` (or ``failed.json``, a diverged run)
sits next to a ``settings.json`` equal to the planned one is kept; an interrupted run starts again from
step 1 (checkpoints of model and optimizer state would be 2-4 GB per rank, for at most one run of minutes).

Writes ``results/llm/``: ``runs/<tag>/`` (steps.csv, summary.json, settings.json; the launcher's log goes to
``results/tmp/llm_logs/``),
``summary.csv`` (one row per run), ``comparison.md`` (sweep table, mean ± spread over seeds, bytes),
``llm.png`` (eval / train loss vs steps and vs bytes), ``llm_lr_sweep.png``; with ``--diagnose`` also
``diagnosis.md`` and ``llm_diagnosis.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ema, read_rows, standard_error_of_difference  # noqa: E402  (also selects matplotlib's Agg backend)

import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "smollm2"
WARMUP_FRACTION = 0.13  # 1-bit Adam's fp32 warm-up (freeze_step), as in compare.py
LABELS = {"adamw": "AdamW (fp32 all-reduce)", "cdadam": "CD-Adam", "onebitadam": "1-bit Adam"}
CONFIGS = {opt: f"llm_{opt}.json" for opt in LABELS}
#: 1-bit Adam lower: its variance freezes at 1.3% of its steady value (13 steps of beta2 0.999, no bias
#: correction), so its steps after the freeze are ~9x Adam's at the same lr; at 3e-5 it trained through the warm-up
#: (eval loss 3.98 at step 10) and blew up right after the freeze (loss 7.4 at step 16, 792 at step 18)
#: 3e-5 was added after the first study chose 1e-4, the sweep's lowest, for both (an edge of the sweep);
#: then 1e-5 for CD-Adam, which chose 3e-5 (the edge again; AdamW kept 1e-4)
SWEEP_LRS = {
    "adamw": (3e-5, 1e-4, 3e-4, 1e-3),
    "cdadam": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
    "onebitadam": (3e-5,),  # 1e-5 too was planned; cut to fit the session (3e-5 diverged after the freeze)
}
SEEDS = {"adamw": (0, 1, 2), "cdadam": (0, 1, 2), "onebitadam": (0,)}
QUICK_SEEDS = {"adamw": (0, 1), "cdadam": (0, 1), "onebitadam": (0,)}


@dataclass(frozen=True)
class Budget:
    """How long every run is and what train.py is told (the same for every optimizer)."""

    steps: int
    micro_batch: int
    seq_len: int
    eval_every: int
    eval_examples: int
    text_limit: int
    max_loss: float = 0.0  # stop a run as diverged above this training loss (0: only on NaN/inf)

    def flags(self) -> list[str]:
        flags = [
            "--seq-len", str(self.seq_len),
            "--eval-every", str(self.eval_every),
            "--eval-examples", str(self.eval_examples),
            "--text-limit", str(self.text_limit),
        ]  # fmt: skip
        return flags + (["--max-loss", f"{self.max_loss:g}"] if self.max_loss else [])


#: max_loss 12: above ln(49,152) = 10.8, the loss of uniform logits (training starts at ~5.8)
FULL = Budget(steps=80, micro_batch=4, seq_len=32, eval_every=20, eval_examples=128, text_limit=20000, max_loss=12)
QUICK = Budget(steps=4, micro_batch=4, seq_len=32, eval_every=2, eval_examples=16, text_limit=2000, max_loss=12)
#: issue 16's divergence, cheaper: lr 4e-4, betas (0.9, 0.999), wd 0.01 (the BERT configs), 25 steps
DIAGNOSIS = Budget(steps=25, micro_batch=4, seq_len=32, eval_every=5, eval_examples=128, text_limit=20000)
DIAGNOSIS_QUICK = Budget(steps=3, micro_batch=4, seq_len=32, eval_every=1, eval_examples=16, text_limit=2000)
#: the gap study's longer runs: 3x the study's steps, the same batches and eval rows
LONG = Budget(steps=240, micro_batch=4, seq_len=32, eval_every=40, eval_examples=128, text_limit=20000, max_loss=12)
LONG_QUICK = Budget(steps=6, micro_batch=4, seq_len=32, eval_every=3, eval_examples=16, text_limit=2000, max_loss=12)


@dataclass
class Run:
    tag: str  # folder under results/llm/runs/
    optimizer: str  # key of LABELS, or a diagnosis variant
    config: dict
    budget: Budget
    seed: int = 0
    lr: float | None = None
    label: str = ""
    rows: list[dict] = field(default_factory=list)
    summary: dict | None = None
    failed: str = ""  # why the run stopped early (a non-finite loss or one above --max-loss), or ""

    def settings(self) -> dict:
        return {"task": TASK, "steps": self.budget.steps, "seed": self.seed, "flags": self.budget.flags(),
                "config": self.config}  # fmt: skip

    @property
    def eval_loss(self) -> float:
        return self.summary["test_loss"] if self.summary else math.inf

    @property
    def diverged(self) -> bool:
        """Stopped early (``failed``), or its final training loss (EMA) above the first step's."""
        if self.failed:
            return True
        return len(self.rows) > 1 and ema([r["loss"] for r in self.rows])[-1] >= self.rows[0]["loss"]


def same_settings(stored: dict, planned: dict) -> bool:
    """Equal but for the configs' ``_description`` (editing a committed file's text reruns nothing)."""

    def strip(settings: dict) -> dict:
        config = {k: v for k, v in settings.get("config", {}).items() if k != "_description"}
        return {**settings, "config": config}

    return strip(stored) == strip(planned)


def make_config(base: str, budget: Budget, *, lr: float | None = None, **params) -> dict:
    """A committed config with this budget's micro batch, ``lr`` and extra optimizer ``params``."""
    config = json.loads((ROOT / "configs" / base).read_text())
    config["train_micro_batch_size_per_gpu"] = budget.micro_batch
    p = config["optimizer"]["params"]
    if "freeze_step" in p:
        p["freeze_step"] = max(1, round(WARMUP_FRACTION * budget.steps))
    if lr is not None:
        p["lr"] = lr
    p.update(params)
    config["_description"] += f" [llm_compare.py: micro batch {budget.micro_batch}, {budget.steps} steps]"
    return config


class Runner:
    """Runs (or keeps) runs, with one progress bar over all planned steps."""

    def __init__(self, results: Path, fresh: bool, total_steps: int, logs: Path) -> None:
        self.results, self.fresh, self.logs = results, fresh, logs
        self.seen: set[str] = set()  # tags counted on the progress bar (seed 0 is also a sweep run)
        every = 0.5 if sys.stderr.isatty() else 60  # a log file gets a line a minute
        self.bar = tqdm(total=total_steps, unit="step", desc="llm_compare", dynamic_ncols=True, mininterval=every)

    def close(self) -> None:
        self.bar.close()

    def __call__(self, run: Run) -> Run:
        out = self.results / "runs" / run.tag
        settings = run.settings()
        if run.tag in self.seen:
            return self._load(run, out)
        self.seen.add(run.tag)
        kept = (
            not self.fresh
            and (out / "settings.json").exists()
            and same_settings(json.loads((out / "settings.json").read_text()), settings)
        )
        if kept and ((out / "summary.json").exists() or (out / "failed.json").exists()):
            self.bar.update(run.budget.steps)
            self.bar.write(f"[llm_compare] {run.tag}: done before with these settings, kept")
            return self._load(run, out)
        for stale in ("summary.json", "failed.json", "steps.csv"):
            (out / stale).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        config = self.results / "configs" / f"{run.tag.replace('/', '_')}.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(run.config, indent=1))
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
        cmd = [
            str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "scripts/train.py",
            "--deepspeed_config", str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
            "--task", TASK, "--steps", str(run.budget.steps), "--seed", str(run.seed),
            "--out", str(out), *run.budget.flags(),
        ]  # fmt: skip
        self.bar.write(f"[llm_compare] {run.tag}: {' '.join(cmd[1:])}")
        self.bar.set_description(run.tag)
        done, start = 0, time.perf_counter()
        log_path = self.logs / f"{run.tag.replace('/', '_')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    time.sleep(3)
                    now = self._steps_done(out)
                    self.bar.update(now - done)
                    done = now
            except BaseException:  # Ctrl-C: stop the launcher (it stops its ranks), then re-raise
                proc.terminate()
                proc.wait()
                raise
        self.bar.update(run.budget.steps - done)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            why = next((line.strip() for line in reversed(tail) if "FloatingPointError" in line), "")
            if not why:
                raise RuntimeError(f"{run.tag} failed (exit {proc.returncode}); see {log_path}")
            why = why.split("FloatingPointError:")[-1].strip()  # "Training loss is ... at step N: lower the lr."
            (out / "failed.json").write_text(json.dumps({"why": why}))
            run.failed = why
        outcome = "diverged" if run.failed else "done"
        self.bar.write(f"[llm_compare] {run.tag}: {outcome} in {time.perf_counter() - start:.0f} s")
        return self._load(run, out)

    @staticmethod
    def _steps_done(out: Path) -> int:
        try:
            with open(out / "steps.csv") as fh:
                return max(sum(1 for _ in fh) - 1, 0)
        except FileNotFoundError:
            return 0

    @staticmethod
    def _load(run: Run, out: Path) -> Run:
        run.rows = read_rows(out) if (out / "steps.csv").exists() else []
        run.summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
        if (out / "failed.json").exists():
            run.failed = json.loads((out / "failed.json").read_text())["why"]
        return run


# ---------------------------------------------------------------------------------------------
# the diagnosis of issue 16 (lr 4e-4, betas (0.9, 0.999): CD-Adam with fixed 256-blocks diverged)

def diagnosis_runs(budget: Budget) -> list[Run]:
    """The failing setting and variants that each change one thing (BERT configs: lr 4e-4, wd 0.01)."""
    cd = "bert_cdadam_block256.json"
    variants = [
        ("adamw", "bert_adam.json", {}, "AdamW (fp32)"),
        ("cdadam_fixed256", cd, {}, "CD-Adam, fixed blocks of 256 (issue 16)"),
        ("cdadam_none", cd, {"exchange": "none"}, "CD-Adam's rule, exact all-reduce"),
        ("cdadam_fixed576", cd, {"block_size": 576}, "CD-Adam, fixed blocks of 576"),
        ("cdadam_fixed256_bc", cd, {"bias_correction": True}, "CD-Adam, fixed 256, bias correction"),
        ("cdadam_none_bc", cd, {"exchange": "none", "bias_correction": True}, "CD-Adam's rule, exact, bias correction"),
        ("cdadam_fixed256_b099", cd, {"betas": [0.9, 0.99]}, "CD-Adam, fixed 256, betas (0.9, 0.99)"),
    ]
    # scale_blocks "tensor_padded" (blocks inside each row of every tensor) is not here: on this 24 GB machine
    # its layout-space index and copies took a rank past 7.5 GB at the first step and the OOM killer stopped it.
    # Fixed blocks of 576 are exactly the embedding's rows (it opens the bucket and server shard 0).
    return [
        Run(f"diagnosis/{name}", name, make_config(base, budget, **params), budget, label=label)
        for name, base, params, label in variants
    ]


def diagnosis_report(runs: list[Run], results: Path) -> list[str]:
    budget = runs[0].budget
    at = [s for s in range(budget.eval_every, budget.steps + 1, budget.eval_every)]
    lines = [
        f"### Diagnosis: {TASK}, lr 4e-4, betas (0.9, 0.999), wd 0.01, micro batch {budget.micro_batch} x 2 ranks, "
        f"seq {budget.seq_len}, seed 0",
        "",
        f"Eval loss ({budget.eval_examples} held-out rows) at each step; then the final training loss (EMA over 20 "
        "steps) and the MB one rank sent per step.",
        "",
        "| run | " + " | ".join(f"step {s}" for s in at) + " | train EMA | MB/step |",
        "|---" * (len(at) + 3) + "|",
    ]
    for run in runs:
        evals = {int(r["step"]): r["test_loss"] for r in run.rows if r["test_loss"] is not None}
        cells = [f"{evals[s]:.3f}" if s in evals else ("NaN" if run.failed else "—") for s in at]
        mb = run.rows[-1]["bytes_total"] / 1e6 / len(run.rows) if run.rows else float("nan")
        train = f"{ema([r['loss'] for r in run.rows])[-1]:.3f}" if run.rows else "—"
        lines.append(f"| {run.label} | " + " | ".join(cells) + f" | {train} | {mb:.1f} |")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if not run.rows:
            continue
        steps = [r["step"] for r in run.rows]
        axes[0].plot(steps, ema([r["loss"] for r in run.rows], 5), label=run.label)
        ev = [(r["step"], r["test_loss"]) for r in run.rows if r["test_loss"] is not None]
        if ev:
            axes[1].plot(*zip(*ev), marker="o", label=run.label)
    axes[0].set(xlabel="step", ylabel="training loss (EMA 5)", title="issue 16 setting: training loss")
    axes[1].set(xlabel="step", ylabel="eval loss", title="eval loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "llm_diagnosis.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![diagnosis](llm_diagnosis.png)", ""]


# ---------------------------------------------------------------------------------------------
# where CD-Adam's gap to AdamW comes from (run with --gap, after the study)

#: (name, label, optimizer params over configs/llm_cdadam.json). CD-Adam's update differs from AdamW's in three
#: places besides compression (optim/cd_adam.py): AMSGrad's max, eps inside the square root (1e-8 floors the
#: denominator at 1e-4, AdamW's at 1e-8) and the compressed gradient the moments see. eps 1e-16 puts the floor
#: where AdamW's is; "exchange": "none" removes the compression (an exact all-reduce, the same update rule).
GAP_VARIANTS = (
    ("cdadam_exact", "CD-Adam's rule, exact all-reduce (eps 1e-8)", {"exchange": "none"}),
    ("cdadam_exact_eps1e-16", "CD-Adam's rule, exact all-reduce, eps 1e-16", {"exchange": "none", "eps": 1e-16}),
    ("cdadam_eps1e-16", "CD-Adam (compressed), eps 1e-16", {"eps": 1e-16}),
    # finer scales: 1.5 bits per coordinate (21.3x fewer bytes than fp32, under the 25x target); 64 divides every
    # SmolLM2 row length (576, 1536), so on server shard 0 (it opens with the tied embedding) no block straddles two
    # rows (shard 1 starts at 134,515,008 / 2, 32 past a multiple of 64)
    ("cdadam_block64", "CD-Adam (compressed), blocks of 64", {"block_size": 64}),
)
GAP_LRS = (3e-5, 1e-4)  # CD-Adam's and AdamW's picks in the study
GAP_SEEDS = (1, 2)  # for the exact rule at its better lr: is the rule alone inside AdamW's seed range?


def gap_run(name: str, label: str, params: dict, lr: float, budget: Budget, seed: int = 0) -> Run:
    return Run(f"gap/{name}_lr{lr:g}_seed{seed}", name, make_config(CONFIGS["cdadam"], budget, lr=lr, **params),
               budget, seed=seed, lr=lr, label=label)  # fmt: skip


def long_run(opt: str, lr: float, budget: Budget) -> Run:
    return Run(f"long/{opt}_lr{lr:g}_{budget.steps}steps", opt, make_config(CONFIGS[opt], budget, lr=lr), budget,
               lr=lr, label=LABELS[opt])  # fmt: skip


def plot_gap(chosen: dict[str, list[Run]], variants: dict[str, list[Run]], seeds: list[Run], longs: list[Run],
             results: Path) -> None:
    """Left: each variant's final eval loss at each lr (seed 0 dots; the exact rule's seeds too), beside the
    study's AdamW and CD-Adam; right: the long runs' eval loss against steps."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = [(f"{LABELS[opt]} (study)", chosen[opt]) for opt in ("adamw", "cdadam")]
    rows += [(runs[0].label, runs + [s for s in seeds if s.optimizer == name]) for name, runs in variants.items()]
    for i, (label, runs) in enumerate(rows):
        pts = [(r.lr, r.eval_loss) for r in runs if r.summary]
        if pts:
            axes[0].scatter(*zip(*pts), color=f"C{i}", label=label, alpha=0.8)
    adamw = [r.eval_loss for r in chosen["adamw"] if r.summary]
    if adamw:
        axes[0].axhspan(min(adamw), max(adamw), color="C0", alpha=0.12, label="AdamW's seed range")
    axes[0].set(xscale="log", xlabel="lr", ylabel="final eval loss (80 steps)",
                title="CD-Adam with one thing changed (seed 0; exact rule at 1e-4: 3 seeds)")  # fmt: skip
    for i, r in enumerate(longs):
        ev = [(x["step"], x["test_loss"]) for x in r.rows if x["test_loss"] is not None]
        if ev:
            axes[1].plot(*zip(*ev), marker="o", color=f"C{i}", label=f"{r.label}, lr {r.lr:g}")
    axes[1].set(xlabel="step", ylabel="eval loss", title="longer runs (seed 0)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with nothing run yet has no legend
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "llm_gap.png", dpi=110)
    plt.close(fig)


def gap_report(chosen: dict[str, list[Run]], variants: dict[str, list[Run]], seeds: list[Run], longs: list[Run],
               budget: Budget) -> list[str]:
    """The study's two rows, then each variant at each lr (seed 0; seeds for the exact rule), then the long runs."""
    adamw = [r.eval_loss for r in chosen["adamw"] if r.summary]
    base = statistics.mean(adamw) if adamw else math.nan
    reference = (f"{base:.4f}, seed range {min(adamw):.4f}–{max(adamw):.4f}" if adamw
                 else "no AdamW run finished: no gap is stated")  # fmt: skip
    lines = [
        f"### Where CD-Adam's gap comes from ({budget.steps} steps, the study's budget)",
        "",
        "Final eval loss; gap: minus AdamW's mean over its seeds at its chosen lr "
        f"({chosen['adamw'][0].lr:g}: {reference}). All CD-Adam rows "
        "use `configs/llm_cdadam.json` (betas (0.9, 0.999), bias correction, blocks of 256) with one change.",
        "",
        "| run | lr | seeds | eval loss | gap to AdamW | MB sent |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, runs: list[Run]) -> str:
        done = [r for r in runs if r.summary]
        stopped = [r for r in runs if r.failed]
        if not done:
            why = stopped[0].failed if stopped else "not run"
            return f"| {label} | {runs[0].lr:g} | {len(runs)} | {why} | — | — |"
        ev = [r.eval_loss for r in done]
        mb = statistics.mean(r.summary["bytes_total"] for r in done) / 1e6
        missing = len(runs) - len(done) - len(stopped)
        note = f" ({len(stopped)} more stopped: {stopped[0].failed})" if stopped else ""
        note += f" ({missing} more not run)" if missing else ""
        gap = f"{statistics.mean(ev) - base:+.4f}" if adamw else "—"
        return f"| {label} | {done[0].lr:g} | {len(done)} | {mean_spread(ev)}{note} | {gap} | {mb:,.0f} |"

    for opt in ("adamw", "cdadam"):
        lines.append(row(f"{LABELS[opt]} (the study)", chosen[opt]))
    for name, runs in variants.items():
        for r in runs:
            with_seeds = [r] + [s for s in seeds if s.optimizer == name and s.lr == r.lr]
            lines.append(row(r.label, with_seeds))
    if longs:
        steps = longs[0].budget.steps
        lines += [
            "",
            f"Longer runs ({steps} steps, seed 0, each optimizer at the study's lr; eval every "
            f"{longs[0].budget.eval_every} steps):",
            "",
            "| run | lr | " + " | ".join(f"step {s}" for s in range(longs[0].budget.eval_every, steps + 1,
                                                                   longs[0].budget.eval_every)) + " |",
            "|---|---|" + "---|" * (steps // longs[0].budget.eval_every),
        ]
        for r in longs:
            evals = {int(x["step"]): x["test_loss"] for x in r.rows if x["test_loss"] is not None}
            cells = [f"{evals[s]:.4f}" if s in evals else ("stopped" if r.failed else "—")
                     for s in range(r.budget.eval_every, steps + 1, r.budget.eval_every)]  # fmt: skip
            why = f" (stopped: {r.failed})" if r.failed else ("" if r.summary else " (not run)")
            lines.append(f"| {r.label}{why} | {r.lr:g} | " + " | ".join(cells) + " |")
    return lines + ["", "![gap](llm_gap.png)", ""]


# ---------------------------------------------------------------------------------------------
# the study

def sweep_run(opt: str, lr: float, budget: Budget) -> Run:
    return Run(f"sweep/{opt}_lr{lr:g}", opt, make_config(CONFIGS[opt], budget, lr=lr), budget, lr=lr,
               label=LABELS[opt])  # fmt: skip


def seed_run(opt: str, lr: float, seed: int, budget: Budget) -> Run:
    if seed == 0:
        return sweep_run(opt, lr, budget)
    return Run(f"seeds/{opt}_lr{lr:g}_seed{seed}", opt, make_config(CONFIGS[opt], budget, lr=lr), budget, seed=seed,
               lr=lr, label=LABELS[opt])  # fmt: skip


def best_lr(runs: list[Run]) -> float:
    """The lr of the lowest final eval loss among the runs that did not diverge (else the lowest lr)."""
    ok = [r for r in runs if not r.diverged and r.summary]
    return min(ok, key=lambda r: r.eval_loss).lr if ok else min(r.lr for r in runs)


def ppl(loss: float) -> str:
    return f"{math.exp(loss):.2f}" if loss < 20 else "> 4e8"


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def write_summary_csv(runs: list[Run], path: Path) -> None:
    fields = ["tag", "optimizer", "lr", "seed", "steps", "final_train_loss_ema", "eval_loss", "eval_ppl",
              "mb_sent_total", "wall_s", "diverged"]  # fmt: skip
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        for r in runs:
            if not r.rows and not r.failed:
                continue  # not run yet
            s = r.summary or {}
            writer.writerow({
                "tag": r.tag, "optimizer": r.optimizer, "lr": r.config["optimizer"]["params"]["lr"],
                "seed": r.seed, "steps": r.budget.steps,
                "final_train_loss_ema": f"{ema([x['loss'] for x in r.rows])[-1]:.5f}" if r.rows else "",
                "eval_loss": f"{s['test_loss']:.5f}" if s else "",
                "eval_ppl": f"{math.exp(min(s['test_loss'], 700)):.4g}" if s else "",
                "mb_sent_total": f"{s['bytes_total'] / 1e6:.2f}" if s else "",
                "wall_s": f"{s['wall_s']:.1f}" if s else "",
                "diverged": r.diverged,
            })  # fmt: skip


def plot_study(chosen: dict[str, list[Run]], budget: Budget, results: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, (opt, runs) in enumerate(chosen.items()):
        color = f"C{i}"
        runs = [r for r in runs if r.rows]
        for j, r in enumerate(runs):
            label = f"{LABELS[opt]}, lr {r.lr:g}" + (" (diverged)" if r.diverged else "") if j == 0 else None
            ev = [(x["step"], x["bytes_total"] / 1e6, x["test_loss"]) for x in r.rows if x["test_loss"] is not None]
            axes[0].plot([e[0] for e in ev], [e[2] for e in ev], marker="o", ms=3, color=color, alpha=0.8, label=label)
            train = ema([x["loss"] for x in r.rows])
            axes[1].plot([x["step"] for x in r.rows], train, color=color, alpha=0.8, label=label)
            axes[2].plot([e[1] for e in ev], [e[2] for e in ev], marker="o", ms=3, color=color, alpha=0.8, label=label)
    # the y axes show the runs that trained; a diverged run leaves the top of the plot
    kept = [r for runs in chosen.values() for r in runs if r.rows and not r.diverged]
    if kept:
        evals = [x["test_loss"] for r in kept for x in r.rows if x["test_loss"] is not None]
        trains = [v for r in kept for v in ema([x["loss"] for x in r.rows])]
        for ax, vals in ((axes[0], evals), (axes[1], trains), (axes[2], evals)):
            low, high = min(vals), max(vals)
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    axes[0].set(xlabel="step", ylabel="eval loss", title="SmolLM2-135M on WordNet glosses: eval loss (each seed)")
    axes[1].set(xlabel="step", ylabel="training loss (EMA 20)", title="training loss")
    axes[2].set(xlabel="MB sent by one rank (log)", ylabel="eval loss", xscale="log", title="eval loss vs bytes sent")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "llm.png", dpi=110)
    plt.close(fig)


def plot_sweep(sweep: dict[str, list[Run]], budget: Budget, results: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for opt, runs in sweep.items():
        pts = [(r.lr, r.eval_loss) for r in runs if r.summary and not r.diverged]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS[opt])
        for r in runs:
            if r.diverged:
                ax.axvline(r.lr, ls=":", color="grey")
    ax.set(xscale="log", xlabel="lr", ylabel="final eval loss",
           title=f"lr sweep, {budget.steps} steps, seed 0 (dotted: diverged)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "llm_lr_sweep.png", dpi=110)
    plt.close(fig)


def study_report(sweep: dict[str, list[Run]], chosen: dict[str, list[Run]], budget: Budget) -> list[str]:
    params = next(r.summary["params"] for runs in chosen.values() for r in runs if r.summary)
    all_lrs = sorted({r.lr for runs in sweep.values() for r in runs})
    lines = [
        f"### {TASK}: SmolLM2-135M-Instruct ({params:,} params), 2 CPU ranks, {budget.steps} steps, micro batch "
        f"{budget.micro_batch} rows x {budget.seq_len} tokens per rank, constant lr",
        "",
        f"lr sweep: seed 0, final eval loss on {budget.eval_examples} held-out rows; the lowest is chosen (its run is "
        "seed 0 below). An lr at the edge of its sweep is marked (edge).",
        "",
        "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in all_lrs) + " | chosen |",
        "|---" * (len(all_lrs) + 2) + "|",
    ]
    for opt, runs in sweep.items():
        by_lr = {r.lr: r for r in runs}
        cells = []
        for lr in all_lrs:
            r = by_lr.get(lr)
            cells.append("" if r is None else ("diverged" if r.diverged else f"{r.eval_loss:.4f}"))
        lr = chosen[opt][0].lr
        edge = " (edge)" if lr in (min(by_lr), max(by_lr)) else ""
        lines.append(f"| {LABELS[opt]} | " + " | ".join(cells) + f" | {lr:g}{edge} |")
    lines += [
        "",
        "At the chosen lr, over seeds (seed: the order of the training batches; the model starts from the same "
        "pretrained weights): mean ± sample std (min–max). MB sent: what one rank sent over the whole run.",
        "",
        "| optimizer | lr | seeds | eval loss | eval perplexity (of the mean loss) | train loss (EMA 20) | MB sent | "
        "bytes / CD-Adam's | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    done = {opt: [r for r in runs if r.summary] for opt, runs in chosen.items()}
    mb = {opt: statistics.mean(whole_run_bytes(r) for r in runs) for opt, runs in chosen.items() if runs[0].rows}
    for opt, rs in done.items():
        if not rs:  # every seed stopped early (diverged): where, and the bytes the whole run would have sent
            r = chosen[opt][0]
            ratio = f"{mb[opt] / mb['cdadam']:.1f}x" if "cdadam" in mb and opt in mb else "—"
            lines.append(
                f"| {LABELS[opt]} (diverged) | {r.lr:g} | {len(chosen[opt])} | stopped: {r.failed} | — | — | "
                f"{mb.get(opt, math.nan) / 1e6:,.0f} (whole run, from its per-step bytes) | {ratio} | — |"
            )
            continue
        ev = [r.eval_loss for r in rs]
        tr = [ema([x["loss"] for x in r.rows])[-1] for r in rs]
        failed = sum(r.diverged for r in rs)
        name = LABELS[opt] + (f" ({failed} of {len(rs)} diverged)" if failed else "")
        ratio = f"{mb[opt] / mb['cdadam']:.1f}x" if "cdadam" in mb else "—"
        wall = statistics.mean(r.summary["wall_s"] for r in rs)
        lines.append(
            f"| {name} | {rs[0].lr:g} | {len(rs)} | {mean_spread(ev)} | {ppl(statistics.mean(ev))} | "
            f"{mean_spread(tr)} | {mb[opt] / 1e6:,.0f} | {ratio} | {wall:.0f} |"
        )
    lines.append("")
    a = [r.eval_loss for r in done.get("adamw", [])]
    c = [r.eval_loss for r in done.get("cdadam", [])]
    if len(a) > 1 and len(c) > 1:
        gap = statistics.mean(c) - statistics.mean(a)
        se = standard_error_of_difference(a, c)
        inside = min(a) <= statistics.mean(c) <= max(a)
        lines.append(
            f"CD-Adam - AdamW, mean final eval loss: {gap:+.4f} (standard error of the difference {se:.4f}: "
            f"{abs(gap) / se if se else float('inf'):.1f} SE). CD-Adam's mean is {'inside' if inside else 'outside'} "
            f"AdamW's seed range [{min(a):.4f}, {max(a):.4f}]."
        )
    if "cdadam" in mb:
        for opt, target in (("adamw", 25.0), ("onebitadam", 4.0)):
            if opt in mb:
                got = mb[opt] / mb["cdadam"]
                lines.append(
                    f"Bytes: {LABELS[opt]} sent {got:.1f}x CD-Adam's (target >= {target:g}x: "
                    f"{'met' if got >= target else 'NOT met'})."
                )
    return lines + ["", "![llm](llm.png)", "", "![lr sweep](llm_lr_sweep.png)", ""]


def whole_run_bytes(run: Run) -> float:
    """Bytes one rank sent over the run; for a run stopped early, what it would have sent by the last step
    at its last step's rate (1-bit Adam stopped after its warm-up: its compressed rate)."""
    if run.summary:
        return run.summary["bytes_total"]
    if len(run.rows) < 2:
        return math.nan
    last, before = run.rows[-1], run.rows[-2]
    return last["bytes_total"] + (run.budget.steps - last["step"]) * (last["bytes_total"] - before["bytes_total"])


def on_disk(run: Run, results: Path) -> bool:
    """Finished before with the same settings (kept by ``Runner``)."""
    out = results / "runs" / run.tag
    return (
        (out / "settings.json").exists()
        and same_settings(json.loads((out / "settings.json").read_text()), run.settings())
        and ((out / "summary.json").exists() or (out / "failed.json").exists())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results" / "llm"))
    parser.add_argument("--quick", action="store_true", help="a few steps per run: a smoke test, not a result")
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already have a summary")
    parser.add_argument("--diagnose", action="store_true", help="also run issue 16's divergence diagnosis (~25 min)")
    parser.add_argument("--no-study", action="store_true", help="skip the sweep and the seeds (with --diagnose)")
    parser.add_argument("--gap", action="store_true",
                        help="also run where CD-Adam's gap comes from (GAP_VARIANTS, long runs; ~80 min)")
    parser.add_argument("--report", action="store_true", help="run nothing: tables and plots from the runs on disk")
    args = parser.parse_args()
    if args.gap and args.no_study:
        parser.error("--gap compares with the study's runs at their chosen lrs: drop --no-study")
    results = Path(args.results)
    if args.quick and args.results == parser.get_default("results"):
        results = ROOT / "results" / "tmp" / "llm_quick"  # never mixed with the real results
    results.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else FULL
    long_budget = LONG_QUICK if args.quick else LONG  # the gap study's longer runs
    seeds = QUICK_SEEDS if args.quick else SEEDS

    # the diagnosis: run with --diagnose; otherwise reported if it is on disk already
    diag = diagnosis_runs(DIAGNOSIS_QUICK if args.quick else DIAGNOSIS)
    run_diag = args.diagnose and not args.report
    if not run_diag and not all(on_disk(r, results) for r in diag):
        diag = []
    sweep_plan = {opt: [sweep_run(opt, lr, budget) for lr in lrs] for opt, lrs in SWEEP_LRS.items()}
    if args.no_study:
        sweep_plan = {}
    total = 0
    if not args.report:
        total += sum(r.budget.steps for r in diag) if run_diag else 0
        if sweep_plan:
            n_runs = sum(map(len, sweep_plan.values())) + sum(len([s for s in v if s]) for v in seeds.values())
            total += budget.steps * n_runs
        if args.gap:
            total += budget.steps * (len(GAP_VARIANTS) * len(GAP_LRS) + len(GAP_SEEDS)) + 2 * long_budget.steps
    runner = Runner(results, args.fresh, total, ROOT / "results" / "tmp" / "llm_logs")
    load = lambda run: Runner._load(run, results / "runs" / run.tag)  # noqa: E731
    execute = load if args.report else runner

    report = [
        "# LLM fine-tuning head-to-head on 2 CPU ranks (gloo)",
        "",
        "Written by `scripts/llm_compare.py`; bytes are what one rank sent (ring/pairwise accounting), "
        "the engine's fp32 all-reduce included. Configs used: `results/llm/configs/`; one row per run: `summary.csv`.",
        "",
    ]
    try:
        if diag:
            section = diagnosis_report([(runner if run_diag else load)(r) for r in diag], results)
            (results / "diagnosis.md").write_text("\n".join(section))
            report += section
        if sweep_plan:
            sweep = {opt: [execute(r) for r in runs] for opt, runs in sweep_plan.items()}
            chosen = {}
            for opt, runs in sweep.items():
                lr = best_lr(runs)
                chosen[opt] = [execute(seed_run(opt, lr, seed, budget)) for seed in seeds[opt]]
            extra = [r for runs in chosen.values() for r in runs if r.seed]
            write_summary_csv(diag + [r for runs in sweep.values() for r in runs] + extra, results / "summary.csv")
            if any(r.summary for runs in chosen.values() for r in runs):
                plot_study(chosen, budget, results)
                plot_sweep(sweep, budget, results)
                report += study_report(sweep, chosen, budget)
            else:
                report += ["(The head-to-head has not been run yet: `python scripts/llm_compare.py`.)", ""]
            gap_plan = {name: [gap_run(name, label, params, lr, budget) for lr in GAP_LRS]
                        for name, label, params in GAP_VARIANTS}  # fmt: skip
            long_plan = [long_run(opt, chosen[opt][0].lr, long_budget) for opt in ("adamw", "cdadam")]
            if args.gap or any(on_disk(r, results) for r in [*sum(gap_plan.values(), []), *long_plan]):
                # without --gap: what is on disk with the planned settings; the rest shows as not run
                kept = lambda r: load(r) if on_disk(r, results) else r  # noqa: E731
                gap_execute = execute if args.gap and not args.report else kept
                variants = {name: [gap_execute(r) for r in runs] for name, runs in gap_plan.items()}
                exact = variants["cdadam_exact"]
                lr = best_lr(exact)
                label, params = exact[0].label, next(v[2] for v in GAP_VARIANTS if v[0] == "cdadam_exact")
                gap_seeds = [gap_execute(gap_run("cdadam_exact", label, params, lr, budget, s)) for s in GAP_SEEDS]
                longs = [gap_execute(r) for r in long_plan]
                section = gap_report(chosen, variants, gap_seeds, longs, budget)
                plot_gap(chosen, variants, gap_seeds, longs, results)
                (results / "gap.md").write_text("\n".join(section))
                report += section
                write_summary_csv(diag + [r for runs in sweep.values() for r in runs] + extra
                                  + [r for runs in variants.values() for r in runs] + gap_seeds + longs,
                                  results / "summary.csv")  # fmt: skip
    finally:
        runner.close()
    (results / "comparison.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()

"""Head-to-head of CD-Adam, 1-bit Adam, Adam, uncompressed AMSGrad and EF21 on 2 CPU ranks, plus an lr sweep.

    python scripts/compare.py            # (`make compare`) ~35 min on 2 cores; reruns only missing runs
    python scripts/compare.py --quick    # a smoke version in a few minutes (not for the report)

Each run is ``deepspeed --num_gpus 2 scripts/train.py`` with a committed config from configs/,
scaled to the budget (micro batch, 1-bit Adam's freeze_step = 13% of the run, lr for the sweep)
and written to ``results/compare/configs/``. Writes under ``results/``: one folder per run
(steps.csv, summary.json), the plots ``*.png`` and ``comparison.md`` (the table the README quotes).

"Bytes to reach loss L": the bytes one rank had sent when the training loss (EMA over 20 steps)
first reached L, where L is the worst final EMA loss among the optimizers compared (so all of them
reach it). This is the paper's "bits at equal training loss".

Seeds: CD-Adam (block 256 on BERT), 1-bit Adam and Adam also run with ``--seed`` 1 and 2 (``SEEDS``; seed 0 is the run of
the main table; a seed sets the initial weights, the order of the batches and dropout), and the
report gives each metric's mean and spread over the seeds, and CD-Adam's gap to Adam in units of its
standard error (``--no-seeds`` skips them; ~25 min).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("cdadam", "onebitadam", "adam", "amsgrad", "ef21")
LABELS = {
    "cdadam": "CD-Adam",
    "cdadam_block256": "CD-Adam, block 256",
    "onebitadam": "1-bit Adam",
    "adam": "Adam (fp32)",
    "amsgrad": "AMSGrad (fp32, CD-Adam's rule)",
    "ef21": "EF21 (top-1%, SGD)",
    "liec_sgd": "LIEC-SGD (1-bit, fp32 average every 100)",
    "birder": "Birder (1-bit random signs of m/b)",
    "zero_one_adam": "0/1 Adam",
    "onebit_lamb": "1-bit LAMB",
    "adacgd": "AdaCGD (adaptive top-k levels, SGD)",
}
#: SGD-type methods: their losses do not set the target (they are compared at the Adam-type methods' worst)
SGD_TYPE = ("ef21", "liec_sgd", "adacgd")
WARMUP_FRACTION = 0.13  # 1-bit Adam's full-precision warm-up, as in the paper's CIFAR runs
EMA_STEPS = 20


@dataclass
class Study:
    """One task's head-to-head: which configs, how long, which train.py flags."""

    name: str
    task: str
    config_prefix: str
    steps: int
    micro_batch: int
    flags: tuple[str, ...]
    extra_optimizers: tuple[str, ...] = ()  # configs beyond OPTIMIZERS, e.g. a CD-Adam variant
    #: the CD-Adam config the README recommends for the task (the seeds and time_to_accuracy.py run it)
    cdadam_config: str = "cdadam"

    @property
    def seed_optimizers(self) -> tuple[str, ...]:
        """The optimizers run with every seed of SEEDS: the recommended CD-Adam (first), 1-bit Adam, Adam."""
        return (self.cdadam_config, "onebitadam", "adam")


def studies(quick: bool) -> list[Study]:
    scale = 0.1 if quick else 1.0
    return [
        Study(
            "resnet",
            "resnet18-fashion",
            "resnet",
            int(500 * scale),
            64,
            (
                "--width",
                "16",
                "--lr-decay-at",
                "0.5",
                "0.75",
                "--eval-every",
                str(int(100 * scale)),
                "--eval-examples",
                "2000",
            ),
            ("liec_sgd", "adacgd"),  # SGD methods: ResNet is their home
        ),
        Study(
            "bert_mlm",
            "bert-mlm",
            "bert",
            int(600 * scale),
            16,
            ("--size", "tiny", "--eval-every", str(int(100 * scale)), "--eval-examples", "256"),
            # SketchedAMSGrad is left out: ~10 s per step on this model on one CPU core (its hashes in eager torch)
            ("cdadam_block256", "birder", "zero_one_adam", "onebit_lamb"),
            "cdadam_block256",  # block 2048 stalls at the unigram plateau (a block spans 16 embedding rows)
        ),
    ]


SEEDS = (0, 1, 2)  # seed 0: the run of the main table
SWEEP_LRS = (3e-5, 1e-4, 3e-4, 1e-3)
SWEEP_OPTIMIZERS = ("cdadam", "adam")


def write_config(study: Study, optimizer: str, lr: float | None, steps: int, out: Path) -> Path:
    config = json.loads((ROOT / "configs" / f"{study.config_prefix}_{optimizer}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = study.micro_batch
    params = config["optimizer"]["params"]
    if optimizer in ("onebitadam", "onebit_lamb"):
        params["freeze_step"] = max(1, round(WARMUP_FRACTION * steps))
    if optimizer == "zero_one_adam":  # the same share of the run with variance refreshes
        params["var_freeze_step"] = max(1, round(WARMUP_FRACTION * steps))
    if lr is not None:
        params["lr"] = lr
    config["_description"] += f" [compare.py: micro batch {study.micro_batch}, {steps} steps]"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=1))
    return out


def run(
    study: Study,
    optimizer: str,
    results: Path,
    *,
    lr: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    fresh: bool,
) -> Path:
    steps = steps or study.steps
    name = optimizer + (f"_lr{lr:g}" if lr is not None else "")
    tag = f"{study.name}/seeds/{name}_seed{seed}" if seed else f"{study.name}/{name}"
    out = results / "compare" / tag
    config = write_config(
        study, optimizer, lr, steps, results / "compare" / "configs" / f"{tag.replace('/', '_')}.json"
    )
    if (out / "summary.json").exists() and not fresh:
        done = json.loads((out / "summary.json").read_text())
        if done["steps"] == steps and done["config"] == json.loads(config.read_text()):
            print(f"[compare] {tag}: done before with these settings, kept")
            return out
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "scripts/train.py",
        "--deepspeed_config",
        str(config),
        "--task",
        study.task,
        "--steps",
        str(steps),
        "--out",
        str(out),
        *(("--seed", str(seed)) if seed else ()),
        *study.flags,
    ]
    print(f"[compare] {tag}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "steps.csv") as fh:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(fh)]


def ema(values: list[float], span: int = EMA_STEPS) -> list[float]:
    out, acc, alpha = [], values[0], 2 / (span + 1)
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def bytes_to_reach(rows: list[dict], target: float) -> float | None:
    for row, smooth in zip(rows, ema([r["loss"] for r in rows])):
        if smooth <= target:
            return row["bytes_total"]
    return None


def diverged(rows: list[dict]) -> bool:
    """Final EMA training loss above the first step's loss."""
    return ema([r["loss"] for r in rows])[-1] >= rows[0]["loss"]


def plot_study(study: Study, runs: dict[str, list[dict]], results: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for opt, rows in runs.items():
        steps = [r["step"] for r in rows]
        mb = [r["bytes_total"] / 1e6 for r in rows]
        label = LABELS[opt] + (" (diverged)" if diverged(rows) else "")
        axes[0].plot(steps, ema([r["loss"] for r in rows]), label=label)
        axes[1].plot(mb, ema([r["loss"] for r in rows]), label=label)
        evals = [(r["bytes_total"] / 1e6, r["test_acc"]) for r in rows if r["test_acc"] is not None]
        axes[2].plot(*zip(*evals), marker="o", label=label)
    # the loss axes show the runs that trained; a diverged run leaves the top of the plot
    kept = [ema([r["loss"] for r in rows]) for rows in runs.values() if not diverged(rows)]
    low, high = min(min(k) for k in kept), max(max(k) for k in kept)
    for ax in axes[:2]:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    axes[0].set(xlabel="step", ylabel=f"training loss (EMA {EMA_STEPS})", title=f"{study.task}: loss vs steps")
    axes[1].set(
        xlabel="MB sent by one rank (log)", ylabel="training loss (EMA)", xscale="log", title="loss vs bytes sent"
    )
    axes[2].set(
        xlabel="MB sent by one rank (log)", ylabel="test accuracy", xscale="log", title="test accuracy vs bytes sent"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / f"{study.name}.png", dpi=110)
    plt.close(fig)


def table(study: Study, runs: dict[str, list[dict]], summaries: dict[str, dict]) -> list[str]:
    finals = {opt: ema([r["loss"] for r in rows])[-1] for opt, rows in runs.items()}
    failed = [opt for opt, rows in runs.items() if diverged(rows)]
    target = max(finals[opt] for opt in runs if opt not in SGD_TYPE and opt not in failed)
    # a diverged run may pass L on its way up: it does not count as having reached it
    reach = {opt: None if opt in failed else bytes_to_reach(rows, target) for opt, rows in runs.items()}
    cd = reach.get("cdadam")
    lines = [
        f"### {study.task} ({summaries['cdadam']['params']:,} params, 2 ranks, {study.steps} steps, micro batch {study.micro_batch})",
        "",
        f"Target loss L = {target:.4f} (worst final EMA training loss among the Adam-type optimizers that did "
        "not diverge)."
        + (f" Diverged (final loss above the first): {', '.join(LABELS[o] for o in failed)}." if failed else ""),
        "",
        "| optimizer | final train loss (EMA) | test loss | test acc | MB sent (total) | MB sent to reach L | vs CD-Adam | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for opt, rows in runs.items():
        s = summaries[opt]
        r = reach[opt]
        ratio = f"{r / cd:.1f}x" if r is not None and cd else "—"
        lines.append(
            f"| {LABELS[opt]} | {ema([x['loss'] for x in rows])[-1]:.4f} | {s['test_loss']:.4f} | {s['test_acc']:.4f} | "
            f"{s['bytes_total'] / 1e6:.1f} | {f'{r / 1e6:.1f}' if r is not None else ('diverged' if opt in failed else 'not reached')} | {ratio} | {s['wall_s']:.0f} |"
        )
    return lines + [""]


@dataclass
class SeedResult:
    final_loss: float  # EMA training loss at the last step
    test_loss: float
    test_acc: float
    mb_sent: float
    diverged: bool


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def standard_error_of_difference(a: list[float], b: list[float]) -> float:
    """sqrt(var(a)/n_a + var(b)/n_b), with sample variances: the standard error of mean(a) - mean(b)."""
    return math.sqrt(mean_spread(a)[1] ** 2 / len(a) + mean_spread(b)[1] ** 2 / len(b))


def gap_in_standard_errors(a: list[float], b: list[float]) -> float:
    """(mean(a) - mean(b)) / standard_error_of_difference(a, b): Welch's t statistic, how many standard
    errors of the difference the gap is (inf when both spreads are 0 and the means differ)."""
    ma, mb, se = statistics.fmean(a), statistics.fmean(b), standard_error_of_difference(a, b)
    return (ma - mb) / se if se > 0 else (0.0 if ma == mb else math.copysign(math.inf, ma - mb))


#: two-sided 95% critical values of Student's t by degrees of freedom (then 1.96, the normal's)
T_CRITICAL_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def welch_degrees_of_freedom(a: list[float], b: list[float]) -> float:
    """Welch-Satterthwaite: (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)), sample variances
    (inf when both spreads are 0)."""
    qa, qb = mean_spread(a)[1] ** 2 / len(a), mean_spread(b)[1] ** 2 / len(b)
    denominator = qa**2 / (len(a) - 1) + qb**2 / (len(b) - 1)
    return (qa + qb) ** 2 / denominator if denominator > 0 else math.inf


def t_critical_95(df: float) -> float:
    """The two-sided 95% critical value for ``df`` degrees of freedom, from ``T_CRITICAL_95`` at the largest
    tabled df <= ``df`` (conservative between rows; 1.96 beyond 30)."""
    if df > 30:
        return 1.96
    return T_CRITICAL_95[max(k for k in T_CRITICAL_95 if k <= max(df, 1))]


def seed_results(study: Study, results: Path, fresh: bool) -> dict[str, list[SeedResult]]:
    out: dict[str, list[SeedResult]] = {}
    for opt in study.seed_optimizers:
        for seed in SEEDS:
            folder = run(study, opt, results, seed=seed, fresh=fresh)
            rows = read_rows(folder)
            s = json.loads((folder / "summary.json").read_text())
            out.setdefault(opt, []).append(
                SeedResult(
                    ema([r["loss"] for r in rows])[-1], s["test_loss"], s["test_acc"], s["bytes_total"] / 1e6, diverged(rows)
                )
            )
    return out


def seeds_section(study: Study, by_opt: dict[str, list[SeedResult]]) -> list[str]:
    """Mean ± spread over the seeds that did not diverge (a diverged run's loss says only that it diverged),
    and the recommended CD-Adam's gap to Adam in standard errors."""
    lines = [
        f"#### {study.task}: over seeds {', '.join(map(str, SEEDS))} (mean ± sample standard deviation "
        "over the seeds that did not diverge)",
        "",
        "| optimizer | seeds (diverged) | final train loss (EMA) | test loss | test acc | MB sent |",
        "|---|---|---|---|---|---|",
    ]
    for opt, rs in by_opt.items():
        ok = [r for r in rs if not r.diverged]
        cells = []
        for field, fmt in (("final_loss", ".4f"), ("test_loss", ".4f"), ("test_acc", ".4f"), ("mb_sent", ".1f")):
            counted = rs if field == "mb_sent" else ok  # a diverged run's bytes were still sent
            if counted:
                m, sd = mean_spread([getattr(r, field) for r in counted])
                cells.append(f"{m:{fmt}} ± {sd:{fmt}}")
            else:
                cells.append("diverged")
        lines.append(f"| {LABELS[opt]} | {len(rs)} ({len(rs) - len(ok)}) | " + " | ".join(cells) + " |")
    cd_name = study.seed_optimizers[0]
    cd, adam = [r for r in by_opt[cd_name] if not r.diverged], [r for r in by_opt["adam"] if not r.diverged]
    if len(cd) < 2 or len(adam) < 2:
        return lines + ["", f"{LABELS[cd_name]} or Adam has fewer than 2 seeds that trained: no gap is stated.", ""]
    verdicts = []
    for field, name in (("test_acc", "test accuracy"), ("test_loss", "test loss")):
        a, b = [getattr(r, field) for r in cd], [getattr(r, field) for r in adam]
        t, df = gap_in_standard_errors(a, b), welch_degrees_of_freedom(a, b)
        critical = t_critical_95(df)
        verdicts.append(
            f"{name} {statistics.fmean(a) - statistics.fmean(b):+.4f} ({t:+.1f} standard errors of the difference, "
            f"Welch df {df:.1f}: {'within' if abs(t) < critical else 'beyond'} the seed noise at 95%, |t| "
            f"{'<' if abs(t) < critical else '>='} {critical:.2f})"
        )
    return lines + ["", f"{LABELS[cd_name]} minus Adam: " + "; ".join(verdicts) + ".", ""]


def plot_seeds(all_results: dict[str, dict[str, list[SeedResult]]], results: Path) -> None:
    """Test accuracy and test loss of every seed that did not diverge (dots) and their mean (line), one
    column per study."""
    fig, axes = plt.subplots(2, len(all_results), figsize=(5.5 * len(all_results), 7), squeeze=False)
    for col, (task, by_opt) in enumerate(all_results.items()):
        for row, (field, label) in enumerate((("test_acc", "test accuracy"), ("test_loss", "test loss"))):
            ax = axes[row][col]
            names = []
            for i, (opt, rs) in enumerate(by_opt.items()):
                values = [getattr(r, field) for r in rs if not r.diverged]
                if values:
                    ax.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color=f"C{i}", linewidth=2)
                    ax.scatter([i] * len(values), values, color=f"C{i}", zorder=3)
                n_div = len(rs) - len(values)
                names.append(LABELS[opt] + (f"\n(diverged: {n_div})" if n_div else ""))
            ax.set_xticks(range(len(by_opt)), names, fontsize=8)
            ax.set(ylabel=label, title=f"{task}: {label}, seeds {', '.join(map(str, SEEDS))}")
            # the values differ in the second decimal: the axis spans them (mean lines, no bars from 0)
            kept = [getattr(r, field) for rs in by_opt.values() for r in rs if not r.diverged]
            if kept:
                pad = 0.1 * (max(kept) - min(kept)) or 0.01
                ax.set_ylim(min(kept) - pad, max(kept) + pad)
            ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(results / "seeds.png", dpi=110)
    plt.close(fig)


def sweep_section(study: Study, results: Path, fresh: bool, steps: int) -> list[str]:
    finals: dict[str, list[tuple[float, float, float]]] = {}
    for opt in SWEEP_OPTIMIZERS:
        for lr in SWEEP_LRS:
            folder = run(study, opt, results, lr=lr, steps=steps, fresh=fresh)
            rows = read_rows(folder)
            s = json.loads((folder / "summary.json").read_text())
            finals.setdefault(opt, []).append((lr, ema([r["loss"] for r in rows])[-1], s["test_acc"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for opt, pts in finals.items():
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[opt])
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=LABELS[opt])
    axes[0].set(
        xscale="log", xlabel="lr", ylabel="final training loss (EMA)", title=f"lr sweep, {study.task}, {steps} steps"
    )
    axes[1].set(xscale="log", xlabel="lr", ylabel="test accuracy", title="lr sweep: test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(results / "lr_sweep.png", dpi=110)
    plt.close(fig)
    lines = [
        f"### lr sweep: {study.task}, {steps} steps (same schedule and batch as above)",
        "",
        "| lr | " + " | ".join(f"{LABELS[o]} loss / acc" for o in finals) + " |",
        "|---" * (len(finals) + 1) + "|",
    ]
    for i, lr in enumerate(SWEEP_LRS):
        lines.append(
            f"| {lr:g} | " + " | ".join(f"{finals[o][i][1]:.4f} / {finals[o][i][2]:.4f}" for o in finals) + " |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--quick", action="store_true", help="10%% of the steps: a smoke test, not a result")
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already have a summary")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-seeds", action="store_true", help=f"skip seeds {SEEDS[1:]} (~25 min)")
    args = parser.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report = [
        "# Head-to-head on 2 CPU ranks (gloo)",
        "",
        (
            "Written by `scripts/compare.py`; bytes are what one rank sent (ring/pairwise accounting), "
            "the engine's fp32 all-reduce included. Configs used: `results/compare/configs/`."
        ),
        "",
    ]
    all_studies = studies(args.quick)
    by_seed: dict[str, dict[str, list[SeedResult]]] = {}
    for study in all_studies:
        runs, summaries = {}, {}
        for opt in OPTIMIZERS + study.extra_optimizers:
            folder = run(study, opt, results, fresh=args.fresh)
            runs[opt] = read_rows(folder)
            summaries[opt] = json.loads((folder / "summary.json").read_text())
        plot_study(study, runs, results)
        report += table(study, runs, summaries) + [f"![{study.name}]({study.name}.png)", ""]
        if not args.no_seeds:
            by_seed[study.task] = seed_results(study, results, args.fresh)
            report += seeds_section(study, by_seed[study.task])
    if by_seed:
        plot_seeds(by_seed, results)
        report += ["![seeds](seeds.png)", ""]
    if not args.no_sweep:
        sweep_steps = max(all_studies[0].steps // 2, 10)
        report += sweep_section(all_studies[0], results, args.fresh, sweep_steps) + ["![lr sweep](lr_sweep.png)", ""]
    (results / "comparison.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()

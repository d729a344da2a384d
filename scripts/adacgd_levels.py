"""AdaCGD's bytes per step adapt over a run: the level each worker and the servers choose, and the skip rate.

    python scripts/adacgd_levels.py                          # 4 runs of 400 steps: results/adacgd/
    python scripts/adacgd_levels.py --steps 20 --out /tmp/a  # a smoke run

The problem is ``deepspeed_cdadam.problems.NonconvexLogistic`` (the CD-Adam paper's section 7.1
objective: logistic loss with a nonconvex regulariser), its workers' data heterogeneous, each worker
taking its full local gradient every step (the 3PC experiments' setting) or a minibatch, on 2 in-process ranks
(``InProcessWorld``: the optimizer's own collectives, between threads). The step size is the spec's
DERIVED safe one (``optim.adacgd.safe_stepsize``) from the problem's smoothness constants, times
``--stepsize-multiplier`` (the 3PC experiments sweep such a multiplier; 1 is the bound itself).

Four runs: full local gradients and minibatches (``--batch`` samples per worker per step), each with
``zeta = 1`` (the optimizer's default) and ``zeta = beta(alpha_m)``, the largest zeta whose DERIVED safe
step size is the one of EF21 at the finest level (``optim.adacgd.three_pc_constants``). Writes one CSV
row per step and run (levels, skips, bytes, loss, gradient norm: ``levels.csv``), a figure of the
levels, the skip rates and the bytes per step (``levels.png``), and what it prints (``summary.txt``).
Bytes are rank 0's, as ``CommStats`` counts them (headers, partial norms and envelope padding
included); "finest" is what the same exchange sends at the finest level on every step (EF21 with that
top-k, both ways), "fp32" an fp32 ring all-reduce. The first step (exact) is left out of the summaries.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from deepspeed_cdadam import AdaCGD, InProcessWorld
from deepspeed_cdadam.comm.accounting import all_gather_bytes_sent, all_reduce_bytes_sent, all_to_all_bytes_sent
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors.adaptive_topk import NestedTopK
from deepspeed_cdadam.optim.adacgd import finest_contraction, safe_stepsize, three_pc_constants
from deepspeed_cdadam.problems import NonconvexLogistic

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "step", "kind", "level_worker0", "level_worker1", "level_down", "up_skip_rate", "down_skip",
    "bytes_up", "bytes_down", "bytes_sent", "payload_up", "payload_down", "loss", "grad_norm",
)  # fmt: skip


# --- the problem and its constants ---------------------------------------------------------------
def smoothness(problem: NonconvexLogistic) -> tuple[float, float]:
    """(L of the mean objective, L_tilde = sqrt(mean_i L_i^2)): the logistic part's Hessian is at most
    A_i^T A_i / (4 m_i), the regulariser's second derivative at most 2 lam per coordinate."""
    local = [a.T @ a / (4 * a.shape[0]) for a in problem.features]
    top = [float(torch.linalg.eigvalsh(h.double())[-1]) for h in local]
    mean = float(torch.linalg.eigvalsh(sum(h.double() for h in local) / len(local))[-1])
    reg = 2 * problem.lam
    return mean + reg, (sum((t + reg) ** 2 for t in top) / len(top)) ** 0.5


# --- the run ----------------------------------------------------------------------------------------
def minibatch_grad(problem: NonconvexLogistic, worker: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``problem.grad`` (the same formula) on the samples ``rows`` of the worker's data only."""
    a, y = problem.features[worker][rows], problem.labels[worker][rows]
    s = torch.sigmoid(-y * (a @ x))
    return -(a * (y * s).unsqueeze(1)).mean(0) + problem.lam * 2 * x / (1 + x * x) ** 2


def train(
    problem: NonconvexLogistic, steps: int, lr: float, ratios: tuple[float, ...], zeta: float, batch: int | None
) -> list[dict]:
    n = problem.n_workers

    def worker(rank, transport):
        x = torch.nn.Parameter(torch.zeros(problem.features[0].shape[1], dtype=problem.features[0].dtype))
        opt = AdaCGD([x], lr=lr, ratios=ratios, zeta=zeta, transport=transport)
        rows = []
        for step in range(1, steps + 1):
            if batch is None:
                x.grad = problem.grad(rank, x.detach())
            else:  # each worker its own samples, drawn per step and rank
                gen = torch.Generator().manual_seed(1000 * step + rank)
                picked = torch.randperm(problem.features[rank].shape[0], generator=gen)[:batch]
                x.grad = minibatch_grad(problem, rank, x.detach(), picked)
            before = opt.comm_stats.snapshot()
            opt.step()
            if rank != 0:
                continue
            rec, after = opt.last_levels()[0], opt.comm_stats
            exact = rec.kind == "exact"
            up = rec.up_levels or (None,) * n
            rows.append({
                "step": step, "kind": rec.kind, "level_worker0": up[0], "level_worker1": up[1],
                "level_down": rec.down_level,
                "up_skip_rate": None if exact else sum(level == 0 for level in up) / n,
                "down_skip": None if exact else int(rec.down_level == 0),
                "bytes_up": after.bytes_up - before.bytes_up, "bytes_down": after.bytes_down - before.bytes_down,
                "bytes_sent": after.bytes_sent - before.bytes_sent,
                "payload_up": rec.payload_bytes_up, "payload_down": rec.payload_bytes_down,
                "loss": float(problem.loss(x.detach())), "grad_norm": problem.grad_norm(x.detach()),
            })  # fmt: skip
        return rows

    return InProcessWorld(n).run(worker)[0]


def finest_bytes(numel: int, n: int, ratios: tuple[float, ...], item: int) -> float:
    """Bytes one rank sends per step at the finest level both ways, headers and norms left out (EF21)."""
    layout = ShardLayout(numel, n)
    dtype = torch.float32 if item == 4 else torch.float64
    width = NestedTopK(ratios).level_wire_nbytes(len(ratios), layout.capacity, dtype)
    return all_to_all_bytes_sent(width, n) + all_gather_bytes_sent(width, n) + all_reduce_bytes_sent(4 * n, n)


# --- output -----------------------------------------------------------------------------------------
def phases(rows: list[dict], count: int = 4) -> list[list[dict]]:
    compressed = [r for r in rows if r["kind"] == "compressed"]
    size = max(1, -(-len(compressed) // count))
    return [compressed[i : i + size] for i in range(0, len(compressed), size)]


def summarise(rows: list[dict], m: int, finest: float, fp32: float) -> str:
    """One line per quarter of the compressed steps: the share of each choice, bytes per step, the loss."""
    levels = "  ".join(f"L{j}" for j in range(1, m + 1))
    lines = [f"{'steps':>11}  {'up: skip  ' + levels:<28}{'down: skip  ' + levels:<30}{'bytes/step':>11}"
             f"{'vs finest':>10}{'vs fp32':>9}{'loss':>9}"]  # fmt: skip
    for part in phases(rows):
        ups = [r[f"level_worker{w}"] for r in part for w in (0, 1)]
        downs = [r["level_down"] for r in part]
        share_up = "  ".join(f"{ups.count(j) / len(ups):.2f}" for j in range(m + 1))
        share_down = "  ".join(f"{downs.count(j) / len(downs):.2f}" for j in range(m + 1))
        sent = sum(r["bytes_sent"] for r in part) / len(part)
        lines.append(
            f"{part[0]['step']:>5}-{part[-1]['step']:<5}  {share_up:<28}{share_down:<30}{sent:>11.0f}"
            f"{sent / finest:>10.2f}{sent / fp32:>9.3f}{part[-1]['loss']:>9.4f}"
        )
    comp = [r for r in rows if r["kind"] == "compressed"]
    total = sum(r["bytes_sent"] for r in comp)
    lines.append(
        f"all compressed steps: {total / len(comp):.0f} bytes/step, {total / (finest * len(comp)):.3f} of the finest "
        f"level every step, {total / (fp32 * len(comp)):.4f} of fp32; skip rate up "
        f"{sum(r['up_skip_rate'] for r in comp) / len(comp):.2f}, "
        f"down {sum(r['down_skip'] for r in comp) / len(comp):.2f}; "
        f"loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, ||grad f|| {rows[0]['grad_norm']:.3e} -> "
        f"{rows[-1]['grad_norm']:.3e}"
    )
    return "\n".join(lines)


def rolling(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def plot(runs: dict[str, list[dict]], m: int, finest: float, fp32: float, path: Path) -> None:
    """One column per run: the levels chosen, the skip rates (20-step mean), the bytes per step."""
    fig, axes = plt.subplots(3, len(runs), figsize=(4.6 * len(runs), 8.5), sharex=True, squeeze=False)
    for col, (label, rows) in enumerate(runs.items()):
        comp = [r for r in rows if r["kind"] == "compressed"]
        steps = [r["step"] for r in comp]
        ax_level, ax_skip, ax_bytes = axes[:, col]
        for w, marker in ((0, "o"), (1, "s")):
            ax_level.scatter(steps, [r[f"level_worker{w}"] + (w - 0.5) * 0.15 for r in comp], s=5, marker=marker,
                             label=f"worker {w} (up)")  # fmt: skip
        ax_level.scatter(steps, [r["level_down"] + 0.3 for r in comp], s=8, marker="x", color="k",
                         label="servers (down)")  # fmt: skip
        ax_level.set_yticks(range(m + 1), ["skip"] + [f"level {j}" for j in range(1, m + 1)])
        ax_level.set_title(label, fontsize=9)
        ax_skip.plot(steps, rolling([r["up_skip_rate"] for r in comp], 20), label="workers (up)")
        ax_skip.plot(steps, rolling([r["down_skip"] for r in comp], 20), label="servers (down)")
        ax_skip.set_ylim(-0.02, 1.02)
        ax_bytes.plot(steps, rolling([r["bytes_sent"] for r in comp], 20), lw=1, label="AdaCGD, as sent")
        ax_bytes.plot(steps, rolling([r["payload_up"] + r["payload_down"] for r in comp], 20), lw=1,
                      label="AdaCGD, information bytes")  # fmt: skip
        ax_bytes.axhline(finest, color="r", ls="--", lw=1, label="finest level every step (EF21)")
        ax_bytes.axhline(fp32, color="gray", ls=":", lw=1, label="fp32 all-reduce")
        ax_bytes.set_yscale("log")
        ax_bytes.set_xlabel("step")
        if col == 0:
            ax_level.set_ylabel("level chosen")
            ax_skip.set_ylabel("skip rate (20-step mean)")
            ax_bytes.set_ylabel("bytes rank 0 sent (20-step mean)")
            ax_level.legend(loc="center right", fontsize=7)
            ax_skip.legend(fontsize=7)
            ax_bytes.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--samples", type=int, default=400, help="per worker")
    parser.add_argument("--batch", type=int, default=32, help="samples per worker per step in the minibatch runs")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.04, 0.16])
    parser.add_argument("--stepsize-multiplier", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "adacgd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: list[str] = []

    def say(text: str) -> None:  # printed, and kept for summary.txt
        print(text)
        report.append(text)

    ratios, m = tuple(args.ratios), len(args.ratios)
    problem = NonconvexLogistic.synthetic(n_workers=2, samples=args.samples, dim=args.dim, dtype=torch.float32)
    L, L_tilde = smoothness(problem)
    alpha = finest_contraction(ratios[-1], ShardLayout(args.dim, 2).shard_sizes)
    free = three_pc_constants(alpha, 0.0)[1]  # beta(alpha_m): the largest zeta with EF21's derived step size
    safe = safe_stepsize(L, L_tilde, alpha, 1.0)
    assert safe == safe_stepsize(L, L_tilde, alpha, free)  # the same bound for every zeta <= beta(alpha_m)
    lr = safe * args.stepsize_multiplier
    say(f"NonconvexLogistic, 2 workers, d={args.dim}, {args.samples} samples each; levels {ratios} of each shard")
    say(f"L={L:.3f}, L_tilde={L_tilde:.3f}, alpha_m={alpha:.4f}, beta(alpha_m)={free:.2f}: safe step size "
          f"{safe:.3e} for every zeta <= beta(alpha_m); lr={lr:.3e}")  # fmt: skip
    configs = [(None, 1.0), (None, free), (args.batch, 1.0), (args.batch, free)]
    finest = finest_bytes(args.dim, 2, ratios, 4)
    fp32 = all_reduce_bytes_sent(4 * args.dim, 2) + all_reduce_bytes_sent(8, 2)
    runs: dict[str, list[dict]] = {}
    for batch, zeta in configs:
        label = f"{'full local gradients' if batch is None else f'minibatch {batch}'}, zeta={zeta:.3g}"
        rows = train(problem, args.steps, lr, ratios, zeta, batch)
        for row in rows:
            row.update(run=label, batch=batch or args.samples, zeta=zeta)
        runs[label] = rows
        say(f"\n{label}: share of each choice per quarter of the compressed steps (up: both workers)")
        say(summarise(rows, m, finest, fp32))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "levels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ("run", "batch", "zeta", *FIELDS))
        writer.writeheader()
        for rows in runs.values():
            writer.writerows(rows)
    plot(runs, m, finest, fp32, args.out / "levels.png")
    (args.out / "summary.txt").write_text("\n".join(report) + "\n")
    print(f"\nwrote {args.out / 'levels.csv'}, {args.out / 'levels.png'} and {args.out / 'summary.txt'}")


if __name__ == "__main__":
    main()

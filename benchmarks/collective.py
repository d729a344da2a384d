"""Collective benchmark: bytes and time of the compressed exchanges vs an fp32 all-reduce.

    python benchmarks/collective.py [--world-sizes 2 4] [--sizes 1e6 1e7 1e8] [--repeats 3]

Each world size runs as gloo processes on this machine (loopback: the network is not the
bottleneck here, so times show the compute cost of compression; see emulated_cluster.py for a
rate-limited network). For every buffer size it times, per step and on the same random buffer:
an fp32 ``all_reduce`` (what Adam sends), 1-bit Adam's compressed phase (error feedback, L2 sign),
and CD-Adam's exchange (Markov, scaled sign, both ways) with blocks of 2048 (fused CPU kernels) and
with one scale per shard (the paper's layout, eager torch). Bytes are what one rank sends under
ring/pairwise collectives, counted by the code (``CommStats``). Writes
``benchmarks/results/collective.csv`` and ``collective.png`` and prints a table with ratios.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange_methods import METHODS, time_methods

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def _rank(rank: int, world: int, init: str, sizes: list[int], repeats: int, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    rows = [row for numel in sizes for row in time_methods(numel, repeats)]
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder for the CSV, text and PNG")
    args = parser.parse_args()
    rows = []
    for world in args.world_sizes:
        # about 12 fp32 buffers of the full size live per rank (inputs, states, temporaries)
        budget = psutil.virtual_memory().available * 0.8
        sizes = [int(s) for s in args.sizes if world * 12 * 4 * s <= budget]
        skipped = [f"{int(s):,}" for s in args.sizes if world * 12 * 4 * s > budget]
        if skipped:
            print(f"{world} ranks: skipping {', '.join(skipped)} parameters (not enough memory on this machine)")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_rank, args=(world, os.path.join(tmp, "init"), sizes, args.repeats, out), nprocs=world)
            rows += torch.load(out)
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "collective.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo loopback"
    )
    print(
        f"{'ranks':>5} {'numel':>11} {'method':<30} {'time/step':>10} {'MB sent':>9} {'bytes vs fp32':>13} {'time vs fp32':>12}"
    )
    for r in rows:
        base = next(
            b
            for b in rows
            if b["world_size"] == r["world_size"] and b["numel"] == r["numel"] and b["method"] == METHODS[0]
        )
        print(
            f"{r['world_size']:>5} {r['numel']:>11,} {r['method']:<30} {r['seconds'] * 1e3:>8.1f}ms "
            f"{r['bytes_sent_per_rank'] / 1e6:>9.2f} {r['bytes_sent_per_rank'] / base['bytes_sent_per_rank']:>13.4f} "
            f"{r['seconds'] / base['seconds']:>11.2f}x"
        )
    _plot(rows, args.results)


def _plot(rows: list[dict], results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for world, style in zip(worlds, ("-", "--", ":")):
        for method, color in zip(METHODS, ("C0", "C1", "C2", "C3")):
            pts = sorted((r["numel"], r) for r in rows if r["world_size"] == world and r["method"] == method)
            xs = [n for n, _ in pts]
            axes[0].plot(
                xs, [r["seconds"] for _, r in pts], style, color=color, marker="o", label=f"{method}, {world} ranks"
            )
            axes[1].plot(
                xs,
                [r["bytes_sent_per_rank"] for _, r in pts],
                style,
                color=color,
                marker="o",
                label=f"{method}, {world} ranks",
            )
    for ax, title in zip(axes, ("time per step (gloo, loopback)", "bytes one rank sends per step")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "collective.png", dpi=120)


if __name__ == "__main__":
    main()

"""Kernel benchmark: the worker's compression step vs copying the buffer once (memory-bandwidth bound).

    python benchmarks/kernels.py [--numel 5e7] [--threads 2] [--repeats 5]

Times, single process, on one fp32 buffer: a plain copy; the eager torch pieces of CD-Adam's
worker step (Markov delta, L1 scale, sign packing, unpacking + scaling, Markov state update); and
the whole step. Prints each as a multiple of the copy time against the target (<= 3x), and writes
``benchmarks/results/kernels.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from deepspeed_cdadam.compressors import ScaledSignL1, pack_signs, unpack_signs
from deepspeed_cdadam.compressors.sign import l1_block_scales

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 3.0


def _median(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=5e7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = int(args.numel)
    g = torch.randn(n)
    h = torch.randn(n) * 0.1
    dst = torch.empty_like(g)
    comp = ScaledSignL1()
    delta = g - h
    packed = pack_signs(delta)

    def worker_step():
        d = g - h  # (1) Markov delta
        c = comp.compress(d, (n,))  # L1 scale + sign packing
        wire = comp.to_wire(c, n, 1, d.dtype)  # what goes on the wire
        h.add_(comp.decompress(comp.from_wire(wire, n, (n,), n, d.dtype), dtype=d.dtype))  # (2) h += C(d)

    timings = {
        "copy (reference)": _median(lambda: dst.copy_(g), args.repeats),
        "markov delta g - h": _median(lambda: torch.sub(g, h, out=dst), args.repeats),
        "L1 scale": _median(lambda: l1_block_scales(delta, (n,)), args.repeats),
        "pack signs": _median(lambda: pack_signs(delta), args.repeats),
        "unpack + scale": _median(lambda: unpack_signs(packed, n).mul_(0.5), args.repeats),
        "worker step (eager torch, all of the above + state update)": _median(worker_step, args.repeats),
    }
    copy = timings["copy (reference)"]
    gbps = 2 * 4 * n / copy / 1e9
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"torch {torch.__version__}; {n:,} fp32; copy {copy * 1e3:.1f} ms = {gbps:.1f} GB/s (read + write)"
    )
    print(f"{'piece':<60} {'ms':>8} {'x copy':>7}")
    rows = []
    for name, sec in timings.items():
        print(f"{name:<60} {sec * 1e3:>8.1f} {sec / copy:>7.1f}")
        rows.append({"piece": name, "numel": n, "threads": args.threads, "seconds": sec, "times_copy": sec / copy})
    step = timings["worker step (eager torch, all of the above + state update)"] / copy
    verdict = "meets" if step <= TARGET else "misses"
    print(f"worker step = {step:.1f}x copy: {verdict} the target of {TARGET:.0f}x")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "kernels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()

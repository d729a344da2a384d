"""Host time of one optimizer step: many small parameters, so the Python around the math is what is timed.

    python benchmarks/host_overhead.py            # 150 parameters (GPT-2 small has 148), 140k coordinates

On a GPU a step's kernels are short and many (GPT-2 small, H200: 4.2 ms on the device, ~7 ms in all,
``results/gpu/``), so the host's per-step work decides how soon the device gets them. That work runs
on any machine: here one rank (in-process transport), one thread, parameters of 64 to 4,096
coordinates, and the median of ``--steps`` steps per optimizer (after 5 warm-up steps), beside
``torch.optim.AdamW(foreach=True)`` for scale. Writes ``<results>/host_overhead.csv`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [64, 256, 64, 192, 4096]  # repeated: ~GPT-2's mix of biases, norms and matrices, scaled down


def builders(transport):
    return {
        "AdamW (torch, foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "CDAdam (block 2048)": lambda ps: CDAdam(ps, lr=1e-4, block_size=2048, transport=transport),
        "OneBitAdam (compressed phase)": lambda ps: OneBitAdam(ps, lr=1e-4, freeze_step=1, transport=transport),
    }


def time_steps(build, repeat: int, steps: int) -> float:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SIZES * repeat]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opt = build(params)

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    for _ in range(5):  # warm-up: state, buckets, 1-bit Adam past its freeze_step
        step()
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="copies of the 5 parameter sizes (30: 150 parameters)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transport = InProcessWorld(1).transports[0]
    n = len(SIZES) * args.repeat
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    lines = [f"host time per optimizer step: {n} parameters, {sum(SIZES) * args.repeat:,} coordinates; {machine}"]
    rows = []
    for name, build in builders(transport).items():
        seconds = time_steps(build, args.repeat, args.steps)
        rows.append({"machine": machine, "method": name, "params": n, "ms_per_step": round(seconds * 1e3, 4)})
        lines.append(f"{name:32} {seconds * 1e3:8.3f} ms")
    text = "\n".join(lines)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "host_overhead.txt").write_text(text + "\n")
    with open(args.results / "host_overhead.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()

"""GPU: sweep the Triton exchange kernels' two knobs (coordinates per program, warps per program).

    python benchmarks/gpu_tune.py                      # on a GPU machine: 110M params, 4 tiles x 3 warp counts
    python benchmarks/gpu_tune.py --device cpu --sizes 2e5 --tiles 4096 --warps 4 --repeats 1   # dry run

Issue "GPU for real" left CD-Adam's block-256 and one-block kernels and 1-bit Adam's 5-10% over their
targets (worker step <= 4x a device copy, whole exchange <= 10x) at the default ``TILE`` 4096 and 4-8
warps. Each setting runs ``gpu.exchange_rows`` (the same timing and fused-vs-eager check as
``benchmarks/gpu.py``) inside ``triton_exchange.tuned(tile, num_warps)``; a setting changes no bit of
any result but the scales' summation order (``tests/kernels/test_triton_exchange.py``). Reports, per
scheme and piece, the default's ratio to a copy, the best setting and its ratio, and whether the
target is met. On CPU the exchanges take the eager path (the kernels are for CUDA): a dry run of the
script, not of the knobs.

Writes ``<results>/gpu_tune.csv`` and ``gpu_tune.txt`` with the device's name.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402

from deepspeed_cdadam.kernels import triton_exchange as tx  # noqa: E402

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
TARGETS = {"worker step": 4.0, "whole exchange": 10.0}


def sweep(sizes: list[int], tiles: list[int], warps: list[int | None], device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for numel in sizes:
        for tile in tiles:
            for w in warps:
                with tx.tuned(tile=tile, num_warps=w):
                    for r in gpu.exchange_rows(numel, device, repeats):
                        rows.append({**r, "tile": tile, "warps": "auto" if w is None else w})
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per (size, scheme, piece): the default setting's ratio, the best one's, and the target."""
    lines = []
    keys = dict.fromkeys((r["numel"], r["method"], r["piece"]) for r in rows if r["piece"] in TARGETS)
    for numel, method, piece in keys:
        mine = [r for r in rows if (r["numel"], r["method"], r["piece"]) == (numel, method, piece)]
        best = min(mine, key=lambda r: r["times_copy"])
        default = next((r for r in mine if r["tile"] == 4096 and r["warps"] == "auto"), None)
        was = f"{default['times_copy']:.2f}x" if default else "not swept"
        target = TARGETS[piece]
        verdict = "met" if best["times_copy"] <= target else "NOT met"
        lines.append(
            f"{numel / 1e6:7.1f}M {method:38} {piece:15} default {was:>9}  best {best['times_copy']:.2f}x at tile "
            f"{best['tile']}, warps {best['warps']} (target <= {target:g}x: {verdict})  [{best.get('check', '')}]"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--sizes", type=float, nargs="+", default=[110e6])
    parser.add_argument("--tiles", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--warps", nargs="+", default=["auto", "4", "8", "16"],
                        help="warps per program; 'auto' is the kernels' default (8 for >= 4096 coordinates, else 4)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    warps = [None if w == "auto" else int(w) for w in args.warps]

    device, card = gpu.start_world_of_one(args.device)
    try:
        rows = sweep([int(s) for s in args.sizes], args.tiles, warps, device, args.repeats)
    finally:
        dist.destroy_process_group()
    title = f"{card}, torch {torch.__version__}: Triton exchange kernels, tile x warps (ratios to one device copy)"
    if device.type != "cuda":
        title += " [CPU: the eager path; the knobs do not apply]"
    text = "\n".join([title, "", *summary(rows)])
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gpu_tune.txt").write_text(text + "\n")
    fields = ["device", "numel", "method", "piece", "tile", "warps", "seconds", "times_copy", "check"]
    with open(args.results / "gpu_tune.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "device": card} for r in rows)


if __name__ == "__main__":
    main()

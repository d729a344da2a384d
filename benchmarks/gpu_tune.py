"""GPU: sweep the Triton exchange kernels' knobs (coordinates per program, warps per program, 16-byte loads).

    python benchmarks/gpu_tune.py                      # on a GPU machine: 110M params, 4 tiles x 4 warp counts
    python benchmarks/gpu_tune.py --device cpu --sizes 2e5 --tiles 4096 --warps 4 --repeats 1   # dry run

Issue "GPU for real" left CD-Adam's block-256 and one-block kernels and 1-bit Adam's 5-10% over their
targets (worker step <= 4x a device copy, whole exchange <= 10x) at the default ``TILE`` 4096 and 4-8
warps. Each setting runs ``gpu.exchange_rows`` (the same timing as ``benchmarks/gpu.py``; the fused-vs-eager
check on the first setting only) inside ``triton_exchange.tuned(tile, num_warps, vector_loads)``; a setting
changes no bit of any result but the scales' summation order (``tests/kernels/test_triton_exchange.py``).
The first two settings are the defaults with and without ``VECTOR_LOADS`` (the kernels' ``EVEN`` variant:
16-byte loads where every shard is a multiple of 8 long, as here), so one run shows what that gains.
Reports, per scheme and piece, the default's ratio to a copy, the same without vector loads, the best
setting and its ratio, and whether the target is met. On CPU the exchanges take the eager path (the
kernels are for CUDA): a dry run of the script, not of the knobs.

Writes ``<results>/gpu_tune.csv`` and ``gpu_tune.txt`` with the device's name, after every setting (a
run stopped by a time limit keeps what it measured).
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


def settings(tiles: list[int], warps: list[int | None]) -> list[tuple[int, int | None, bool]]:
    """(tile, warps, vector loads): the defaults with and without vector loads first, then the grid."""
    first = [(tx.TILE, tx.NUM_WARPS, True), (tx.TILE, tx.NUM_WARPS, False)]
    return first + [(t, w, True) for t in tiles for w in warps if (t, w, True) not in first]


def sweep(sizes: list[int], grid: list[tuple[int, int | None, bool]], device: torch.device, repeats: int,
          report=lambda rows: None) -> list[dict]:  # fmt: skip
    rows: list[dict] = []
    for numel in sizes:
        for i, (tile, w, vector) in enumerate(grid):
            with tx.tuned(tile=tile, num_warps=w, vector_loads=vector):
                for r in gpu.exchange_rows(numel, device, repeats, check=i == 0):
                    rows.append({**r, "tile": tile, "warps": "auto" if w is None else w, "vector_loads": vector})
            report(rows)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per (size, scheme, piece): the default setting's ratio (and without vector loads), the best one's, the target."""
    lines = []
    keys = dict.fromkeys((r["numel"], r["method"], r["piece"]) for r in rows if r["piece"] in TARGETS)
    default_warps = "auto" if tx.NUM_WARPS is None else tx.NUM_WARPS
    for numel, method, piece in keys:
        mine = [r for r in rows if (r["numel"], r["method"], r["piece"]) == (numel, method, piece)]
        best = min(mine, key=lambda r: r["times_copy"])

        def at_default(vector: bool, mine=mine) -> str:
            r = next((r for r in mine if (r["tile"], r["warps"], r["vector_loads"]) == (tx.TILE, default_warps, vector)), None)
            return f"{r['times_copy']:.2f}x" if r else "not run"

        target = TARGETS[piece]
        verdict = "met" if best["times_copy"] <= target else "NOT met"
        check = next((r["check"] for r in mine if r.get("check")), "")
        lines.append(
            f"{numel / 1e6:7.1f}M {method:38} {piece:15} default {at_default(True):>7} (scalar loads "
            f"{at_default(False):>7})  best {best['times_copy']:.2f}x at tile {best['tile']}, warps {best['warps']}"
            f"{'' if best['vector_loads'] else ', scalar loads'} (target <= {target:g}x: {verdict})  [{check}]"
        )
    return lines


def write(rows: list[dict], title: str, card: str, results: Path) -> str:
    text = "\n".join([title, "", *summary(rows)])
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_tune.txt").write_text(text + "\n")
    fields = ["device", "numel", "method", "piece", "tile", "warps", "vector_loads", "seconds", "times_copy", "check"]
    with open(results / "gpu_tune.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "device": card} for r in rows)
    return text


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
    title = f"{card}, torch {torch.__version__}: Triton exchange kernels, tile x warps x vector loads (ratios to one device copy)"
    if device.type != "cuda":
        title += " [CPU: the eager path; the knobs do not apply]"
    try:
        rows = sweep([int(s) for s in args.sizes], settings(args.tiles, warps), device, args.repeats,
                     report=lambda rows: write(rows, title, card, args.results))  # fmt: skip
    finally:
        dist.destroy_process_group()
    print(write(rows, title, card, args.results))


if __name__ == "__main__":
    main()

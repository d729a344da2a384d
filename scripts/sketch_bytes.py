"""SketchedAMSGrad's bytes per step against the model size d: O(k log d).

    .venv/bin/python scripts/sketch_bytes.py                      # d = 1e4, 1e5, 1e6; k = 1000; 2 ranks
    .venv/bin/python scripts/sketch_bytes.py --sizes 4096 65536 --k 64 --world-size 4

For each d, one bucket of d fp32 parameters takes one step of ``SketchedAMSGrad`` on ``--world-size``
in-process ranks (real reduce-scatter / all-gather of the sketches, counted by ``CommStats``), with the
sketch sized as the spec says: ``r = ceil(log2 d)`` rows, ``c = 16 k`` columns (the defaults). It
prints, per d, the bytes one rank sent in that step (sketch exchange and step agreement), the bytes
per row of the sketch (constant: ``O(k)``), and the share of an fp32 ring all-reduce of the d values.
"""

from __future__ import annotations

import argparse
import math

import torch

from deepspeed_cdadam import InProcessWorld, SketchedAMSGrad
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.compressors.count_sketch import CountSketch


def measure(d: int, k: int, world_size: int) -> dict[str, float]:
    """One step on ``world_size`` ranks; rank 0's bytes."""

    def run(rank, transport):
        p = torch.nn.Parameter(torch.zeros(d))
        opt = SketchedAMSGrad([p], k=k, transport=transport)
        p.grad = torch.randn(d, generator=torch.Generator().manual_seed(rank))
        opt.step()
        return opt.comm_stats

    stats = InProcessWorld(world_size).run(run)[0]
    shape = CountSketch(k).shape(d)
    sketch_bytes = stats.bytes_up + stats.bytes_down
    return {
        "d": d,
        "rows": shape.rows,
        "columns": shape.columns,
        "sent": stats.bytes_sent,
        "sketch": sketch_bytes,
        "per_row": sketch_bytes / shape.rows,
        "fp32_share": stats.bytes_sent / all_reduce_bytes_sent(4 * d, world_size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    print(f"SketchedAMSGrad, k = {args.k}, {args.world_size} ranks, fp32, one step (bytes one rank sent)\n")
    print("| d | log2 d | rows r | columns c | bytes sent | sketch bytes | sketch bytes per row | of fp32 all-reduce |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in args.sizes:
        m = measure(d, args.k, args.world_size)
        print(
            f"| {d:,} | {math.log2(d):.1f} | {m['rows']} | {m['columns']:,} | {m['sent']:,.0f} | {m['sketch']:,.0f} "
            f"| {m['per_row']:,.0f} | {m['fp32_share']:.4f} |"
        )


if __name__ == "__main__":
    main()

"""Kernel benchmark: the workers' compression steps vs copying the buffer once (memory-bandwidth bound).

    python benchmarks/kernels.py [--numel 5e7] [--threads 2] [--repeats 7] [--block-size 2048]

Single process, one fp32 buffer. Times a plain copy; the eager torch pieces of CD-Adam's worker
step (Markov delta, L1 scale, sign packing, unpacking + scaling); CD-Adam's whole worker step
(``d = g - h``, block scales, signs packed into the wire message, ``h += C(d)``) and 1-bit Adam's
(error feedback as upstream OnebitAdam: ``p = x + e``, one L2 scale for the whole buffer, signs
packed, ``e = p - C(p)``), each in eager torch and on the fused CPU kernels
(``deepspeed_cdadam.kernels``), checking that both give the same bits before timing. Prints each
as GB/s of fp32 input and as a multiple of the copy time, against the target (fused worker steps
<= 3x a copy); writes ``benchmarks/results/kernels.{csv,txt,png}``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from deepspeed_cdadam import InProcessWorld, kernels
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1, ScaledSignL2, pack_signs, unpack_signs
from deepspeed_cdadam.compressors.sign import l1_block_scales
from deepspeed_cdadam.exchange import ErrorFeedbackExchange, MarkovExchange, make_exchange
from deepspeed_cdadam.kernels import cpu_exchange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange_methods import describe_machine

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 3.0


def _median(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def eager_worker_step(g: torch.Tensor, h: torch.Tensor, exchange: MarkovExchange) -> torch.Tensor:
    """MarkovExchange's eager steps (1)-(2): wire messages out, ``h += C(g - h)`` in place."""
    wire, c = exchange.encode_up(g - h, step=1, group=0)
    h += c
    return wire


def eager_error_feedback_step(x: torch.Tensor, e: torch.Tensor, exchange: ErrorFeedbackExchange) -> torch.Tensor:
    """ErrorFeedbackExchange's eager step (1): ``p = x + e``, wire messages out, ``e = p - C(p)`` in place."""
    p = x + e
    wire, c = exchange.encode_up(p, step=1, group=0)
    torch.sub(p, c, out=e)
    return wire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=5e7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder for the CSV, text and PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = int(args.numel)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, generator=gen)
    h = torch.randn(n, generator=gen) * 0.1
    dst = torch.empty_like(g)
    comp = ScaledSignL1()
    delta = g - h
    packed = pack_signs(delta)
    blocked = ShardLayout(n, 1, args.block_size)
    transport = InProcessWorld(1).transports[0]  # encoding needs no peers
    eager_blocked = make_exchange("markov", transport, blocked, comp)
    eager_single = make_exchange("markov", transport, ShardLayout(n, 1, None), comp)
    width = comp.wire_nbytes(blocked.capacity, blocked.max_blocks, g.dtype)

    # the fused kernel must give the eager path's bits before it is timed
    h_eager, h_fused = h.clone(), h.clone()
    wire_eager = eager_worker_step(g, h_eager, eager_blocked)
    wire_fused = kernels.markov_worker_step(g, h_fused, blocked, width)
    identical = torch.equal(wire_eager, wire_fused) and torch.equal(h_eager, h_fused)
    if not identical:
        raise SystemExit("fused kernel differs from the eager path: not timing it")

    # 1-bit Adam's worker step (upstream OnebitAdam: sign_l2, one scale for the whole buffer)
    onebit = ShardLayout(n, 1, None)
    ef_eager = make_exchange("error_feedback", transport, onebit, ScaledSignL2(worker_scale_scope="tensor"))
    ef_fused = make_exchange("error_feedback", transport, onebit, ScaledSignL2(worker_scale_scope="tensor"))
    assert isinstance(ef_fused, ErrorFeedbackExchange) and ef_fused.uses_fused_kernel(g, h)
    e_eager, e_fused = h.clone(), h.clone()
    wire_eager = eager_error_feedback_step(g, e_eager, ef_eager)
    wire_fused = cpu_exchange.error_feedback_encode_up(ef_fused, g, e_fused)
    ef_identical = torch.equal(wire_eager, wire_fused) and torch.equal(e_eager, e_fused)
    if not ef_identical:
        raise SystemExit("fused error-feedback step differs from the eager path: not timing it")
    del e_eager, e_fused, wire_eager

    h_work, e_work = h.clone(), h.clone()
    fused_name = f"worker step, fused kernel (block {args.block_size})"
    ef_eager_name = "1-bit Adam worker step, eager torch (one L2 scale)"
    ef_fused_name = "1-bit Adam worker step, fused kernel (one L2 scale)"
    timings = {
        "copy (reference)": _median(lambda: dst.copy_(g), args.repeats),
        "markov delta g - h": _median(lambda: torch.sub(g, h, out=dst), args.repeats),
        f"L1 scales (block {args.block_size})": _median(
            lambda: l1_block_scales(delta, blocked.block_sizes()), args.repeats
        ),
        "L1 scale (one block)": _median(lambda: l1_block_scales(delta, (n,)), args.repeats),
        "pack signs": _median(lambda: pack_signs(delta), args.repeats),
        "unpack + scale": _median(lambda: unpack_signs(packed, n).mul_(0.5), args.repeats),
        f"worker step, eager torch (block {args.block_size})": _median(
            lambda: eager_worker_step(g, h_work, eager_blocked), args.repeats
        ),
        "worker step, eager torch (one block per shard)": _median(
            lambda: eager_worker_step(g, h_work, eager_single), args.repeats
        ),
        fused_name: _median(lambda: kernels.markov_worker_step(g, h_work, blocked, width), args.repeats),
        ef_eager_name: _median(lambda: eager_error_feedback_step(g, e_work, ef_eager), args.repeats),
        ef_fused_name: _median(lambda: cpu_exchange.error_feedback_encode_up(ef_fused, g, e_work), args.repeats),
    }
    copy = timings["copy (reference)"]
    lines = [
        f"machine: {describe_machine()}",
        (
            f"{args.threads} threads; {n:,} fp32; copy {copy * 1e3:.1f} ms = {2 * 4 * n / copy / 1e9:.1f} GB/s"
            " (read + write)"
        ),
        f"fused kernel == eager path, bit for bit (wire bytes and Markov state): {identical}",
        f"fused error-feedback step == eager path, bit for bit (wire bytes and worker error): {ef_identical}",
        f"{'piece':<52} {'ms':>8} {'GB/s in':>8} {'x copy':>7}",
    ]
    rows = []
    for name, sec in timings.items():
        lines.append(f"{name:<52} {sec * 1e3:>8.1f} {4 * n / sec / 1e9:>8.1f} {sec / copy:>7.1f}")
        rows.append({"piece": name, "numel": n, "threads": args.threads, "seconds": sec, "times_copy": sec / copy})
    step = timings[fused_name] / copy
    eager = timings[f"worker step, eager torch (block {args.block_size})"] / copy
    verdict = "meets" if step <= TARGET else "misses"
    lines.append(
        f"fused worker step = {step:.1f}x copy ({eager / step:.1f}x faster than eager): {verdict} the target of {TARGET:.0f}x"
    )
    ef_step, ef_eager_step = timings[ef_fused_name] / copy, timings[ef_eager_name] / copy
    verdict = "meets" if ef_step <= TARGET else "misses"
    lines.append(
        f"fused 1-bit Adam worker step = {ef_step:.1f}x copy ({ef_eager_step / ef_step:.1f}x faster than eager): "
        f"{verdict} the target of {TARGET:.0f}x"
    )
    print("\n".join(lines))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "kernels.txt").write_text("\n".join(lines) + "\n")
    with open(args.results / "kernels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(timings)
    fused = {fused_name, ef_fused_name}
    ax.barh(names, [timings[k] / copy for k in names],
            color=["grey"] + ["tab:green" if k in fused else "tab:blue" for k in names[1:]])  # fmt: skip
    ax.axvline(TARGET, color="red", linestyle="--", label=f"target {TARGET:.0f}x copy")
    ax.set_xlabel(f"time / copy time ({n / 1e6:.0f}M fp32, {args.threads} threads)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.results / "kernels.png", dpi=110)


if __name__ == "__main__":
    main()

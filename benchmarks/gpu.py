"""GPU benchmark: exchange compute vs a device copy, and a GPT-2-small training step per optimizer.

    python benchmarks/gpu.py                       # on a GPU machine: 110M and 1B params, GPT-2 small
    python benchmarks/gpu.py --device cpu --sizes 2e5 --gpt2-layers 1 --gpt2-width 64 --gpt2-vocab 500 --steps 2

One process, a world of one rank (NCCL on a GPU: two processes cannot share one GPU; gloo on CPU).
With one rank every collective is a local copy, so the times are the exchange's *compute*: the
worker encode, the server decode-average-encode and the worker decode.

Part 1, per buffer size: a plain device copy of the fp32 buffer (the reference, 1.0x), then per
scheme the worker's encode alone and the whole exchange step, as multiples of the copy. Targets
(issue "GPU for real"): CD-Adam worker step <= 4x a copy, whole exchange <= 10x, 1-bit Adam alike.

Part 2: GPT-2 small (124M, random init, ``--gpt2-batch`` x ``--gpt2-seq`` tokens, bf16 autocast on
CUDA) with ``torch.optim.AdamW(fused=True)``, ``CDAdam`` (block 2048) and ``OneBitAdam`` in its
compressed phase: median whole-step and optimizer-step time (the device synchronized between
backward and step, to time the step alone), the training-step time (no synchronization between them,
as in training: what a host-blocking optimizer step costs shows here), and peak device memory. Target:
CDAdam's optimizer time <= 5x fused AdamW's. On CUDA, where deepspeed and cupy import, also
DeepSpeed's own ``OnebitAdam`` (its NCCL backend, cupy bit packing) in the same loop, so that ours is
timed against it side by side (target: no slower); elsewhere it is reported as not measured, with why.
The GPU image lacks deepspeed: ``make gpu-wheels`` puts it and its missing dependencies in ``.whl/``,
which ``benchmarks/gpu_checks.sh`` installs when the folder travels (``carry: [".whl"]``).

Writes ``<results>/gpu.csv``, ``gpu.txt`` and ``gpu.png`` with the device's name.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from deepspeed_cdadam import CDAdam, OneBitAdam
from deepspeed_cdadam.comm import CommStats, ShardLayout, TorchDistributedTransport
from deepspeed_cdadam.compressors import get_compressor
from deepspeed_cdadam.exchange import make_exchange

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "gpu"

# name -> (scheme, compressor, block_size, worker_scale_scope)
SCHEMES = {
    "CD-Adam, block 2048": ("markov", "scaled_sign", 2048, "block"),
    "CD-Adam, one block per shard": ("markov", "scaled_sign", None, "block"),
    "CD-Adam, block 256": ("markov", "scaled_sign", 256, "block"),
    "1-bit Adam (error feedback, L2 sign)": ("error_feedback", "sign_l2", None, "tensor"),
    "exact all-reduce": ("none", "scaled_sign", None, "block"),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel builds and compilation
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def exchange_rows(numel: int, device: torch.device, repeats: int, check: bool = True) -> list[dict]:
    """Part 1: copy, worker encode and whole exchange per scheme, for one ``numel`` fp32 buffer
    (``check``: also one step fused vs eager per scheme, ``fused_vs_eager``)."""
    transport = TorchDistributedTransport()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    copy_into = torch.empty_like(x)
    copy_s = median_seconds(lambda: copy_into.copy_(x), device, repeats)
    rows = [{"part": "exchange", "numel": numel, "method": "device copy", "piece": "copy", "seconds": copy_s}]
    del copy_into
    for name, (scheme, comp, block, scope) in SCHEMES.items():
        compressor = get_compressor(comp, worker_scale_scope=scope)
        ex = make_exchange(scheme, transport, ShardLayout(numel, 1, block), compressor, CommStats(), 0)
        state: dict = {}
        ex.init_state(state, torch.zeros(numel, device=device))
        step = [0]

        def whole(ex=ex, state=state, step=step) -> None:
            step[0] += 1
            ex.exchange(x, state, step=step[0])

        pieces = [("whole exchange", whole)]
        if scheme != "none":
            pieces.insert(0, ("worker step", worker_step(ex, scheme, x)))
        verdict = fused_vs_eager(ex, x) if scheme != "none" and check else ""
        for piece, fn in pieces:
            seconds = median_seconds(fn, device, repeats)
            rows.append(
                {"part": "exchange", "numel": numel, "method": name, "piece": piece, "seconds": seconds, "check": verdict}
            )
        del state, ex
    for r in rows:
        r["times_copy"] = r["seconds"] / copy_s
    return rows


def worker_step(ex, scheme: str, x: torch.Tensor) -> Callable[[], object]:
    """The worker's step as the exchange runs it: the Triton kernel on CUDA where it applies
    (Markov: d = g - h, scales, signs into the wire, h += C(d); error feedback: p = x + e, C(p), e = p - C(p)),
    else the eager encode."""
    from deepspeed_cdadam.kernels import triton_exchange as tk

    buf = torch.zeros_like(x)
    if x.is_cuda and tk.available() and tk.applies(ex, x, buf):
        width, scope, norm = ex._wire_nbytes(x.dtype), ex.worker_scale_scope, tk.norm_of(ex.compressor)
        step = tk.markov_worker_step if scheme == "markov" else tk.ef_worker_step
        return lambda: step(x, buf, ex.layout, width, norm=norm, scope=scope)
    return lambda: ex.encode_up(x, step=1, group=0)


def fused_vs_eager(ex, x: torch.Tensor) -> str:
    """One exchange step from zero state with the kernels the dispatch picks and with eager torch:
    the largest difference of the results, relative to the largest entry."""
    outs = {}
    for mode in ("auto", "eager"):
        os.environ["DEEPSPEED_CDADAM_KERNELS"] = mode
        state: dict = {}
        ex.init_state(state, torch.zeros_like(x))
        outs[mode] = ex.exchange(x, state, step=1).clone()
    os.environ["DEEPSPEED_CDADAM_KERNELS"] = "auto"
    scale = outs["eager"].abs().max().clamp_min(1e-30)
    finite = bool(torch.isfinite(outs["auto"]).all())
    return f"max|auto-eager|/max|eager|={float((outs['auto'] - outs['eager']).abs().max() / scale):.2e} finite={finite}"


def gpt2_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Part 2: one GPT-2 training step per optimizer: whole step, optimizer step, peak memory."""
    from transformers import GPT2Config

    config = GPT2Config(
        n_positions=args.gpt2_seq,
        n_layer=args.gpt2_layers,
        n_embd=args.gpt2_width,
        n_head=max(1, args.gpt2_width // 64),
        vocab_size=args.gpt2_vocab,
        bos_token_id=args.gpt2_vocab - 1,
        eos_token_id=args.gpt2_vocab - 1,
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.gpt2_batch, args.gpt2_seq), generator=gen).to(device)
    builders = {
        "AdamW (torch, fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=device.type == "cuda"),
        "CDAdam (block 2048)": lambda ps: CDAdam(ps, lr=1e-4, block_size=2048),
        # lr=0 for 1-bit Adam: its frozen v is 0 on the embedding rows no warm-up batch touched, and
        # every coordinate receives a 1-bit momentum, so any lr > 0 diverges on a random GPT-2 (upstream's
        # exp_avg_mask case); the lr does not change the work timed.
        "OneBitAdam (compressed phase, lr 0)": lambda ps: OneBitAdam(ps, lr=0.0, freeze_step=1),
        # the row above decides its non-finite skip on the device (the flag inside the messages up, no host
        # read); this one agrees every step on the host (DEEPSPEED_CDADAM_STEP_AGREEMENT=host): what that saves
        "CDAdam (block 2048), host agreement": cdadam_host_agreement,
        "OneBitAdam (compressed phase, lr 0), host agreement": lambda ps: host_agreement(OneBitAdam(ps, lr=0.0, freeze_step=1)),
    }
    if args.gpt2_methods:  # AdamW always: the ratios are to it
        builders = {k: v for k, v in builders.items() if k.startswith("AdamW") or any(m in k for m in args.gpt2_methods)}
    rows = []
    for name, build in builders.items():
        try:
            rows += gpt2_method_rows(args, device, config, ids, name, build)
        except (FloatingPointError, RuntimeError) as err:  # reported, and the eager path tried instead
            rows.append(gpt2_error_row(name, err))
            if name.startswith("AdamW"):
                raise
            os.environ["DEEPSPEED_CDADAM_KERNELS"] = "eager"
            try:
                rows += gpt2_method_rows(args, device, config, ids, f"{name} [eager]", build)
            except (FloatingPointError, RuntimeError) as err2:
                rows.append(gpt2_error_row(f"{name} [eager]", err2))
            os.environ["DEEPSPEED_CDADAM_KERNELS"] = "auto"
    upstream, upstream_name = upstream_onebit_builder(device)
    if args.gpt2_methods and not any(m in upstream_name for m in args.gpt2_methods):
        upstream = None
    if upstream is not None:  # last: a failure inside cupy or upstream cannot cost our rows
        try:
            rows += gpt2_method_rows(args, device, config, ids, upstream_name, upstream)
        except Exception as err:  # noqa: BLE001 - upstream's failure is a result to report, not ours to fix
            rows.append(gpt2_error_row(upstream_name, err, limit=300))
    if not args.no_profile:
        for name in ("CDAdam (block 2048)", "OneBitAdam (compressed phase, lr 0)"):
            if name in builders:
                try:
                    profile_optimizer(args, device, config, ids, builders[name], name)
                except Exception as err:  # noqa: BLE001 - a failed profile must not cost the timed rows
                    rows.append(gpt2_error_row(f"{name} [profile]", err))
    adamw_opt = next(r["seconds"] for r in rows if r["piece"] == "optimizer step" and r["method"].startswith("AdamW"))
    for r in rows:
        r["times_adamw_optimizer"] = r["seconds"] / adamw_opt if r["piece"] == "optimizer step" else ""
    return rows


def cdadam_host_agreement(params, **kwargs) -> CDAdam:
    """CDAdam agreeing on every step with a control message the host reads (``agree_on_step``), as where the
    kernels cannot decide the skip on the device (``DEEPSPEED_CDADAM_STEP_AGREEMENT=host``): its time minus
    the default row's is what the device-decided step saves."""
    return host_agreement(CDAdam(params, lr=1e-4, block_size=2048, **kwargs))


def host_agreement(opt):
    """``opt`` with every step agreed by the host (``DEEPSPEED_CDADAM_STEP_AGREEMENT=host``, for this optimizer only)."""
    opt._decides_on_device = lambda *args, **kw: False
    return opt


def gpt2_error_row(method: str, err: BaseException, limit: int = 200) -> dict:
    """The row of a GPT-2 method that failed: its error, cut to ``limit`` characters."""
    return {"part": "gpt2", "numel": 0, "method": method, "piece": "error", "seconds": float("nan"),
            "check": f"{type(err).__name__}: {str(err)[:limit]}"}  # fmt: skip


def forward_backward(model, ids: torch.Tensor, device: torch.device) -> None:
    """One GPT-2 language-modelling forward (bf16 autocast on CUDA) and backward on ``ids``."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()


def gpt2_method_rows(args, device, config, ids, name, build) -> list[dict]:
    """Whole-step and optimizer-step medians and peak memory of one optimizer on GPT-2."""
    from transformers import GPT2LMHeadModel

    rows = []
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    opt = build(model.parameters())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_s, opt_s = [], []
    for i in range(args.warmup + args.steps):  # the warm-up also takes OneBitAdam past its freeze_step
        synchronize(device)
        t0 = time.perf_counter()
        forward_backward(model, ids, device)
        synchronize(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    # as in training: nothing waits between backward and step(), so the host launches the optimizer while the
    # device still runs backward, unless the optimizer makes it wait (the step agreement's read)
    train_s = []
    for _ in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        forward_backward(model, ids, device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        train_s.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rows.append(
        {
            "part": "gpt2",
            "numel": sum(p.numel() for p in model.parameters()),
            "method": name,
            "piece": "whole step",
            "seconds": statistics.median(step_s),
            "peak_gib": peak,
        }
    )
    rows.append({**rows[-1], "piece": "optimizer step", "seconds": statistics.median(opt_s)})
    rows.append({**rows[-2], "piece": "training step", "seconds": statistics.median(train_s)})
    del model, opt
    return rows


def profile_optimizer(args, device, config, ids, build, name) -> None:
    """Where one optimizer step's time goes: ``torch.profiler`` around the ``step()`` after ``args.warmup``
    training steps, the top operators and kernels by device time, into ``<results>/profile_<name>.txt``."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    opt = build(model.parameters())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for i in range(args.warmup + 1):
        forward_backward(model, ids, device)
        synchronize(device)
        if i < args.warmup:
            opt.step()
        else:
            with profile(activities=activities) as prof:
                opt.step()
                synchronize(device)
        opt.zero_grad(set_to_none=True)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=70)
    slug = "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).lower()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"profile_{slug}.txt").write_text(f"{name}: one optimizer step after {args.warmup} warm-up steps\n{table}\n")
    del model, opt


def upstream_onebit_builder(device: torch.device, backend: str | None = None) -> tuple[Callable | None, str]:
    """DeepSpeed's own ``OnebitAdam`` as ``gpt2_method_rows`` builds optimizers (lr 0 and ``freeze_step`` 1,
    as ours: past the warm-up every step is compressed), and its row's name; or None and why not.

    ``backend``: upstream's ``comm_backend_name``, by default ``"nccl"`` on CUDA (cupy packs the bits; its only
    GPU backend) and none elsewhere. The process group gpu.py made is adopted by ``deepspeed.init_distributed``;
    the engine upstream reads (``mpu``, ``local_rank``, the all-reduce switch it flips at the freeze) is a
    namespace, since the loop averages nothing (a world of one rank)."""
    backend = backend or ("nccl" if device.type == "cuda" else None)
    if backend is None:
        return None, "DeepSpeed's own OnebitAdam: not measured (its NCCL backend needs CUDA and cupy)."
    try:
        import deepspeed
        from deepspeed.runtime.fp16.onebit.adam import OnebitAdam

        if backend == "nccl":
            import cupy  # noqa: F401
    except ImportError as err:
        return None, f"DeepSpeed's own OnebitAdam: not measured ({err}; `make gpu-wheels` and carry .whl)."

    def build(params):
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        engine = types.SimpleNamespace(mpu=None, local_rank=0, enable_backward_allreduce=True)
        return OnebitAdam(list(params), deepspeed=engine, lr=0.0, freeze_step=1, comm_backend_name=backend)

    return build, f"DeepSpeed {deepspeed.__version__} OnebitAdam ({backend}, lr 0)"


def upstream_onebit_note(device: torch.device) -> str:
    build, name = upstream_onebit_builder(device)
    return f"{name}: timed below, side by side with ours." if build is not None else name


def plot(rows: list[dict], title: str, path: Path) -> None:
    exch = [r for r in rows if r["part"] == "exchange" and r["method"] != "device copy"]
    sizes = sorted({r["numel"] for r in exch})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, numel in zip(axes[0], sizes):
        mine = [r for r in exch if r["numel"] == numel]
        labels = [f"{r['method']}\n{r['piece']}" for r in mine]
        ax.barh(labels, [r["times_copy"] for r in mine], color="tab:blue")
        for target, colour in ((4, "tab:orange"), (10, "tab:red")):
            ax.axvline(target, color=colour, linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("time / device copy of the buffer")
        ax.set_title(f"{numel / 1e6:,.0f}M fp32 params")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--sizes", type=float, nargs="+", default=[110e6, 1e9])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--gpt2-layers", type=int, default=12, help="12: GPT-2 small (124M)")
    parser.add_argument("--gpt2-width", type=int, default=768)
    parser.add_argument("--gpt2-vocab", type=int, default=50257)
    parser.add_argument("--gpt2-batch", type=int, default=8)
    parser.add_argument("--gpt2-seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--gpt2-methods", nargs="+", default=None,
                        help="time only the GPT-2 optimizers whose names contain one of these (and AdamW)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip profiling one CDAdam and one OneBitAdam optimizer step (profile_*.txt)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()

    device, card = start_world_of_one(args.device)
    title = f"{card}, torch {torch.__version__}, world of 1 rank ({dist.get_backend()})"

    rows: list[dict] = []
    for numel in (int(s) for s in args.sizes):
        rows += exchange_rows(numel, device, args.repeats)
        write_results(rows, title, card, args.results, device)  # what is measured survives a later failure
    if not args.skip_gpt2:
        rows += gpt2_rows(args, device)
    write_results(rows, title, card, args.results, device)
    dist.destroy_process_group()


def start_world_of_one(choice: str) -> tuple[torch.device, str]:
    """The device (``choice``: auto, cuda or cpu) and its name, after a process group of one rank on it
    (NCCL on CUDA, gloo on CPU)."""
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=600)
    )
    card = torch.cuda.get_device_name(device) if use_cuda else f"CPU {platform.processor() or platform.machine()}"
    return device, card


def write_results(rows: list[dict], title: str, card: str, results: Path, device: torch.device) -> None:
    lines = [title, upstream_onebit_note(device), ""]
    for r in rows:
        if r["piece"] == "error":
            lines.append(f"{r['part']:8} {r['method']:38} failed: {r['check']}")
            continue
        ratio = f"{r['times_copy']:8.1f}x copy" if "times_copy" in r else ""
        if r.get("times_adamw_optimizer") not in ("", None):
            ratio = f"{r['times_adamw_optimizer']:8.1f}x fused AdamW's optimizer step"
        peak = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r and r["peak_gib"] == r["peak_gib"] else ""
        check = f"  [{r['check']}]" if r.get("check") else ""
        lines.append(
            f"{r['part']:8} {r['numel'] / 1e6:8.1f}M {r['method']:38} {r['piece']:15} "
            f"{r['seconds'] * 1e3:10.3f} ms {ratio}{peak}{check}"
        )
    text = "\n".join(lines)
    print(text)

    results.mkdir(parents=True, exist_ok=True)
    fields = ["device", "part", "numel", "method", "piece", "seconds", "times_copy", "times_adamw_optimizer", "peak_gib",
              "check"]  # fmt: skip
    with open(results / "gpu.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows({**r, "device": card} for r in rows)
    (results / "gpu.txt").write_text(text + "\n")
    plot(rows, title, results / "gpu.png")


if __name__ == "__main__":
    main()

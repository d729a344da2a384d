"""Fused CPU kernels, compiled on first use; the eager torch path stays the reference and the fallback.

CD-Adam (``exchange.MarkovExchange``): ``markov_worker_step`` does the whole worker step (``d = g - h``;
block L1 scales; signs packed into the wire message; ``h += C(d)``) in one fused pass over the buffer;
``markov_server_step`` the server's ``ghat += mean_i C_i``, its message down and its own shard's
``gtil += ctil`` in one pass; ``decode_shards`` the workers' ``gtil += ctil`` on the other shards
(``decode_mean_add`` and ``markov_encode`` are the separate pieces). They apply to CPU fp32/fp64
buffers, the ``scaled_sign`` compressor with ``worker_scale_scope="block"`` and a ``block_size`` that is
a multiple of 8 and splits every shard into at least two blocks (``scale_mode`` ``"block"``: a
one-block shard's eager scale uses torch's vectorised sum, whose order a kernel cannot reproduce).

1-bit Adam (``exchange.ErrorFeedbackExchange``): ``error_feedback_worker_step`` (``p = x + e``, signs
packed, ``e = p - C(p)``) and ``error_feedback_server_step`` (``q = mean_i c_i + ebar``, its message,
``ebar = q - C(q)``), ``decode_shards`` the result; ``scaled_sign`` or ``sign_l2``, either worker scale
scope. A scale that is a norm over a whole vector (the tensor scope, a one-block shard) is taken by
torch in Python, the same call as the eager path, and passed in; block scales are summed in the
kernel, with the L2 square root and division left to torch (its float ``sqrt`` is not always
correctly rounded). All give bit-identical results to the eager path.

The kernel is a plain C++ file built with the system's ``g++`` into a cache folder
(``$DEEPSPEED_CDADAM_CACHE``, default ``~/.cache/deepspeed_cdadam``) keyed by the source, the
compiler and the CPU, and loaded with ctypes: no torch headers, under a second to build.
``DEEPSPEED_CDADAM_KERNELS`` chooses: ``auto`` (default: fused where it applies and builds, else
eager, with one warning if the build fails), ``eager`` (never fused), ``fused`` (raise if it cannot build).
Set it alike on every rank: an exchange makes all ranks agree once (one tiny all-reduce) and uses the
fused path only if it builds on every rank; in ``fused`` mode every rank raises, naming the failed ranks.

Each call runs on ``num_threads()`` threads (torch's count, capped by ``cpus // LOCAL_WORLD_SIZE``) of
a persistent pool in the library. A C++ error never aborts the process: the entry points return an
error code, raised here as ``RuntimeError`` with the library's message.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from ..comm.layout import ShardLayout

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("markov_sign.cpp")
MODES = ("auto", "eager", "fused")
# No -ffast-math and no FMA contraction: every operation must round exactly as torch's eager ones.
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-ffp-contract=off", "-pthread")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


class KernelUnavailableError(RuntimeError):
    """The fused kernel cannot be built or loaded here."""


def mode() -> str:
    value = os.environ.get("DEEPSPEED_CDADAM_KERNELS", "auto")
    if value not in MODES:
        raise ValueError(f"Invalid DEEPSPEED_CDADAM_KERNELS={value!r}. Allowed: {', '.join(MODES)}.")
    return value


def _cache_dir() -> Path:
    return Path(os.environ.get("DEEPSPEED_CDADAM_CACHE", Path.home() / ".cache" / "deepspeed_cdadam"))


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


@cache
def _library() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelUnavailableError("no C++ compiler (g++) found: install one, or set DEEPSPEED_CDADAM_KERNELS=eager.")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
        key = hashlib.sha256((SOURCE.read_text() + version + _cpu_id() + " ".join(CXXFLAGS)).encode()).hexdigest()
        target = _cache_dir() / f"markov_sign_{key[:16]}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / "lib.so"
                result = subprocess.run(
                    [compiler, *CXXFLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False
                )
                if result.returncode != 0:
                    raise KernelUnavailableError(f"building {SOURCE.name} failed:\n{result.stderr[-2000:]}")
                os.replace(built, target)  # atomic: concurrent ranks may build at once, one file wins
        lib = ctypes.CDLL(str(target))
    except OSError as err:  # an unwritable cache folder, a library that does not load
        raise KernelUnavailableError(
            f"{type(err).__name__}: {err} (set DEEPSPEED_CDADAM_CACHE to a writable folder)"
        ) from err
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "cdadam_markov_worker_step": (i32, [i32, p, p, i64, p, p, i64, i64, i64, p, i32, i32]),
        "cdadam_markov_server_step": (i32, [i32, p, i64, i64, i64, i64, i64, i64, p, p, p, i32]),
        "cdadam_error_feedback_step": (i32, [i32, p, p, p, i64, i64, i64, p, p, i64, i64, i64, p, p, p, i32, i32]),
        "cdadam_decode_mean_add": (i32, [i32, p, i64, i64, i64, i64, i64, p, i32]),
        "cdadam_decode_shards": (i32, [i32, p, i64, i64, p, p, i64, i64, p, i32, i64, i32]),
        "cdadam_last_error": (ctypes.c_char_p, []),
        "cdadam_threads_created": (i64, []),
        "cdadam_test_throw": (i32, [i32, i32, i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _call(name: str, *args: object) -> None:
    """Call entry point ``name``; a nonzero return (C++ errors never cross ctypes) raises ``RuntimeError``."""
    lib = _library()
    code = getattr(lib, name)(*args)
    if code != 0:
        message = (lib.cdadam_last_error() or b"").decode(errors="replace")
        raise RuntimeError(f"{name} failed with error code {code}: {message or 'no message'}")


def _local_world_size() -> int:
    """Ranks sharing this node (``LOCAL_WORLD_SIZE``, set by torchrun and the DeepSpeed launcher); 1 if unset."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


@cache
def _cpu_counts() -> tuple[int, int]:
    """(CPUs of the node, CPUs this process may run on)."""
    node = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = node
    return node, mine


def num_threads() -> int:
    """Threads per kernel call: torch's intra-op count, capped by this rank's share of the node's CPUs
    (``cpus // LOCAL_WORLD_SIZE``) and the CPUs it may run on; at least 1."""
    node, mine = _cpu_counts()
    return max(1, min(torch.get_num_threads(), node // _local_world_size(), mine))


def threads_created() -> int:
    """Threads the kernels' persistent pool has started so far (constant once it is warm)."""
    return int(_library().cdadam_threads_created())


_failure: KernelUnavailableError | None = None  # the first build failure, remembered (never retried per step)


def build_failure() -> KernelUnavailableError | None:
    """Why the fused kernels cannot be built or loaded on this rank (remembered), or ``None``; never raises.

    Ignores the mode; warns once (in ``auto`` mode) when the failure is first met. Exchanges combine
    every rank's answer (``CompressedExchange._agree_on_kernel``) so that all ranks take the same path.
    """
    global _failure
    if _failure is None:
        try:
            _library()
            return None
        except KernelUnavailableError as err:
            _failure = err
            if mode() == "auto":
                logger.warning("Fused CPU kernel unavailable, using the eager torch path: %s", err)
    return _failure


def available() -> bool:
    """Whether the fused kernels may be used on this rank (mode, and they build); warns once in ``auto`` mode."""
    if mode() == "eager":
        return False
    failure = build_failure()
    if failure is None:
        return True
    if mode() == "fused":
        raise failure
    return False


def scale_mode(layout: ShardLayout) -> str | None:
    """How the kernels get the scales of this layout's blocks, exactly as the eager path does.

    ``"block"``: computed in the kernel, each block summed in index order (``torch.segment_reduce``'s
    order): ``block_size`` a multiple of 8 and at least two blocks in every shard. ``"shard"``: every
    shard is one block, whose eager scale is torch's vectorised norm (an order a kernel cannot
    reproduce): the caller computes it with the same torch call and passes it in. ``None``: neither
    (blocks not byte-aligned, or one-block and two-block shards mixed): eager only.
    """
    if layout.block_size is None or layout.block_size >= layout.capacity:
        return "shard"
    if layout.block_size % 8 == 0 and min(layout.shard_sizes) > layout.block_size:
        return "block"
    return None


def markov_applies(layout: ShardLayout, g: torch.Tensor) -> bool:
    """Whether ``markov_worker_step`` computes exactly what the eager path does for this layout and buffer."""
    return g.device.type == "cpu" and g.dtype in _DTYPE_CODES and scale_mode(layout) == "block"


def error_feedback_applies(layout: ShardLayout, x: torch.Tensor) -> bool:
    """Whether the error-feedback kernels compute exactly the eager result for this layout and buffer
    (block scales computed in the kernel, or one torch scale per shard passed in: ``scale_mode``)."""
    return x.device.type == "cpu" and x.dtype in _DTYPE_CODES and layout.numel > 0 and scale_mode(layout) is not None


@cache
def _shard_arrays(layout: ShardLayout, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset 0 and shard ``shard``'s size: the arrays of a one-shard call (the server's)."""
    return torch.zeros(1, dtype=torch.int64), torch.tensor([layout.shard_sizes[shard]], dtype=torch.int64)


@cache
def _layout_arrays(layout: ShardLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout's shard offsets and sizes as int64 tensors (made once per layout)."""
    return torch.tensor(layout.shard_offsets, dtype=torch.int64), torch.tensor(layout.shard_sizes, dtype=torch.int64)


def _wire(nbytes: int, out: torch.Tensor | None) -> torch.Tensor:
    """The wire buffer a kernel writes: ``out`` if given (a buffer of ``nbytes`` that was zeros, or that an
    earlier call for the same layout filled: the kernels write the same bytes every time and never the
    padding, which stays zero), else fresh zeros."""
    if out is None:
        return torch.zeros(nbytes, dtype=torch.uint8)
    if not (out.dtype == torch.uint8 and out.dim() == 1 and out.numel() == nbytes and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous 1-D uint8 buffer of {nbytes} bytes.")
    return out


def _encode_shards(
    g: torch.Tensor,
    h: torch.Tensor,
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    layout: ShardLayout,
    wire_width: int,
    update: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One call of the C++ worker step over the given shards of ``g``/``h``; the messages sized for ``layout``."""
    wire = _wire(len(sizes) * wire_width, out)
    if offsets == layout.shard_offsets and sizes == layout.shard_sizes:
        offsets_t, sizes_t = _layout_arrays(layout)
    else:
        offsets_t, sizes_t = torch.tensor(offsets, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64)
    _call(
        "cdadam_markov_worker_step",
        _DTYPE_CODES[g.dtype], g.data_ptr(), h.data_ptr(), len(sizes), offsets_t.data_ptr(), sizes_t.data_ptr(),
        layout.block_size, wire_width, (layout.capacity + 7) // 8, wire.data_ptr(), int(update), num_threads(),
    )  # fmt: skip
    return wire


def markov_worker_step(
    g: torch.Tensor, h: torch.Tensor, layout: ShardLayout, wire_width: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused ``c = C(g - h)``; ``h += c``; returns the ``world_size`` wire messages concatenated (uint8).

    Message ``j`` (``wire_width`` bytes) is shard ``j``'s: ``[ceil(capacity/8) bytes of signs | scales]``,
    byte for byte what ``ScaledSign.to_wire`` writes. ``h`` is updated in place. ``out``: the buffer to
    write (see ``_wire``; reusing one saves the allocation), else fresh zeros.
    """
    if not (g.is_contiguous() and h.is_contiguous() and g.dtype == h.dtype and g.numel() == h.numel() == layout.numel):
        raise ValueError("markov_worker_step needs contiguous g and h of one dtype and the layout's length.")
    return _encode_shards(g, h, layout.shard_offsets, layout.shard_sizes, layout, wire_width, update=True, out=out)


def markov_encode(g: torch.Tensor, h: torch.Tensor, layout: ShardLayout, shard: int, wire_width: int) -> torch.Tensor:
    """Shard ``shard``'s wire message of ``C(g - h)`` (``g``, ``h``: that shard's coordinates); nothing is updated."""
    size = layout.shard_sizes[shard]
    if not (g.is_contiguous() and h.is_contiguous() and g.dtype == h.dtype and g.numel() == h.numel() == size):
        raise ValueError("markov_encode needs contiguous g and h of one dtype and the shard's length.")
    return _encode_shards(g, h, (0,), (size,), layout, wire_width, update=False)


def markov_server_step(
    messages: torch.Tensor,
    ghat: torch.Tensor,
    gtil: torch.Tensor,
    layout: ShardLayout,
    shard: int,
    wire_width: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The server's steps (3)-(4) and its own shard's (5), fused: ``ghat += mean_k C_k`` (the rows of
    ``messages``, averaged in row order); returns the wire message of ``C(ghat - gtil)``; ``gtil += C(ghat - gtil)``.

    ``ghat``, ``gtil``: shard ``shard``'s coordinates, both updated in place. The same bits as
    ``decode_mean_add``, then ``markov_encode``, then decoding that message into ``gtil``.
    """
    size = layout.shard_sizes[shard]
    _check_messages(messages, "markov_server_step")
    same = ghat.dtype == gtil.dtype and ghat.numel() == gtil.numel() == size
    if not (same and ghat.is_contiguous() and gtil.is_contiguous()):
        raise ValueError("markov_server_step needs contiguous ghat and gtil of one dtype and the shard's length.")
    wire = _wire(wire_width, out)
    _call(
        "cdadam_markov_server_step",
        _DTYPE_CODES[ghat.dtype], messages.data_ptr(), messages.shape[0], messages.shape[1], size, layout.block_size,
        wire_width, (layout.capacity + 7) // 8, ghat.data_ptr(), gtil.data_ptr(), wire.data_ptr(), num_threads(),
    )  # fmt: skip
    return wire


def _check_messages(messages: torch.Tensor, name: str) -> None:
    if not (messages.dtype == torch.uint8 and messages.dim() == 2 and messages.is_contiguous()):
        raise ValueError(f"{name} needs a contiguous 2-D uint8 tensor of messages (one per row).")


def _nblocks(layout: ShardLayout, shard: int) -> int:
    """``len(layout.shard_blocks(shard))``, without building the tuple."""
    size, block = layout.shard_sizes[shard], layout.block_size
    return 1 if block is None or size == 0 else -(-size // block)


@cache
def _sqrt_block_lengths(layout: ShardLayout, shard: int, dtype: torch.dtype) -> torch.Tensor:
    """``d.sqrt()`` of ``l2_block_scales`` for shard ``shard``'s blocks (the same torch ops, made once)."""
    return torch.tensor(layout.shard_blocks(shard), dtype=dtype).clamp_min(1).sqrt()


def _l2_scales(sums: torch.Tensor, layout: ShardLayout, shards: Sequence[int]) -> torch.Tensor:
    """Each block's ``sqrt(sum v^2) / sqrt(|B|)`` from the kernel's block sums (the given shards' blocks in
    order), by the very torch operations of ``compressors.sign.l2_block_scales`` on a tensor of one
    shard's blocks: torch's float sqrt is not always the correctly rounded one a kernel would take."""
    out, at = [], 0
    for j in shards:
        count = _nblocks(layout, j)
        out.append(sums[at : at + count].clone().sqrt() / _sqrt_block_lengths(layout, j, sums.dtype))
        at += count
    return torch.cat(out)


def _per_block(scales: torch.Tensor, dtype: torch.dtype, counts: Sequence[int]) -> torch.Tensor:
    """One value (every block), or one per shard (each of its ``counts[j]`` blocks), as one scale per block."""
    scales = scales.reshape(-1)
    if scales.dtype != dtype or scales.device.type != "cpu" or scales.numel() not in (1, len(counts)):
        raise ValueError(
            f"scales must be 1 or {len(counts)} value(s) of {dtype} on the CPU, "
            f"got {tuple(scales.shape)} {scales.dtype}."
        )
    if scales.numel() == 1:
        return scales.expand(sum(counts)).contiguous()
    if all(c == 1 for c in counts):
        return scales.contiguous()
    return scales.repeat_interleave(torch.tensor(counts)).contiguous()


def _error_feedback_call(
    x: torch.Tensor | None,
    e: torch.Tensor,
    messages: torch.Tensor | None,
    nshards: int,
    offsets_t: torch.Tensor,
    sizes_t: torch.Tensor,
    layout: ShardLayout,
    wire_width: int,
    wire: torch.Tensor,
    scales: torch.Tensor | None,
    sums: torch.Tensor | None,
    norm: int,
) -> None:
    _call(
        "cdadam_error_feedback_step",
        _DTYPE_CODES[e.dtype], None if x is None else x.data_ptr(), e.data_ptr(),
        None if messages is None else messages.data_ptr(), 0 if messages is None else messages.shape[0],
        0 if messages is None else messages.shape[1], nshards, offsets_t.data_ptr(), sizes_t.data_ptr(),
        layout.block_size or 0, wire_width, (layout.capacity + 7) // 8, wire.data_ptr(),
        None if scales is None else scales.data_ptr(), None if sums is None else sums.data_ptr(), norm, num_threads(),
    )  # fmt: skip


def _compress_error_feedback(
    x: torch.Tensor | None,
    e: torch.Tensor,
    messages: torch.Tensor | None,
    shards: Sequence[int],
    offsets_t: torch.Tensor,
    sizes_t: torch.Tensor,
    layout: ShardLayout,
    wire_width: int,
    norm: int,
    scales: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """The wire messages of ``shards``: ``v = x + e`` (or ``e``, after ``e += mean(messages)``); ``e = v - C(v)``."""
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 (scaled_sign) or 2 (sign_l2), got {norm!r}.")
    counts = [_nblocks(layout, j) for j in shards]
    wire = _wire(len(shards) * wire_width, out)
    args = (len(shards), offsets_t, sizes_t, layout, wire_width, wire)
    if scales is not None:  # scales taken by the caller (torch's norms)
        _error_feedback_call(x, e, messages, *args, _per_block(scales, e.dtype, counts), None, norm)
    elif scale_mode(layout) != "block":
        raise ValueError("without given scales the layout needs blocks of a multiple of 8, at least two per shard.")
    elif norm == 1:  # one pass: L1 block scales need no sqrt
        _error_feedback_call(x, e, messages, *args, None, None, norm)
    else:  # L2: the block sums here (v stored in e), the scales by torch, then e = v - C(v)
        sums = torch.empty(sum(counts), dtype=e.dtype)
        _error_feedback_call(x, e, messages, *args, None, sums, norm)
        _error_feedback_call(None, e, None, *args, _l2_scales(sums, layout, shards), None, norm)
    return wire


def error_feedback_worker_step(
    x: torch.Tensor | None,
    e: torch.Tensor,
    layout: ShardLayout,
    wire_width: int,
    norm: int,
    scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Error feedback's worker step over every shard: ``p = x + e`` (or ``p = e`` when ``x`` is None);
    message ``j`` = ``C(p_j)``; ``e = p - C(p)`` in place. Returns the ``world_size`` messages concatenated.

    ``scales``: one value (the tensor scale) or one per shard (torch's scale of each one-block shard),
    given to each block; without them each block's scale comes from the kernel's block sums
    (``scale_mode(layout) == "block"``). ``norm``: 1 for ``||p_B||_1 / |B|``, 2 for ``||p_B||_2 / sqrt(|B|)``.
    ``out``: the buffer to write (see ``_wire``), else fresh zeros.
    """
    if not (e.is_contiguous() and e.dtype in _DTYPE_CODES and e.numel() == layout.numel):
        raise ValueError("error_feedback_worker_step needs a contiguous fp32/fp64 e of the layout's length.")
    if x is not None and not (x.is_contiguous() and x.dtype == e.dtype and x.numel() == e.numel()):
        raise ValueError("error_feedback_worker_step needs a contiguous x like e.")
    offsets_t, sizes_t = _layout_arrays(layout)
    shards = range(layout.world_size)
    return _compress_error_feedback(x, e, None, shards, offsets_t, sizes_t, layout, wire_width, norm, scales, out)


def error_feedback_server_step(
    messages: torch.Tensor | None,
    ebar: torch.Tensor,
    layout: ShardLayout,
    shard: int,
    wire_width: int,
    norm: int,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Error feedback's server step on shard ``shard``: ``q = mean_k C_k + ebar`` (the rows of ``messages``,
    in row order; ``messages`` None: ``ebar`` already holds ``q``); returns the message of ``C(q)``;
    ``ebar = q - C(q)`` in place.

    ``scale`` (torch's scale of the one-block shard, taken from ``q``) needs ``messages`` None; without
    it the block scales come from the kernel's block sums (``scale_mode(layout) == "block"``).
    """
    size = layout.shard_sizes[shard]
    if not (ebar.is_contiguous() and ebar.dtype in _DTYPE_CODES and ebar.numel() == size):
        raise ValueError("error_feedback_server_step needs a contiguous fp32/fp64 ebar of the shard's length.")
    if messages is not None:
        _check_messages(messages, "error_feedback_server_step")
        if scale is not None:
            raise ValueError("error_feedback_server_step: decode the messages first (decode_mean_add) to take a scale.")
    offsets_t, sizes_t = _shard_arrays(layout, shard)
    return _compress_error_feedback(
        None, ebar, messages, [shard], offsets_t, sizes_t, layout, wire_width, norm, scale, out
    )


def decode_shards(
    messages: torch.Tensor, out: torch.Tensor, layout: ShardLayout, *, accumulate: bool, skip: int | None = None
) -> None:
    """Row ``j`` of ``messages`` (shard ``j``'s scaled-sign message) decoded into ``out``'s shard ``j``, for
    every shard but ``skip``: ``out += C_j`` (``accumulate``) or ``out = C_j``. ``out``: the full buffer."""
    n = layout.world_size
    _check_messages(messages, "decode_shards")
    if messages.shape[0] != n:
        raise ValueError(f"decode_shards needs one message per shard ({n}), got {messages.shape[0]}.")
    if not (out.is_contiguous() and out.dtype in _DTYPE_CODES and out.numel() == layout.numel):
        raise ValueError("decode_shards needs a contiguous fp32/fp64 out of the layout's length.")
    mode = scale_mode(layout)
    if mode is None:
        raise ValueError("decode_shards needs blocks of a multiple of 8 coordinates, or one block per shard.")
    offsets_t, sizes_t = _layout_arrays(layout)
    _call(
        "cdadam_decode_shards",
        _DTYPE_CODES[out.dtype], messages.data_ptr(), messages.shape[1], n, offsets_t.data_ptr(), sizes_t.data_ptr(),
        layout.block_size if mode == "block" else 0, (layout.capacity + 7) // 8, out.data_ptr(), int(accumulate),
        -1 if skip is None else skip, num_threads(),
    )  # fmt: skip


def decode_mean_add(messages: torch.Tensor, out: torch.Tensor, layout: ShardLayout, shard: int) -> None:
    """``out += mean_k C_k`` for the scaled-sign messages (rows of ``messages``) of shard ``shard``.

    The mean is summed in row order and divided by the row count, as ``mean_in_rank_order``; one
    row adds the decoded message itself. ``out`` is that shard's coordinates.
    """
    size = layout.shard_sizes[shard]
    if not (messages.dtype == torch.uint8 and messages.dim() == 2 and messages.is_contiguous()):
        raise ValueError("decode_mean_add needs a contiguous 2-D uint8 tensor of messages (one per row).")
    if not (out.is_contiguous() and out.numel() == size and out.dtype in _DTYPE_CODES):
        raise ValueError("decode_mean_add needs a contiguous fp32/fp64 out of the shard's length.")
    if size == 0:
        return
    _call(
        "cdadam_decode_mean_add",
        _DTYPE_CODES[out.dtype], messages.data_ptr(), messages.shape[0], messages.shape[1], size,
        layout.block_size or size, (layout.capacity + 7) // 8, out.data_ptr(), num_threads(),
    )  # fmt: skip

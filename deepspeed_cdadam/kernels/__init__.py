"""Fused CPU kernels, compiled on first use; the eager torch path stays the reference and the fallback.

``markov_worker_step`` does CD-Adam's whole worker step (``d = g - h``; block L1 scales; signs
packed into the wire message; ``h += C(d)``) in one fused pass over the buffer; ``decode_mean_add``
the server's decode-and-average (``ghat += mean_i C_i``) and the worker's ``gtil += ctil``;
``markov_encode`` the server's message down. All give bit-identical results to the eager path
(``exchange.MarkovExchange``). They apply to CPU fp32/fp64 buffers,
the ``scaled_sign`` compressor with ``worker_scale_scope="block"`` and a ``block_size`` that is a
multiple of 8 and splits every shard into at least two blocks (a one-block shard's eager scale
uses torch's vectorised sum, whose order a kernel cannot reproduce).

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
        "cdadam_decode_mean_add": (i32, [i32, p, i64, i64, i64, i64, i64, p, i32]),
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
    every rank's answer (``MarkovExchange.uses_fused_kernel``) so that all ranks take the same path.
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


def markov_applies(layout: ShardLayout, g: torch.Tensor) -> bool:
    """Whether ``markov_worker_step`` computes exactly what the eager path does for this layout and buffer."""
    return (
        g.device.type == "cpu"
        and g.dtype in _DTYPE_CODES
        and layout.block_size is not None
        and layout.block_size % 8 == 0
        and min(layout.shard_sizes) > layout.block_size  # every shard has at least two blocks
    )


def _encode_shards(
    g: torch.Tensor,
    h: torch.Tensor,
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    layout: ShardLayout,
    wire_width: int,
    update: bool,
) -> torch.Tensor:
    """One call of the C++ worker step over the given shards of ``g``/``h``; the messages sized for ``layout``."""
    wire = torch.zeros(len(sizes) * wire_width, dtype=torch.uint8)
    offsets_t, sizes_t = torch.tensor(offsets, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64)
    _call(
        "cdadam_markov_worker_step",
        _DTYPE_CODES[g.dtype], g.data_ptr(), h.data_ptr(), len(sizes), offsets_t.data_ptr(), sizes_t.data_ptr(),
        layout.block_size, wire_width, (layout.capacity + 7) // 8, wire.data_ptr(), int(update), num_threads(),
    )  # fmt: skip
    return wire


def markov_worker_step(g: torch.Tensor, h: torch.Tensor, layout: ShardLayout, wire_width: int) -> torch.Tensor:
    """Fused ``c = C(g - h)``; ``h += c``; returns the ``world_size`` wire messages concatenated (uint8).

    Message ``j`` (``wire_width`` bytes) is shard ``j``'s: ``[ceil(capacity/8) bytes of signs | scales]``,
    byte for byte what ``ScaledSign.to_wire`` writes. ``h`` is updated in place.
    """
    if not (g.is_contiguous() and h.is_contiguous() and g.dtype == h.dtype and g.numel() == h.numel() == layout.numel):
        raise ValueError("markov_worker_step needs contiguous g and h of one dtype and the layout's length.")
    return _encode_shards(g, h, layout.shard_offsets, layout.shard_sizes, layout, wire_width, update=True)


def markov_encode(g: torch.Tensor, h: torch.Tensor, layout: ShardLayout, shard: int, wire_width: int) -> torch.Tensor:
    """Shard ``shard``'s wire message of ``C(g - h)`` (``g``, ``h``: that shard's coordinates); nothing is updated."""
    size = layout.shard_sizes[shard]
    if not (g.is_contiguous() and h.is_contiguous() and g.dtype == h.dtype and g.numel() == h.numel() == size):
        raise ValueError("markov_encode needs contiguous g and h of one dtype and the shard's length.")
    return _encode_shards(g, h, (0,), (size,), layout, wire_width, update=False)


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

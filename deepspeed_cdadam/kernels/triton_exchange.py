"""Fused GPU kernels (Triton) for the scaled-sign exchanges; the eager torch path stays the reference and the fallback.

The API mirrors the fused CPU kernels (``kernels/__init__.py``) and adds error feedback:

* ``markov_worker_step(g, h, layout, width)``: ``c = C(g - h)`` packed into the ``world_size`` wire
  messages (returned, uint8), ``h += c`` in the same pass.
* ``markov_encode(g, h, layout, shard, width)``: shard ``shard``'s message of ``C(g - h)`` (the
  server's message down); nothing is updated.
* ``decode_mean_add(messages, out, layout, shard)``: ``out += (C_0 + ... + C_{n-1}) / n``, summed in
  row (rank) order, then divided, as ``exchange.mean_in_rank_order``.
* ``decode_shards(messages, out, layout, accumulate=True)``: ``out[shard j] (+)= C(messages[j])``
  for every shard at once (the workers' ``gtil += ctil``; error feedback's returned ``ctil``).
* ``ef_worker_step(x, e, layout, width)``: ``p = x + e``; wire = ``C(p)``; ``e = p - C(p)``.
* ``ef_server_step(messages, ebar, layout, shard, width)``: ``q = ebar + mean_i C_i``; wire =
  ``C(q)``; ``ebar = q - C(q)``.
* ``sign_encode(x, layout, width)``: wire = ``C(x)`` (no state).

``norm`` is ``"l1"`` (``scaled_sign``: ``||x_B||_1 / d_B``) or ``"l2"`` (``sign_l2``:
``||x_B||_2 / sqrt(d_B)``); ``scope`` is ``"block"`` (one scale per block of the layout) or
``"tensor"`` (``worker_scale_scope="tensor"``: one scale over the whole vector, written into every
block's slot). Wire messages are byte for byte ``ScaledSign.to_wire``'s format:
``[ceil(capacity / 8) bytes of signs, LSB first | max_blocks scales]``, zero padded.

Block sizes: ``None`` (one block per shard) or any multiple of 8. Blocks of at most ``TILE``
coordinates are done in one pass (each program ``TILE // block`` whole blocks: sums, scales, signs,
state); longer blocks, one-block shards and tensor scales in three (per-chunk partial sums, one
program per block or tensor summing its chunks in order, then signs and state).

Exactness (tests/kernels/test_triton_exchange.py): signs, padding, decoded means and every state
update are bit-identical to the eager path on CPU given the same wire bytes (eager torch on CUDA
divides by a Python number as a multiplication by its reciprocal, so its mean over 3, 5, ... ranks
can be 1 ulp away; here the division is IEEE, ``div_rn``, as on CPU and in the simulator). A
scale's sum is a tree reduction instead of torch's order, so scales agree to about 1e-7 relative in
fp32 (tested at 2e-6), not bitwise. Rank consistency holds by construction: every rank-identical
state (``gtil``, the returned ``ctil``) is decoded from the gathered wire bytes on every rank
without any division, exactly as the eager path decodes them, so ranks agree even if some took the
eager path; the per-rank states (``h``, ``e``, ``ghat``, ``ebar``) move by exactly what the bytes they
sent say.

Layouts become cached int tensors per ``(layout, device, tile)`` (``plan``): the units (chunks of
rows) each program handles, the shards' offsets, sizes and block lengths, and the blocks' chunk ranges.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ..comm.layout import ShardLayout
from ..compressors.sign import ScaledSignL1, ScaledSignL2

if TYPE_CHECKING:
    from ..exchange import CompressedExchange, StepSkip

logger = logging.getLogger(__name__)

#: Coordinates per program (a power of two >= 8); blocks up to this long are done in one pass.
TILE = 4096
#: Warps per program; None: 8 for programs of >= 4096 coordinates, else 4. ``tuned`` sets both knobs
#: (``benchmarks/gpu_tune.py`` sweeps them on a GPU).
NUM_WARPS: int | None = None
WARP_CHOICES = (1, 2, 4, 8, 16, 32)
#: Whether launches over shards that are all ``shard_even`` compile the kernels' ``EVEN`` variant (16-byte
#: loads and stores); ``tuned(vector_loads=False)`` turns it off to measure what it gains.
VECTOR_LOADS = True
#: Partial sums a block's (or the tensor's) scale program adds per step.
REDUCE_CHUNK = 1024
NORMS = ("l1", "l2")
SCOPES = ("block", "tensor")
_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# availability and dispatch


@cache
def _kernels() -> ModuleType:
    """The ``@triton.jit`` kernels (imports triton: ``TRITON_INTERPRET=1`` must be set before, for CPU tensors)."""
    from . import triton_sign

    return triton_sign


@cache
def import_failure() -> str | None:
    """Why triton cannot be imported here (remembered), or ``None``."""
    try:
        _kernels()
    except Exception as err:  # ImportError, or a broken install failing inside triton
        return f"{type(err).__name__}: {err}"
    return None


_warned = False


def failure() -> str | None:
    """Why triton cannot be imported on this rank, or ``None``; in ``auto`` mode a failure warns once.

    What the exchanges agree on across ranks before the first Triton step (``kernels.registry``):
    all ranks take the Triton path or none does.
    """
    from . import mode

    global _warned
    why = import_failure()
    if why is not None and mode() == "auto" and not _warned:
        _warned = True
        logger.warning("Triton GPU kernels unavailable, using the eager torch path: %s", why)
    return why


def available() -> bool:
    """Whether the Triton path may run on this rank: ``DEEPSPEED_CDADAM_KERNELS`` is not ``eager`` and
    triton imports. ``auto`` (default): a failed import warns once; ``fused``: it raises
    ``KernelUnavailableError``. (The exchanges ask ``failure()`` through the cross-rank agreement.)
    """
    from . import KernelUnavailableError, mode

    if mode() == "eager":
        return False
    why = failure()
    if why is not None and mode() == "fused":
        raise KernelUnavailableError(
            f"DEEPSPEED_CDADAM_KERNELS=fused, but the Triton GPU kernels are unavailable: {why}. "
            "Install triton (pip install triton), or set DEEPSPEED_CDADAM_KERNELS=auto or eager."
        )
    return why is None


def norm_of(compressor: object) -> str | None:
    """``"l1"`` / ``"l2"`` for the two scaled-sign compressors (exact types: a subclass may change the scale)."""
    if type(compressor) is ScaledSignL1:
        return "l1"
    if type(compressor) is ScaledSignL2:
        return "l2"
    return None


def _on_gpu(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the compiled kernels run (tests patch this to drive the CPU interpreter)."""
    return t.is_cuda


def applies(ex: CompressedExchange, x: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether exchange ``ex`` runs its step on the Triton kernels for buffer ``x`` (and its ``state`` buffers).

    A GPU buffer of fp32/fp64, a scaled-sign compressor, blocks of a multiple of 8 (or one per
    shard), contiguous buffers, and a mode other than ``eager``; otherwise the eager path runs.
    Only checks that are the same on every rank: whether triton imports is agreed across the ranks
    afterwards (``kernels.registry``, ``failure``).
    """
    from . import mode

    block = ex.layout.block_size
    return (
        norm_of(ex.compressor) is not None
        and _on_gpu(x)
        and x.dtype in _DTYPES
        and (block is None or block % 8 == 0)
        and ex.worker_scale_scope in SCOPES
        and all(t.is_contiguous() and t.dtype == x.dtype and t.device == x.device for t in (x, *state))
        and mode() != "eager"
    )


# ------------------------------------------------------------------------------------------------
# layouts as cached tensors


@dataclass(frozen=True, eq=False)
class Plan:
    """One layout's work units and tables on one device (built once, ``plan``).

    Unit ``u`` covers ``rows`` rows of shard ``unit_shard[u]`` from coordinate ``unit_start[u]`` of
    that shard, ``row_stride`` apart, each at most ``row_width`` long and never past its block; its
    first row lies in block ``unit_blk[u]`` of the shard, row ``r`` in block ``unit_blk[u] + r``.
    ``shard_even[j]``: shard ``j`` has a multiple of 8 coordinates and starts at one (a launch over such shards only
    may tell the compiler so: 16-byte loads, ``triton_sign._tile``).
    ``chunked``: blocks are longer than a row, so scales need the partial-sum and group passes;
    group ``g`` (the ``g``-th block of the buffer) has units ``group_unit0[g] ...`` (``group_units[g]``
    of them) and ``group_numel[g]`` coordinates. Units and groups are numbered shard after shard:
    shard ``j``'s are ``shard_units[j]:shard_units[j + 1]`` and ``shard_groups[j]:shard_groups[j + 1]``.
    """

    layout: ShardLayout
    tile: int
    rows: int
    row_width: int
    row_stride: int
    chunked: bool
    shard_off: torch.Tensor
    shard_size: torch.Tensor
    shard_beff: torch.Tensor
    shard_blk0: torch.Tensor
    unit_shard: torch.Tensor
    unit_start: torch.Tensor
    unit_blk: torch.Tensor
    group_unit0: torch.Tensor
    group_units: torch.Tensor
    group_numel: torch.Tensor
    all_group: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    shard_units: tuple[int, ...]
    shard_groups: tuple[int, ...]
    shard_even: tuple[bool, ...]

    @property
    def num_units(self) -> int:
        return self.shard_units[-1]

    @property
    def num_groups(self) -> int:
        return self.shard_groups[-1]


def _pow2_at_least(v: int) -> int:
    return 1 << max(3, (max(v, 1) - 1).bit_length())


def _check_tile(tile: object) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8 or tile & (tile - 1):
        raise ValueError(f"Invalid tile={tile!r}. Must be a power of two >= 8.")


def _build_plan(layout: ShardLayout, device: torch.device, tile: int) -> Plan:
    _check_tile(tile)
    block, cap, n = layout.block_size, layout.capacity, layout.world_size
    if block is not None and block % 8:
        raise ValueError(f"The Triton kernels need block_size None or a multiple of 8, got {block}.")
    longest = cap if block is None else min(block, cap)  # the longest block of the layout
    width = _pow2_at_least(longest)
    chunked = width > tile
    if chunked:
        rows, width, stride = 1, tile, tile
    elif block is None or block >= cap:
        rows, stride = 1, width  # one block per shard: one unit each
    else:
        rows, stride = max(1, tile // width), block
    i64 = dict(dtype=torch.int64)
    starts, blks, shards, g_unit0, g_units, g_numel, blk0, unit_counts, group_counts = [], [], [], [], [], [], [], [0], [0]
    for j in range(n):
        size = layout.shard_sizes[j]
        beff = block if block is not None else max(size, 1)
        nblocks = max(1, -(-size // beff))  # an empty shard has one empty block: its unit writes the scale slot
        blk0.append(group_counts[-1])
        if not chunked:
            count = -(-nblocks // rows)
            s = torch.arange(count, **i64) * (rows * (block or 0))
        else:  # `full` blocks of beff coordinates, then a shorter last one (an empty shard: one empty block)
            full = size // beff
            last = size - full * beff
            last_chunks = max(1, -(-last // tile)) if last or not size else 0
            per_block = -(-beff // tile)
            s_full = torch.arange(full, **i64)[:, None] * beff + torch.arange(per_block, **i64)[None, :] * tile
            s = torch.cat([s_full.view(-1), full * beff + torch.arange(last_chunks, **i64) * tile])
            has_last = [1] if last_chunks else []
            counts = torch.cat([torch.full((full,), per_block, **i64), torch.tensor(has_last, **i64) * last_chunks])
            g_units.append(counts)
            g_unit0.append(unit_counts[-1] + torch.cumsum(counts, 0) - counts)
            g_numel.append(torch.cat([torch.full((full,), beff, **i64), torch.tensor(has_last, **i64) * last]))
        starts.append(s)
        blks.append(s // beff)
        shards.append(torch.full((s.numel(),), j, **i64))
        unit_counts.append(unit_counts[-1] + s.numel())
        group_counts.append(group_counts[-1] + nblocks)

    def put(t: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    empty = torch.zeros(0, **i64)
    total = unit_counts[-1]
    return Plan(
        layout=layout,
        tile=tile,
        rows=rows,
        row_width=width,
        row_stride=stride,
        chunked=chunked,
        shard_off=put(torch.tensor(layout.shard_offsets, **i64)),
        shard_size=put(torch.tensor(layout.shard_sizes, **i64)),
        shard_beff=put(torch.tensor([block if block is not None else max(s, 1) for s in layout.shard_sizes], **i64)),
        shard_blk0=put(torch.tensor(blk0, **i64)),
        unit_shard=put(torch.cat(shards)),
        unit_start=put(torch.cat(starts)),
        unit_blk=put(torch.cat(blks)),
        group_unit0=put(torch.cat(g_unit0) if g_unit0 else empty),
        group_units=put(torch.cat(g_units) if g_units else empty, torch.int32),
        group_numel=put(torch.cat(g_numel) if g_numel else empty),
        all_group=(
            put(torch.zeros(1, **i64)),
            put(torch.tensor([total]), torch.int32),
            put(torch.tensor([layout.numel], **i64)),
        ),
        shard_units=tuple(unit_counts),
        shard_groups=tuple(group_counts),
        shard_even=tuple(size % 8 == 0 and off % 8 == 0 for size, off in zip(layout.shard_sizes, layout.shard_offsets)),
    )


@lru_cache(maxsize=64)
def _cached_plan(layout: ShardLayout, device: torch.device, tile: int) -> Plan:
    return _build_plan(layout, device, tile)


def plan(layout: ShardLayout, device: torch.device | str, tile: int | None = None) -> Plan:
    """The cached ``Plan`` of ``layout`` on ``device`` (built on first use)."""
    return _cached_plan(layout, torch.device(device), TILE if tile is None else tile)


# ------------------------------------------------------------------------------------------------
# launching

# The CPU interpreter (TRITON_INTERPRET=1) patches triton.language while a kernel runs: one kernel at
# a time across threads (ranks of an InProcessWorld are threads). Compiled launches need no lock.
_interpreter_lock = threading.Lock()


def _launch(kernel: object, grid: int, device: torch.device, *args: object, **kwargs: object) -> None:
    if grid <= 0:
        return
    if device.type == "cuda":
        guard: contextlib.AbstractContextManager = torch.cuda.device(device)
    elif _kernels().INTERPRETED:
        guard = _interpreter_lock
    else:
        guard = contextlib.nullcontext()
    # no FMA contraction: the state updates have no multiply anyway; it keeps L2 sums version-independent
    with guard:
        kernel[(grid,)](*args, enable_fp_fusion=False, **kwargs)  # type: ignore[index]


def _dtype_args(dtype: torch.dtype) -> dict[str, object]:
    tl = _kernels().tl
    if dtype == torch.float64:
        return dict(IS_F64=True, FLOAT=tl.float64, UINT=tl.uint64, ITEM=8)
    return dict(IS_F64=False, FLOAT=tl.float32, UINT=tl.uint32, ITEM=4)


def _num_warps(p: Plan) -> int:
    if NUM_WARPS is not None:
        return NUM_WARPS
    return 8 if p.rows * p.row_width >= 4096 else 4


@contextlib.contextmanager
def tuned(tile: int | None = None, num_warps: int | None = None, vector_loads: bool = True):
    """Run the kernels with another ``TILE`` and warps per program inside the block (None: the default),
    and with or without ``VECTOR_LOADS``, restoring all three after. Results do not depend on any of them
    beyond the scales' summation order (tests)."""
    global TILE, NUM_WARPS, VECTOR_LOADS
    if tile is not None:
        _check_tile(tile)
    if num_warps is not None and num_warps not in WARP_CHOICES:
        raise ValueError(f"Invalid num_warps={num_warps!r}. Must be one of {WARP_CHOICES} or None.")
    before = TILE, NUM_WARPS, VECTOR_LOADS
    TILE = before[0] if tile is None else tile
    NUM_WARPS = num_warps
    VECTOR_LOADS = bool(vector_loads)
    try:
        yield
    finally:
        TILE, NUM_WARPS, VECTOR_LOADS = before


def _tables(p: Plan) -> tuple[torch.Tensor, ...]:
    return p.unit_shard, p.unit_start, p.unit_blk, p.shard_off, p.shard_size, p.shard_beff


def _even(p: Plan, shard: int | None) -> bool:
    """Whether every shard a launch touches (all, or ``shard``) is ``shard_even`` (the kernels' ``EVEN``)."""
    if not VECTOR_LOADS:
        return False
    return all(p.shard_even) if shard is None else p.shard_even[shard]


def _check_norm_scope(norm: str, scope: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"Invalid norm={norm!r}. Allowed: {', '.join(NORMS)}.")
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope={scope!r}. Allowed: {', '.join(SCOPES)}.")


def _check_width(layout: ShardLayout, width: int, dtype: torch.dtype) -> None:
    need = (layout.capacity + 7) // 8 + layout.max_blocks * torch.empty((), dtype=dtype).element_size()
    if width < need:
        raise ValueError(f"wire_width={width} is too small for this layout: a message needs {need} bytes.")


def _check_vectors(name: str, length: int, *ts: torch.Tensor) -> None:
    first = ts[0]
    if first.dtype not in _DTYPES:
        raise ValueError(f"{name} needs fp32 or fp64 buffers, got {first.dtype}.")
    for t in ts:
        if not (t.is_contiguous() and t.dim() == 1 and t.dtype == first.dtype and t.device == first.device):
            raise ValueError(f"{name} needs contiguous 1-D buffers of one dtype on one device.")
        if t.numel() != length:
            raise ValueError(f"{name} needs buffers of {length} coordinates, got {t.numel()}.")


def _encode(
    mode: int,
    a: torch.Tensor,
    b: torch.Tensor,
    layout: ShardLayout,
    shard: int | None,
    width: int,
    norm: str,
    scope: str,
    tile: int | None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wire messages of ``C(p)`` (every shard, or shard ``shard`` with ``a``/``b`` that shard's coordinates).
    ``skip``: a one-byte flag on the device; nonzero makes ``p = 0`` (``_values``)."""
    _check_norm_scope(norm, scope)
    _check_width(layout, width, a.dtype)
    k, device = _kernels(), a.device
    p = plan(layout, device, tile)
    nshards = layout.world_size if shard is None else 1
    wire = torch.zeros(nshards * width, dtype=torch.uint8, device=device)
    if layout.numel == 0:
        return wire
    if shard is None:
        u0, u1, g0, g1, shift = 0, p.num_units, 0, p.num_groups, 0
    else:
        if scope == "tensor":
            raise ValueError("scope='tensor' needs the whole vector (shard=None).")
        u0, u1 = p.shard_units[shard], p.shard_units[shard + 1]
        g0, g1 = p.shard_groups[shard], p.shard_groups[shard + 1]
        shift = layout.shard_offsets[shard]
    dt, l2, warps = _dtype_args(a.dtype), norm == "l2", _num_warps(p)
    shape = dict(R=p.rows, BP=p.row_width, EVEN=_even(p, shard), SKIP=skip is not None)
    flag = wire if skip is None else skip  # an unread pointer without a flag
    if scope == "tensor" or p.chunked:
        partial = torch.empty(p.num_units, dtype=a.dtype, device=device)
        _launch(
            k.partial_sums_kernel, u1 - u0, device, a, b, partial, *_tables(p), u0, shift, p.row_stride, flag,
            MODE=mode, L2=l2, num_warps=warps, **shape,
        )  # fmt: skip
        if scope == "tensor":
            scales = torch.empty(1, dtype=a.dtype, device=device)
            _launch(
                k.group_scale_kernel, 1, device, partial, scales, *p.all_group, 0,
                L2=l2, P=REDUCE_CHUNK, IS_F64=dt["IS_F64"], FLOAT=dt["FLOAT"],
            )  # fmt: skip
            source = k.SCALE_ONE
        else:
            scales = torch.empty(p.num_groups, dtype=a.dtype, device=device)
            _launch(
                k.group_scale_kernel, g1 - g0, device, partial, scales, p.group_unit0, p.group_units, p.group_numel,
                g0, L2=l2, P=REDUCE_CHUNK, IS_F64=dt["IS_F64"], FLOAT=dt["FLOAT"],
            )  # fmt: skip
            source = k.SCALE_BLOCKS
    else:
        scales, source = a, k.SCALE_ROWS  # unused pointer
    _launch(
        k.encode_kernel, u1 - u0, device, a, b, wire, scales, *_tables(p), p.shard_blk0,
        u0, shift, 0 if shard is None else shard, width, (layout.capacity + 7) // 8, p.row_stride, flag,
        MODE=mode, SCALE_SRC=source, L2=l2, num_warps=warps, **shape, **dt,
    )  # fmt: skip
    return wire


# ------------------------------------------------------------------------------------------------
# the API


def markov_worker_step(
    g: torch.Tensor,
    h: torch.Tensor,
    layout: ShardLayout,
    wire_width: int,
    *,
    norm: str = "l1",
    scope: str = "block",
    tile: int | None = None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``c = C(g - h)``; ``h += c``; returns the ``world_size`` wire messages concatenated (uint8).

    Message ``j`` (``wire_width`` bytes) is shard ``j``'s, byte for byte ``ScaledSign.to_wire``'s format.
    ``skip`` (a 0-dim bool or uint8 tensor on ``g``'s device, read by the kernels, not by the host): where
    true, ``g - h`` is taken as zero: every scale is 0 and ``h`` keeps its values (a rank whose gradient
    is not finite sends a zero correction; ``exchange.mark_skipped`` then marks its messages).
    """
    _check_vectors("markov_worker_step", layout.numel, g, h)
    if skip is not None:
        skip = _check_flag("markov_worker_step", skip, g.device)
    return _encode(_kernels().MODE_MARKOV, g, h, layout, None, wire_width, norm, scope, tile, skip)


def _check_flag(name: str, skip: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``skip`` as the one byte the kernels read (a view where it is one already: no copy, no host read)."""
    if skip.numel() != 1 or skip.device != device or skip.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"{name} needs skip as a one-element bool or uint8 tensor on {device}, got {skip.dtype} "
                         f"of {skip.numel()} elements on {skip.device}.")  # fmt: skip
    return skip.reshape(1).view(torch.uint8) if skip.dtype == torch.bool else skip.reshape(1)


def markov_encode(
    g: torch.Tensor,
    h: torch.Tensor,
    layout: ShardLayout,
    shard: int,
    wire_width: int,
    *,
    norm: str = "l1",
    tile: int | None = None,
) -> torch.Tensor:
    """Shard ``shard``'s wire message of ``C(g - h)`` (``g``, ``h``: that shard's coordinates); nothing is updated."""
    _check_vectors("markov_encode", layout.shard_sizes[shard], g, h)
    return _encode(_kernels().MODE_MARKOV_ENCODE, g, h, layout, shard, wire_width, norm, "block", tile)


def sign_encode(
    x: torch.Tensor,
    layout: ShardLayout,
    wire_width: int,
    *,
    norm: str = "l1",
    scope: str = "block",
    tile: int | None = None,
) -> torch.Tensor:
    """The ``world_size`` wire messages of ``C(x)`` (no state)."""
    _check_vectors("sign_encode", layout.numel, x)
    return _encode(_kernels().MODE_PLAIN, x, x, layout, None, wire_width, norm, scope, tile)


def ef_worker_step(
    x: torch.Tensor,
    e: torch.Tensor,
    layout: ShardLayout,
    wire_width: int,
    *,
    norm: str = "l2",
    scope: str = "block",
    tile: int | None = None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Error feedback, worker side: ``p = x + e``; returns the wire messages of ``C(p)``; ``e = p - C(p)`` in place.
    ``skip`` (as ``markov_worker_step``'s): where true, ``p`` is taken as zero (zero scales) and ``e`` is kept."""
    _check_vectors("ef_worker_step", layout.numel, x, e)
    if skip is not None:
        skip = _check_flag("ef_worker_step", skip, x.device)
    return _encode(_kernels().MODE_EF, x, e, layout, None, wire_width, norm, scope, tile, skip)


def ef_server_step(
    messages: torch.Tensor,
    ebar: torch.Tensor,
    layout: ShardLayout,
    shard: int,
    wire_width: int,
    *,
    norm: str = "l2",
    tile: int | None = None,
) -> torch.Tensor:
    """Error feedback, server side of shard ``shard``: ``q = ebar + mean_i C_i`` (``messages``: one per
    row, in rank order); returns the wire message of ``C(q)``; ``ebar = q - C(q)`` in place."""
    decode_mean_add(messages, ebar, layout, shard, tile=tile)  # ebar <- q
    return _encode(_kernels().MODE_RESIDUAL, ebar, ebar, layout, shard, wire_width, norm, "block", tile)


def _check_messages(name: str, messages: torch.Tensor, layout: ShardLayout, dtype: torch.dtype) -> None:
    if not (messages.dtype == torch.uint8 and messages.dim() == 2 and messages.is_contiguous()):
        raise ValueError(f"{name} needs a contiguous 2-D uint8 tensor of messages (one per row).")
    _check_width(layout, messages.shape[1], dtype)


def decode_mean_add(
    messages: torch.Tensor, out: torch.Tensor, layout: ShardLayout, shard: int, *, tile: int | None = None
) -> None:
    """``out += mean_k C_k`` of the scaled-sign messages (rows of ``messages``) of shard ``shard``.

    The mean is summed in row order and divided by the row count, as ``mean_in_rank_order``
    (bit-identical to it). ``out`` is that shard's coordinates.
    """
    _check_vectors("decode_mean_add", layout.shard_sizes[shard], out)
    _check_messages("decode_mean_add", messages, layout, out.dtype)
    if messages.shape[0] < 1:
        raise ValueError("decode_mean_add needs at least one message.")
    if out.numel() == 0:
        return
    p = plan(layout, out.device, tile)
    u0, u1 = p.shard_units[shard], p.shard_units[shard + 1]
    _launch(
        _kernels().decode_kernel, u1 - u0, out.device, messages, out, *_tables(p),
        u0, layout.shard_offsets[shard], shard, 0, messages.stride(0), messages.shape[0],
        (layout.capacity + 7) // 8, p.row_stride,
        ACCUMULATE=True, R=p.rows, BP=p.row_width, EVEN=_even(p, shard), num_warps=_num_warps(p),
        **_dtype_args(out.dtype),
    )  # fmt: skip


def decode_shards(
    messages: torch.Tensor, out: torch.Tensor, layout: ShardLayout, *, accumulate: bool = True, tile: int | None = None
) -> None:
    """``out[shard j] += C(messages[j])`` for every shard (``accumulate=False``: ``=``); ``out`` is the whole buffer."""
    _check_vectors("decode_shards", layout.numel, out)
    _check_messages("decode_shards", messages, layout, out.dtype)
    if messages.shape[0] != layout.world_size:
        raise ValueError(f"decode_shards needs one message per shard ({layout.world_size}), got {messages.shape[0]}.")
    if out.numel() == 0:
        return
    p = plan(layout, out.device, tile)
    _launch(
        _kernels().decode_kernel, p.num_units, out.device, messages, out, *_tables(p),
        0, 0, 0, messages.stride(0), 0, 1, (layout.capacity + 7) // 8, p.row_stride,
        ACCUMULATE=accumulate, R=p.rows, BP=p.row_width, EVEN=_even(p, None), num_warps=_num_warps(p),
        **_dtype_args(out.dtype),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# whole exchange steps (called by exchange.py where ``applies``)


def run_markov(
    ex: CompressedExchange,
    x: torch.Tensor,
    h: torch.Tensor,
    ghat: torch.Tensor,
    gtil: torch.Tensor,
    skip: StepSkip | None = None,
) -> torch.Tensor:
    """``MarkovExchange`` steps (1)-(5) on the kernels: the same collectives and wire format as the eager path.
    ``skip``: as ``MarkovExchange.exchange``'s (a non-finite gradient sends a zero, marked correction)."""
    from ..exchange import _DOWN

    lay, n, me = ex.layout, ex.layout.world_size, ex.rank
    norm, width = _norm(ex), ex._wire_nbytes(x.dtype)
    # (1) + (2): c_i = C(g_i - h_i) straight into the wire messages; h_i += c_i
    send = markov_worker_step(
        x, h, lay, width, norm=norm, scope=ex.worker_scale_scope, skip=None if skip is None else skip.mine
    )
    recv = ex.all_to_all_up(send, x.dtype, skip)
    # (3) ghat += mean_i c_i (decoded and averaged in rank order)
    decode_mean_add(recv, ghat, lay, me)
    # (4) ctil = C(ghat - gtil) for this rank's shard, gathered by every worker
    wire = markov_encode(ghat, gtil[lay.shard_slice(me)], lay, me, width, norm=norm)
    down = ex.transport.all_gather(wire).view(n, -1)
    ex._count(_DOWN, wire.numel(), width)
    # (5) gtil += ctil, every shard decoded from the gathered bytes (identical on every rank)
    decode_shards(down, gtil, lay)
    return gtil


def run_error_feedback(
    ex: CompressedExchange, x: torch.Tensor, e: torch.Tensor, ebar: torch.Tensor, skip: StepSkip | None = None
) -> torch.Tensor:
    """``ErrorFeedbackExchange`` steps (1)-(3) on the kernels; returns ``ctil`` (decoded from the gathered bytes).
    ``skip``: as ``ErrorFeedbackExchange.exchange``'s (then ``ctil`` is written over ``x``, the caller's temporary)."""
    from ..exchange import _DOWN

    lay, n, me = ex.layout, ex.layout.world_size, ex.rank
    norm, width = _norm(ex), ex._wire_nbytes(x.dtype)
    # (1) p_i = x_i + e_i; c_i = C(p_i) into the wire messages; e_i = p_i - c_i
    send = ef_worker_step(x, e, lay, width, norm=norm, scope=ex.worker_scale_scope, skip=None if skip is None else skip.mine)
    recv = ex.all_to_all_up(send, x.dtype, skip)
    # (2) q = mean_i c_i + ebar; ctil = C(q); ebar = q - ctil
    wire = ef_server_step(recv, ebar, lay, me, width, norm=norm)
    down = ex.transport.all_gather(wire).view(n, -1)
    ex._count(_DOWN, wire.numel(), width)
    # (3) ctil, every shard decoded from the gathered bytes
    out = torch.empty_like(x) if skip is None else x
    decode_shards(down, out, lay, accumulate=False)
    return out


def _norm(ex: CompressedExchange) -> str:
    norm = norm_of(ex.compressor)
    if norm is None:
        raise ValueError(f"The Triton kernels need a scaled-sign compressor, got {type(ex.compressor).__name__}.")
    return norm

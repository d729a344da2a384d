"""Triton kernels of the scaled-sign exchanges (imported lazily by ``triton_exchange``, which documents them).

Every kernel walks *units*: unit ``u`` is ``R`` rows of a shard, row ``r`` starting ``row_start =
unit_start[u] + r * RS`` coordinates into shard ``j = unit_shard[u]`` and ending at the end of its
scale block (``block = row_start // beff[j]``, read from ``unit_blk``) or after ``BP`` coordinates, whichever comes first.
With blocks of at most ``BP`` coordinates a row is a whole block (``RS = block_size``, ``R`` blocks
per unit); with longer blocks (or one block per shard) a row is one ``BP``-long chunk of a block
and ``R = 1``. A row always starts on a byte boundary of its shard's message (blocks and chunks
are multiples of 8 long), so its signs are whole bytes of that message.

A row is loaded as ``[R, BP // 8, 8]``: the last axis is the 8 signs of one wire byte (bit ``k``,
least significant first, as ``compressors/packing.py``). Scales are written into (and read from)
the uint8 wire through their bit pattern, byte by byte, so no alignment is assumed.

Rounding: sums are trees (``tl.sum``), so scales differ from torch's sums in the last bits; every
other operation is one correctly rounded IEEE operation in the order the eager path performs it
(``div_rn``/``sqrt_rn`` for fp32, no multiply that FMA contraction could fuse), so everything that
is derived from wire bytes (decoded means, state updates) is bit-identical to the eager path.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Whether these kernels run on the CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)

# What the encode kernel reads and writes (``MODE``):
MODE_PLAIN = 0  # p = a;                         nothing written (naive)
MODE_MARKOV_ENCODE = 1  # p = a - b;             nothing written (the server's Markov message down)
MODE_MARKOV = 2  # p = a - b;                    b <- b + C(p)   (worker: a = g, b = h)
MODE_EF = 3  # p = a + b;                        b <- p - C(p)   (worker: a = x, b = e)
MODE_RESIDUAL = 4  # p = a;                      b <- p - C(p)   (server: a = b = q, in place)

# Where the encode kernel's scales come from (``SCALE_SRC``):
SCALE_ROWS = 0  # each row is a block: its scale from the row's own sum (one pass)
SCALE_BLOCKS = 1  # scales[shard_blk0[j] + block], computed by group_scale_kernel
SCALE_ONE = 2  # scales[0] for every block (worker_scale_scope="tensor")


@triton.jit
def _sum(x, axis: tl.constexpr):
    """``tl.sum`` spelled as ``tl.reduce`` with ``tl.sum``'s own combine function.

    ``tl.sum`` (like ``tl.zeros``) is itself a ``@triton.jit`` function, which the CPU interpreter cannot
    call if triton was imported before ``TRITON_INTERPRET`` was set (a process that imported deepspeed
    first): these kernels use builtins only (``tl.reduce``, ``tl.full``), and the interpreter sums with
    numpy for this combine function."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _div(x, y, IS_F64: tl.constexpr):
    if IS_F64:
        r = x / y  # fp64 division is always IEEE round-to-nearest
    else:
        r = tl.math.div_rn(x, y)
    return r


@triton.jit
def _sqrt(x, IS_F64: tl.constexpr):
    if IS_F64:
        r = tl.sqrt(x)  # fp64 sqrt is IEEE round-to-nearest
    else:
        r = tl.math.sqrt_rn(x)
    return r


@triton.jit
def _scale(total, count, L2: tl.constexpr, IS_F64: tl.constexpr):
    """``total / count`` (L1) or ``sqrt(total) / sqrt(count)`` (L2); count >= 1."""
    if L2:
        s = _div(_sqrt(total, IS_F64), _sqrt(count, IS_F64), IS_F64)
    else:
        s = _div(total, count, IS_F64)
    return s


@triton.jit
def _tile(
    unit, unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr, elem_shift, RS,
    R: tl.constexpr, BP: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """The unit's rows: shard, its size and block length, per-row start/block/length, element mask and offsets.

    Row ``r`` is block ``unit_blk[u] + r`` of its shard (rows are whole blocks when ``R > 1``; a unit of one
    row lies inside one block), so no integer division is needed. Rows start at multiples of 8 (blocks
    and chunks are multiples of 8 long); ``EVEN`` (every shard the launch touches has a multiple of 8
    coordinates and starts at a multiple of 8, so row lengths and offsets are multiples of 8 too) lets the
    compiler load and store 16 bytes at a time, masks being constant over each group of 8.
    """
    j = tl.load(unit_shard_ptr + unit)
    start = tl.multiple_of(tl.load(unit_start_ptr + unit), 8)
    blk0 = tl.load(unit_blk_ptr + unit)
    off = tl.load(shard_off_ptr + j)
    if EVEN:  # (hints go on loads and arithmetic that no folding removes)
        off = tl.multiple_of(off, 8)
    off = off - elem_shift
    if EVEN:
        off = tl.multiple_of(off, 8)
    size = tl.load(shard_size_ptr + j)
    beff = tl.load(shard_beff_ptr + j)
    r = tl.arange(0, R).to(tl.int64)
    row_start = tl.multiple_of(start + r * RS, 8)  # [R], within the shard
    blk = blk0 + r
    blk_end = tl.minimum((blk + 1) * beff, size)
    row_len = tl.minimum(tl.maximum(blk_end - row_start, 0), BP)
    if EVEN:
        row_len = tl.multiple_of(row_len, 8)
    q = tl.arange(0, BP // 8)
    bit = tl.arange(0, 8)
    e = q[None, :, None] * 8 + bit[None, None, :]  # [1, BP/8, 8]: coordinate within the row
    mask = e < row_len[:, None, None]
    idx = off + row_start[:, None, None] + e
    return j, size, beff, row_start, blk, row_len, q, bit, mask, idx


@triton.jit
def _values(a_ptr, b_ptr, idx, mask, skip_ptr, MODE: tl.constexpr, SKIP: tl.constexpr):
    """``p`` (the vector being compressed) and ``b`` (the state, where the mode has one).

    ``SKIP`` (the workers' steps only): ``p = 0`` where the byte at ``skip_ptr`` is nonzero (this rank's
    gradient is not finite), so the message carries zero scales; ``b`` keeps its value (Markov: ``b + 0``;
    error feedback: ``encode_kernel`` does not store it)."""
    a = tl.load(a_ptr + idx, mask=mask, other=0.0)
    if MODE == 1 or MODE == 2 or MODE == 3:
        b = tl.load(b_ptr + idx, mask=mask, other=0.0)
    else:
        b = a
    if MODE == 1 or MODE == 2:
        p = a - b
    elif MODE == 3:
        p = a + b
    else:
        p = a
    if SKIP:
        p = tl.where(tl.load(skip_ptr) != 0, 0.0, p)
    return p, b


@triton.jit
def _magnitude(p, L2: tl.constexpr):
    if L2:
        v = p * p
    else:
        v = tl.abs(p)
    return v


@triton.jit
def partial_sums_kernel(
    a_ptr, b_ptr, partial_ptr,
    unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr,
    unit0, elem_shift, RS, skip_ptr,
    MODE: tl.constexpr, L2: tl.constexpr, R: tl.constexpr, BP: tl.constexpr, EVEN: tl.constexpr,
    SKIP: tl.constexpr,
):  # fmt: skip
    """``partial[u] = sum |p|`` (L1) or ``sum p^2`` (L2) over unit ``u``'s coordinates."""
    unit = unit0 + tl.program_id(0)
    j, size, beff, row_start, blk, row_len, q, bit, mask, idx = _tile(
        unit, unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr, elem_shift, RS,
        R, BP, EVEN,
    )  # fmt: skip
    p, b = _values(a_ptr, b_ptr, idx, mask, skip_ptr, MODE, SKIP)
    v = tl.where(mask, _magnitude(p, L2), 0.0)
    tl.store(partial_ptr + unit, _sum(_sum(_sum(v, axis=2), axis=1), axis=0))


@triton.jit
def group_scale_kernel(
    partial_ptr, scales_ptr, group_unit0_ptr, group_units_ptr, group_numel_ptr, group0,
    L2: tl.constexpr, P: tl.constexpr, IS_F64: tl.constexpr, FLOAT: tl.constexpr,
):  # fmt: skip
    """``scales[g]``: the scale of group ``g`` (a block, or the whole vector) from its units' partial sums."""
    g = group0 + tl.program_id(0)
    u0 = tl.load(group_unit0_ptr + g)
    nu = tl.load(group_units_ptr + g)
    numel = tl.load(group_numel_ptr + g)
    acc = tl.full([P], 0, FLOAT)
    for i in range(0, nu, P):
        offs = i + tl.arange(0, P)
        acc += tl.load(partial_ptr + u0 + offs, mask=offs < nu, other=0.0)
    count = tl.full([], 0, FLOAT) + tl.maximum(numel, 1)
    tl.store(scales_ptr + g, _scale(_sum(acc, axis=0), count, L2, IS_F64))


@triton.jit
def encode_kernel(
    a_ptr, b_ptr, wire_ptr, scales_ptr,
    unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr, shard_blk0_ptr,
    unit0, elem_shift, wire_shard0, width, packed_cap, RS, skip_ptr,
    MODE: tl.constexpr, SCALE_SRC: tl.constexpr, L2: tl.constexpr, R: tl.constexpr, BP: tl.constexpr, EVEN: tl.constexpr,
    IS_F64: tl.constexpr, FLOAT: tl.constexpr, UINT: tl.constexpr, ITEM: tl.constexpr, SKIP: tl.constexpr,
):  # fmt: skip
    """Signs packed into the wire, scales written after them, and the state update of ``MODE``."""
    unit = unit0 + tl.program_id(0)
    j, size, beff, row_start, blk, row_len, q, bit, mask, idx = _tile(
        unit, unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr, elem_shift, RS,
        R, BP, EVEN,
    )  # fmt: skip
    p, b = _values(a_ptr, b_ptr, idx, mask, skip_ptr, MODE, SKIP)
    row_ok = (row_start < size) | (row_start == 0)  # a row with coordinates, or an empty shard's only block
    if SCALE_SRC == 0:
        v = tl.where(mask, _magnitude(p, L2), 0.0)
        count = tl.full([R], 0, FLOAT) + tl.maximum(row_len, 1)
        scale = _scale(_sum(_sum(v, axis=2), axis=1), count, L2, IS_F64)
    elif SCALE_SRC == 1:
        scale = tl.load(scales_ptr + tl.load(shard_blk0_ptr + j) + blk, mask=row_ok, other=0.0)
    else:
        scale = tl.load(scales_ptr + blk * 0)
    # signs: sign(0) = +1 (p >= 0), NaN -> bit 0, padding bits 0
    pos = (p >= 0) & mask
    byte = _sum(pos.to(tl.int32) << bit[None, None, :], axis=2).to(tl.uint8)  # [R, BP/8]
    msg = wire_ptr + (j - wire_shard0) * width
    tl.store(msg + ((row_start[:, None] >> 3) + q[None, :]), byte, mask=(q[None, :] * 8) < row_len[:, None])
    # the block's scale, byte by byte (little endian), by the row that starts the block
    first = (row_start == blk * beff) & row_ok
    pattern = scale.to(UINT, bitcast=True)
    slot = msg + packed_cap + blk * ITEM
    for k in tl.static_range(ITEM):
        tl.store(slot + k, ((pattern >> (8 * k)) & 0xFF).to(tl.uint8), mask=first)
    if MODE >= 2:
        s = scale[:, None, None]
        c = tl.where(pos, s, -s)
        if MODE == 2:
            new = b + c  # (with SKIP set: c = +-0, b keeps its value)
            tl.store(b_ptr + idx, new, mask=mask)
        else:
            new = p - c
            if SKIP:  # error feedback: a skipping worker keeps its error (the flag as a vector: a broadcast load)
                tl.store(b_ptr + idx, new, mask=mask & (tl.load(skip_ptr + idx * 0, mask=mask, other=0) == 0))
            else:
                tl.store(b_ptr + idx, new, mask=mask)


@triton.jit
def decode_kernel(
    msgs_ptr, out_ptr,
    unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr,
    unit0, elem_shift, msg_shard0, shard_stride, msg_stride, nmsgs, packed_cap, RS,
    ACCUMULATE: tl.constexpr, R: tl.constexpr, BP: tl.constexpr, EVEN: tl.constexpr,
    IS_F64: tl.constexpr, FLOAT: tl.constexpr, UINT: tl.constexpr, ITEM: tl.constexpr,
):  # fmt: skip
    """``out (+)= (C_0 + C_1 + ... + C_{n-1}) / n``, summed in message order, of the ``nmsgs`` messages of each shard.

    Shard ``j``'s message ``k`` is at ``msgs + (j - msg_shard0) * shard_stride + k * msg_stride``.
    """
    unit = unit0 + tl.program_id(0)
    j, size, beff, row_start, blk, row_len, q, bit, mask, idx = _tile(
        unit, unit_shard_ptr, unit_start_ptr, unit_blk_ptr, shard_off_ptr, shard_size_ptr, shard_beff_ptr, elem_shift, RS,
        R, BP, EVEN,
    )  # fmt: skip
    base = msgs_ptr + (j - msg_shard0) * shard_stride
    byte_idx = ((row_start[:, None] >> 3) + q[None, :])[:, :, None]  # [R, BP/8, 1]
    byte_mask = ((q[None, :] * 8) < row_len[:, None])[:, :, None]
    row_ok = row_len > 0
    total = tl.full([R, BP // 8, 8], 0, FLOAT)
    for k in range(nmsgs):
        msg = base + k * msg_stride  # k * msg_stride < 2^31 unless a buffer has > 1.7e10 coordinates
        byte = tl.load(msg + byte_idx, mask=byte_mask, other=0).to(tl.int32)
        pattern = tl.full([R], 0, UINT)
        for t in tl.static_range(ITEM):
            part = tl.load(msg + packed_cap + blk * ITEM + t, mask=row_ok, other=0).to(UINT)
            pattern = pattern | (part << (8 * t))
        s = pattern.to(FLOAT, bitcast=True)[:, None, None]
        value = tl.where(((byte >> bit[None, None, :]) & 1) != 0, s, -s)
        total = tl.where(k == 0, value, total + value)  # C_0, then (C_0 + C_1) + C_2 ...
    mean = _div(total, tl.full([R, BP // 8, 8], 0, FLOAT) + nmsgs, IS_F64)  # x / 1 == x exactly
    if ACCUMULATE:
        mean = tl.load(out_ptr + idx, mask=mask, other=0.0) + mean
    tl.store(out_ptr + idx, mean, mask=mask)

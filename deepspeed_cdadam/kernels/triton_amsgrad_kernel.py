"""The Triton kernel of CD-Adam's moment update (imported lazily by ``triton_amsgrad``, which documents it)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def amsgrad_kernel(
    g_ptr, m_ptr, v_ptr, vmax_ptr, out_ptr, skip_ptr, n,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias1, bias2,
    HAS_MAX: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One pass over ``BLOCK`` coordinates: the moments (stored only where the flag at ``skip_ptr`` is 0)
    and the direction (0 where it is not)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    keep = tl.load(skip_ptr + offs * 0) == 0  # the flag, as a vector (one address: a broadcast load)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * g  # (6)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g  # (7)
    store = mask & keep
    tl.store(m_ptr + offs, m, mask=store)
    tl.store(v_ptr + offs, v, mask=store)
    second = v
    if HAS_MAX:  # (8)
        second = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
        tl.store(vmax_ptr + offs, second, mask=store)
    # IEEE division and square root (``/`` and ``tl.sqrt`` compile to approximations on a GPU)
    if BIAS:  # (9') Adam's bias correction
        direction = tl.math.div_rn(tl.math.div_rn(m, bias1), tl.math.sqrt_rn(tl.math.div_rn(second, bias2) + eps))
    else:  # (9)
        direction = tl.math.div_rn(m, tl.math.sqrt_rn(second + eps))
    tl.store(out_ptr + offs, tl.where(keep, direction, 0.0), mask=mask)

"""CD-Adam's moment update and direction (``optim.functional.amsgrad_direction``) in one Triton pass,
with a step skip read on the device.

``amsgrad_direction(estimate, exp_avg, exp_avg_sq, max_exp_avg_sq, skip, ...)`` reads ``gtil`` and the
moments once and writes the moments and the direction once (the eager lines make four full passes and
two temporaries). Where the one-byte flag ``skip`` (on the device) is set, no moment is written and the
direction is zero, so ``x <- x - lr * direction`` leaves the parameters as they were: a skipped step is
decided without the host reading anything (``optim.base``, the device-decided step).

fp32 buffers only (Triton passes the Python scalars as fp32). The result agrees with the eager lines to a
few ulps, not bitwise (torch's kernels may contract ``m * beta1 + (1 - beta1) * g`` into a fused
multiply-add; these do not: ``enable_fp_fusion=False``, as the exchange kernels) (``tests/kernels/test_triton_amsgrad.py``).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from . import triton_exchange

#: Coordinates per program, and warps per program.
BLOCK = 2048
NUM_WARPS = 8


@cache
def _kernel() -> ModuleType:
    """The ``@triton.jit`` kernel (imports triton: ``TRITON_INTERPRET=1`` must be set before, for CPU tensors)."""
    from . import triton_amsgrad_kernel

    return triton_amsgrad_kernel


def applies(*buffers: torch.Tensor) -> bool:
    """Whether the kernel takes these buffers: contiguous fp32 vectors of one length on one device."""
    first = buffers[0]
    return all(
        t.dtype == torch.float32 and t.is_contiguous() and t.device == first.device and t.numel() == first.numel()
        for t in buffers
    )


def amsgrad_direction(
    estimate: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    skip: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction_step: int | None = None,
) -> torch.Tensor:
    """``functional.amsgrad_direction`` (CD-Adam lines (6)-(9)) in one pass; where ``skip`` (0-dim bool or
    uint8 on the buffers' device) is set, the moments keep their values and the direction is zero."""
    buffers = [estimate, exp_avg, exp_avg_sq] + ([] if max_exp_avg_sq is None else [max_exp_avg_sq])
    if not applies(*buffers):
        raise ValueError("triton_amsgrad.amsgrad_direction needs contiguous fp32 buffers of one length on one device.")
    if skip.numel() != 1 or skip.device != estimate.device:
        raise ValueError(f"skip must be one element on {estimate.device}, got {skip.numel()} on {skip.device}.")
    flag = skip.reshape(1).view(torch.uint8) if skip.dtype == torch.bool else skip.reshape(1)
    out = torch.empty_like(estimate)
    n = estimate.numel()
    if n == 0:
        return out
    t = bias_correction_step
    triton_exchange._launch(  # the interpreter's lock, the device guard, no FMA contraction
        _kernel().amsgrad_kernel, -(-n // BLOCK), estimate.device,
        estimate, exp_avg, exp_avg_sq, exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq, out, flag, n,
        beta1, 1 - beta1, beta2, 1 - beta2, eps,
        1.0 if t is None else 1 - beta1**t, 1.0 if t is None else 1 - beta2**t,
        HAS_MAX=max_exp_avg_sq is not None, BIAS=t is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out

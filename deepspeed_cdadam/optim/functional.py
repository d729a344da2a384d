"""Pure per-buffer update math, shared by the optimizers (labels match their docstrings)."""

from __future__ import annotations

import torch
from torch._utils import _unflatten_dense_tensors  # (what DDP and DeepSpeed use to split a flat buffer)


def amsgrad_direction(
    estimate: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction_step: int | None = None,
) -> torch.Tensor:
    """CD-Adam's worker update (Algorithm 1, lines 13-16), in place on the moments.

    Returns ``m_t / sqrt(vhat_t + eps)``; with ``max_exp_avg_sq=None`` (Adam) ``v_t`` replaces ``vhat_t``.
    With ``bias_correction_step=t`` (opt-in, not in the paper): Adam's bias correction,
    ``(m_t / (1 - beta1^t)) / sqrt(vhat_t / (1 - beta2^t) + eps)`` (as ``torch.optim.Adam`` with
    amsgrad: the max is taken over uncorrected ``v``, then corrected; eps stays inside the root).
    """
    # (6) m_t = beta1 m_{t-1} + (1 - beta1) gtil_t
    exp_avg.mul_(beta1).add_(estimate, alpha=1 - beta1)
    # (7) v_t = beta2 v_{t-1} + (1 - beta2) gtil_t^2
    exp_avg_sq.mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)
    # (8) vhat_t = max(vhat_{t-1}, v_t)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    if bias_correction_step is not None:
        # (9') direction = (m_t / (1 - beta1^t)) / sqrt(vhat_t / (1 - beta2^t) + eps)
        t = bias_correction_step
        return (exp_avg / (1 - beta1**t)) / (second / (1 - beta2**t) + eps).sqrt()
    # (9) direction = m_t / sqrt(vhat_t + eps), in one temporary
    direction = torch.add(second, eps).sqrt_()
    return torch.div(exp_avg, direction, out=direction)


def adam_moments_(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None, *, beta1: float, beta2: float
) -> None:
    """1-bit Adam's moment update: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2`` unless ``v`` is frozen (None)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    if exp_avg_sq is not None:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def onebit_adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, eps: float) -> torch.Tensor:
    """DeepSpeed OnebitAdam's direction ``m / (sqrt(v) + eps)`` (no bias correction, as upstream)."""
    direction = exp_avg_sq.sqrt().add_(eps)  # one temporary, upstream's operations
    return torch.div(exp_avg, direction, out=direction)


def apply_update_(
    params: list[torch.Tensor],
    direction: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    decoupled: bool = True,
    overwrite_direction: bool = False,
    skip: torch.Tensor | None = None,
) -> None:
    """``x <- x - lr * (direction + weight_decay * x)`` on each parameter's slice of the flat ``direction``.

    ``decoupled`` only changes the order of operations: ``x *= 1 - lr*wd`` first (AdamW), or the
    update built as ``direction + wd * x`` first (DeepSpeed OnebitAdam). ``overwrite_direction=True``
    (the caller's own temporary): the second order is computed in ``direction`` itself, with the
    same operations, so no further full-size temporary is made (but ``wd * x`` with weight decay).
    ``skip`` (0-dim bool on the device): where true the parameters keep their values, and the host reads
    nothing: decoupled, the weight decay factor is 1 and the caller's ``direction`` must be zero
    (``kernels.triton_amsgrad`` writes it so); otherwise the update is multiplied by 0 instead of ``-lr``
    (the caller's ``direction`` must be finite).
    """
    # a few multi-tensor launches per operation, not one per parameter (GPT-2: ~150); each element sees the
    # same operations as ``p.add_(d, alpha=-lr)`` etc. on its own. Chunks bound the temporaries (``wd * x``,
    # the update, a cast) to what one chunk of parameters needs, as the per-parameter loop bounded them to
    # one; the decoupled update of parameters in the direction's dtype makes none: one chunk.
    numels = [p.numel() for p in params]
    ds = _unflatten_dense_tensors(direction, params)  # views of direction shaped like params, in one call
    temporaries = not decoupled or any(p.dtype != direction.dtype for p in params)
    with torch.no_grad():
        for ps, ds_ in _chunks(params, ds, numels) if temporaries else [(params, ds)]:
            if decoupled:
                if weight_decay != 0.0 and skip is None:
                    torch._foreach_mul_(ps, 1 - lr * weight_decay)
                elif weight_decay != 0.0:  # the factor as a device scalar: 1 on a skipped step
                    torch._foreach_mul_(ps, _device_scalar(1 - lr * weight_decay, skip, 1.0, ps[0].dtype))
                torch._foreach_add_(ps, _cast(ds_, ps), alpha=-lr)
            elif overwrite_direction:  # the same operations as below, in d
                if weight_decay > 0.0:
                    torch._foreach_add_(ds_, torch._foreach_mul(ps, weight_decay))
                torch._foreach_mul_(ds_, _step_size(-lr, skip, ds_))
                torch._foreach_add_(ps, _cast(ds_, ps))
            else:  # DeepSpeed OnebitAdam's own operations: update = d + wd * p; p += -lr * update
                update = torch._foreach_add(ds_, torch._foreach_mul(ps, weight_decay)) if weight_decay > 0.0 else ds_
                torch._foreach_add_(ps, _cast(torch._foreach_mul(update, _step_size(-lr, skip, update)), ps))


def _step_size(value: float, skip: torch.Tensor | None, like: list[torch.Tensor]) -> float | torch.Tensor:
    """``value``, or with ``skip`` a device scalar that is 0 where the step is skipped (the same product
    where it is not: a 0-dim tensor of the buffers' dtype multiplies as the Python number does)."""
    if skip is None or not like:
        return value
    return _device_scalar(value, skip, 0.0, like[0].dtype)


def _device_scalar(value: float, skip: torch.Tensor, skipped: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim ``dtype`` tensor on ``skip``'s device: ``value``, or ``skipped`` where ``skip`` is true (no host read)."""
    return torch.full((), value, dtype=dtype, device=skip.device).masked_fill_(skip, skipped)


def _chunks(ps: list[torch.Tensor], ds: list[torch.Tensor], numels: list[int]):
    """``(ps, ds)`` in consecutive pieces of at most a quarter of all coordinates, or one parameter if larger:
    the temporaries of a piece stay within the bound the per-parameter loop had (the largest parameter)
    or a quarter of the bucket (tests/optim/test_allocations.py). ``numels``: the parameters' sizes."""
    limit = max(max(numels, default=0), sum(numels) // 4)
    start, total = 0, 0
    for i, n in enumerate(numels):
        if i > start and total + n > limit:
            yield ps[start:i], ds[start:i]
            start, total = i, 0
        total += n
    if start < len(ps):
        yield ps[start:], ds[start:]


def _cast(xs: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each ``xs[i]`` in ``like[i]``'s dtype (the same tensor where it already is)."""
    if all(x.dtype == y.dtype for x, y in zip(xs, like)):
        return xs
    return [x.to(y.dtype) for x, y in zip(xs, like)]

"""1-bit LAMB (Li et al., 2021), with the semantics of DeepSpeed 0.19.6's OnebitLamb, on any transport."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..compressors.base import Compressor
from ..config import OneBitLambConfig, check_lamb_coeff_range, spec_of
from ..schedule import StepKind
from ..state import FULL, PADDING, RANK_IDENTICAL, StateSpec
from ..types import (
    EXP_AVG,
    EXP_AVG_PADDING,
    EXP_AVG_SQ,
    EXP_AVG_SQ_FRESH,
    LAMB_COEFF_FREEZE,
    LAST_FACTOR,
    SCALING_COEFF,
    STEP,
)
from .base import Bucket, CompressedOptimizer, Segment
from .masks import check_exp_avg_mask


def clip(value: float, low: float, high: float) -> float:
    """``value`` clipped to ``[low, high]`` (upper bound first, as upstream)."""
    if value > high:
        value = high
    if value < low:
        value = low
    return value


@dataclass
class LambTensor:
    """One parameter tensor inside a bucket: where it lies in the flat buffers, and what to update."""

    param: torch.Tensor
    segment: Segment
    index_in_segment: int
    slice: slice
    #: the tensor the update is applied to: the parameter, or its slice of the fp32 master copy
    target: torch.Tensor

    @property
    def group(self) -> dict[str, Any]:
        return self.segment.group


class OneBitLamb(CompressedOptimizer):
    r"""1-bit LAMB: LAMB for ``freeze_step`` steps, then frozen variance and coefficient and one fused
    1-bit momentum exchange, with a per-tensor factor from a variance that keeps adapting.

    For each parameter tensor :math:`k` (norms :math:`\|\cdot\|` are per tensor):

    .. math::
       \begin{aligned}
       &\textbf{warm-up } (t \le T_w):\\
       &(1)\ g_t = \tfrac1n \textstyle\sum_i g^{(i)}_t \quad \text{(fp32 all-reduce)}\\
       &(2)\ m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
            \quad v^{f}_{T_w} = v_{T_w}\\
       &(3)\ u_k = m_k / (\sqrt{v_k} + \epsilon) + \lambda x_k\\
       &(4)\ c_k = \mathrm{clip}(\|x_k\| / \|u_k\|,\ c_{\min}, c_{\max}) \text{ if both norms} \ne 0,
            \text{ else } 1\\
       &(5)\ \bar c_k \leftarrow \beta_c \bar c_k + (1-\beta_c) c_k \quad \text{unless } c_k = 1
            \quad (\bar c_k = 0 \text{ at first; no bias correction})\\
       &(6)\ x_k \leftarrow x_k - \alpha\, c_k\, u_k\\
       &\textbf{compressed } (t > T_w):\ v_t = v_{T_w},\ \bar c_k \text{ frozen}\\
       &(7)\ \text{once, at } t = T_w + 1:\ r_k = \|m_k\| / \sqrt{d_k},\quad
            s_k = \mathrm{mean}_j(r_j) / r_k \quad (s_k = 1 \text{ if } r_k = 0)\\
       &(8)\ m^{(i)}_k = s_k\,(\beta_1 m_{k,t-1} + (1-\beta_1) g^{(i)}_{k,t}) \quad \text{(local gradient)}\\
       &(9)\ [m_t, z] \leftarrow \mathrm{EF}_{\mathcal C}([m^{(i)}_t, z]) \quad
            \text{(one error-feedback 1-bit exchange of the whole bucket)}\\
       &(10)\ m_k \leftarrow m_k / s_k \odot \mathrm{mask}_k\\
       &(11)\ \tilde g_k = (m_k - \beta_1 m_{k,t-1}) / (1-\beta_1),\quad
            v^{f}_k \leftarrow \beta_2 v^{f}_k + (1-\beta_2) \tilde g_k^2\\
       &(12)\ u^0_k = m_k / (\sqrt{v_k} + \epsilon),\quad u_k = u^0_k + \lambda x_k\\
       &(13)\ f_k = \max_j \big[(\sqrt{v_k} + \epsilon) / (\sqrt{v^f_k} + \epsilon)\big]_j;\
            \text{if } \lambda > 0:\ \rho = \min(1, \|u^0_k\| / \|u_k\|),\ f_k \leftarrow \rho f_k + 1 - \rho\\
       &(14)\ f_k \leftarrow \mathrm{clip}(f_k, f_{\min}, f_{\max}),\quad
            f_k \leftarrow \mathrm{clip}(f_k, (1-\tau) f'_k, (1+\tau) f'_k),\quad f'_k \leftarrow f_k\\
       &(15)\ x_k \leftarrow x_k - \alpha\, \bar c_k f_k\, u_k
       \end{aligned}

    Names: :math:`m` ``exp_avg``, :math:`v` ``exp_avg_sq``, :math:`v^f` ``exp_avg_sq_fresh``,
    :math:`z` ``exp_avg_padding``, :math:`\bar c_k` ``lamb_coeff_freeze``, :math:`f'_k` ``last_factor``
    (1 at first), :math:`s_k` ``scaling_coeff``; :math:`\beta_c` ``coeff_beta``, :math:`\tau`
    ``factor_threshold``. The moments are flat per bucket (``optim.base``); the per-tensor floats
    live in ``optimizer.state[p]`` of each parameter, as upstream keeps them.
    :math:`\mathcal C(x_B) = \|x_B\|_2/\sqrt{d_B}\cdot\mathrm{sign}(x_B)` and
    :math:`\mathrm{EF}_{\mathcal C}` is ``exchange.ErrorFeedbackExchange`` (worker error, server
    error); ``get_lamb_coeffs()`` gives :math:`c_k` (warm-up) or :math:`\bar c_k f_k` of the last step.

    Upstream fuses all momenta into one flat buffer zero-padded by a dummy tensor to a multiple of
    ``world_size * lcm(world_size, 8)`` and runs one compressed all-reduce over it: one worker scale
    over the padded length, one server scale per chunk. Here the bucket is that buffer: with the
    defaults (``scale_blocks="tensor_padded"``, ``worker_scale_scope="tensor"``, ``block_size=None``)
    the whole bucket is one padded "tensor" (``layout_tensor_sizes``), and step (9) is upstream's,
    operation for operation. The scaling (7) makes the tensors' momenta alike in magnitude so that one
    worker scale suits them all. Upstream's compressed all-reduce works in place on its fused buffer,
    so the padding slots :math:`z` keep the last exchange's output and are sent again with the next
    one; they are kept here too (``exp_avg_padding``, identical on every rank), which is what makes
    the result equal to upstream's and not only close. ``scale_blocks="fixed"`` (blocks of
    ``block_size`` over the server shards, no padding) is offered as a variant. On one rank (9) is
    skipped, as upstream does: there is nothing to average.

    Param-group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``max_coeff``, ``min_coeff`` (as
    upstream's defaults), and ``exp_avg_mask`` (below). As for 1-bit Adam, a coordinate whose gradient
    was exactly zero through the warm-up has :math:`v = 0`, while its 1-bit momentum is not zero: its
    update is that noise divided by eps. Mask such coordinates (unused embedding rows) with
    ``exp_avg_mask``, as upstream's BERT example does.

    Equal to DeepSpeed 0.19.6's OnebitLamb inside its engine on 2 ranks, fp32 and fp16, through the
    warm-up and the compressed phase (``tests/integration/test_upstream_onebit_lamb.py``), with
    these differences, each deliberate:

    * Step 1 updates the parameters: upstream's first ``step()`` call only initialises its buffers,
      so upstream's ``freeze_step`` F is ours F - 1. ``freeze_step`` must be >= 1: with no warm-up
      :math:`\bar c` stays 0 and the parameters never move. (Upstream's F = 1 runs one warm-up step
      too, but never copies v into :math:`v^f`, which then starts from zero: not reproduced.)
    * A tensor whose momentum is exactly zero at the switch (a parameter that never had a gradient)
      gets :math:`s_k = 1` and is left out of the mean; upstream divides by its zero scale
      (a ``ZeroDivisionError`` in its Python arithmetic). Empty tensors take no part, as upstream
      filters them out.
    * A parameter without ``.grad`` counts as a zero gradient (every rank sends the same layout);
      upstream skips it in its per-parameter loops.
    * One fused buffer per bucket (parameters of one dtype and device; DeepSpeed's wrappers give one
      fp32 bucket), and the mean in (7) is over the bucket's tensors. Upstream has one for the model.
    * ``exp_avg_mask`` (param-group key, as ``OneBitAdam``): one entry per coordinate of the group's
      trainable parameters (upstream multiplies each parameter's momentum by the group's mask, so
      the two agree for a group of one parameter, its usual use: BERT's position embeddings).
      ``load_state_dict`` keeps the mask the group has now, as upstream does.
    * Exact resume, which upstream does not have: ``state_dict()`` / ``load_state_dict`` (and the
      DeepSpeed integration's per-rank files) restore everything, so a resumed run continues
      bit-identically. Upstream's reload rebuilds its fused buffer with zero padding slots, drops
      the worker and server errors, and when it loads into the warm-up resets ``lamb_coeff_freeze``
      to 0 and ``last_factor`` to 1 and drops ``scaling_coeff``: its resumed run differs from an
      uninterrupted one. Ours resets the compression state (errors and padding slots) only when
      the per-rank state cannot be restored (another world size): ``reset_compression_state``.

    The phase is ``state["step"] <= freeze_step``: warm-up.
    """

    CONFIG = OneBitLambConfig  # its arguments, their defaults and checks
    #: upstream OnebitAdam's ``non_freeze`` is not a 1-bit LAMB key (upstream OnebitLamb ignores it)
    UNSUPPORTED_GROUP_KEYS = ("non_freeze",)
    STATE = (
        StateSpec(EXP_AVG, FULL, RANK_IDENTICAL, "m_t"),
        StateSpec(EXP_AVG_SQ, FULL, RANK_IDENTICAL, "v_t, frozen after the warm-up"),
        StateSpec(EXP_AVG_SQ_FRESH, FULL, RANK_IDENTICAL, "v^f_t, the variance that keeps adapting"),
        StateSpec(EXP_AVG_PADDING, PADDING, RANK_IDENTICAL, "z, the fused buffer's padding slots"),
    )
    #: During the warm-up a framework's exact gradient average (DeepSpeed's engine all-reduce) may
    #: stand in for the optimizer's own (``engine_averages_exact_steps``), as upstream's does.
    ENGINE_MAY_AVERAGE_EXACT_STEPS = True

    def exchange_names(self) -> tuple[str, ...]:
        return ("none", self.exchange_name)  # exact average during the warm-up, then compressed

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        freeze_step: int = 100000,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        coeff_beta: float = 0.9,
        factor_max: float = 4.0,
        factor_min: float = 0.5,
        factor_threshold: float = 0.1,
        *,
        compressor: str | Compressor = "sign_l2",
        block_size: int | None = None,
        scale_blocks: str = "tensor_padded",
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        worker_scale_scope: str = "tensor",
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        config = OneBitLambConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange="error_feedback",
            transport=transport, process_group=process_group,
        )  # fmt: skip
        self.freeze_step = config.freeze_step
        self.coeff_beta = config.coeff_beta
        self.factor_max = config.factor_max
        self.factor_min = config.factor_min
        self.factor_threshold = config.factor_threshold
        # id(param) -> its coefficient in the last step (get_lamb_coeffs)
        self._lamb_coeffs: dict[int, float] = {}

    # --- parameter groups -------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        for key in ("max_coeff", "min_coeff"):  # a group may override them, as upstream's defaults
            spec_of(OneBitLambConfig, key).check(key, group[key])
        check_lamb_coeff_range(group["min_coeff"], group["max_coeff"], " in a parameter group")
        if "exp_avg_mask" in group:  # a wrong mask fails here, not after the warm-up
            check_exp_avg_mask(group["exp_avg_mask"], self.group_numel(group))

    def _tensor_mask(self, tensor: LambTensor, like: torch.Tensor) -> torch.Tensor | None:
        """The entries of the group's ``exp_avg_mask`` for ``tensor``'s coordinates (``like``'s dtype), or None."""
        mask = tensor.group.get("exp_avg_mask")
        if mask is None:
            return None
        check_exp_avg_mask(mask, self.group_numel(tensor.group))  # the group may have been edited since
        start = tensor.segment.group_offsets[tensor.index_in_segment]
        return mask.reshape(-1)[start : start + tensor.param.numel()].to(device=like.device, dtype=like.dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``CompressedOptimizer.load_state_dict``, keeping each group's ``exp_avg_mask`` as it is now
        (as upstream: a mask may change between training stages, e.g. BERT's sequence length)."""
        groups = list(state_dict["param_groups"])  # a count that differs is refused by torch below
        for i, (group, saved) in enumerate(zip(self.param_groups, groups)):
            groups[i] = {k: v for k, v in saved.items() if k != "exp_avg_mask"}
            if "exp_avg_mask" in group:
                groups[i]["exp_avg_mask"] = group["exp_avg_mask"]
        super().load_state_dict({**state_dict, "param_groups": groups})

    # --- the fused buffer -------------------------------------------------------------------
    def layout_tensor_sizes(self, bucket: Bucket) -> tuple[int, ...]:
        """The whole bucket is one "tensor": upstream's one fused momentum buffer, padded as one."""
        return (bucket.numel,)

    def _padding_numel(self, bucket: Bucket) -> int:
        """Padding slots the layout adds past the bucket (0 for ``scale_blocks="fixed"``)."""
        return self._exchange_for(bucket.index, bucket.numel).layout.numel - bucket.numel

    def _exchange_momentum(self, bucket: Bucket, m: torch.Tensor, state: dict[str, Any], step: int) -> None:
        """(9) One error-feedback exchange of the bucket's momentum and its padding slots, in place.
        On one rank there is nothing to average and nothing is compressed, as upstream (``size > 1``)."""
        if self.transport.world_size == 1:
            return
        exchange = self._exchange_for(bucket.index, m.numel())
        padding = state[EXP_AVG_PADDING]
        if not exchange.layout.permuted:  # "fixed": the bucket itself, no padding
            m.copy_(exchange.exchange(m, state, step=step, group=bucket.index))
            return
        # One padded tensor: its layout space is the bucket followed by the padding slots, in order,
        # so the wrapped exchange takes them as they are (not zeros: upstream's buffer keeps its output).
        out = exchange.inner.exchange(torch.cat([m, padding]), state, step=step, group=bucket.index)
        m.copy_(out[: m.numel()])
        padding.copy_(out[m.numel() :])

    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[EXP_AVG] = zeros.clone()  # m_t
        state[EXP_AVG_SQ] = zeros.clone()  # v_t (frozen after the warm-up)
        state[EXP_AVG_SQ_FRESH] = zeros.clone()  # v^f_t (a copy of v at the freeze, then adapting)
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)  # worker_error, server_error
        state[EXP_AVG_PADDING] = zeros.new_zeros(self._padding_numel(bucket))  # z
        for p in bucket.params:
            self.state[p][LAMB_COEFF_FREEZE] = 0.0  # \bar c_k
            self.state[p][LAST_FACTOR] = 1.0  # f'_k

    def reset_compression_state(self) -> None:
        """``CompressedOptimizer.reset_compression_state``, and the padding slots back to zero (their
        number depends on the world size), as upstream's reload rebuilds its fused buffer."""
        super().reset_compression_state()
        for bucket in self.buckets():
            state = self.bucket_state(bucket)
            if self.FLAT_STATE_KEY in state:
                state[EXP_AVG_PADDING] = state[EXP_AVG].new_zeros(self._padding_numel(bucket))

    def lamb_tensors(self, bucket: Bucket, targets: list[torch.Tensor]) -> list[LambTensor]:
        """The bucket's non-empty parameter tensors, in bucket order, with what the update goes to."""
        out = []
        for seg in bucket.segments:
            offset = seg.start
            for i, p in enumerate(seg.params):
                sl = slice(offset, offset + p.numel())
                offset += p.numel()
                if p.numel() == 0:
                    continue  # no coordinates: no norm, no update (upstream filters them out)
                target = p if targets is bucket.params else targets[0][sl]
                out.append(LambTensor(p, seg, i, sl, target))
        return out

    # --- the schedule and the step ----------------------------------------------------------
    def planned_step(self) -> StepKind:
        """``EXACT`` for steps 1..freeze_step (the warm-up), ``COMPRESSED`` after."""
        return StepKind.EXACT if self.completed_steps() + 1 <= self.freeze_step else StepKind.COMPRESSED

    def get_lamb_coeffs(self) -> list[float]:
        """Each parameter tensor's coefficient in the last step (param-group order): the clipped trust
        ratio in the warm-up, ``lamb_coeff_freeze * factor`` after. A new list, as upstream's."""
        return [
            self._lamb_coeffs[id(p)] for g in self.param_groups for p in self.trainable(g) if id(p) in self._lamb_coeffs
        ]

    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
    ) -> None:
        """The warm-up step (exact average, trust ratio), or the compressed one (one fused exchange)."""
        tensors = self.lamb_tensors(bucket, params)
        if kind == StepKind.EXACT:
            if self.engine_averages_exact_steps:
                mean_grad = grad  # (1) by the framework (DeepSpeed's engine all-reduce)
            else:  # (1) one all-reduce for the bucket
                mean_grad = self._exchange_for(bucket.index, grad.numel(), "none").exchange(
                    grad, state, step=state[STEP], group=bucket.index
                )
            for tensor in tensors:
                self._warmup_tensor(tensor, state, mean_grad[tensor.slice])
        else:
            self._compressed_step(bucket, tensors, state, grad)

    def _warmup_tensor(self, tensor: LambTensor, state: dict[str, Any], grad: torch.Tensor) -> None:
        """Steps (2)-(6) for one tensor (upstream's operations, in its order)."""
        group, sl = tensor.group, tensor.slice
        beta1, beta2 = group["betas"]
        m, v = state[EXP_AVG][sl], state[EXP_AVG_SQ][sl]
        # (2) moments; at the freeze the fresh variance starts as a copy of v
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if state[STEP] == self.freeze_step:
            state[EXP_AVG_SQ_FRESH][sl].copy_(v)
        x = tensor.target.reshape(-1)
        weight_norm = x.pow(2).sum().sqrt()
        # (3) u = m / (sqrt(v) + eps) + wd * x
        update = m / (v.sqrt() + group["eps"])
        if group["weight_decay"] > 0.0:
            update += group["weight_decay"] * x
        update_norm = update.pow(2).sum().sqrt()
        # (4) the trust ratio, clipped
        coeff = 1.0
        if weight_norm != 0 and update_norm != 0:
            coeff = clip((weight_norm / update_norm).item(), group["min_coeff"], group["max_coeff"])
        # (5) its running average, skipping c == 1.0 (as upstream)
        per_param = self.state[tensor.param]
        if coeff != 1.0:
            previous = per_param[LAMB_COEFF_FREEZE]
            per_param[LAMB_COEFF_FREEZE] = self.coeff_beta * previous + (1 - self.coeff_beta) * coeff
        self._lamb_coeffs[id(tensor.param)] = coeff
        # (6) x <- x - lr * c * u
        tensor.target.add_((-group["lr"] * coeff * update).view_as(tensor.target))

    def _scaling_coeffs(self, bucket: Bucket, tensors: list[LambTensor], m: torch.Tensor) -> None:
        """(7) Once, at the first compressed step: each tensor's ``scaling_coeff`` = mean RMS / its RMS."""
        rms = [(torch.linalg.vector_norm(m[t.slice]) / math.sqrt(t.param.numel())).item() for t in tensors]
        # summed group by group, then over the groups, as upstream (the same floats in the same order);
        # a zero momentum is left out of the mean and unscaled (upstream would divide by zero)
        by_group = [[r for t, r in zip(tensors, rms) if t.segment is seg and r != 0] for seg in bucket.segments]
        count = sum(len(r) for r in by_group)
        united = sum([sum(r) for r in by_group]) / count if count else 1.0
        for t, r in zip(tensors, rms):
            self.state[t.param][SCALING_COEFF] = united / r if r != 0 else 1.0

    def _compressed_step(
        self, bucket: Bucket, tensors: list[LambTensor], state: dict[str, Any], grad: torch.Tensor
    ) -> None:
        """Steps (7)-(15): local momentum, one fused exchange, the factor and the update per tensor."""
        m, v, v_fresh = state[EXP_AVG], state[EXP_AVG_SQ], state[EXP_AVG_SQ_FRESH]
        m_prev = m.clone()  # m_{t-1}, for the reconstructed gradient (11)
        if any(SCALING_COEFF not in self.state[t.param] for t in tensors):
            self._scaling_coeffs(bucket, tensors, m)
        for t in tensors:  # (8) local momentum, scaled
            beta1 = t.group["betas"][0]
            m[t.slice].mul_(beta1).add_(grad[t.slice], alpha=1 - beta1)
            m[t.slice].mul_(self.state[t.param][SCALING_COEFF])
        self._exchange_momentum(bucket, m, state, state[STEP])  # (9)
        for t in tensors:
            self._compressed_tensor(t, m[t.slice], m_prev[t.slice], v[t.slice], v_fresh[t.slice])

    def _compressed_tensor(
        self, tensor: LambTensor, m: torch.Tensor, m_prev: torch.Tensor, v: torch.Tensor, v_fresh: torch.Tensor
    ) -> None:
        """Steps (10)-(15) for one tensor (upstream's operations, in its order)."""
        group, per_param = tensor.group, self.state[tensor.param]
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        # (10) unscale, mask
        m.div_(per_param[SCALING_COEFF])
        mask = self._tensor_mask(tensor, m)
        if mask is not None:
            m.mul_(mask)
        # (11) the gradient the exchanged momentum implies, into the fresh variance
        grad_reconstruct = (m - m_prev * beta1) / (1 - beta1)
        v_fresh.mul_(beta2).addcmul_(grad_reconstruct, grad_reconstruct, value=1 - beta2)
        # (12) the update with the frozen variance
        x = tensor.target.reshape(-1)
        denom = v.sqrt() + group["eps"]
        update_prelim = m / denom
        update = update_prelim + weight_decay * x if weight_decay > 0.0 else update_prelim
        update_norm = update.pow(2).sum().sqrt()
        # (13) how much larger the frozen denominator is than the fresh one (at most), weighed by the
        # share of the update that is not weight decay
        denom_real = v_fresh.sqrt() + group["eps"]
        factor = (denom / denom_real).max().item()
        if weight_decay > 0.0:
            update_ratio = min(1.0, (update_prelim.pow(2).sum().sqrt() / update_norm).item())
            factor = factor * update_ratio + (1.0 - update_ratio)
        # (14) clipped, and rate-limited against the last step's factor
        factor = clip(factor, self.factor_min, self.factor_max)
        last = per_param[LAST_FACTOR]
        factor = clip(factor, last * (1.0 - self.factor_threshold), last * (1.0 + self.factor_threshold))
        per_param[LAST_FACTOR] = factor
        # (15) x <- x - lr * (lamb_coeff_freeze * factor) * u
        coeff = per_param[LAMB_COEFF_FREEZE] * factor
        self._lamb_coeffs[id(tensor.param)] = coeff
        tensor.target.add_((-group["lr"] * coeff * update).view_as(tensor.target))

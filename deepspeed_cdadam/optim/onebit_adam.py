"""1-bit Adam (Tang et al.), with the semantics of DeepSpeed's OnebitAdam, on any transport."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..compressors.base import Compressor
from ..config import OneBitAdamConfig
from ..exchange import StepSkip
from ..types import EXP_AVG, EXP_AVG_SQ, STEP
from ..schedule import StepKind
from .base import Bucket, CompressedOptimizer
from .masks import apply_exp_avg_masks, check_exp_avg_mask
from .functional import adam_moments_, apply_update_, onebit_adam_direction


class OneBitAdam(CompressedOptimizer):
    r"""1-bit Adam: exact Adam for ``freeze_step`` steps, then frozen variance and 1-bit momentum.

    .. math::
       \begin{aligned}
       &\textbf{warm-up } (t \le T_w):\\
       &(1)\ g_t = \tfrac1n \textstyle\sum_i g^{(i)}_t \quad \text{(fp32 all-reduce)}\\
       &(2)\ m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
       &\textbf{compressed } (t > T_w):\ v_t = v_{T_w} \text{ (frozen)}\\
       &(3)\ m^{(i)}_t = \beta_1 m_{t-1} + (1-\beta_1) g^{(i)}_t \quad \text{(local gradient)}\\
       &(4)\ \text{worker: } p_i = m^{(i)}_t + e_i,\ c_i = \mathcal C(p_i),\ e_i \leftarrow p_i - c_i\\
       &(5)\ \text{server: } q = \tfrac1n\textstyle\sum_i c_i + \bar e,\ \tilde c = \mathcal C(q),\ \bar e \leftarrow q - \tilde c\\
       &(6)\ m_t = \tilde c \quad \text{(identical on all ranks)}\\
       &(7)\ x_{t+1} = x_t - \alpha\,\big(m_t / (\sqrt{v_t} + \epsilon) + \lambda x_t\big)
       \end{aligned}

    with :math:`\mathcal C(x_B) = \|x_B\|_2/\sqrt{d_B}\cdot\mathrm{sign}(x_B)`. Names: :math:`m`
    ``exp_avg``, :math:`v` ``exp_avg_sq``, :math:`e_i` ``worker_error``, :math:`\bar e`
    ``server_error`` (this rank's shard). As upstream: no bias correction, eps outside the root,
    weight decay added to the update. Unlike upstream, step 1 updates the parameters (upstream's
    first call only initialises its buffers) and the error buffers are kept in checkpoints.

    The phase is ``state["step"] <= freeze_step``: warm-up. Steps (4)-(5) are
    ``exchange.ErrorFeedbackExchange``. With ``hierarchy="node"`` (``ranks_per_node`` per node group,
    default the launcher's ``LOCAL_WORLD_SIZE``) they run across node groups on the node averages
    of :math:`m^{(i)}_t` (exact inside each node; ``hierarchical_exchange``), so the error buffers
    :math:`e_i`, :math:`\bar e` belong to nodes, each local rank holding its part of the bucket.

    Param-group keys, as upstream: ``exp_avg_mask`` (a tensor with one entry per coordinate of the
    group's trainable parameters, e.g. zeros for embedding rows that never get a gradient)
    multiplies the group's segment of ``m`` after each compressed exchange, since 1-bit compression
    cannot represent exact zeros; ``non_freeze=True`` keeps a group uncompressed (exact all-reduce,
    ``v`` keeps adapting) after the warm-up: such groups get their own bucket.

    All groups of one dtype and device share one bucket (``base.Bucket``): step (3) runs per
    group segment with its betas, steps (4)-(6) once on the bucket's ``m``, the mask and step (7)
    per segment again.

    With ``scale_blocks="tensor_padded"``, ``worker_scale_scope="tensor"`` and ``block_size=None``
    the arithmetic is DeepSpeed 0.19.6's OnebitAdam with its compressed all-reduce, operation for
    operation, on any number of tensors of any size (tested against it on 2 ranks, fp32 and fp16):
    each tensor zero-padded to a multiple of ``world_size * lcm(world_size, 8)`` (the padding
    counted in ``d_B`` and carrying error), one worker scale per padded tensor, one server scale
    per tensor chunk (``comm.layout.TensorLayout``). With the default ``scale_blocks="fixed"`` the
    same holds only for one parameter per bucket whose size is such a multiple.
    """

    CONFIG = OneBitAdamConfig  # its arguments, their defaults and checks
    UNSUPPORTED_GROUP_KEYS = ()

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
        *,
        compressor: str | Compressor = "sign_l2",
        block_size: int | None = None,
        scale_blocks: str = "fixed",
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        worker_scale_scope: str = "block",
        hierarchy: str = "flat",
        ranks_per_node: int | None = None,
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        config = OneBitAdamConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange="error_feedback",
            transport=transport, process_group=process_group,
        )  # fmt: skip
        self.freeze_step = config.freeze_step
        for group in self.param_groups:  # a wrong mask fails here, not after the warm-up
            if "exp_avg_mask" in group:
                check_exp_avg_mask(group["exp_avg_mask"], self.group_numel(group))

    #: During the warm-up a framework's exact gradient average (DeepSpeed's engine all-reduce) may
    #: stand in for the optimizer's own (``engine_averages_exact_steps``), as upstream's OnebitAdam does.
    ENGINE_MAY_AVERAGE_EXACT_STEPS = True

    def planned_step(self) -> StepKind:
        """``EXACT`` for steps 1..freeze_step (the warm-up), ``COMPRESSED`` after."""
        return StepKind.EXACT if self.completed_steps() + 1 <= self.freeze_step else StepKind.COMPRESSED

    def bucket_key(self, group: dict[str, Any], p: torch.Tensor) -> tuple:
        """(dtype, device), and apart the ``non_freeze`` groups: they stay exact after the warm-up."""
        key = super().bucket_key(group, p)
        return (*key, "non_freeze") if group.get("non_freeze", False) else key

    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[EXP_AVG] = zeros.clone()  # m_t
        state[EXP_AVG_SQ] = zeros.clone()  # v_t (frozen after warm-up)
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)  # worker_error, server_error

    #: A compressed step's non-finite skip can be decided on the device (``optim.base._step_decided_on_device``):
    #: the error-feedback exchange takes the flag, the momentum is kept where it is set, and the update is
    #: scaled by a device scalar that is then 0.
    DEVICE_SKIP = True

    def update_decides_on_device(self, bucket: Bucket, grad: torch.Tensor, state: dict[str, Any], kind: StepKind) -> bool:
        return kind == StepKind.COMPRESSED and "non_freeze" not in bucket.key

    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
        skip: StepSkip | None = None,
    ) -> None:
        """One exchange for the bucket (of the gradient, or in the compressed phase of the momentum);
        the moments and the update per segment, with its group's betas, eps, lr and weight decay.
        ``skip`` (a compressed step decided on the device, ``StepSkip``): the local momentum goes into a
        temporary, the exchanged one replaces ``m`` only where no rank skipped, and the update is scaled
        by 0 where one did."""
        step = state[STEP]
        m, v = state[EXP_AVG], state[EXP_AVG_SQ]
        non_freeze = "non_freeze" in bucket.key  # every group of the bucket has non_freeze=True
        if kind == StepKind.EXACT or non_freeze:
            # (1) exact average of the gradients (one all-reduce for the bucket)
            if self.engine_averages_exact_steps and kind == StepKind.EXACT:
                mean_grad = grad
            else:
                mean_grad = self._exchange_for(bucket.index, grad.numel(), "none").exchange(
                    grad, state, step=step, group=bucket.index
                )
            for seg in bucket.segments:  # (2) Adam moments
                beta1, beta2 = seg.group["betas"]
                sl = seg.slice
                adam_moments_(mean_grad[sl], m[sl], v[sl], beta1=beta1, beta2=beta2)
        else:
            compressed = self._exchange_for(bucket.index, grad.numel())
            if skip is None:
                for seg in bucket.segments:  # (3) local momentum, variance frozen
                    sl = seg.slice
                    adam_moments_(grad[sl], m[sl], None, beta1=seg.group["betas"][0], beta2=seg.group["betas"][1])
                # (4)-(6) error-feedback compressed average of the bucket's momentum (one pair of collectives)
                m.copy_(compressed.exchange(m, state, step=step, group=bucket.index))
                apply_exp_avg_masks(self, bucket, m)
            else:  # (3) into a temporary, the same operations (m is kept on a skipped step); (4)-(6) with the flag
                local = torch.empty_like(m)
                for seg in bucket.segments:
                    sl, beta1 = seg.slice, seg.group["betas"][0]
                    torch.mul(m[sl], beta1, out=local[sl]).add_(grad[sl], alpha=1 - beta1)
                mean = compressed.exchange(local, state, step=step, group=bucket.index, skip=skip)  # type: ignore[call-arg]
                apply_exp_avg_masks(self, bucket, mean)  # (the plain exchange's own result buffer: ours to scale)
                assert skip.anywhere is not None, "the exchange records whether any rank skipped"
                torch.where(skip.anywhere, m, mean, out=m)
                del local, mean
        for seg in bucket.segments:
            # (7) x <- x - lr * (m / (sqrt(v) + eps) + wd * x)
            group, sl = seg.group, seg.slice
            direction = onebit_adam_direction(m[sl], v[sl], eps=group["eps"])
            apply_update_(
                self.segment_targets(bucket, seg, params),
                direction,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                decoupled=False,
                overwrite_direction=True,  # the direction is this segment's own temporary
                skip=None if skip is None else skip.anywhere,
            )

"""0/1 Adam (Lu et al., ICLR 2023), with the semantics of DeepSpeed 0.19.6's ZeroOneAdam, on any transport."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..compressors.base import Compressor
from ..config import ZeroOneAdamConfig
from ..schedule import StepKind
from ..state import FULL, PER_RANK, RANK_IDENTICAL, TRANSIENT, StateSpec
from ..types import EXP_AVG, EXP_AVG_SQ, LRS, MASTER_PARAMS, MOMENTUM_ACCUMULATOR, STEP
from .base import Bucket, CompressedOptimizer, Segment
from .masks import apply_exp_avg_masks, check_exp_avg_mask
from .functional import adam_moments_, onebit_adam_direction
from .zero_one_schedule import ZeroOneSchedule

#: The fp32 master copy of fp16/bf16 parameters is this rank's own in the second phase (its
#: parameters are): saved with them in the per-rank checkpoint files, not compared across ranks.
RANK_MASTER_SPEC = StateSpec(MASTER_PARAMS, FULL, TRANSIENT, "fp32 master copy of this rank's fp16/bf16 parameters")


class ZeroOneAdam(CompressedOptimizer):
    r"""0/1 Adam: adaptive variance freezing, then local steps with 1-bit syncs.

    .. math::
       \begin{aligned}
       &\textbf{first phase } (t \le T_v)\text{, variance step } (t \in \mathcal T_v):\\
       &(1)\ g_t = \tfrac1n \textstyle\sum_i g^{(i)}_t \quad \text{(fp32 all-reduce)}\\
       &(2)\ m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
       &\textbf{first phase, 1-bit step } (t \notin \mathcal T_v):\\
       &(3)\ \hat g_t = \mathcal E\big(g^{(i)}_t\big) \odot \mathrm{mask},\quad
            m_t = \beta_1 m_{t-1} + (1-\beta_1) \hat g_t,\quad v_t = v_{t-1}\\
       &\textbf{second phase } (t > T_v)\text{, } v \text{ frozen, every step local}:\\
       &(4)\ m^{(i)}_t = \beta_1 m^{(i)}_{t-1} + (1-\beta_1) g^{(i)}_t,\quad \ell \leftarrow \ell + \alpha\\
       &\textbf{every step:}\\
       &(5)\ \delta_t = m_t / (\sqrt{v_t} + \epsilon) + \lambda x_t,\quad x_{t+1} = x_t - \alpha \delta_t,
            \quad u_i \leftarrow u_i - \alpha \delta_t \ \text{(second phase)}\\
       &\textbf{sync } (t > T_v,\ t \in \mathcal T_u):\\
       &(6)\ x \leftarrow x - u_i \quad \text{(undo the local steps since the last sync)}\\
       &(7)\ \bar u = \mathcal E\big(u_i \odot (\sqrt v + \epsilon)\big) \odot \mathrm{mask}\\
       &(8)\ m = -\bar u / \ell,\quad x \leftarrow x + \bar u / (\sqrt v + \epsilon),\quad u_i = 0,\quad \ell = 0
       \end{aligned}

    :math:`\mathcal E` is the error-feedback 1-bit average of 1-bit Adam (``exchange.ErrorFeedbackExchange``:
    worker ``p_i = x_i + e_i``, ``e_i = p_i - C(p_i)``; server ``q = mean_i C(p_i) + ebar``,
    ``ebar = q - C(q)``; every rank gets ``C(q)``) with :math:`\mathcal C(x_B) = \|x_B\|_2/\sqrt{d_B}\cdot
    \mathrm{sign}(x_B)`. Its error buffers serve both phases and are zeroed at the end of step
    :math:`T_v` (from then on they hold the error of a different quantity, as upstream).
    Names: :math:`m` ``exp_avg``, :math:`v` ``exp_avg_sq``, :math:`u_i` ``momentum_accumulator``,
    :math:`\ell` ``lrs`` (the lr summed since the last sync, per parameter group), :math:`e_i`
    ``worker_error``, :math:`\bar e` ``server_error``, :math:`T_v` ``var_freeze_step``. As upstream: no
    bias correction, eps outside the root, weight decay added to the update, and (8) re-estimates the
    momentum from the synced update, weight decay included.

    The schedule (``ZeroOneSchedule``, the step kinds every rank agrees on): :math:`\mathcal T_v`
    (``EXACT`` steps) has an interval that starts at 1 and doubles after every ``var_update_scaler``
    refreshes; the other first-phase steps are ``COMPRESSED``. :math:`\mathcal T_u` (``AVERAGE``
    steps) has an interval that starts at 1 and doubles after every ``local_step_scaler``
    second-phase steps, up to ``local_step_clipper``; the other second-phase steps are ``LOCAL``
    (no communication). Upstream counts its initialising first call as step 1: our step ``t`` is its
    call ``t + 1``, the schedule is counted as upstream counts it, so the same settings give the same
    steps (upstream's unit-test settings 4, 1, 1, 2: steps 1 and 3 refresh the variance, 2 and 4 are
    1-bit, then syncs at 5, 7, 9, ... and local steps between). Inside DeepSpeed the engine's fp32
    all-reduce runs on the ``EXACT`` steps only (``engine_allreduces``), exactly where upstream's runs.

    With ``scale_blocks="tensor_padded"`` and ``worker_scale_scope="tensor"`` (the defaults) the
    arithmetic is DeepSpeed 0.19.6's ZeroOneAdam with its compressed all-reduce, operation for
    operation, on any number of tensors (tested against it on 2 ranks through every phase change).
    Under DeepSpeed's fp16 upstream ran inside the fused wrapper, which hands it one flat fp32
    tensor per param group: ``scale_blocks="group_padded"`` reproduces that. ``exp_avg_mask`` (a
    param-group key, as upstream: one entry per coordinate of the group's trainable parameters)
    multiplies every 1-bit average, (3) and (7), which cannot represent exact zeros.

    Differences from upstream, all deliberate:

    * Step 1 updates the parameters (upstream's first call only initialises its buffers).
    * Exact resume, which upstream does not have (its checkpoint loading drops ``u``, the error
      buffers and the schedule counters, restarting the intervals at 1): ``state_dict`` keeps every
      buffer, the schedule is a function of the step count, and inside DeepSpeed each rank's
      per-rank file keeps its own ``m``, ``u``, error buffers and parameters (in the second phase
      each rank has its own: DeepSpeed saves one rank's model only). ``load_state_dict`` takes the
      mask of the loading optimizer's param groups, as upstream.
    * One rank: nothing is compressed or sent (as upstream); a first-phase step off
      :math:`\mathcal T_v` updates ``m`` with the rank's gradient, which is the average (upstream
      leaves ``m`` unchanged there), and a sync leaves the parameters where they are, up to rounding.
    * A group whose lr summed to 0 since the last sync keeps its ``m`` at the sync (upstream divides by 0).
    """

    CONFIG = ZeroOneAdamConfig  # its arguments, their defaults and checks
    UNSUPPORTED_GROUP_KEYS = ("non_freeze",)  # an upstream OnebitAdam key; upstream ZeroOneAdam has none
    STATE = (
        StateSpec(EXP_AVG, FULL, PER_RANK, "m_t: the same on every rank in the first phase, each rank's own after"),
        StateSpec(EXP_AVG_SQ, FULL, RANK_IDENTICAL, "v_t (frozen in the second phase)"),
        StateSpec(MOMENTUM_ACCUMULATOR, FULL, PER_RANK, "u_i, this rank's update since the last sync"),
    )
    FLAT_STATE_KEY = EXP_AVG_SQ  # rank-identical: present after any load
    PARAMETERS_PER_RANK = True  # in the second phase (parameters_identical_now)
    #: The variance steps take the framework's exact gradient average (DeepSpeed's engine all-reduce), as upstream.
    ENGINE_MAY_AVERAGE_EXACT_STEPS = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        var_freeze_step: int = 100000,
        var_update_scaler: int = 16,
        local_step_scaler: int = 32678,
        local_step_clipper: int = 16,
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
        config = ZeroOneAdamConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange="error_feedback",
            transport=transport, process_group=process_group,
        )  # fmt: skip
        self.var_freeze_step = config.var_freeze_step
        self.schedule = ZeroOneSchedule(
            config.var_freeze_step, config.var_update_scaler, config.local_step_scaler, config.local_step_clipper
        )
        # the saving rank's m of each bucket while a state_dict loads (see load_state_dict)
        self._loaded_exp_avg: dict[int, torch.Tensor] = {}
        for group in self.param_groups:  # a wrong mask fails here, not at the first 1-bit step
            if "exp_avg_mask" in group:
                check_exp_avg_mask(group["exp_avg_mask"], self.group_numel(group))

    def exchange_names(self) -> tuple[str, ...]:
        return ("none", self.exchange_name)  # exact average on variance steps, else 1 bit

    def state_specs(self) -> tuple[StateSpec, ...]:
        """As every optimizer's, with the fp32 master copy this rank's own (``RANK_MASTER_SPEC``)."""
        return tuple(RANK_MASTER_SPEC if spec.key == MASTER_PARAMS else spec for spec in super().state_specs())

    # --- the schedule ----------------------------------------------------------------------
    def planned_step(self) -> StepKind:
        """``EXACT`` / ``COMPRESSED`` in the first phase, ``AVERAGE`` (sync) / ``LOCAL`` after (``ZeroOneSchedule``)."""
        return self.schedule.kind(self.completed_steps() + 1)

    def parameters_identical_now(self) -> bool:
        """Every rank holds the same parameters until the first local step."""
        return not self.schedule.frozen(self.completed_steps())

    # --- state -------------------------------------------------------------------------------
    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[EXP_AVG] = zeros.clone()  # m_t
        state[EXP_AVG_SQ] = zeros.clone()  # v_t
        state[MOMENTUM_ACCUMULATOR] = zeros.clone()  # u_i
        state[LRS] = [0.0] * len(bucket.segments)  # l, per segment (its group's lr)
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)  # worker_error, server_error

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As every optimizer's, with two differences. Each group keeps the ``exp_avg_mask`` it has
        now (none if it has none), not the saved one, as upstream. Where the per-rank state is dropped
        (another rank's, or ``without_rank_state``: a resume on another world size), ``m`` is the
        saving rank's (the same on every rank in the first phase) rather than zero, until this rank's
        own is restored."""
        groups = []
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            saved = {key: value for key, value in saved.items() if key != "exp_avg_mask"}
            if "exp_avg_mask" in group:  # the mask given now, not the saved one (as upstream)
                saved["exp_avg_mask"] = group["exp_avg_mask"]
            groups.append(saved)
        state_dict = {**state_dict, "param_groups": groups}
        self._loaded_exp_avg = self._saved_exp_avg(state_dict)
        try:
            super().load_state_dict(state_dict)
            for bucket in self.buckets():
                state = self.state.get(bucket.params[0], {})
                if self.FLAT_STATE_KEY in state and EXP_AVG not in state:
                    state[EXP_AVG] = self._fallback_exp_avg(bucket, state[EXP_AVG_SQ])
        finally:
            self._loaded_exp_avg = {}

    def _fallback_exp_avg(self, bucket: Bucket, like: torch.Tensor) -> torch.Tensor:
        """``m`` where this rank's own is missing: the loaded state_dict's, or zero."""
        saved = self._loaded_exp_avg.get(bucket.index)
        return torch.zeros_like(like) if saved is None else saved.to(device=like.device, dtype=like.dtype)

    def _saved_exp_avg(self, state_dict: dict[str, Any]) -> dict[int, torch.Tensor]:
        """Each bucket's ``m`` in ``state_dict`` (by bucket index), where it holds one."""
        saved_ids = {
            id(p): i
            for group, saved in zip(self.param_groups, state_dict["param_groups"])
            for p, i in zip(group["params"], saved["params"])
        }
        out = {}
        for bucket in self.buckets():
            entry = state_dict["state"].get(saved_ids.get(id(bucket.params[0])), {})
            if torch.is_tensor(entry.get(EXP_AVG)) and entry[EXP_AVG].numel() == bucket.numel:
                out[bucket.index] = entry[EXP_AVG].detach().clone()
        return out

    def reset_compression_state(self) -> None:
        """Restart the error buffers, ``u`` and ``l`` from zero on this rank (call it on every rank alike).

        A rank in the second phase that still holds its ``u`` first undoes its local steps since the
        last sync (``x -= u``, step (6)), so that the ranks' parameters agree again, up to rounding.
        A missing ``m`` (per-rank state not restored) becomes the loaded one, or zero.
        """
        frozen = self.schedule.frozen(self.completed_steps())
        for bucket in self.buckets():
            state = self.bucket_state(bucket)
            if self.FLAT_STATE_KEY not in state:
                continue
            u = state.get(MOMENTUM_ACCUMULATOR)
            if frozen and u is not None:
                targets = self.update_targets(bucket.params, state)
                for seg in bucket.segments:
                    for x, sl in self._pieces(bucket, seg, targets):
                        x.sub_(u[sl].view_as(x))
                self.copy_master_to_params(bucket.params, state)
            like = state[EXP_AVG_SQ]
            if EXP_AVG not in state:
                state[EXP_AVG] = self._fallback_exp_avg(bucket, like)
            state[MOMENTUM_ACCUMULATOR] = torch.zeros_like(like)
            state[LRS] = [0.0] * len(bucket.segments)
        super().reset_compression_state()

    # --- the step -------------------------------------------------------------------------------
    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
    ) -> None:
        """One step of the kind every rank agreed on: at most one exchange for the bucket; moments,
        update and sync per segment, with its group's betas, eps, lr and weight decay."""
        step = state[STEP]
        m, v, u, lrs = state[EXP_AVG], state[EXP_AVG_SQ], state[MOMENTUM_ACCUMULATOR], state[LRS]
        if kind == StepKind.EXACT:
            # (1) exact average of the gradients: the engine's, or one all-reduce for the bucket
            if self.engine_averages_exact_steps:
                mean_grad = grad
            else:
                mean_grad = self._exchange_for(bucket.index, grad.numel(), "none").exchange(
                    grad, state, step=step, group=bucket.index
                )
            for seg in bucket.segments:  # (2) both moments
                beta1, beta2 = seg.group["betas"]
                adam_moments_(mean_grad[seg.slice], m[seg.slice], v[seg.slice], beta1=beta1, beta2=beta2)
        elif kind == StepKind.COMPRESSED:
            estimate = self._one_bit_average(bucket, grad, state, step)  # (3) 1-bit average of the gradients
            for seg in bucket.segments:
                adam_moments_(estimate[seg.slice], m[seg.slice], None, beta1=seg.group["betas"][0], beta2=0.0)
        elif kind in (StepKind.LOCAL, StepKind.AVERAGE):
            for k, seg in enumerate(bucket.segments):  # (4) this rank's gradient; l += lr
                adam_moments_(grad[seg.slice], m[seg.slice], None, beta1=seg.group["betas"][0], beta2=0.0)
                lrs[k] += seg.group["lr"]
        else:
            raise ValueError(f"ZeroOneAdam has no step of kind {kind.name}.")
        frozen = kind in (StepKind.LOCAL, StepKind.AVERAGE)
        for seg in bucket.segments:
            # (5) delta = m / (sqrt(v) + eps) + wd * x; x -= lr * delta; u -= lr * delta (second phase)
            group, sl = seg.group, seg.slice
            direction = onebit_adam_direction(m[sl], v[sl], eps=group["eps"])
            for x, piece in self._pieces(bucket, seg, params):
                delta = direction[piece.start - sl.start : piece.stop - sl.start].view_as(x)
                if group["weight_decay"] > 0.0:
                    delta = delta + group["weight_decay"] * x
                move = -group["lr"] * delta
                x.add_(move)
                if frozen:
                    u[piece].view_as(x).add_(move)
        if kind == StepKind.AVERAGE:
            self._sync(bucket, params, state, step)
        if step == self.var_freeze_step:
            # the error buffers carry the gradient's error until now, the accumulated update's from now on
            for key in self.exchange_state_keys():
                state[key].zero_()

    def _sync(self, bucket: Bucket, params: list[torch.Tensor], state: dict[str, Any], step: int) -> None:
        """Steps (6)-(8): undo the local steps, average the update in 1 bit, re-estimate m, apply it."""
        m, v, u, lrs = state[EXP_AVG], state[EXP_AVG_SQ], state[MOMENTUM_ACCUMULATOR], state[LRS]
        for seg in bucket.segments:
            sl = seg.slice
            for x, piece in self._pieces(bucket, seg, params):
                x.sub_(u[piece].view_as(x))  # (6) x -= u
            u[sl].mul_(v[sl].sqrt() + seg.group["eps"])  # u * (sqrt(v) + eps)
        u.copy_(self._one_bit_average(bucket, u, state, step))  # (7) 1-bit average (masked)
        for k, seg in enumerate(bucket.segments):
            sl = seg.slice
            if lrs[k] != 0.0:
                m[sl].zero_().add_(u[sl] / lrs[k], alpha=-1)  # (8) m = -ubar / l
            denominator = v[sl].sqrt() + seg.group["eps"]
            for x, piece in self._pieces(bucket, seg, params):
                x.add_((u[piece] / denominator[piece.start - sl.start : piece.stop - sl.start]).view_as(x))
            lrs[k] = 0.0
        u.zero_()

    def _one_bit_average(self, bucket: Bucket, x: torch.Tensor, state: dict[str, Any], step: int) -> torch.Tensor:
        """``E(x) * mask``: the error-feedback 1-bit average over the ranks, each group's segment times
        its ``exp_avg_mask``; with one rank ``x`` itself (nothing to send, as upstream)."""
        if self.transport.world_size == 1:
            return x
        out = self._exchange_for(bucket.index, x.numel()).exchange(x, state, step=step, group=bucket.index)
        apply_exp_avg_masks(self, bucket, out)
        return out

    @staticmethod
    def _pieces(bucket: Bucket, segment: Segment, targets: list[torch.Tensor]) -> list[tuple[torch.Tensor, slice]]:
        """The segment's update targets, each with its coordinates in the bucket's flat buffers: its
        parameters (updated tensor by tensor, as upstream), or its slice of the fp32 master copy."""
        if targets is not bucket.params:
            return [(targets[0][segment.slice], segment.slice)]
        out, start = [], segment.start
        for p in segment.params:
            out.append((p.detach(), slice(start, start + p.numel())))
            start += p.numel()
        return out

"""LIEC-SGD (Cheng et al., arXiv:2402.11857): local immediate error compensation, 1 bit both ways, periodic averages."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..compressors.base import Compressor
from ..config import LIECSGDConfig
from ..liec_exchange import ImmediateCompensationExchange, ScaleBucketLayout, scale_bucket_sizes
from ..schedule import StepKind
from ..state import FULL, PER_RANK, TRANSIENT, StateSpec
from ..types import MASTER_PARAMS, MOMENTUM_BUFFER, SERVER_ESTIMATE, STEP
from .base import Bucket, CompressedOptimizer

#: fp16/bf16 parameters' fp32 master copy: this rank's own, like the parameters (saved with them by
#: ``checkpoint.save_rank_state``, rebuilt from them when missing, never compared between ranks).
RANK_MASTER_SPEC = StateSpec(MASTER_PARAMS, FULL, TRANSIENT, "fp32 master copy of this rank's fp16/bf16 parameters")


def sgd_step_(
    params: list[torch.Tensor],
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """``torch.optim.SGD``'s step (dampening 0, no Nesterov) with its operations, on each parameter's
    slice of the flat ``grad`` and ``momentum_buffer`` (zeros before the first step: ``0 * mu + d``
    is torch's first ``buf = d``). Labels as in ``LIECSGD``'s docstring."""
    offset = 0
    for p in params:
        g = grad[offset : offset + p.numel()].view_as(p)
        buf = momentum_buffer[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        # (5) d = gtil + wd * x
        d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        # (6) b <- mu * b + d;  d = b
        if momentum != 0:
            buf.mul_(momentum).add_(d)
            d = buf
        # (7) x <- x - lr * d
        p.add_(d, alpha=-lr)


class LIECSGD(CompressedOptimizer):
    r"""LIEC-SGD: each worker SGD-steps its own model on a 1-bit gradient whose local compression
    error it adds back at once; the server keeps the only error buffer; every H-th step the models and
    the gradients are averaged in full precision.

    .. math::
       \begin{aligned}
       &\textbf{compressed step } (t \bmod H \neq 0)\text{, per scale bucket } b:\\
       &(1)\ \text{worker } i\text{: } c_i = \mathcal C(g^{(i)}_t),\quad r_i = g^{(i)}_t - c_i
            \quad (r_i \text{ not kept})\\
       &(2)\ \text{server: } y = \tfrac1n \textstyle\sum_i c_i + e_s,\quad \hat c = \mathcal C(y),\quad
            e_s \leftarrow y - \hat c\\
       &(3)\ \text{worker } i\text{: } \tilde g^{(i)}_t = \hat c + r_i\\
       &\textbf{averaging step } (t \bmod H = 0)\text{:}\\
       &(4)\ x^{(i)}_t \leftarrow \tfrac1n \textstyle\sum_j x^{(j)}_t,\quad
            \tilde g^{(i)}_t = \tfrac1n \textstyle\sum_j g^{(j)}_t + e_s,\quad e_s \leftarrow 0\\
       &\textbf{update of worker } i\text{'s own model (torch.optim.SGD):}\\
       &(5)\ d = \tilde g^{(i)}_t + \lambda x^{(i)}_t\\
       &(6)\ b_i \leftarrow \mu b_i + d,\quad d = b_i \quad (\mu > 0)\\
       &(7)\ x^{(i)}_{t+1} = x^{(i)}_t - \eta\, d
       \end{aligned}

    with :math:`\mathcal C(x_b) = (\|x_b\|_1 / d_b)\,\mathrm{sign}(x_b)` on each scale bucket
    :math:`b` (``sign(0) := +1``), one scale per scale bucket both ways. Names: :math:`e_s`
    ``server_error`` (this rank's server shard), :math:`b_i` ``momentum_buffer``, :math:`\hat c`
    (or at an averaging step the averaged gradient) ``server_estimate``; :math:`H`
    ``average_period``, :math:`\eta` ``lr``, :math:`\mu` ``momentum``, :math:`\lambda` ``weight_decay``.

    Where each line comes from (the authors' ``main.py``, branch ``args.method == 'liec'``, read in
    ../shared/SEED_SPECS.md §4; the paper's Algorithm 1 was not available):

    * (1)-(3): the ``else`` branch of ``if (cur_iter+1) % H == 0``, per bucket: ``s_i = mean|g|``,
      sign bits gathered to root; root ``y = mean_j c_j + s_residuals[b]``, ``s = mean|y|``,
      ``s_residuals[b] = y - s*sign(y)``, broadcast; ``grad = chat + (g - c_i)``.
    * (4): the averaging branch: ``dist.reduce(SUM)`` of the parameters to root, ``/n``, broadcast;
      per bucket root ``ghat = mean_j g_j + s_residuals[b]``, ``s_residuals[b] = 0``, broadcast.
      The gradients were computed at the local models; the step below starts from the average.
    * (5)-(7): ``optimizer.step()`` of ``torch.optim.SGD(lr, momentum, weight_decay)`` on the
      worker's own model; momentum is local and never averaged, not even at an averaging step.
    * Scale buckets: ``torch._utils._take_tensors(grads, bucket_size)``, ``bucket_size`` in bytes.
    * Defaults (``GetArgs``): lr 0.1, momentum 0, weight decay 5e-4, ``--average-period`` 100,
      ``--bucket-size`` 52428800; the README's runs use an average period of 32 or 100.

    Steps (1)-(4) are ``liec_exchange.ImmediateCompensationExchange``: its server is sharded
    (rank ``j`` serves shard ``j`` of the bucket) instead of the authors' gather to / broadcast
    from rank 0, with each scale bucket's one server scale agreed by a small all-gather; the
    arithmetic is the same. The schedule is ``planned_step()``: ``COMPRESSED``, and ``AVERAGE`` when
    the step count (skipped steps excluded) reaches a multiple of ``average_period``.

    Between averages the ranks' parameters and momentum buffers differ (``PARAMETERS_PER_RANK``):
    the consistency check compares only the rank-identical ``server_estimate`` (and the parameters
    right after an averaging step when every group's momentum is 0, the one moment they are equal);
    ``checkpoint.save_rank_state`` writes each rank's own parameters (and fp32 master copy) with its
    momentum and server error, and ``load_rank_state`` puts them back, so a resumed run continues
    bit-identically on every rank, also between averages.

    Not from the authors' code: what the rest of this package gives every optimizer (parameter
    groups with their own lr / momentum / weight decay, fp32 master copies of fp16/bf16 parameters,
    non-finite gradient policies); the other compressors (the code has the L1 scaled sign only):
    ``sign_l2`` with one L2 scale per scale bucket, top-k / rand-k compressed server shard by server
    shard; ``sign(0) := +1`` (how the authors' packing treats 0 was not read). The authors' per-step
    broadcast of BatchNorm buffers from rank 0 is not done (DeepSpeed does not do it either);
    ``scripts/train.py`` evaluates the ranks' averaged model, as the authors do at each epoch's end.

    Args:
        params: parameters or parameter groups.
        lr, momentum, weight_decay: ``torch.optim.SGD``'s (per group).
        average_period: H, steps between full-precision averages (1: every step, plain SGD).
        compressor: "scaled_sign" (default, the code's), "sign_l2", "topk", "randk" or a ``Compressor``.
        bucket_size: bytes of whole tensors per scale bucket (None: one per communication bucket).
        block_size, scale_blocks: only None and "fixed" (the scale buckets set the scales).
        Other keyword arguments: as ``CDAdam`` (transport, timeout_s, seed, ...).
    """

    CONFIG = LIECSGDConfig  # its arguments, their defaults and checks
    PARAMETERS_PER_RANK = True
    FLAT_STATE_KEY = SERVER_ESTIMATE  # the one full-length buffer identical on every rank
    STATE = (StateSpec(MOMENTUM_BUFFER, FULL, PER_RANK, "b_i, this worker's own momentum"),)

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 5e-4,
        average_period: int = 100,
        *,
        compressor: str | Compressor = "scaled_sign",
        bucket_size: int | None = 52428800,
        block_size: int | None = None,
        scale_blocks: str = "fixed",
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        config = LIECSGDConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange=ImmediateCompensationExchange.scheme_name,
            transport=transport, process_group=process_group,
        )  # fmt: skip
        self.average_period = config.average_period
        self.bucket_size = config.bucket_size

    def state_specs(self) -> tuple[StateSpec, ...]:
        """As every optimizer's, with the fp32 master copy this rank's own (``RANK_MASTER_SPEC``)."""
        return tuple(RANK_MASTER_SPEC if spec.key == MASTER_PARAMS else spec for spec in super().state_specs())

    def _exchange_for(self, index: int, numel: int, name: str | None = None) -> ImmediateCompensationExchange:
        """Bucket ``index``'s exchange, built once on its ``ScaleBucketLayout``: the server shards of the
        bucket, and its scale buckets (whole tensors up to ``bucket_size`` bytes of the flat buffer)."""
        key = (index, self.exchange_name)
        if key not in self._exchanges:
            bucket = self.buckets()[index]
            element_size = torch.empty((), dtype=self.buffer_dtype(bucket.params)).element_size()
            sizes = scale_bucket_sizes([p.numel() for p in bucket.params], element_size, self.bucket_size)
            layout = ScaleBucketLayout(numel, self.transport.world_size, bucket_sizes=sizes)
            self._exchanges[key] = ImmediateCompensationExchange(
                self.transport, layout, self.compressor, self.comm_stats, self.seed
            )
        return self._exchanges[key]  # type: ignore[return-value]

    # --- the schedule ---------------------------------------------------------------------------
    def planned_step(self) -> StepKind:
        """``AVERAGE`` on steps H, 2H, ... (the code's ``(cur_iter+1) % H == 0``), ``COMPRESSED`` between."""
        step = self.completed_steps() + 1
        return StepKind.AVERAGE if step % self.average_period == 0 else StepKind.COMPRESSED

    def parameters_identical_now(self) -> bool:
        """Right after an averaging step with momentum 0 in every group: all ranks took the same step
        from the same average. Any other time each rank holds its own parameters."""
        done = self.completed_steps()
        return (
            done > 0
            and done % self.average_period == 0
            and all(group["momentum"] == 0 for group in self.param_groups)
        )

    # --- the step -------------------------------------------------------------------------------
    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[MOMENTUM_BUFFER] = zeros.clone()  # b_i
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)  # server_error, server_estimate

    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
    ) -> None:
        """(1)-(3) or (4) for the bucket with one exchange, then (5)-(7) per segment with its group's
        lr, momentum and weight decay."""
        exchange = self._exchange_for(bucket.index, grad.numel())
        if kind == StepKind.AVERAGE:
            # (4) x_i <- mean_j x_j; gtil = mean_j g_j + e_s; e_s <- 0
            average, direction = exchange.average(_flatten(params), grad, state)
            _assign_flat(params, average)
        else:
            # (1)-(3) gtil_i = chat + (g_i - C(g_i))
            direction = exchange.exchange(grad, state, step=state[STEP], group=bucket.index)
        if MOMENTUM_BUFFER not in state:  # dropped with the per-rank state (without_rank_state): restarts at 0
            state[MOMENTUM_BUFFER] = torch.zeros_like(direction)
        buf = state[MOMENTUM_BUFFER]
        for seg in bucket.segments:
            group = seg.group
            sgd_step_(
                self.segment_targets(bucket, seg, params),
                direction[seg.slice],
                buf[seg.slice],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _assign_flat(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()

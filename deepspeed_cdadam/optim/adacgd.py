"""AdaCGD (Makarenko, Gasanov, Islamov, Sadiev, Richtarik; arXiv:2211.00188): adaptive compression, both ways."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..adaptive_exchange import AdaptiveThreePointExchange, LevelRecord
from ..comm.layout import ShardLayout
from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..config import AdaCGDConfig
from ..schedule import StepKind
from ..types import DOWN_MARKOV_STATE, SEQUENCES_RESTART, STEP
from .base import Bucket, CompressedOptimizer
from .functional import apply_update_


def three_pc_constants(alpha: float, zeta: float) -> tuple[float, float]:
    r"""``(A, B)`` of AdaCGD's compressor as a 3PC compressor (DERIVED, not the paper's constants):
    :math:`\|C^{AC}_{h,y}(x) - x\|^2 \le (1 - A)\|h - y\|^2 + B\|x - y\|^2` with
    :math:`A = \theta(\alpha) = 1 - \sqrt{1 - \alpha}`, :math:`B = \max(\zeta, \beta(\alpha))`,
    :math:`\beta(\alpha) = (1 - \alpha) / (1 - \sqrt{1 - \alpha})` (0 at :math:`\alpha = 1`), where
    :math:`\alpha` is the finest level's contraction (``finest_contraction``).

    Every accepted branch (skip, a level below the finest) has error :math:`\le \zeta\|x - y\|^2`; the
    fallback :math:`h + C_m(x - h)` has error :math:`\le (1 - \alpha)\|x - h\|^2`, which Young's
    inequality with :math:`s = 1/\sqrt{1-\alpha} - 1` splits into :math:`(1-\theta)\|h-y\|^2 +
    \beta\|x-y\|^2` (the EF21 bound).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"Invalid alpha={alpha!r}. Must be in (0.0, 1.0].")
    root = math.sqrt(1.0 - alpha)
    theta = 1.0 - root
    beta = 0.0 if alpha == 1.0 else (1.0 - alpha) / (1.0 - root)
    return theta, max(zeta, beta)


def finest_contraction(ratio: float, shard_sizes: Sequence[int]) -> float:
    """``alpha`` of top-k with ``ratio`` on each server shard: ``min_j k(d_j) / d_j`` over the non-empty
    shards (``||v - C(v)||^2 <= (1 - k_j/d_j) ||v_j||^2`` shard by shard), at least ``ratio``."""
    ks = [(min(d, max(1, math.ceil(ratio * d))), d) for d in shard_sizes if d > 0]
    return min((k / d for k, d in ks), default=1.0)


def safe_stepsize(smoothness: float, smoothness_tilde: float, alpha: float, zeta: float) -> float:
    r"""The DERIVED safe step size :math:`\gamma = 1 / (L + \tilde L \sqrt{B / A})` (``three_pc_constants``),
    the 3PC step-size form the 3PC code instantiates for EF21 and CLAG, with AdaCGD's ``(A, B)``.

    ``smoothness`` :math:`L` of :math:`f = \frac1n \sum_i f_i`, ``smoothness_tilde``
    :math:`\tilde L = \sqrt{\frac1n \sum_i L_i^2}`. It is derived for the worker -> server direction
    (the 3PC theory); for the server's compression too the paper may need a smaller one (its
    bidirectional analysis was not retrieved).
    """
    a, b = three_pc_constants(alpha, zeta)
    return 1.0 / (smoothness + smoothness_tilde * math.sqrt(b / a))


class AdaCGD(CompressedOptimizer):
    r"""AdaCGD: SGD on an estimate of the mean gradient that each worker, and the server, refreshes
    with the cheapest of several top-k levels accurate enough for this step, or not at all.

    .. math::
       \begin{aligned}
       &C^{AC}_{h,y}(x) = \begin{cases}
            h & \text{if } \|x - h\|^2 \le \zeta \|x - y\|^2 \quad \text{(skip, level 0)}\\
            z_j = h + C_j(x - h) & \text{the least } j < m \text{ with } \|x - z_j\|^2 \le \zeta\|x - y\|^2\\
            h + C_m(x - h) & \text{otherwise}
          \end{cases}\\
       &(0)\ t = 1\text{: } \hat g^{(i)} = y_i = g^{(i)}_1,\quad \hat g = \hat g_{prev} = \tfrac1n \textstyle\sum_i
            g^{(i)}_1,\quad \tilde g = \hat g \quad \text{(exact)}\\
       &(1)\ \text{worker } i\text{: } \hat g^{(i)} \leftarrow C^{AC}_{\hat g^{(i)},\, y_i}(g^{(i)}_t),\quad
            y_i \leftarrow g^{(i)}_t\\
       &(2)\ \text{server: } \hat g_{prev} \leftarrow \hat g,\quad \hat g \leftarrow \tfrac1n \textstyle\sum_i
            \hat g^{(i)}\\
       &(3)\ \text{server: } \tilde g \leftarrow C^{AC}_{\tilde g,\, \hat g_{prev}}(\hat g)\\
       &(4)\ x_{t+1} = (1 - \gamma\lambda)\, x_t - \gamma\, \tilde g
       \end{aligned}

    :math:`C_1, \dots, C_m` are top-k on each server shard with ``ratios`` (cheapest first, nested:
    one sort serves all), :math:`\zeta` ``zeta``, :math:`\gamma` ``lr``, :math:`\lambda`
    ``weight_decay``; :math:`g^{(i)}_t` the gradient worker :math:`i` hands in at step :math:`t`.
    Names: :math:`\hat g^{(i)}` ``markov_state``, :math:`y_i` ``previous_grad`` (per rank, full);
    :math:`\hat g` ``server_markov_state``, :math:`\hat g_{prev}` ``server_previous_markov_state``
    (per rank, this rank's server shard); :math:`\tilde g` ``down_markov_state`` (identical on every
    rank). Steps (0)-(3) are ``adaptive_exchange.AdaptiveThreePointExchange``; (2) is kept as
    :math:`\hat g \mathrel{+}= \frac1n\sum_i C_{j_i}(g^{(i)}_t - \hat g^{(i)})`, what the server receives.

    Where each part comes from (../shared/SEED_SPECS.md section 3; no AdaCGD code or paper body was
    available):

    * PRIMARY (the 3PC code's LAG / CLAG / EF21): the anchors (:math:`h` the worker's estimate,
      :math:`y` its previous gradient), the exact start :math:`g^{(i)}_0 = \nabla f_i(x^0)`, the skip
      convention (send iff :math:`\|x - h\|^2 > \zeta\|x - y\|^2`), the SGD step on the mean estimate.
    * SECONDARY (a third-party summary): the adaptive rule :math:`C^{AC}` above, the choice of the
      cheapest accepted level, one shared :math:`\zeta` for every level.
    * DERIVED: the safe step size (``safe_stepsize``): :math:`C^{AC}` is a 3PC compressor with
      :math:`A = 1 - \sqrt{1 - \alpha_m}`, :math:`B = \max(\zeta, (1-\alpha_m)/(1 - \sqrt{1-\alpha_m}))`,
      so :math:`\gamma \le 1/(L + \tilde L\sqrt{B/A})`. The optimizer does not know :math:`L`: ``lr``
      is the user's, as ``lr`` is EF21's; the bound is there for problems whose smoothness is known.
    * Ours, where the spec is silent: line (3), the server's compression (the paper "allows the server
      to compress as well"; we apply the same rule to the aggregate, anchored at the last broadcast
      :math:`\tilde g` and the previous aggregate, with the same levels and :math:`\zeta`); top-k per
      server shard, ties to the lower index; who decides: each worker its own level (a one-byte
      header says which), the servers one level for the whole aggregate from their summed partial
      norms (a small all-gather), so every rank decodes alike; the exact step again after a reset of
      the compression state (a new world size); decoupled weight decay as EF21's; the defaults
      (``config.AdaCGDConfig``).

    ``planned_step()`` is ``EXACT`` on the first step (and the first after a reset), ``COMPRESSED``
    after; the exact step runs in our exchange (the engine's all-reduce stays off: each worker needs
    its own gradient). ``last_levels()`` gives what the last step chose, per bucket. The per-rank
    buffers are saved per rank (``checkpoint.save_rank_state``); a state loaded without them restarts
    the sequences with an exact step, on every rank alike.

    Args:
        params: parameters or parameter groups.
        lr, weight_decay: SGD step size and decoupled weight decay (per group).
        ratios: the top-k levels (kept fraction of each server shard), strictly increasing.
        zeta: the acceptance threshold (0: EF21 at the finest level; a skip or a cheaper level only where exact).
        Other keyword arguments: as ``CDAdam`` (transport, timeout_s, nonfinite_grads, ...).
    """

    CONFIG = AdaCGDConfig  # its arguments, their defaults and checks
    FLAT_STATE_KEY = DOWN_MARKOV_STATE  # AdaCGD keeps no moments
    STATE = ()

    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        *,
        ratios: Sequence[float] = (0.001, 0.004, 0.016),
        zeta: float = 1.0,
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        config = AdaCGDConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange=AdaptiveThreePointExchange.scheme_name,
            transport=transport, process_group=process_group,
        )  # fmt: skip
        self.ratios = config.ratios
        self.zeta = config.zeta

    def _exchange_for(self, index: int, numel: int, name: str | None = None) -> AdaptiveThreePointExchange:
        """Bucket ``index``'s exchange, built once: server shards of the whole bucket, this ``zeta``."""
        key = (index, self.exchange_name)
        if key not in self._exchanges:
            layout = ShardLayout(numel, self.transport.world_size)
            self._exchanges[key] = AdaptiveThreePointExchange(
                self.transport, layout, self.compressor, self.comm_stats, zeta=self.zeta
            )
        return self._exchanges[key]  # type: ignore[return-value]

    def last_levels(self) -> list[LevelRecord | None]:
        """Per bucket, what its last step chose (``adaptive_exchange.LevelRecord``; None before the first)."""
        records = []
        for bucket in self.buckets():
            exchange = self._exchanges.get((bucket.index, self.exchange_name))
            records.append(None if exchange is None else exchange.last)  # type: ignore[attr-defined]
        return records

    # --- the schedule ---------------------------------------------------------------------------
    def planned_step(self) -> StepKind:
        """``EXACT`` on the first step and after a reset of the compression state, else ``COMPRESSED``."""
        restart = any(self.state.get(b.params[0], {}).get(SEQUENCES_RESTART, False) for b in self.buckets())
        return StepKind.EXACT if self.completed_steps() == 0 or restart else StepKind.COMPRESSED

    def reset_compression_state(self) -> None:
        """As every optimizer's, and the next step starts the sequences again with an exact step (0)."""
        super().reset_compression_state()
        for bucket in self.buckets():
            state = self.state.get(bucket.params[0], {})
            if self.FLAT_STATE_KEY in state:
                state[SEQUENCES_RESTART] = True

    # --- the step -------------------------------------------------------------------------------
    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)

    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
    ) -> None:
        exchange = self._exchange_for(bucket.index, grad.numel())
        if kind == StepKind.EXACT:
            # (0) the sequences start from the exact mean
            estimate = exchange.exact(grad, state)
            state.pop(SEQUENCES_RESTART, None)
        else:
            # (1)-(3) one adaptive exchange for the whole bucket; every rank gets the same gtil
            estimate = exchange.exchange(grad, state, step=state[STEP], group=bucket.index)
        for seg in bucket.segments:
            # (4) x <- (1 - lr*wd) x - lr * gtil, with the segment's group's lr and weight decay
            group = seg.group
            apply_update_(
                self.segment_targets(bucket, seg, params),
                estimate[seg.slice],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
            )

"""Birder (Peng, Qin, Yu, Wang, Wang, Li; NeurIPS 2023): a 1-bit adaptive optimizer with no warm-up."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..config import BirderConfig
from ..schedule import StepKind
from ..state import FULL, PER_RANK, StateSpec
from ..types import EXP_AVG, EXP_AVG_ABS, MAX_EXP_AVG_ABS, STEP
from .base import Bucket, CompressedOptimizer
from .functional import apply_update_


def birder_moments_(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_abs: torch.Tensor, *, beta: float) -> None:
    """(1) ``m = beta m + (1 - beta) g``; (2) ``b = beta b + (1 - beta) |g|``, in place.

    With one ``beta`` and ``m_0 = b_0 = 0``, ``|m| <= b`` holds coordinate by coordinate, also in
    floating point: both lines round the same operations, and rounding is monotone and odd.
    """
    exp_avg.mul_(beta).add_(grad, alpha=1 - beta)
    exp_avg_abs.mul_(beta).add_(grad.abs(), alpha=1 - beta)


def normalised_momentum(exp_avg: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """(4) ``z = m / b`` in [-1, 1], and ``z = 0`` where ``b = 0`` (a coordinate that never had a gradient)."""
    return torch.where(denominator > 0, exp_avg / denominator, 0.0)


class Birder(CompressedOptimizer):
    r"""Birder: each worker sends one unbiased random bit per coordinate of its normalised momentum.

    Reconstructed from ../shared/SEED_SPECS.md section 1; Algorithm 1 of the paper (and its
    authors' code) was not available, so every line below is that reconstruction, not the paper:

    .. math::
       \begin{aligned}
       &(1)\ m^{(i)}_t = \beta m^{(i)}_{t-1} + (1-\beta)\, g^{(i)}_t \\
       &(2)\ b^{(i)}_t = \beta b^{(i)}_{t-1} + (1-\beta)\, |g^{(i)}_t| \\
       &(3)\ \hat b^{(i)}_t = \max(\hat b^{(i)}_{t-1}, b^{(i)}_t)
            \quad (\text{amsgrad=True only; else } \hat b = b) \\
       &(4)\ z^{(i)}_t = m^{(i)}_t / \hat b^{(i)}_t \in [-1, 1] \quad (0 \text{ where } \hat b^{(i)}_t = 0) \\
       &(5)\ q^{(i)}_t \in \{-1, +1\},\ P(q^{(i)}_{tj} = +1) = (1 + z^{(i)}_{tj}) / 2
            \quad (\mathbb E\, q^{(i)}_t = z^{(i)}_t) \\
       &(6)\ \bar q_t = \tfrac1n \textstyle\sum_i q^{(i)}_t
            \quad \text{(exact; hierarchy "node": the Hierarchical-1-bit-All-Reduce, unbiased)} \\
       &(7)\ x_{t+1} = x_t - \eta\, (\bar q_t + \lambda x_t)
       \end{aligned}

    Names: :math:`m^{(i)}` is ``exp_avg``, :math:`b^{(i)}` ``exp_avg_abs``, :math:`\hat b^{(i)}`
    ``max_exp_avg_abs`` (all three per rank: they follow the rank's own gradients),
    :math:`\eta` ``lr``, :math:`\beta` ``beta``, :math:`\lambda` ``weight_decay``. Steps (5)-(6) are
    ``binary_exchange``: flat, the exact mean with 1 bit per coordinate up and
    ``n.bit_length()`` bits down (the count of +1s); with ``hierarchy="node"`` every message, inside
    and across nodes, is 1 bit per coordinate (node counts and the inter-node sums re-binarised,
    unbiased), and the bytes across node groups are 1/32 of an fp32 all-reduce's across them.

    What the spec fixes and what we chose where it is silent:

    * One :math:`\beta` for both statistics, so :math:`|m| \le b` and :math:`z \in [-1, 1]` (by
      induction, and exactly in floating point). No warm-up, no error feedback, no bias correction:
      2 flat buffers per bucket (3 with ``amsgrad``, the paper's theory-only step, off by default).
    * The randomness: each rank draws its own uniforms, from ``torch.Generator`` seeded with
      ``exchange.shared_seed(seed, step, bucket, 0, shard, rank)`` per server shard, on the bucket's
      device (a reference replays them on CPU). ``seed`` is the same on every rank; draws differ per
      rank, step, bucket and shard, and never touch the global RNG.
    * Weight decay as in the spec's reconstruction: added to the update, :math:`\eta\lambda x`.
    * Dead coordinates: where :math:`b = 0` (no gradient yet on this rank) :math:`z = 0`, so the rank
      sends a fair coin: unbiased, but such a coordinate random-walks by :math:`\pm\eta/n` steps
      (flat) as long as no rank sees a gradient there. A 1-bit message cannot say "zero".
    * Defaults ``lr=1e-3``, ``beta=0.9`` are ours (the paper's hyperparameters were not retrieved).
      Every coordinate moves by up to ``lr`` per step, but by ``lr * z`` in expectation, so Adam's
      lrs fit: on BERT MLM (tiny, 2 ranks, 600 steps, ``configs/bert_birder.json``) the test loss
      was 6.52 at lr 1e-3, 6.55 at 4e-4 and 6.67 at 1e-4 (Adam at 4e-4: 6.55).

    Checkpoints: :math:`m^{(i)}, b^{(i)}, \hat b^{(i)}` are ``PER_RANK`` state (saved per rank by
    ``checkpoint.save_rank_state`` / the DeepSpeed integration); a state loaded without them (another
    world size, ``without_rank_state``) restarts them at zero on every rank, and
    ``reset_compression_state`` keeps the ones present. The parameters stay identical on every rank.

    Args:
        params: parameters or parameter groups (groups may set ``lr``, ``beta``, ``weight_decay``,
            ``amsgrad``; all parameters of one dtype and device share one flat buffer and one exchange).
        lr, beta, weight_decay, amsgrad: :math:`\eta`, :math:`\beta`, :math:`\lambda`, step (3).
        hierarchy: "flat" (default) or "node" (the Hierarchical-1-bit-All-Reduce over node groups of
            ``ranks_per_node`` ranks, default the launcher's ``LOCAL_WORLD_SIZE``; bytes per level in
            ``node_hierarchy.intra_stats`` / ``inter_stats``).
        transport, process_group, timeout_s, nonfinite_grads, consistency_check_every: as ``CDAdam``.
        seed: base of the per-rank, per-step seeds of the draws (step (5) and the hierarchy's).
    """

    CONFIG = BirderConfig  # its arguments, their defaults and checks
    STATE = (
        StateSpec(EXP_AVG, FULL, PER_RANK, "m_i, this worker's momentum"),
        StateSpec(EXP_AVG_ABS, FULL, PER_RANK, "b_i, this worker's EMA of |g|"),
        StateSpec(MAX_EXP_AVG_ABS, FULL, PER_RANK, "bhat_i, the running max of b_i (amsgrad only)"),
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        hierarchy: str = "flat",
        ranks_per_node: int | None = None,
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        config = BirderConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange="binary",
            transport=transport, process_group=process_group,
        )  # fmt: skip

    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[EXP_AVG] = zeros.clone()  # m_i
        state[EXP_AVG_ABS] = zeros.clone()  # b_i
        if any(seg.group["amsgrad"] for seg in bucket.segments):
            state[MAX_EXP_AVG_ABS] = zeros.clone()  # bhat_i (read by the segments of amsgrad groups)
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)  # none: Birder keeps no errors

    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
    ) -> None:
        m, b = state[EXP_AVG], state[EXP_AVG_ABS]
        z = torch.empty_like(m)
        for seg in bucket.segments:  # (1)-(4) per group, with its beta
            group, sl = seg.group, seg.slice
            birder_moments_(grad[sl], m[sl], b[sl], beta=group["beta"])
            denominator = b[sl]
            if group["amsgrad"]:
                if MAX_EXP_AVG_ABS not in state:  # a group turned amsgrad on after the state was made
                    state[MAX_EXP_AVG_ABS] = b.clone()  # bhat starts at b
                bhat = state[MAX_EXP_AVG_ABS][sl]
                torch.maximum(bhat, b[sl], out=bhat)  # (3)
                denominator = bhat
            z[sl] = normalised_momentum(m[sl], denominator)
        # (5)-(6): one binary exchange for the whole bucket; every rank gets the same qbar
        qbar = self._exchange_for(bucket.index, grad.numel()).exchange(z, state, step=state[STEP], group=bucket.index)
        for seg in bucket.segments:
            # (7) x <- x - lr * (qbar + wd * x)
            group = seg.group
            apply_update_(
                self.segment_targets(bucket, seg, params),
                qbar[seg.slice],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                decoupled=False,
            )

    # --- per-rank moments -----------------------------------------------------------------
    def _restart_missing_moments(self) -> None:
        """Zero ``m``, ``b`` (and drop ``bhat``) of every bucket whose state lacks any of them: restarted
        together, so that ``|m| <= b`` keeps holding."""
        for bucket in self.buckets():
            state = self.bucket_state(bucket)
            if STEP not in state or (EXP_AVG in state and EXP_AVG_ABS in state):
                continue
            zeros = torch.zeros(bucket.numel, dtype=self.buffer_dtype(bucket.params), device=bucket.params[0].device)
            state[EXP_AVG], state[EXP_AVG_ABS] = zeros.clone(), zeros
            if any(seg.group["amsgrad"] for seg in bucket.segments):
                state[MAX_EXP_AVG_ABS] = zeros.clone()
            else:
                state.pop(MAX_EXP_AVG_ABS, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``CompressedOptimizer.load_state_dict``; per-rank moments absent from ``state_dict`` (another
        rank's state, ``without_rank_state``) restart at zero on this rank."""
        super().load_state_dict(state_dict)
        self._restart_missing_moments()

    def reset_compression_state(self) -> None:
        """Restart what is missing of the per-rank state at zero (``m``, ``b`` present are kept)."""
        super().reset_compression_state()
        self._restart_missing_moments()

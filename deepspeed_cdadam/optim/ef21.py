"""EF21 both ways: SGD on a Markov-compressed (top-k) gradient estimate (Richtarik et al.; the paper's baseline)."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..compressors.base import Compressor
from ..config import EF21Config
from ..types import DOWN_MARKOV_STATE, STEP
from ..schedule import StepKind
from .base import Bucket, CompressedOptimizer
from .functional import apply_update_


class EF21(CompressedOptimizer):
    r"""EF21 with Markov compression up and down and a plain SGD step (CD-Adam's baseline "EF21").

    .. math::
       \begin{aligned}
       &(1)\ c^{(i)}_t = \mathcal{C}(g^{(i)}_t - \hat g^{(i)}_{t-1}),\quad
             \hat g^{(i)}_t = \hat g^{(i)}_{t-1} + c^{(i)}_t \\
       &(2)\ \hat g_t = \hat g_{t-1} + \tfrac1n \textstyle\sum_i c^{(i)}_t,\quad
             \tilde g_t = \tilde g_{t-1} + \mathcal{C}(\hat g_t - \tilde g_{t-1}) \\
       &(3)\ x_{t+1} = (1 - \alpha\lambda)\, x_t - \alpha\, \tilde g_t
       \end{aligned}

    Steps (1)-(2) are CD-Adam's exchange (``exchange.MarkovExchange``); only the update differs.
    :math:`\mathcal{C}` defaults to top-k with ``ratio`` of each shard's coordinates (index +
    value per kept coordinate on the wire). SGD needs its own lr (about 0.01-0.1 for a ResNet,
    not Adam's 1e-4); ``weight_decay`` is decoupled as in AdamW.

    The default ``ratio`` 0.016 is the paper's (K = 0.016 d, section 7.2): it was chosen there so
    that EF21 sends about the bytes of CD-Adam's scaled sign. Each kept coordinate costs an fp32
    value and an int32 index, 64 bits, so 0.016 d coordinates cost 1.02 bits per coordinate of
    the model, like 1 sign bit plus the scales.

    Args:
        params: parameters or parameter groups.
        lr, weight_decay: SGD step size and decoupled weight decay.
        compressor: "topk" (default), "randk", "scaled_sign", "sign_l2", or a ``Compressor``.
        ratio: kept fraction for "topk" / "randk" (default 0.016, the paper's); refused for the others.
        Other keyword arguments: as ``CDAdam`` (block_size, transport, timeout_s, seed, ...).
    """

    CONFIG = EF21Config  # its arguments, their defaults and checks
    #: The paper's K = 0.016 d: top-k's 64 bits per kept coordinate then cost about one bit per coordinate.
    DEFAULT_RATIO = EF21Config.DEFAULT_RATIO

    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        *,
        compressor: str | Compressor = "topk",
        ratio: float | None = None,
        block_size: int | None = None,
        scale_blocks: str = "fixed",
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        config = EF21Config.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(  # config.build_compressor() carries the ratio (default: the paper's for topk / randk)
            params, config, exchange="markov",
            transport=transport, process_group=process_group,
        )  # fmt: skip

    FLAT_STATE_KEY = DOWN_MARKOV_STATE  # EF21 keeps no moments
    STATE = ()

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
        # (1)-(2): one compressed exchange for the whole bucket; every rank gets the same estimate gtil
        estimate = self._exchange_for(bucket.index, grad.numel()).exchange(
            grad, state, step=state[STEP], group=bucket.index
        )
        for seg in bucket.segments:
            # (3) x <- (1 - lr*wd) x - lr * gtil, with the segment's group's lr and weight decay
            group = seg.group
            apply_update_(
                self.segment_targets(bucket, seg, params),
                estimate[seg.slice],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
            )

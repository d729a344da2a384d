"""CD-Adam: AMSGrad with 1-bit Markov compression both ways (Wang, Lin, Chen)."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import Transport
from ..compressors.base import Compressor
from ..types import EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP
from .base import CompressedOptimizer, validate_adam_hparams
from .functional import amsgrad_direction, apply_update_


class CDAdam(CompressedOptimizer):
    r"""Communication-compressed distributed AMSGrad (CD-Adam, Algorithm 1).

    .. math::
       \begin{aligned}
       &(1)\ \text{worker } i:\ c^{(i)}_t = \mathcal{C}(g^{(i)}_t - \hat g^{(i)}_{t-1})
            \quad \text{(sent up, 1 bit/coord + 1 scale/block)} \\
       &(2)\ \hat g^{(i)}_t = \hat g^{(i)}_{t-1} + c^{(i)}_t \\
       &(3)\ \text{server: } \hat g_t = \hat g_{t-1} + \tfrac1n \textstyle\sum_i c^{(i)}_t \\
       &(4)\ \tilde c_t = \mathcal{C}(\hat g_t - \tilde g_{t-1}) \quad \text{(sent down)} \\
       &(5)\ \text{worker: } \tilde g_t = \tilde g_{t-1} + \tilde c_t \\
       &(6)\ m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t \\
       &(7)\ v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2 \\
       &(8)\ \hat v_t = \max(\hat v_{t-1}, v_t) \quad (\hat v_t = v_t \text{ if amsgrad=False}) \\
       &(9)\ x_{t+1} = (1 - \alpha\lambda)\, x_t - \alpha\, m_t / \sqrt{\hat v_t + \epsilon}
       \end{aligned}

    with :math:`\mathcal{C}(x_B) = \|x_B\|_1/d_B \cdot \mathrm{sign}(x_B)` per block
    (``sign(0) := +1``). Line (4) follows the paper's text (a Markov compression sequence of
    :math:`\hat g`); its Algorithm 1 prints :math:`\mathcal C(\hat g_t - \hat g_{t-1})`.
    Names: :math:`m` is ``exp_avg``, :math:`v` ``exp_avg_sq``, :math:`\hat v` ``max_exp_avg_sq``,
    :math:`\hat g^{(i)}` ``markov_state``, :math:`\hat g` (this rank's shard) ``server_markov_state``,
    :math:`\tilde g` ``down_markov_state``. As in the paper there is no bias correction and
    :math:`\epsilon` sits inside the square root. Steps (1)-(5) are ``exchange.MarkovExchange``.

    Compression starts at step 1 (no warm-up). Compressed methods may need a smaller ``lr`` than
    uncompressed Adam: in a plain simulation of the paper's section 7.1, lr 3e-3 converged while
    lr 3e-2 oscillated.

    Args:
        params: parameters or parameter groups (each group is one flat buffer, one dtype).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay ``lambda``).
        amsgrad: AMSGrad (True, the paper) or Adam without bias correction (False).
        compressor: "scaled_sign" (default), "sign_l2", "topk", "randk", or a ``Compressor``.
        block_size: coordinates per scale (None: one scale per server shard).
        exchange: "markov" (CD-Adam), "error_feedback", "naive" or "none" (exact all-reduce):
            the alternatives are the paper's baselines with the same update rule.
        transport: a ``Transport``; default ``TorchDistributedTransport(process_group)``.
        timeout_s: collective timeout of the default transport.
        seed: base of the shared per-step seeds (rand-k).
        worker_scale_scope: "block" (each block of each shard its own scale) or "tensor" (one
            scale for the worker's whole flat buffer, sent with every shard: upstream OnebitAdam's
            worker side). The server side always scales per block.
        nonfinite_grads: "error" (default): a NaN/inf gradient on any rank raises
            ``FloatingPointError`` on every rank before any state changes; "skip": every rank skips
            the step (``skipped_steps`` counts them). Either costs one tiny all-reduce per step.
        consistency_check_every: every N steps, check that parameters and rank-identical state are
            bit-identical on all ranks (raises naming the first differing tensor); 0 = never.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = True,
        compressor: str | Compressor = "scaled_sign",
        block_size: int | None = None,
        exchange: str = "markov",
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = 300.0,
        seed: int = 0,
        worker_scale_scope: str = "block",
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        validate_adam_hparams(lr, betas, eps, weight_decay)
        if not isinstance(amsgrad, bool):
            raise TypeError(f"Invalid amsgrad={amsgrad!r}. Must be a bool.")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad}
        super().__init__(
            params,
            defaults,
            exchange=exchange,
            compressor=compressor,
            block_size=block_size,
            transport=transport,
            process_group=process_group,
            timeout_s=timeout_s,
            seed=seed,
            worker_scale_scope=worker_scale_scope,
            nonfinite_grads=nonfinite_grads,
            consistency_check_every=consistency_check_every,
        )

    def init_group_state(self, index: int, group: dict[str, Any], state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[EXP_AVG] = zeros.clone()  # m_t
        state[EXP_AVG_SQ] = zeros.clone()  # v_t
        if group["amsgrad"]:
            state[MAX_EXP_AVG_SQ] = zeros.clone()  # \hat v_t
        self._exchange_for(index, zeros.numel()).init_state(state, zeros)  # Markov states (or error buffers)

    def group_step(
        self, index: int, group: dict[str, Any], params: list[torch.Tensor], state: dict[str, Any], grad: torch.Tensor
    ) -> None:
        # (1)-(5): compressed exchange; every rank gets the same estimate gtil
        exchange = self._exchange_for(index, grad.numel())
        estimate = exchange.exchange(grad, state, step=state[STEP], group=index)
        beta1, beta2 = group["betas"]
        # (6)-(8) moments, then the direction m / sqrt(vhat + eps)
        direction = amsgrad_direction(
            estimate,
            state[EXP_AVG],
            state[EXP_AVG_SQ],
            state.get(MAX_EXP_AVG_SQ),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )
        # (9) x <- (1 - lr*wd) x - lr * direction
        apply_update_(params, direction, lr=group["lr"], weight_decay=group["weight_decay"])

"""CD-Adam: AMSGrad with 1-bit Markov compression both ways (Wang, Lin, Chen)."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.transport import DEFAULT_TIMEOUT_S, Transport
from ..compressors.base import Compressor
from ..config import CDAdamConfig
from ..exchange import StepSkip
from ..kernels import triton_amsgrad
from ..types import EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP
from ..schedule import StepKind
from .base import ADAM_MOMENTS, AMSGRAD_MAX, Bucket, CompressedOptimizer, Segment
from .functional import amsgrad_direction, apply_update_
from .overlap import BackwardOverlap, overlap_supported, own_communicator


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
    :math:`\tilde g` ``down_markov_state``. Steps (1)-(5) are ``exchange.MarkovExchange``.
    Compression starts at step 1 (no warm-up).

    **How the update differs from AdamW's** (same names, not the same step):

    * No bias correction (the paper's update). Early steps are larger than Adam's: for a steady
      gradient the step is :math:`(1-\beta_1^t)/\sqrt{1-\beta_2^t}` times Adam's, i.e. 1.0x at
      t=1 and at most 2.1x (t=13) with the default betas (0.9, 0.99), but 3.2x at t=1 and 6.6x at
      t=12 (still 2.3x at t=200) with AdamW's (0.9, 0.999). ``bias_correction=True`` (opt-in)
      divides :math:`m_t` by :math:`1-\beta_1^t` and :math:`\hat v_t` by :math:`1-\beta_2^t`;
      then ``exchange="none"`` is ``torch.optim.AdamW(amsgrad=...)`` up to where eps sits.
    * :math:`\epsilon` sits inside the square root (the paper's :math:`\nu`): the default 1e-8
      floors the denominator at :math:`\sqrt{10^{-8}} = 10^{-4}`, not at 1e-8 as in AdamW: it
      acts like AdamW's ``eps=1e-4``, so coordinates whose gradient is below ~1e-4 move less than
      under AdamW's default. ``eps=e**2`` gives the floor of AdamW's ``eps=e``.
    * AMSGrad: :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` never shrinks (``amsgrad=False``: Adam).
    * The moments see :math:`\tilde g_t`, the 1-bit compressed estimate of the mean gradient,
      not the gradient itself; weight decay is decoupled as in AdamW.

    **Defaults, from measurements** (``scripts/measure_defaults.py`` -> ``results/defaults.md``:
    an MLP, an embedding-heavy classifier and the paper's logistic regression, 2-4 ranks, 300
    steps, 3 seeds, 4 lrs each; and ``results/comparison.md``):

    * ``betas=(0.9, 0.99)``, the paper's. At each setting's best lr the four combinations of
      betas (0.9, 0.999)/(0.9, 0.99) and bias correction off/on were within the seed spread
      (test loss 0.518-0.527 on the MLP, 0.863-0.894 on the embedding model), but (0.9, 0.999)
      without correction needed an lr 3-10x below AdamW's best and fell off at AdamW's lr (MLP
      0.577 vs 0.524 at lr 3e-4; embedding model 1.047 vs 0.792 at 1e-2). With (0.9, 0.99) the
      best lr was 1/3 to 1x AdamW's.
    * ``bias_correction=False`` (the paper): with betas (0.9, 0.99) turning it on changed the
      best result by less than the seed spread (0.525 vs 0.527, 0.877 vs 0.863, log10 gradient
      norm -3.19 vs -2.90). Use it to get Adam's step sizes from step 1, e.g. with (0.9, 0.999).
    * ``block_size=256``: the paper's one scale per server shard (``None``) spans many layers; it
      was the worst setting measured here (BERT MLM stalled at test acc 0.113 with block 2048 and
      matched Adam, 0.146, with block 256; the demo MLP at 80 steps had test loss 0.93 with one
      block vs 0.76 with 2048). 256 costs 1/8 bit per coordinate more (28.4x fewer bytes than fp32 instead of
      ~32x) and, being a multiple of 8, turns on the fused CPU kernel (one block per shard keeps
      the slower eager path).

    **Which lr.** Start at about 1/3 of the lr you would use with AdamW and try up to 1x: the
    best CD-Adam lr was 1/3x (MLP, logistic regression) to 1x (embedding model) AdamW's, and on
    ResNet-18 CD-Adam was best at 3e-4 where Adam was still improving at 1e-3 (lr sweep in
    ``results/comparison.md``). With AdamW's betas (0.9, 0.999) turn ``bias_correction`` on: without
    it the early steps are up to 6.6x Adam's at the same lr, and on SmolLM2-135M at lr 4e-4 the
    compressed run diverged where the corrected one trained (``results/llm/diagnosis.md``;
    ``configs/llm_cdadam.json``).

    Args:
        params: parameters or parameter groups (groups carry hyperparameters; all parameters of one
            dtype and device share one flat buffer and one exchange, whatever their groups).
            fp16/bf16 parameters get an fp32 master copy in the optimizer state (see ``base``).
        lr: step size :math:`\alpha` (see "Which lr" above).
        betas: :math:`(\beta_1, \beta_2)`, default the paper's (0.9, 0.99).
        eps: :math:`\epsilon`, added to :math:`\hat v_t` inside the square root (default 1e-8:
            the denominator is at least 1e-4).
        weight_decay: decoupled weight decay :math:`\lambda` (as AdamW).
        amsgrad: AMSGrad (True, the paper) or Adam's :math:`v_t` (False).
        bias_correction: False (default, the paper): the update above; True: Adam's correction,
            :math:`m_t/(1-\beta_1^t)` over :math:`\sqrt{\hat v_t/(1-\beta_2^t) + \epsilon}`.
        compressor: "scaled_sign" (default), "sign_l2", "topk", "randk", or a ``Compressor``.
        block_size: coordinates per scale (default 256; None: one scale per server shard, the
            paper's setting).
        scale_blocks: "fixed" (default): blocks of ``block_size`` over each server shard of the
            bucket (a block may span parameters); "tensor": blocks follow the parameter tensors
            (each tensor split across the servers, each piece one block or cut by ``block_size``);
            "tensor_padded": as "tensor", each tensor zero-padded as upstream OnebitAdam pads it.
        exchange: "markov" (CD-Adam), "error_feedback", "naive" or "none" (exact all-reduce):
            the alternatives are the paper's baselines with the same update rule.
        transport: a ``Transport``; default ``TorchDistributedTransport(process_group)``.
        timeout_s: collective timeout of the default transport.
        seed: base of the shared per-step seeds (rand-k).
        worker_scale_scope: "block" (each block of each shard its own scale) or "tensor" (one
            scale for the worker's whole flat buffer, or per parameter tensor with
            ``scale_blocks`` "tensor"/"tensor_padded", sent with every shard: upstream OnebitAdam's
            worker side). The server side always scales per block. A setting of the scaled-sign
            compressor (``ScaledSignL1(worker_scale_scope=...)``): a ``Compressor`` instance carries
            its own, which this keyword, unless left at "block", must equal.
        hierarchy: "flat" (default): one exchange over all ranks; "node": exact fp32 average inside
            each node group, the compressed exchange across node groups only, each local rank on its
            part of the bucket (``hierarchical_exchange``; bytes per level in
            ``node_hierarchy.intra_stats`` / ``inter_stats``; needs ``scale_blocks="fixed"``).
        ranks_per_node: ranks per node group with hierarchy "node" (ranks placed node by node);
            None: the launcher's ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE``.
        nonfinite_grads: "error" (default): a NaN/inf gradient on any rank raises
            ``FloatingPointError`` on every rank before any state changes; "skip": every rank skips
            the step (``skipped_steps`` counts them). On the CPU (and wherever the Triton kernels do
            not run) this costs one tiny all-reduce per step, read by the host. On CUDA with the Triton
            kernels and no ``overlap``, from the second step on, it costs nothing: the flag travels inside
            the messages up and the kernels skip on the device (``optim.base._step_decided_on_device``);
            a skipped step then changes no parameter, moment or weight decay on any rank, but ranks with
            finite gradients advance their Markov state (the others send zero corrections), and the
            outcome is read at the next ``step()`` (or ``synchronize()``, ``state_dict()``): "error"
            raises there, one call later. ``DEEPSPEED_CDADAM_STEP_AGREEMENT=host`` keeps the all-reduce.
        consistency_check_every: every N steps, check that parameters and rank-identical state are
            bit-identical on all ranks (raises naming the first differing tensor); 0 = never.
        bucket_cap_mb: largest communication bucket in MB (whole parameters in forward order, as
            PyTorch DDP's); None (default): one bucket per dtype and device, or 25 with ``overlap``.
        overlap: start each bucket's exchange during backward, as soon as its gradients are ready
            (``optim.overlap``; same result bit for bit). Use ``optimizer.no_overlap()`` around the
            micro-batches before the last of a gradient accumulation.
    """

    CONFIG = CDAdamConfig  # its arguments, their defaults and checks
    STATE = (*ADAM_MOMENTS, AMSGRAD_MAX)  # max_exp_avg_sq only with amsgrad=True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = True,
        bias_correction: bool = False,
        compressor: str | Compressor = "scaled_sign",
        block_size: int | None = 256,
        scale_blocks: str = "fixed",
        exchange: str = "markov",
        transport: Transport | None = None,
        process_group: object | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        worker_scale_scope: str = "block",
        hierarchy: str = "flat",
        ranks_per_node: int | None = None,
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
        bucket_cap_mb: float | None = None,
        overlap: bool = False,
    ) -> None:
        config = CDAdamConfig.from_arguments(locals())  # checks every argument (deepspeed_cdadam.config)
        super().__init__(
            params, config, exchange=config.exchange,
            transport=transport, process_group=process_group,
        )  # fmt: skip
        if config.overlap:
            overlap_supported(self)
            self._exchange_transport = own_communicator(self.transport)
            self._overlap = BackwardOverlap(self)

    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        state[EXP_AVG] = zeros.clone()  # m_t
        state[EXP_AVG_SQ] = zeros.clone()  # v_t
        if any(seg.group["amsgrad"] for seg in bucket.segments):
            state[MAX_EXP_AVG_SQ] = zeros.clone()  # \hat v_t (read by the segments of amsgrad groups)
        self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)  # Markov states (or error buffers)

    #: A step's non-finite skip can be decided on the device (``optim.base._step_decided_on_device``):
    #: the Markov exchange takes the flag, and the update kernel (``kernels.triton_amsgrad``) reads it.
    DEVICE_SKIP = True

    def update_decides_on_device(self, bucket: Bucket, grad: torch.Tensor, state: dict[str, Any], kind: StepKind) -> bool:
        moments = [state[EXP_AVG], state[EXP_AVG_SQ]] + ([state[MAX_EXP_AVG_SQ]] if MAX_EXP_AVG_SQ in state else [])
        return triton_amsgrad.applies(grad, *moments)

    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
        skip: StepSkip | None = None,
    ) -> None:
        """``skip``: a step decided on the device (``StepSkip``): the exchange carries the flag, and the
        update (one Triton pass) leaves moments and parameters alone where ``skip.anywhere`` is set."""
        # (1)-(5): one compressed exchange for the whole bucket; every rank gets the same estimate gtil
        estimate = self.exchange_bucket(bucket, grad, state, skip)  # started during backward, with overlap
        for seg in bucket.segments:  # (6)-(9) per group, with its hyperparameters
            self.segment_update(seg, self.segment_targets(bucket, seg, params), state, estimate, skip)

    def segment_update(
        self,
        seg: Segment,
        params: list[torch.Tensor],
        state: dict[str, Any],
        estimate: torch.Tensor,
        skip: StepSkip | None = None,
    ) -> None:
        """Steps (6)-(9) on the segment ``seg.slice`` of the bucket's buffers, with ``seg.group``'s hyperparameters."""
        group, sl = seg.group, seg.slice
        beta1, beta2 = group["betas"]
        max_sq = None
        if group["amsgrad"]:
            if MAX_EXP_AVG_SQ not in state:  # a group turned amsgrad on after the state was made
                state[MAX_EXP_AVG_SQ] = state[EXP_AVG_SQ].clone()  # vhat starts at v, as at step 1
            max_sq = state[MAX_EXP_AVG_SQ]
        moments = dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            # a group saved before the option existed has no key: it ran without correction
            bias_correction_step=state[STEP] if group.get("bias_correction", False) else None,
        )
        m, v, vmax = state[EXP_AVG][sl], state[EXP_AVG_SQ][sl], None if max_sq is None else max_sq[sl]
        if skip is None:  # (6)-(8) moments, then the direction m / sqrt(vhat + eps)
            direction = amsgrad_direction(estimate[sl], m, v, vmax, **moments)
        else:  # the same in one pass, nothing written (a zero direction) where the step is skipped
            assert skip.anywhere is not None, "the exchange records whether any rank skipped"
            direction = triton_amsgrad.amsgrad_direction(estimate[sl], m, v, vmax, skip.anywhere, **moments)
        # (9) x <- (1 - lr*wd) x - lr * direction
        apply_update_(
            params, direction, lr=group["lr"], weight_decay=group["weight_decay"],
            skip=None if skip is None else skip.anywhere,
        )  # fmt: skip

"""Machinery shared by the compressed optimizers: validation, flat buffers, lazy exchanges.

Each parameter group is one flat buffer: the gradients of its parameters (those with
``requires_grad``; a missing ``.grad`` counts as zeros so every rank sends the same layout) are
concatenated in order, exchanged with one pair of collectives, and the update is applied back to
each parameter's slice. The group's state (moments and compression state, all flat) lives in
``self.state[group["params"][0]]``; its per-rank entries are listed in ``types.PER_RANK_KEYS``.

Low-precision parameters (fp16, bf16) get fp32 master weights: the group state holds a flat fp32
copy (``types.MASTER_PARAMS``), the update is applied to it, and the parameters receive it rounded
to their dtype. Without it an update smaller than half a bf16 ulp (lr 1e-4 on a weight near 1.0)
would be rounded away at every step. fp32/fp64 parameters are updated in place and have no copy.
(Inside DeepSpeed the engine's fp16/bf16 wrappers already hand the optimizer fp32 parameters.)
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from typing import Any

import torch

from ..comm.accounting import CommStats
from ..comm.layout import ShardLayout
from ..comm.transport import TorchDistributedTransport, Transport, check_on_transport_device
from ..compressors.base import Compressor
from ..compressors.registry import get_compressor
from ..exchange import EXCHANGE_NAMES, Exchange, check_worker_scale_scope, make_exchange
from ..types import DOWN_MARKOV_STATE, EXP_AVG, EXP_AVG_SQ, MASTER_PARAMS, MAX_EXP_AVG_SQ, PER_RANK_KEYS, STEP
from .safety import NONFINITE_POLICIES, check_ranks_agree, ranks_with_nonfinite

logger = logging.getLogger(__name__)

#: State that must be bit-identical on every rank.
RANK_IDENTICAL_KEYS = (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, DOWN_MARKOV_STATE, MASTER_PARAMS)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_adam_hparams(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter and its allowed range."""
    if not _is_number(lr) or not math.isfinite(lr) or lr < 0.0:  # type: ignore[operator, arg-type]
        raise ValueError(f"Invalid lr={lr!r}. Must be a finite number >= 0.0.")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_number(b) for b in betas):
        raise ValueError(f"Invalid betas={betas!r}. Must be a pair of numbers in [0.0, 1.0).")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}. Must be in [0.0, 1.0).")
    if not _is_number(eps) or not eps > 0.0:  # type: ignore[operator]
        raise ValueError(f"Invalid eps={eps!r}. Must be a number > 0.0.")
    if not _is_number(weight_decay) or not weight_decay >= 0.0:  # type: ignore[operator]
        raise ValueError(f"Invalid weight_decay={weight_decay!r}. Must be a number >= 0.0.")


class CompressedOptimizer(torch.optim.Optimizer):
    """Base class: one flat buffer and one ``Exchange`` per parameter group.

    Pickling keeps only what ``torch.optim.Optimizer`` pickles (defaults, state, param groups):
    the transport and its process group never travel.
    """

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        exchange: str,
        compressor: str | Compressor,
        block_size: int | None,
        transport: Transport | None,
        process_group: object | None,
        timeout_s: float,
        seed: int,
        worker_scale_scope: str = "block",
        nonfinite_grads: str = "error",
        consistency_check_every: int = 0,
    ) -> None:
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite_grads={nonfinite_grads!r}. Allowed: {', '.join(NONFINITE_POLICIES)}.")
        if (
            not isinstance(consistency_check_every, int)
            or isinstance(consistency_check_every, bool)
            or (consistency_check_every < 0)
        ):
            raise ValueError(
                f"Invalid consistency_check_every={consistency_check_every!r}. Must be an int >= 0 (0: never)."
            )
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ValueError(f"Invalid timeout_s={timeout_s!r}. Must be a number > 0 (seconds).")
        if exchange not in EXCHANGE_NAMES:
            raise ValueError(f"Unknown exchange={exchange!r}. Allowed: {', '.join(EXCHANGE_NAMES)}.")
        super().__init__(params, defaults)
        self.compressor = get_compressor(compressor)
        check_worker_scale_scope(worker_scale_scope, self.compressor)
        self.worker_scale_scope = worker_scale_scope
        ShardLayout(0, 1, block_size)  # validates block_size now, not at the first step
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Invalid seed={seed!r}. Must be an int.")
        self.block_size = block_size
        self.exchange_name = exchange
        self.seed = seed
        self._transport = transport
        self._process_group = process_group
        self._timeout_s = float(timeout_s)
        self._exchanges: dict[tuple[int, str], Exchange] = {}
        # True while a framework builds its wrappers around us: DeepSpeed's fp16/bf16 wrapper calls
        # step() once with zero gradients to create optimizer state; that call must not count as a
        # step (it would shift step counts and freeze_step, apply weight decay and move rand-k seeds).
        self.ignore_steps = False
        self.nonfinite_grads = nonfinite_grads
        self.consistency_check_every = consistency_check_every
        self.skipped_steps = 0  # steps skipped on every rank for a non-finite gradient
        self.steps_taken = 0
        # id(param) -> name, for error messages (the DeepSpeed integration fills it from the model)
        self.param_names: dict[int, str] = {}
        self.comm_stats = CommStats()
        for group in self.param_groups:
            self._check_group(group)

    #: A flat buffer every initialised group state holds (how a checkpoint's state is recognised).
    FLAT_STATE_KEY = EXP_AVG

    # --- transport and exchanges --------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = TorchDistributedTransport(self._process_group, self._timeout_s)
        return self._transport

    def _exchange_for(self, index: int, numel: int, name: str | None = None) -> Exchange:
        """The exchange of group ``index`` (scheme ``name``, default the optimizer's), built once."""
        key = (index, name or self.exchange_name)
        if key not in self._exchanges:
            layout = ShardLayout(numel, self.transport.world_size, self.block_size)
            self._exchanges[key] = make_exchange(
                key[1], self.transport, layout, self.compressor, self.comm_stats, self.seed, self.worker_scale_scope
            )
        return self._exchanges[key]

    # --- flat buffers ---------------------------------------------------------------------
    #: Upstream OnebitAdam param-group keys we do not implement yet: refused rather than ignored.
    UNSUPPORTED_GROUP_KEYS = ("exp_avg_mask", "non_freeze")

    def _check_group(self, group: dict[str, Any]) -> None:
        for key in self.UNSUPPORTED_GROUP_KEYS:
            if key in group:
                raise ValueError(
                    f"Parameter-group key {key!r} (upstream OnebitAdam) is not supported by {type(self).__name__} yet; "
                    "remove it (it would otherwise be silently ignored)."
                )
        dtypes = {p.dtype for p in group["params"] if p.requires_grad}
        if len(dtypes) > 1:
            raise ValueError(
                f"A parameter group mixes dtypes {sorted(str(d) for d in dtypes)}; one flat buffer needs one dtype. "
                "Put parameters of different dtypes in separate groups."
            )
        if any(not p.is_floating_point() for p in group["params"] if p.requires_grad):
            raise TypeError("Compressed optimizers need floating-point parameters.")

    @staticmethod
    def trainable(group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.requires_grad]

    @classmethod
    def group_numel(cls, group: dict[str, Any]) -> int:
        """Coordinates of the group's flat buffer."""
        return sum(p.numel() for p in cls.trainable(group))

    @staticmethod
    def buffer_dtype(params: list[torch.Tensor]) -> torch.dtype:
        """fp32 for fp16/bf16 parameters (master precision), else the parameters' dtype."""
        return torch.promote_types(params[0].dtype, torch.float32)

    def flat_grad(self, params: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.buffer_dtype(params)
        parts = []
        for p in params:
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), dtype=dtype, device=p.device))
            elif p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            else:
                parts.append(p.grad.reshape(-1).to(dtype))
        return torch.cat(parts)

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's flat state, kept under its first parameter (created empty)."""
        return self.state[group["params"][0]]

    # --- fp32 master weights for fp16/bf16 parameters ---------------------------------------
    def update_targets(self, params: list[torch.Tensor], state: dict[str, Any]) -> list[torch.Tensor]:
        """What the update is applied to: ``params`` themselves, or (fp16/bf16) the group's fp32 master copy.

        The master is created from the parameters on first use (also for a state loaded from a
        checkpoint that has none). A parameter changed outside the optimizer since the last step
        (its value no longer equals the master rounded to its dtype) wins: the master takes its value.
        """
        dtype = self.buffer_dtype(params)
        if params[0].dtype == dtype:
            return params
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        master = state.get(MASTER_PARAMS)
        if master is None or master.numel() != flat.numel():
            master = state[MASTER_PARAMS] = flat.to(dtype)
        else:
            if master.dtype != dtype or master.device != flat.device:
                master = state[MASTER_PARAMS] = master.to(device=flat.device, dtype=dtype)
            torch.where(master.to(flat.dtype) == flat, master, flat.to(dtype), out=master)
        return [master]

    @staticmethod
    def copy_master_to_params(params: list[torch.Tensor], state: dict[str, Any]) -> None:
        """Round the fp32 master (if any) into the fp16/bf16 parameters."""
        master = state.get(MASTER_PARAMS)
        if master is None or params[0].dtype == master.dtype:
            return
        offset = 0
        for p in params:
            p.detach().copy_(master[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping fp32 buffers for fp16/bf16 parameters.

        torch casts every floating-point state tensor to its parameter's dtype; our flat buffers
        (moments, compression state, master weights) stay in ``buffer_dtype`` (fp32 for fp16/bf16).
        """
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, saved_id in zip(group["params"], saved_group["params"]):
                dtype = torch.promote_types(p.dtype, torch.float32)
                if p.dtype == dtype or saved_id not in saved or p not in self.state:
                    continue
                for key, value in saved[saved_id].items():
                    if key != STEP and torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=dtype)

    # --- the step template ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step for every parameter group: flatten gradients, exchange, update."""
        if self.ignore_steps:
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(i, g, self.trainable(g)) for i, g in enumerate(self.param_groups)]
        groups = [(i, g, ps) for i, g, ps in groups if ps]
        grads = [self.flat_grad(ps) for _, _, ps in groups]
        for (index, _, _), grad in zip(groups, grads):
            check_on_transport_device(self.transport, grad, f"The gradient of param_groups[{index}]")
        if not self._gradients_usable(groups, grads):
            return loss
        for (index, group, params), grad in zip(groups, grads):
            state = self.group_state(group)
            if not state:
                state[STEP] = 0
                zeros = torch.zeros(grad.numel(), dtype=grad.dtype, device=grad.device)
                self.init_group_state(index, group, state, zeros)
            state[STEP] += 1
            targets = self.update_targets(params, state)  # params, or their fp32 master copy
            self.group_step(index, group, targets, state, grad)
            self.copy_master_to_params(params, state)
        self.steps_taken += 1
        if self.consistency_check_every and self.steps_taken % self.consistency_check_every == 0:
            self.check_ranks_agree()
        return loss

    # --- safety -------------------------------------------------------------------------
    def param_name(self, group_index: int, param_index: int, p: torch.Tensor) -> str:
        name = self.param_names.get(id(p))
        return repr(name) if name else f"param_groups[{group_index}]['params'][{param_index}] (shape {tuple(p.shape)})"

    def _gradients_usable(self, groups: list, grads: list[torch.Tensor]) -> bool:
        """False (on every rank alike) to skip this step; raises (on every rank alike) for policy 'error'."""
        bad_ranks = ranks_with_nonfinite(self.transport, grads, self.comm_stats)
        if not bad_ranks:
            return True
        if self.nonfinite_grads == "skip":
            self.skipped_steps += 1
            logger.warning("Non-finite gradient on rank(s) %s: step skipped on every rank.", bad_ranks)
            return False
        where = ""
        for index, group, params in groups:
            for pi, p in enumerate(params):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    where = f" (on this rank first in {self.param_name(index, pi, p)})"
                    break
            if where:
                break
        raise FloatingPointError(
            f"Non-finite gradient (NaN or inf) on rank(s) {bad_ranks}{where}. No parameter or optimizer state was "
            f"changed on any rank. Use fp16 loss scaling, lower the lr, or set nonfinite_grads='skip' to skip such "
            "steps on every rank."
        )

    def check_ranks_agree(self) -> None:
        """Raise on every rank if parameters or rank-identical state differ between ranks."""
        named: list[tuple[str, torch.Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            params = self.trainable(group)
            named += [(self.param_name(gi, pi, p), p) for pi, p in enumerate(params)]
            state = self.group_state(group) if params else {}
            named += [
                (f"optimizer state {key!r} of param_groups[{gi}]", state[key])
                for key in RANK_IDENTICAL_KEYS
                if key in state
            ]
        step = max((self.group_state(g).get(STEP, 0) for g in self.param_groups if self.trainable(g)), default=0)
        check_ranks_agree(self.transport, named, step, self.comm_stats)

    def reset_compression_state(self) -> None:
        """Restart every group's compression state (Markov states, error buffers) from zero, on this rank.

        Moments and step counts are kept. Call it on every rank alike (e.g. after resuming on
        another world size); the next step then starts the compression sequences afresh.
        """
        for index, group in enumerate(self.param_groups):
            state = self.group_state(group)
            if self.FLAT_STATE_KEY not in state:
                continue
            zeros = torch.zeros_like(state[self.FLAT_STATE_KEY])
            for key in (*PER_RANK_KEYS, DOWN_MARKOV_STATE):
                state.pop(key, None)
            self._exchange_for(index, zeros.numel()).init_state(state, zeros)

    @abstractmethod
    def init_group_state(self, index: int, group: dict[str, Any], state: dict[str, Any], zeros: torch.Tensor) -> None:
        """Create the group's flat buffers in ``state`` (``zeros`` has the buffer's size and dtype)."""

    @abstractmethod
    def group_step(
        self, index: int, group: dict[str, Any], params: list[torch.Tensor], state: dict[str, Any], grad: torch.Tensor
    ) -> None:
        """Exchange ``grad`` (this rank's flat gradient) and update ``params``; ``state[STEP]`` is already t.

        ``params`` are the tensors to update in place: the group's parameters, or for fp16/bf16
        parameters a one-element list holding their flat fp32 master copy.
        """

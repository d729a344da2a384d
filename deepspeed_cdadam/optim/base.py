"""Machinery shared by the compressed optimizers: communication buckets, flat buffers, lazy exchanges.

Communication is independent of the parameter groups, which carry hyperparameters only. A
*bucket* (``Bucket``) holds every trainable parameter of every group that shares its dtype and
device (``bucket_key``), in group order then parameter order; each group is one contiguous
*segment* (``Segment``) of it. The gradients of a bucket's parameters (a missing ``.grad`` counts
as zeros so every rank sends the same layout) are concatenated, exchanged with one pair of
collectives, and the update is applied segment by segment with that segment's group's
hyperparameters (lr, betas, eps, weight_decay, ...). A model with decay / no-decay groups thus
costs one ``all_to_all`` + one ``all_gather`` per step, plus the control message, not a pair per group.

The bucket's state (moments and compression state, all flat over the bucket) lives in
``self.state[bucket.params[0]]``, so ``state_dict`` stays a torch optimizer state_dict. Every
buffer is declared (``state.StateSpec``: the optimizer's ``STATE``, its exchanges'
``Exchange.STATE``), so checkpoints, resets, the consistency check and ``state_dict`` treat
per-rank and rank-identical state alike for every scheme.

Low-precision parameters (fp16, bf16) get fp32 master weights: the bucket state holds a flat fp32
copy (``types.MASTER_PARAMS``), the update is applied to it, and the parameters receive it rounded
to their dtype. Without it an update smaller than half a bf16 ulp (lr 1e-4 on a weight near 1.0)
would be rounded away at every step. fp32/fp64 parameters are updated in place and have no copy.
(Inside DeepSpeed the engine's fp16/bf16 wrappers already hand the optimizer fp32 parameters.)
"""

from __future__ import annotations

import contextlib
import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch._utils import _unflatten_dense_tensors  # views of a flat buffer shaped like the parameters

from ..comm.accounting import CommStats
from ..comm.layout import ShardLayout, make_layout
from ..comm.transport import TorchDistributedTransport, Transport, check_on_transport_device
from ..compressors.base import Compressor
from ..exchange import EXCHANGES, Exchange, PreparedExchange, StepSkip, make_exchange
from ..hierarchical_exchange import NodeHierarchy
from ..state import FULL, PER_RANK, RANK_IDENTICAL, StateSpec, keys_with_scope
from ..types import EXP_AVG, EXP_AVG_SQ, MASTER_PARAMS, MAX_EXP_AVG_SQ, STEP
from ..schedule import StepKind
from .safety import DecidedSkip, agree_on_step, any_nonfinite, check_ranks_agree, step_agreement

if TYPE_CHECKING:
    from .overlap import BackwardOverlap

logger = logging.getLogger(__name__)

#: Moments kept by the Adam-type optimizers (each declares the ones it uses in ``STATE``).
ADAM_MOMENTS = (
    StateSpec(EXP_AVG, FULL, RANK_IDENTICAL, "m_t"),
    StateSpec(EXP_AVG_SQ, FULL, RANK_IDENTICAL, "v_t"),
)
AMSGRAD_MAX = StateSpec(MAX_EXP_AVG_SQ, FULL, RANK_IDENTICAL, "vhat_t")
MASTER_SPEC = StateSpec(MASTER_PARAMS, FULL, RANK_IDENTICAL, "fp32 master copy of fp16/bf16 parameters")
#: Top-level ``state_dict()`` key naming the rank whose per-rank state the dict holds.
RANK_STATE_TAG = "deepspeed_cdadam_rank_state"


def without_rank_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` minus its per-rank compression state: load it on every rank (e.g. one file saved
    by rank 0); each rank then restarts its compression state from zero (moments and steps kept)."""
    out = {**state_dict, "state": {k: dict(v) for k, v in state_dict["state"].items()}}
    for key in out.pop(RANK_STATE_TAG, {}).get("keys", ()):
        for entry in out["state"].values():
            entry.pop(key, None)
    return out


@dataclass
class Segment:
    """One parameter group's part of a bucket: coordinates ``[start, stop)`` of the bucket's flat buffers."""

    group_index: int
    group: dict[str, Any]
    start: int
    stop: int = -1
    params: list[torch.Tensor] = field(default_factory=list)
    #: where each of ``params`` starts in its group's own flat vector (the group's trainable
    #: parameters in order: what a per-group key such as ``exp_avg_mask`` is indexed by)
    group_offsets: list[int] = field(default_factory=list)

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass
class Bucket:
    """The unit of communication: every trainable parameter with one ``bucket_key`` (dtype, device),
    across parameter groups; one flat buffer, one ``Exchange``, one pair of collectives per step."""

    index: int
    key: tuple
    params: list[torch.Tensor] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    numel: int = 0
    #: ``(flat, views)``: views of the gradient buffer ``flat`` shaped like ``params`` (``bucket_grad``)
    grad_views: tuple | None = field(default=None, repr=False, compare=False)

    def name(self) -> str:
        """``param_groups[i, j]``: the groups with parameters in this bucket (for messages)."""
        return f"param_groups[{', '.join(str(s.group_index) for s in self.segments)}]"

    def describe(self) -> str:
        return f"bucket {self.index} ({', '.join(str(k) for k in self.key)}; {self.name()})"


class CompressedOptimizer(torch.optim.Optimizer):
    """Base class: one flat buffer and one ``Exchange`` per communication bucket (``Bucket``).

    Pickling keeps only what ``torch.optim.Optimizer`` pickles (defaults, state, param groups):
    the transport and its process group never travel.
    """

    def __init__(
        self,
        params: Any,
        config: Any,
        *,
        exchange: str,
        transport: Transport | None,
        process_group: object | None,
    ) -> None:
        """``config``: the subclass's config dataclass (``deepspeed_cdadam.config``), which has checked
        every argument; its settings are read from it here, once for every optimizer (the compressor:
        ``config.build_compressor()``, which carries the worker scale scope)."""
        super().__init__(params, config.param_group_defaults())
        self.config = config
        self.compressor: Compressor = config.build_compressor()
        self.block_size = config.block_size
        self.scale_blocks = config.scale_blocks  # "fixed", "tensor" or "tensor_padded" (comm.layout.make_layout)
        self.exchange_name = exchange
        self.seed = config.seed
        self._transport = transport
        self._process_group = process_group
        self._timeout_s = float(config.timeout_s)
        self._exchanges: dict[tuple[int, str], Exchange] = {}
        # True while a framework builds its wrappers around us: DeepSpeed's fp16/bf16 wrapper calls
        # step() once with zero gradients to create optimizer state; that call must not count as a
        # step (it would shift step counts and freeze_step, apply weight decay and move rand-k seeds).
        self.ignore_steps = False
        self.nonfinite_grads = config.nonfinite_grads
        self.consistency_check_every = config.consistency_check_every
        self.skipped_steps = 0  # steps skipped on every rank for a non-finite gradient
        self.steps_taken = 0
        # id(param) -> name, for error messages (the DeepSpeed integration fills it from the model)
        self.param_names: dict[int, str] = {}
        self.comm_stats = CommStats()
        # hierarchy "node" (hierarchical_exchange): exact inside node groups, compressed across them, bytes
        # per level in node_hierarchy.intra_stats / inter_stats; None for hierarchy "flat"
        self.node_hierarchy = NodeHierarchy.from_config(config)
        # the buckets' keys and parameters at the first step (the flat buffers' layout, fixed from then on)
        self._bucket_layout: list[tuple[tuple, tuple[int, ...]]] | None = None
        # Set by a framework whose engine averages the gradients on EXACT steps (see engine_allreduces)
        self.engine_averages_exact_steps = False
        # Called with the optimizer after every step and after a load (the DeepSpeed integration
        # switches the engine's all-reduce from engine_allreduces())
        self.on_next_step: Any = None
        for group in self.param_groups:
            self._check_group(group)

    #: A flat buffer every initialised bucket state holds (how a checkpoint's state is recognised).
    FLAT_STATE_KEY = EXP_AVG
    #: The optimizer's own flat buffers (moments); its exchanges declare theirs (``Exchange.STATE``).
    STATE: tuple[StateSpec, ...] = ADAM_MOMENTS

    def exchange_names(self) -> tuple[str, ...]:
        """The exchange schemes this optimizer may run (their state lives in the bucket state)."""
        return (self.exchange_name,)

    def state_specs(self) -> tuple[StateSpec, ...]:
        """Every flat buffer a bucket state can hold: the optimizer's, the master copy, the exchanges'."""
        specs = (*self.STATE, MASTER_SPEC)
        for name in self.exchange_names():
            specs += self.exchange_specs(name)
        return specs

    def exchange_state_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.key for name in self.exchange_names() for spec in self.exchange_specs(name)))

    def exchange_specs(self, name: str) -> tuple[StateSpec, ...]:
        """The buffers scheme ``name`` keeps (under hierarchy "node": those of its node-level exchange)."""
        if self.node_hierarchy is not None and name != "none":
            return self.node_hierarchy.specs(name)
        return EXCHANGES[name].STATE

    # --- transport and exchanges --------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = TorchDistributedTransport(self._process_group, self._timeout_s)
        return self._transport

    @property
    def exchange_transport(self) -> Transport:
        """The exchanges' transport: the optimizer's, or with ``overlap`` a communicator of its own over the
        same ranks (``optim.overlap``), so that the training loop's own collectives between backward and
        ``step()`` (a logged loss) never interleave with the exchanges on one communicator."""
        return self.__dict__.get("_exchange_transport") or self.transport

    def _exchange_for(self, index: int, numel: int, name: str | None = None) -> Exchange:
        """The exchange of bucket ``index`` (scheme ``name``, default the optimizer's), built once.

        Its layout spans the whole bucket: one n-way shard split for all its groups; with
        ``scale_blocks`` "tensor" / "tensor_padded" the blocks follow the bucket's parameter tensors
        (``comm.layout.TensorLayout``). The exact scheme "none" always takes a plain ``ShardLayout``."""
        key = (index, name or self.exchange_name)
        if key not in self._exchanges and self.node_hierarchy is not None and key[1] != "none":
            self._exchanges[key] = self.node_hierarchy.make_exchange(  # exact inside node groups, compressed across
                key[1], numel, self.transport, self.compressor, self.comm_stats, self.seed, self.block_size
            )  # fmt: skip
        if key not in self._exchanges:
            if self.scale_blocks == "fixed" or key[1] == "none":
                layout = ShardLayout(numel, self.transport.world_size, self.block_size)
            else:
                sizes = self.layout_tensor_sizes(self.buckets()[index])
                if sum(sizes) != numel:
                    raise ValueError(f"Bucket {index} has {sum(sizes)} coordinates, its buffer {numel}.")
                layout = make_layout(sizes, self.transport.world_size, self.block_size, self.scale_blocks)
            self._exchanges[key] = make_exchange(
                key[1], self.exchange_transport, layout, self.compressor, self.comm_stats, self.seed
            )
        return self._exchanges[key]

    def layout_tensor_sizes(self, bucket: Bucket) -> tuple[int, ...]:
        """The "tensors" a ``scale_blocks="tensor"`` / ``"tensor_padded"`` layout follows: the bucket's
        parameters. An optimizer may take coarser pieces (1-bit LAMB: the whole bucket as one tensor,
        as upstream's one fused momentum buffer), as long as they add up to the bucket. With
        ``scale_blocks="group_padded"``: each param group's segment (DeepSpeed's fused fp16 wrapper
        hands upstream one flat fp32 tensor per group)."""
        if self.scale_blocks == "group_padded":
            return tuple(seg.stop - seg.start for seg in bucket.segments)
        return tuple(p.numel() for p in bucket.params)

    # --- buckets and flat buffers -----------------------------------------------------------
    #: Upstream OnebitAdam param-group keys we do not implement yet: refused rather than ignored.
    UNSUPPORTED_GROUP_KEYS = ("exp_avg_mask", "non_freeze")

    def _check_group(self, group: dict[str, Any]) -> None:
        for key in self.UNSUPPORTED_GROUP_KEYS:
            if key in group:
                raise ValueError(
                    f"Parameter-group key {key!r} (upstream OnebitAdam) is not supported by {type(self).__name__} yet; "
                    "remove it (it would otherwise be silently ignored)."
                )
        if any(not p.is_floating_point() for p in group["params"] if p.requires_grad):
            raise TypeError("Compressed optimizers need floating-point parameters.")

    @staticmethod
    def trainable(group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.requires_grad]

    @classmethod
    def group_numel(cls, group: dict[str, Any]) -> int:
        """Coordinates of the group's trainable parameters (over all buckets it has parameters in)."""
        return sum(p.numel() for p in cls.trainable(group))

    def bucket_key(self, group: dict[str, Any], p: torch.Tensor) -> tuple:
        """Parameters with equal keys share a bucket: one per (dtype, device)."""
        return (p.dtype, p.device)

    def bucket_cap_numel(self, p: torch.Tensor) -> int | None:
        """Most coordinates of a bucket holding ``p`` (``bucket_cap_mb`` of its flat buffer's dtype), or
        None: one bucket per ``bucket_key``. Only optimizers whose config has ``bucket_cap_mb`` cap them."""
        cap_mb = getattr(self.config, "bucket_cap_mb", None)
        if cap_mb is None:
            return None
        itemsize = torch.empty((), dtype=self.buffer_dtype([p])).element_size()
        return max(1, int(cap_mb * 2**20) // itemsize)

    def buckets(self) -> list[Bucket]:
        """The communication buckets, in order of first appearance (group order, then parameter order).

        Each group with trainable parameters in a bucket is one contiguous ``Segment`` of it. With a cap
        (``bucket_cap_numel``) a key's parameters fill one bucket after another, whole parameters in
        order, a new bucket when the next parameter would pass the cap (PyTorch DDP's buckets, in
        forward order: backward fills the last bucket first).
        """
        in_step = self.__dict__.get("_buckets_in_step")
        if in_step is not None:  # inside step(), which holds them: nothing that decides them changes there
            return list(in_step)
        # the same buckets as last time while no parameter, group, key or requires_grad changed: built
        # again only then (building walks every parameter)
        signature = tuple(
            (id(group), tuple((id(p), p.requires_grad, p.shape, self.bucket_key(group, p)) for p in group["params"]))
            for group in self.param_groups
        )
        cached = self.__dict__.get("_buckets_cache")
        if cached is not None and cached[0] == signature:
            return list(cached[1])
        by_key: dict[tuple, Bucket] = {}
        parts: dict[tuple, int] = {}  # base key -> the part now filling (capped buckets)
        caps: dict[tuple, int | None] = {}  # by key: bucket_cap_numel depends on the dtype only
        for gi, group in enumerate(self.param_groups):
            offset = 0  # in the group's own flat vector
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                key = self.bucket_key(group, p)
                cap = caps[key] if key in caps else caps.setdefault(key, self.bucket_cap_numel(p))
                if cap is not None:
                    base, part = key, parts.get(key, 0)
                    key = (*base, f"part {part}")
                    filling = by_key.get(key)
                    if filling is not None and filling.numel > 0 and filling.numel + p.numel() > cap:
                        parts[base] = part + 1
                        key = (*base, f"part {part + 1}")
                bucket = by_key.get(key)
                if bucket is None:
                    bucket = by_key[key] = Bucket(len(by_key), key)
                if not bucket.segments or bucket.segments[-1].group_index != gi:
                    bucket.segments.append(Segment(gi, group, bucket.numel))
                seg = bucket.segments[-1]
                seg.params.append(p)
                seg.group_offsets.append(offset)
                bucket.params.append(p)
                bucket.numel += p.numel()
                seg.stop = bucket.numel
                offset += p.numel()
        self._buckets_cache = (signature, list(by_key.values()))
        return list(by_key.values())

    @staticmethod
    def segment_targets(bucket: Bucket, segment: Segment, targets: list[torch.Tensor]) -> list[torch.Tensor]:
        """The segment's part of ``update_targets``: its parameters, or its slice of the fp32 master."""
        return segment.params if targets is bucket.params else [targets[0][segment.slice]]

    @staticmethod
    def buffer_dtype(params: list[torch.Tensor]) -> torch.dtype:
        """fp32 for fp16/bf16 parameters (master precision), else the parameters' dtype."""
        return torch.promote_types(params[0].dtype, torch.float32)

    def bucket_grad(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's gradients in its persistent flat buffer (made once; a missing ``.grad`` is zeros).

        Copied in, not aliased: ``p.grad`` never becomes a view of the buffer (torch's and DeepSpeed's
        ``zero_grad`` drop ``.grad`` every step, and a view would let a user's in-place edit of
        ``p.grad`` reach the optimizer's buffer), so the step allocates no full-size gradient.
        """
        dtype = self.buffer_dtype(bucket.params)
        buffers: dict[int, torch.Tensor] = self.__dict__.setdefault("_grad_buffers", {})
        flat = buffers.get(bucket.index)
        device = bucket.params[0].device
        if flat is None or flat.numel() != bucket.numel or flat.dtype != dtype or flat.device != device:
            flat = buffers[bucket.index] = torch.empty(bucket.numel, dtype=dtype, device=device)
        if bucket.grad_views is None or bucket.grad_views[0] is not flat:  # made once per buffer
            bucket.grad_views = (flat, _unflatten_dense_tensors(flat, bucket.params))
        views, grads = [], []
        for p, view in zip(bucket.params, bucket.grad_views[1]):
            g = p.grad
            if g is None:
                view.zero_()
            elif g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            else:
                views.append(view)
                grads.append(g)
        if views:  # one multi-tensor copy, not one launch per parameter (GPT-2: ~150)
            torch._foreach_copy_(views, grads)
        return flat

    def bucket_state(self, bucket: Bucket) -> dict[str, Any]:
        """The bucket's flat state, kept under its first parameter (created empty)."""
        return self.state[bucket.params[0]]

    # --- fp32 master weights for fp16/bf16 parameters ---------------------------------------
    def update_targets(self, params: list[torch.Tensor], state: dict[str, Any]) -> list[torch.Tensor]:
        """What the update is applied to: ``params`` themselves, or (fp16/bf16) the bucket's fp32 master copy.

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
        torch._foreach_copy_([p.detach() for p in params], _unflatten_dense_tensors(master, params))

    def compression_layout(self) -> dict[str, Any]:
        """What fixes the order and meaning of the compression state: a state saved under another
        ``scale_blocks`` or exchange cannot be resumed into this one (its buffers are in another order)."""
        hierarchy = self.node_hierarchy.layout(self.transport.world_size) if self.node_hierarchy is not None else {}
        return {"scale_blocks": self.scale_blocks, "exchanges": list(self.exchange_names()), **hierarchy}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus the rank and world size its per-rank state belongs to
        (step counts after the last step's outcome is read, as ``synchronize`` but without raising)."""
        self._settle_skip()
        out = super().state_dict()
        tr = self.transport
        out[RANK_STATE_TAG] = {
            "rank": tr.rank,
            "world_size": tr.world_size,
            "keys": list(keys_with_scope(self.state_specs(), PER_RANK)),
            "compression_layout": self.compression_layout(),
        }
        return out

    #: Set by a framework that restores per-rank state itself after ``load_state_dict`` (the
    #: DeepSpeed integration's per-rank files): the per-rank state in a state_dict is then dropped on
    #: every rank, not refused, and ``step()`` refuses to run until it is restored or reset.
    accept_foreign_rank_state = False
    _rank_state_pending = False

    def _drop_foreign_rank_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Refuse (or, for a framework that restores it, drop) per-rank state saved by another rank."""
        tag = state_dict.get(RANK_STATE_TAG)
        if tag is None:
            return state_dict
        saved_layout = tag.get("compression_layout", self.compression_layout())
        if saved_layout != self.compression_layout():
            raise ValueError(
                f"This optimizer state_dict was saved with {saved_layout}, this optimizer runs "
                f"{self.compression_layout()}: its compression state is laid out differently. Resume with the "
                "saved settings, or build a new optimizer and load only the model weights."
            )
        if self.accept_foreign_rank_state:
            # the framework restores every rank's own per-rank state next (load_rank_state): drop it
            # here on every rank alike, and refuse to step until it is restored or reset
            self._rank_state_pending = True
            return without_rank_state(state_dict)
        tr = self.transport
        if (tag["rank"], tag["world_size"]) == (tr.rank, tr.world_size):
            return state_dict
        present = any(k in entry for entry in state_dict["state"].values() for k in tag.get("keys", ()))
        if present:
            raise ValueError(
                f"This optimizer state_dict holds the per-rank compression state of rank {tag['rank']} of "
                f"{tag['world_size']} ({', '.join(tag['keys'])}), and this is rank {tr.rank} of {tr.world_size}. "
                "Load on each rank the state_dict that rank saved, or load "
                "deepspeed_cdadam.without_rank_state(state_dict) on every rank (each rank then restarts its "
                "compression state from zero; moments and step counts are kept)."
            )
        return without_rank_state(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping fp32 buffers for fp16/bf16 parameters,
        refusing another rank's per-rank state, and restarting compression state that is absent.

        torch casts every floating-point state tensor to its parameter's dtype; our flat buffers
        (moments, compression state, master weights) stay in ``buffer_dtype`` (fp32 for fp16/bf16).
        """
        state_dict = self._drop_foreign_rank_state(state_dict)
        self._settle_skip()  # the last step's outcome, counted (its error, if any, goes with the state replaced)
        self._nonfinite_error = None
        super().load_state_dict({k: v for k, v in state_dict.items() if k != RANK_STATE_TAG})
        self._agreed_plan = None  # the next step agrees on the host again (the loaded plan is checked there)
        self._load_dtypes(state_dict)
        from ..checkpoint import check_bucket_layout  # noqa: PLC0415 - checkpoint imports nothing of ours

        check_bucket_layout(self)  # a state_dict in the per-group layout of versions before buckets
        per_rank = keys_with_scope(self.state_specs(), PER_RANK)
        if any(
            self.FLAT_STATE_KEY in self.bucket_state(b) and not all(k in self.bucket_state(b) for k in per_rank)
            for b in self.buckets()
        ) and per_rank and not self.accept_foreign_rank_state:
            self.reset_compression_state()

    def _load_dtypes(self, state_dict: dict[str, Any]) -> None:
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
    #: Exchanges started during backward (``overlap.BackwardOverlap``), or None.
    _overlap: BackwardOverlap | None = None
    #: This step's exchanges prepared during backward, by bucket index (``exchange_bucket`` commits them).
    _prepared: dict[int, PreparedExchange] = {}  # noqa: RUF012 - replaced per step, never mutated in place
    _stale_warned = False

    def ensure_bucket_state(self, bucket: Bucket, grad: torch.Tensor) -> dict[str, Any]:
        """The bucket's state, created (zeros, step 0) on its first use."""
        state = self.bucket_state(bucket)
        if not state:
            state[STEP] = 0
            zeros = torch.zeros(grad.numel(), dtype=grad.dtype, device=grad.device)
            self.init_bucket_state(bucket, state, zeros)
        return state

    def exchange_bucket(
        self, bucket: Bucket, grad: torch.Tensor, state: dict[str, Any], skip: StepSkip | None = None
    ) -> torch.Tensor:
        """This step's exchange of ``bucket``: the one prepared during backward, committed, or run now
        (with ``skip``: a step decided on the device, ``_step_decided_on_device``)."""
        prepared = self._prepared.get(bucket.index)
        if prepared is not None:
            return prepared.commit(state)
        exchange = self._exchange_for(bucket.index, grad.numel())
        if skip is not None:
            return exchange.exchange(grad, state, step=state[STEP], group=bucket.index, skip=skip)  # type: ignore[call-arg]
        return exchange.exchange(grad, state, step=state[STEP], group=bucket.index)

    def no_overlap(self):
        """A context in which backward starts no exchange (DDP's ``no_sync()``: wrap the micro-batches
        before the last of a gradient accumulation). Without ``overlap`` it does nothing."""
        return self._overlap.paused() if self._overlap is not None else contextlib.nullcontext()

    def _warn_stale_once(self) -> None:
        if not self._stale_warned:
            self._stale_warned = True
            logger.warning(
                "overlap: gradients changed after their exchange started during backward (clipping or unscaling "
                "before step(), or several backward passes per step); the step's exchanges were run again from the "
                "current gradients, which sends them twice. For gradient accumulation wrap the micro-batches before "
                "the last in optimizer.no_overlap(); to clip, set overlap to false."
            )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step: flatten each bucket's gradients, agree on the step (one control message), then
        per bucket one exchange and the update of each of its groups' segments. With ``overlap`` the
        exchanges started during backward (``optim.overlap``) and are committed here. Where the step's
        skip is decided on the device (``_step_decided_on_device``) there is no control message, and
        the step's outcome is read at the next ``step()`` or ``synchronize()``."""
        self.synchronize()  # the previous step's outcome, if it was decided on the device
        if self.ignore_steps:
            if self._overlap is not None:
                self._overlap.drop_round()
            return None
        if self._rank_state_pending:
            raise RuntimeError(
                "The optimizer state was loaded without its per-rank compression state, and it was not "
                "restored (deepspeed_cdadam.checkpoint.load_rank_state) or reset "
                "(optimizer.reset_compression_state(), on every rank) since: stepping would use missing state."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self.buckets()
        self._buckets_in_step = buckets  # planned_step() and the schedule ask for them again
        try:
            return self._step(buckets, loss)
        finally:
            self._buckets_in_step = None

    def _step(self, buckets: list[Bucket], loss: Any) -> Any:
        prepared, stale = self._overlap.finish(buckets) if self._overlap is not None else ({}, False)
        # a bucket prepared during backward has its gradients in its buffer already (stale: copied again)
        grads = [self._grad_buffers[b.index] if b.index in prepared and not stale else self.bucket_grad(b) for b in buckets]
        for bucket, grad in zip(buckets, grads):
            check_on_transport_device(self.transport, grad, f"The gradient of {bucket.name()}")
        self._check_layout_unchanged(buckets, grads)
        planned = self.planned_step()
        if self._decides_on_device(buckets, grads, planned):
            return self._step_decided_on_device(buckets, grads, planned, loss)
        agreement: dict[str, bool] = {}
        if not self._gradients_usable(buckets, grads, planned, stale=stale, agreement=agreement):
            return loss
        self._agreed_plan = planned
        if agreement.get("stale"):  # some rank's gradients changed after its messages left: every rank redoes them
            self._warn_stale_once()
            prepared = {}
        self._prepared = prepared
        try:
            self._step_buckets(buckets, grads, planned)
        finally:
            self._prepared = {}
        return self._finish_step(loss)

    def _step_buckets(
        self, buckets: list[Bucket], grads: list[torch.Tensor], planned: StepKind, skip: StepSkip | None = None
    ) -> list[dict[str, Any]]:
        """Per bucket: its step count + 1, one exchange and the update of its segments (``bucket_step``, with
        ``skip`` where the step is decided on the device); returns the bucket states."""
        states = []
        for bucket, grad in zip(buckets, grads):
            state = self.ensure_bucket_state(bucket, grad)
            state[STEP] += 1
            states.append(state)
            targets = self.update_targets(bucket.params, state)  # params, or their fp32 master copy
            if skip is None:
                self.bucket_step(bucket, targets, state, grad, planned)
            else:
                self.bucket_step(bucket, targets, state, grad, planned, skip=skip)  # type: ignore[call-arg]
            self.copy_master_to_params(bucket.params, state)
        return states

    def _finish_step(self, loss: Any) -> Any:
        """After a step's buckets: count it, check the ranks where due, tell the framework what comes next."""
        self.steps_taken += 1
        if self.consistency_check_every and self.steps_taken % self.consistency_check_every == 0:
            self._settle_skip()  # (a step decided on the device: its counts first)
            self.check_ranks_agree()
        self.notify_next_step()
        return loss

    # --- the step decided on the device ------------------------------------------------------
    #: Whether this optimizer's ``bucket_step`` takes ``skip=StepSkip`` and then leaves moments and
    #: parameters as they were where ``skip.anywhere`` is true (``update_decides_on_device`` says
    #: for which buffers its update does so without the host).
    DEVICE_SKIP = False
    #: The plan all ranks agreed on at the last synchronous agreement (None: none yet, or loaded since).
    _agreed_plan: StepKind | None = None
    #: The last step's outcome where it was decided on the device, not yet read (``synchronize``).
    _pending_skip: DecidedSkip | None = None

    def update_decides_on_device(self, bucket: Bucket, grad: torch.Tensor, state: dict[str, Any], kind: StepKind) -> bool:
        """Whether the optimizer's update of ``bucket`` in a ``kind`` step skips on the device (a ``DEVICE_SKIP``
        optimizer's kernels or device scalars)."""
        return False

    def _decides_on_device(self, buckets: list[Bucket], grads: list[torch.Tensor], planned: StepKind) -> bool:
        """Whether this step's skip is decided on the device, with no control message and no host read.

        Where every bucket's exchange and update run on kernels that take the flag (CD-Adam, and 1-bit
        Adam's compressed phase, on CUDA with the Triton kernels), with no ``overlap``, after a synchronous
        agreement on the same plan (the first step, the first after a load and the first of a new kind of
        step agree synchronously), and unless ``DEEPSPEED_CDADAM_STEP_AGREEMENT=host``. Every condition is the same on every rank
        (configuration, agreed plan, agreed kernel availability, buffer layouts), so all ranks choose alike.
        """
        if not (self.DEVICE_SKIP and buckets and self._overlap is None and planned == self._agreed_plan):
            return False
        if step_agreement() != "device":
            return False
        for bucket, grad in zip(buckets, grads):
            state = self.bucket_state(bucket)
            if not state or not self.update_decides_on_device(bucket, grad, state, planned):
                return False
            exchange = self._exchanges.get((bucket.index, self.exchange_name))
            if exchange is None or not exchange.SUPPORTS_DEVICE_SKIP or not exchange.decides_skip_on_device(grad, state):
                return False
        return True

    def _step_decided_on_device(self, buckets: list[Bucket], grads: list[torch.Tensor], planned: StepKind, loss: Any) -> Any:
        """A step whose non-finite skip is decided on the device, with no collective of its own and no host read.

        Each rank's flag (NaN/inf in any of its gradients) is computed on the device and travels inside
        its messages up (``exchange.StepSkip``): every rank learns the same answer from the exchange it
        runs anyway. Where it is set: ranks with a non-finite gradient send zero corrections, the others'
        count as usual (the compression sequences stay consistent), and no moment, parameter or weight
        decay changes on any rank (the update kernels read the flag). Step counts go ahead here and are
        put back when the outcome is read (``synchronize``: at the next ``step()``, ``state_dict()``,
        ``completed_steps()``, or now where the next step's plan depends on it), which then raises for
        ``nonfinite_grads="error"`` or counts the skip, on every rank alike.
        """
        skip = StepSkip(any_nonfinite(grads))
        states = self._step_buckets(buckets, grads, planned, skip)
        self._pending_skip = DecidedSkip(skip, states, self.steps_taken + 1)
        if self._next_plan_depends_on_this_step(states):
            self._settle_skip()
        return self._finish_step(loss)

    def _next_plan_depends_on_this_step(self, states: list[dict[str, Any]]) -> bool:
        """Whether the next step's plan would differ if this step were skipped (1-bit Adam's freeze step)."""
        ahead = self.planned_step()
        for state in states:
            state[STEP] -= 1
        try:
            behind = self.planned_step()
        finally:
            for state in states:
                state[STEP] += 1
        return ahead != behind

    #: ``nonfinite_grads="error"``: the error of a step decided on the device, read but not yet raised.
    _nonfinite_error: str | None = None

    def synchronize(self) -> None:
        """Read the outcome of the last step where it was decided on the device: on a skip, put its step
        counts back and count it in ``skipped_steps`` (``nonfinite_grads="skip"``), or raise
        ``FloatingPointError`` (``"error"``); call it on every rank alike. Waits for that step's device work
        only, not for work queued after it. ``step()`` calls it first, so every rank raises there, at the
        call after the step; ``state_dict()``, ``completed_steps()`` and ``checkpoint.save_rank_state`` read
        the outcome (the counters) without raising, as a rank may call them alone (saving on rank 0)."""
        if self.__dict__.get("_buckets_in_step") is not None:
            return
        self._settle_skip()
        error, self._nonfinite_error = self._nonfinite_error, None
        if error is not None:
            raise FloatingPointError(error)

    def _settle_skip(self) -> None:
        """Read the pending outcome and put the counters right; an error waits for ``synchronize`` to raise it."""
        pending, self._pending_skip = self._pending_skip, None
        if pending is None:
            return
        anywhere, mine = pending.read()
        if not anywhere:
            return
        for state in pending.states:
            state[STEP] -= 1
        self.steps_taken -= 1
        here = "including this one" if mine else "not this one"
        if self.nonfinite_grads == "skip":
            self.skipped_steps += 1
            logger.warning("Non-finite gradient on some rank (%s) at step %d: skipped on every rank.", here, pending.step)
            return
        self._nonfinite_error = (
            f"Non-finite gradient (NaN or inf) on some rank ({here}) at step {pending.step}, read after it ran (its "
            "skip was decided on the device). No parameter, moment or weight decay changed on any rank and step "
            "counts were put back; the ranks with finite gradients advanced their compression state (the others "
            "sent zero corrections). Use fp16 loss scaling, lower the lr, or set nonfinite_grads='skip' to skip such "
            "steps on every rank."
        )

    # --- the communication schedule --------------------------------------------------------
    #: True if this optimizer lets a framework's exact gradient average stand in for its own on
    #: ``EXACT`` steps (1-bit Adam's warm-up); set ``engine_averages_exact_steps`` to use that.
    ENGINE_MAY_AVERAGE_EXACT_STEPS = False

    def completed_steps(self) -> int:
        """Steps applied so far (skipped steps excluded): the ``step`` count of the bucket states.

        Reads without creating state: asked before a framework swaps the parameters for its own
        copies (DeepSpeed's fp16 wrapper), an empty entry would be left under a parameter the
        optimizer no longer has, and ``state_dict()`` would fail on it. Outside ``step()`` it reads the
        last step's outcome first (as ``synchronize``, without raising)."""
        if self.__dict__.get("_buckets_in_step") is None:
            self._settle_skip()
        return max((self.state.get(b.params[0], {}).get(STEP, 0) for b in self.buckets()), default=0)

    def planned_step(self) -> StepKind:
        """The kind of the next step (``schedule.StepKind``); agreed by every rank before it runs."""
        return StepKind.EXACT if self.exchange_name == "none" else StepKind.COMPRESSED

    def engine_allreduces(self) -> bool:
        """Whether a framework (DeepSpeed's engine) must average the gradients for the next step."""
        return (
            self.ENGINE_MAY_AVERAGE_EXACT_STEPS
            and self.engine_averages_exact_steps
            and self.planned_step() == StepKind.EXACT
        )

    def notify_next_step(self) -> None:
        """Tell the framework (``on_next_step``) what the next step needs: after each step and after a load."""
        if self.on_next_step is not None:
            self.on_next_step(self)

    # --- safety -------------------------------------------------------------------------
    def _check_layout_unchanged(self, buckets: list[Bucket], grads: list[torch.Tensor]) -> None:
        """Refuse a step after a parameter gained or lost ``requires_grad`` (the flat buffers are fixed)."""
        layout = [(b.key, tuple(id(p) for p in b.params)) for b in buckets]
        known = self._bucket_layout if self._bucket_layout is not None else layout
        self._bucket_layout = known
        built = [
            self.bucket_state(b)[self.FLAT_STATE_KEY].numel() if self.FLAT_STATE_KEY in self.bucket_state(b) else g.numel()
            for b, g in zip(buckets, grads)
        ]
        if known == layout and built == [g.numel() for g in grads]:
            return
        names = {
            id(p): self.param_name(gi, pi, p) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])
        }
        now = {i for _, ids in layout for i in ids}
        before = {i for _, ids in known for i in ids}
        gained = [names.get(i, "?") for _, ids in layout for i in ids if i not in before]
        lost = [names.get(i, "?") for _, ids in known for i in ids if i not in now]
        raise ValueError(
            "The trainable parameters changed since the flat buffers were built (bucket sizes "
            f"{built}, now {[g.numel() for g in grads]}; gained requires_grad: {gained or 'none'}; "
            f"lost: {lost or 'none'}). Compressed optimizers fix the layout of their communication buckets "
            "(all groups' parameters of one dtype and device) at the first step. "
            "Keep requires_grad fixed and hold parameters still with a param group of lr=0 and weight_decay=0, "
            "or build a new optimizer (and DeepSpeed engine) after changing which parameters train."
        )

    def param_name(self, group_index: int, param_index: int, p: torch.Tensor) -> str:
        name = self.param_names.get(id(p))
        return repr(name) if name else f"param_groups[{group_index}]['params'][{param_index}] (shape {tuple(p.shape)})"

    def _gradients_usable(
        self,
        buckets: list[Bucket],
        grads: list[torch.Tensor],
        planned: StepKind,
        *,
        stale: bool = False,
        agreement: dict | None = None,
    ) -> bool:
        """False (on every rank alike) to skip this step; raises (on every rank alike) for policy 'error'
        or when the ranks planned different kinds of step. ``stale`` / ``agreement``: ``agree_on_step``'s."""
        bad_ranks = agree_on_step(self.transport, grads, planned, self.comm_stats, stale=stale, agreement=agreement)
        if not bad_ranks:
            return True
        if self.nonfinite_grads == "skip":
            self.skipped_steps += 1
            logger.warning("Non-finite gradient on rank(s) %s: step skipped on every rank.", bad_ranks)
            return False
        where = ""
        for index, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.requires_grad and p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    where = f" (on this rank first in {self.param_name(index, pi, p)})"
                    break
            if where:
                break
        raise FloatingPointError(
            f"Non-finite gradient (NaN or inf) on rank(s) {bad_ranks}{where}. No parameter or optimizer state was "
            f"changed on any rank. Use fp16 loss scaling, lower the lr, or set nonfinite_grads='skip' to skip such "
            "steps on every rank."
        )

    #: True where each rank keeps its own parameters between synchronisations (LIEC-SGD's local
    #: models): checkpoints then save every rank's own (``checkpoint.save_rank_state``), and the
    #: consistency check compares them only when ``parameters_identical_now()``.
    PARAMETERS_PER_RANK = False

    def parameters_identical_now(self) -> bool:
        """Whether every rank holds the same parameters at this point (always, unless ``PARAMETERS_PER_RANK``)."""
        return not self.PARAMETERS_PER_RANK

    def check_ranks_agree(self) -> None:
        """Raise on every rank if parameters (where they must agree now) or rank-identical state differ."""
        named: list[tuple[str, torch.Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            if self.parameters_identical_now():
                named += [(self.param_name(gi, pi, p), p) for pi, p in enumerate(group["params"]) if p.requires_grad]
        for bucket in self.buckets():
            state = self.bucket_state(bucket)
            named += [
                (f"optimizer state {key!r} of {bucket.describe()}", state[key])
                for key in keys_with_scope(self.state_specs(), RANK_IDENTICAL)
                if key in state
            ]
        check_ranks_agree(self.transport, named, self.completed_steps(), self.comm_stats)

    def reset_compression_state(self) -> None:
        """Restart every bucket's compression state (Markov states, error buffers) from zero, on this rank.

        Moments and step counts are kept. Call it on every rank alike (e.g. after resuming on
        another world size); the next step then starts the compression sequences afresh.
        """
        self._rank_state_pending = False
        for bucket in self.buckets():
            state = self.bucket_state(bucket)
            if self.FLAT_STATE_KEY not in state:
                continue
            zeros = torch.zeros_like(state[self.FLAT_STATE_KEY])
            for key in self.exchange_state_keys():
                state.pop(key, None)
            self._exchange_for(bucket.index, zeros.numel()).init_state(state, zeros)

    @abstractmethod
    def init_bucket_state(self, bucket: Bucket, state: dict[str, Any], zeros: torch.Tensor) -> None:
        """Create the bucket's flat buffers in ``state`` (``zeros`` has the buffer's size and dtype)."""

    @abstractmethod
    def bucket_step(
        self,
        bucket: Bucket,
        params: list[torch.Tensor],
        state: dict[str, Any],
        grad: torch.Tensor,
        kind: StepKind,
    ) -> None:
        """Exchange ``grad`` (this rank's flat gradient of the bucket) once, then update each segment
        with its group's hyperparameters; ``state[STEP]`` is already t; ``kind`` is the step every
        rank agreed to run.

        ``params`` are the tensors to update in place: the bucket's parameters, or for fp16/bf16
        parameters a one-element list holding their flat fp32 master copy (``segment_targets``
        gives a segment's part of either).
        """

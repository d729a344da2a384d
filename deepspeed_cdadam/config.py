"""The optimizers' settings: one frozen dataclass per optimizer, the one place they are declared.

Each field is an argument of the optimizer's constructor and a key of its DeepSpeed JSON
``optimizer.params``. Its default, its check (a small declarative ``Spec`` in the field's metadata:
type, range, allowed values) and its doc line live here and nowhere else:

* ``CDAdam(...)``, ``OneBitAdam(...)`` and ``EF21(...)`` build their config from their arguments
  (``CDAdamConfig.from_arguments(locals())``), which checks every one of them;
* the DeepSpeed integration accepts exactly ``json_keys(config_cls)`` (the fields, then the
  DeepSpeed-only keys of ``config_cls.DEEPSPEED_OPTIONS``) and builds the same dataclass from the
  JSON, so a bad JSON value raises the message the same bad keyword argument raises;
* a test checks that the constructors' parameters (but ``params``, ``transport`` and
  ``process_group``: objects, not settings) are exactly the fields, with the same defaults.

Messages name the key and what it must be; a choice names the allowed values and the closest
match: ``Unknown exchange='markow'. Allowed: markov, error_feedback, naive, none. Did you mean 'markov'?``
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .comm.transport import DEFAULT_TIMEOUT_S
from .comm.layout import PADDED_SCALE_BLOCKS, SCALE_BLOCKS as SCALE_BLOCK_CHOICES
from .compressors.base import Compressor
from .compressors.adaptive_topk import NestedTopK, check_ratios, ratios_must_be
from .compressors.binary import StochasticSign
from .compressors.count_sketch import CountSketch
from .compressors.registry import COMPRESSOR_NAMES, get_compressor
from .compressors.sign import WORKER_SCALE_SCOPES
from .exchange import EXCHANGES
from .hierarchical_exchange import HIERARCHIES
from .optim.safety import NONFINITE_POLICIES

#: Field metadata keys: the field's ``Spec``, and whether it is a parameter-group default.
SPEC = "spec"
PARAM_GROUP = "param_group"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decorate(text: str, none_means: str | None, note: str | None) -> str:
    if note:
        text += f" ({note})"
    if none_means:
        text = f"None ({none_means}) or {text}"
    return text


# --- specs: what a value must be --------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """A field's doc line and check. This base accepts any value (checked where it is used)."""

    doc: str

    def must_be(self) -> str:
        """What a value must be, completing "Must be ..." ("" for this base: checked where it is used)."""
        return ""

    def check(self, name: str, value: object) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming ``name``, ``value`` and what it must be."""


@dataclass(frozen=True)
class Number(Spec):
    """An int or float (not a bool) within the given bounds; ``None`` too if ``none_means`` says what it means."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = False
    none_means: str | None = None
    note: str | None = None

    def range_text(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
        return ""

    def within(self, value: float) -> bool:
        """Inside the bounds (NaN never is, unless there are none)."""
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def must_be(self) -> str:
        text = f"a {'finite ' if self.finite else ''}number"
        bounds = self.range_text()
        return _decorate(f"{text} {bounds}" if bounds else text, self.none_means, self.note)

    def check(self, name: str, value: object) -> None:
        if value is None and self.none_means is not None:
            return
        if (
            not _is_number(value)
            or (self.finite and not math.isfinite(value))  # type: ignore[arg-type]
            or not self.within(value)  # type: ignore[arg-type]
        ):
            raise ValueError(f"Invalid {name}={value!r}. Must be {self.must_be()}.")


@dataclass(frozen=True)
class Int(Spec):
    """An int (not a bool), at least ``ge`` if given (else a wrong type is a ``TypeError``)."""

    ge: int | None = None
    none_means: str | None = None
    note: str | None = None

    def must_be(self) -> str:
        return _decorate("an int" + (f" >= {self.ge}" if self.ge is not None else ""), self.none_means, self.note)

    def check(self, name: str, value: object) -> None:
        if value is None and self.none_means is not None:
            return
        if not _is_int(value) or (self.ge is not None and value < self.ge):  # type: ignore[operator]
            error = ValueError if self.ge is not None else TypeError
            raise error(f"Invalid {name}={value!r}. Must be {self.must_be()}.")


@dataclass(frozen=True)
class Bool(Spec):
    """``True`` or ``False`` (anything else is a ``TypeError``); ``note`` says what each means."""

    note: str | None = None

    def must_be(self) -> str:
        return _decorate("a bool", None, self.note)

    def check(self, name: str, value: object) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {name}={value!r}. Must be {self.must_be()}.")


@dataclass(frozen=True)
class Choice(Spec):
    """One of ``values`` (or an instance of ``instance_of``); a wrong name gets the closest match."""

    values: tuple[str, ...] = ()
    instance_of: type | None = None
    #: First word of the message: "Unknown" for names of implementations, "Invalid" for settings.
    word: str = "Invalid"

    def must_be(self) -> str:
        extra = f", or a {self.instance_of.__name__} instance" if self.instance_of is not None else ""
        return f"one of {', '.join(self.values)}{extra}"

    def check(self, name: str, value: object) -> None:
        if self.instance_of is not None and isinstance(value, self.instance_of):
            return
        if isinstance(value, str) and value in self.values:
            return
        if self.instance_of is not None and not isinstance(value, str):
            raise TypeError(f"Invalid {name}={value!r}. Must be {self.must_be()}.")
        hint = difflib.get_close_matches(value, self.values, n=1) if isinstance(value, str) else []
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{self.word} {name}={value!r}. Allowed: {', '.join(self.values)}.{extra}")


@dataclass(frozen=True)
class Pair(Spec):
    """A tuple or list of two numbers, each within ``element``'s bounds."""

    element: Number = Number("")
    element_name: str = "element"

    def must_be(self) -> str:
        return f"a pair of numbers {self.element.range_text()}"

    def check(self, name: str, value: object) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
            raise ValueError(f"Invalid {name}={value!r}. Must be {self.must_be()}.")
        for i, v in enumerate(value):
            if not self.element.within(v):
                raise ValueError(
                    f"Invalid {self.element_name} at index {i}: {v!r}. Must be {self.element.range_text()}."
                )


@dataclass(frozen=True)
class Only(Spec):
    """Exactly ``value`` (same type): a key accepted for compatibility whose other values are refused."""

    value: object = None
    refusal: str = "is not supported"

    def must_be(self) -> str:
        return f"{self.value!r} only"

    def check(self, name: str, value: object) -> None:
        if type(value) is not type(self.value) or value != self.value:
            raise ValueError(f"{name}={value!r} {self.refusal}.")


def option(default: Any, spec: Spec, *, param_group: bool = False) -> Any:
    """A config field: its default, its ``Spec`` and (``param_group``) whether it is a parameter-group default."""
    return field(default=default, metadata={SPEC: spec, PARAM_GROUP: param_group})


def redefault(config_cls: type, name: str, default: Any) -> Any:
    """``config_cls``'s field ``name`` (spec, doc, role) with another default, for a subclass."""
    (base,) = (f for f in fields(config_cls) if f.name == name)
    return field(default=default, metadata=base.metadata)


def spec_of(config_cls: type, name: str) -> Spec:
    """The ``Spec`` of field ``name``."""
    (found,) = (f for f in fields(config_cls) if f.name == name)
    return found.metadata[SPEC]


def default_of(config_cls: type, name: str) -> Any:
    """The default of field ``name`` (a subclass's ``redefault`` included)."""
    (found,) = (f for f in fields(config_cls) if f.name == name)
    return found.default


def field_names(config_cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config_cls))


# --- the specs ----------------------------------------------------------------------------------
LR = Number("step size (Adam's alpha; EF21: SGD's)", ge=0.0, finite=True)
BETAS = Pair(
    "(beta1, beta2): decay rates of the moments",
    element=Number("", ge=0.0, lt=1.0),
    element_name="beta parameter",
)
EPS = Number("added to the denominator (CD-Adam: inside the square root; 1-bit Adam: outside)", gt=0.0)
WEIGHT_DECAY = Number(
    "weight decay (CD-Adam, EF21: decoupled as AdamW; 1-bit Adam: added to the update; LIEC-SGD: added to the "
    "gradient, as torch.optim.SGD)",
    ge=0.0,
)
COMPRESSOR = Choice("the compressor, by name (Python: or a Compressor)", COMPRESSOR_NAMES, Compressor, "Unknown")
BLOCK_SIZE = Int("coordinates per scale", ge=1, none_means="one block per shard")
TIMEOUT_S = Number("collective timeout of the default transport", gt=0, note="seconds")
SEED = Int("base of the shared per-step seeds (rand-k)")
NONFINITE_GRADS = Choice(
    "a NaN/inf gradient on any rank: 'error' raises on every rank, 'skip' skips the step on every rank",
    NONFINITE_POLICIES,
)
CONSISTENCY_CHECK_EVERY = Int(
    "every N steps, check that parameters and rank-identical state agree bit for bit on all ranks",
    ge=0,
    note="0: never",
)
WORKER_SCALE_SCOPE = Choice(
    "'block': a worker scale per block; 'tensor': one per worker buffer, or with scale_blocks 'tensor' / "
    "'tensor_padded' one per parameter tensor (upstream OnebitAdam); a setting of the scaled-sign compressor "
    "the optimizer builds (a Compressor instance carries its own: this key, unless left at its default, must agree)",
    WORKER_SCALE_SCOPES,
)
SCALE_BLOCKS = Choice(
    "how scale blocks are cut: 'fixed': blocks of block_size over each server shard of the whole bucket; "
    "'tensor': along parameter tensors, each tensor split across the servers and each piece one block "
    "(or cut into blocks of block_size); 'tensor_padded': as 'tensor' with each tensor zero-padded to a "
    "multiple of world_size * lcm(world_size, 8), padding counted in the scales (upstream OnebitAdam); "
    "'group_padded': as 'tensor_padded' with each param group's part of the bucket as one tensor (upstream "
    "under DeepSpeed's fused fp16 wrapper, which hands the optimizer one flat fp32 tensor per group)",
    SCALE_BLOCK_CHOICES,
)
AMSGRAD = Bool("AMSGrad's running max of v (True, the paper) or Adam's v (False)")
BIAS_CORRECTION = Bool(
    "Adam's bias correction of m and vhat (default off: the paper's update)",
    note="False: the paper, no correction; True: Adam's correction of m and vhat",
)
class GeneralExchanges:
    """The names in ``exchange.EXCHANGES`` (live: a scheme registered later counts) of the general
    schemes, those no optimizer owns (``Exchange.OWNER``)."""

    def __iter__(self):
        return (name for name, scheme in EXCHANGES.items() if not scheme.OWNER)

    def __contains__(self, name: object) -> bool:
        return name in EXCHANGES and not EXCHANGES[name].OWNER  # type: ignore[index]


@dataclass(frozen=True)
class ExchangeChoice(Choice):
    """A general exchange scheme; another optimizer's own scheme is refused naming that optimizer."""

    def check(self, name: str, value: object) -> None:
        scheme = EXCHANGES.get(value) if isinstance(value, str) else None
        if scheme is not None and scheme.OWNER:
            raise ValueError(
                f"Invalid {name}={value!r}: it is {scheme.OWNER}'s own scheme ({scheme.OWNER_NOTE}); use the "
                f"optimizer {scheme.OWNER}. Allowed: {', '.join(self.values)}."
            )
        super().check(name, value)


EXCHANGE = ExchangeChoice(
    "'markov' (CD-Adam) or a baseline: 'error_feedback', 'naive', 'none' (exact all-reduce)",
    GeneralExchanges(),  # type: ignore[arg-type]
    word="Unknown",
)
FREEZE_STEP = Int("exact-Adam warm-up steps before the variance freezes and the momentum is compressed", ge=0)
RATIO = Number(
    "kept fraction of each shard for 'topk' / 'randk'",
    gt=0.0,
    le=1.0,
    none_means="0.016 for topk and randk, the paper's",
)


# --- the dataclasses ----------------------------------------------------------------------------
C = TypeVar("C", bound="_Checked")


@dataclass(frozen=True, kw_only=True)
class _Checked:
    """Checks every field against its ``Spec`` on construction, then the fields together."""

    #: Prefix of the names in messages.
    KEY_PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata[SPEC].check(self.KEY_PREFIX + f.name, getattr(self, f.name))
        self._check_together()

    def _check_together(self) -> None:
        """Checks across fields (each field alone is already valid)."""

    @classmethod
    def from_arguments(cls: type[C], arguments: Mapping[str, Any]) -> C:
        """The config of a constructor call, ``from_arguments(locals())``: takes every field from ``arguments``."""
        return cls(**{name: arguments[name] for name in field_names(cls)})

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (of the optimizer's constructor)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class DeepSpeedOptions(_Checked):
    """``optimizer.params`` keys of the DeepSpeed integration that are not optimizer arguments."""

    KEY_PREFIX: ClassVar[str] = "optimizer.params."

    comm_backend_name: str = option(
        "torch",
        Spec(
            "'torch' (torch.distributed; upstream names such as 'nccl' mean the same) or 'mpi' (mpi4py); "
            "checked against the accelerator when the engine builds the optimizer"
        ),
    )
    cuda_aware: bool = option(False, Bool("CUDA-aware MPI: hand device tensors to MPI (comm_backend_name 'mpi')"))


@dataclass(frozen=True, kw_only=True)
class OneBitAdamDeepSpeedOptions(DeepSpeedOptions):
    """Also upstream OnebitAdam's keys, so that its configs load unchanged."""

    bias_correction: bool = option(
        True, Bool("upstream OnebitAdam's key: accepted and ignored (1-bit Adam applies no bias correction)")
    )
    eps_inside_sqrt: bool = option(
        False,
        Only(
            "upstream OnebitAdam's key: only false (eps is added outside the square root)",
            value=False,
            refusal=(
                "is not supported by OneBitAdam (upstream OnebitAdam ignored it); eps is added outside the square root"
            ),
        ),
    )


@dataclass(frozen=True, kw_only=True)
class CommonConfig(_Checked):
    """Settings every optimizer takes (defaults: CD-Adam's, and 1-bit Adam's block_size None)."""

    #: The DeepSpeed-only ``optimizer.params`` keys of this optimizer type.
    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = DeepSpeedOptions

    lr: float = option(1e-3, LR, param_group=True)
    weight_decay: float = option(0.0, WEIGHT_DECAY, param_group=True)
    compressor: str | Compressor = option("scaled_sign", COMPRESSOR)
    block_size: int | None = option(None, BLOCK_SIZE)
    scale_blocks: str = option("fixed", SCALE_BLOCKS)
    timeout_s: float = option(DEFAULT_TIMEOUT_S, TIMEOUT_S)
    seed: int = option(0, SEED)
    nonfinite_grads: str = option("error", NONFINITE_GRADS)
    consistency_check_every: int = option(0, CONSISTENCY_CHECK_EVERY)

    def param_group_defaults(self) -> dict[str, Any]:
        """The ``defaults`` of ``torch.optim.Optimizer``: the fields a parameter group may override."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata[PARAM_GROUP]}

    def build_compressor(self) -> Compressor:
        return get_compressor(self.compressor)


@dataclass(frozen=True, kw_only=True)
class AdamConfig(CommonConfig):
    """Settings of the Adam-type optimizers (CD-Adam, 1-bit Adam); betas become a tuple."""

    betas: tuple[float, float] = option((0.9, 0.999), BETAS, param_group=True)
    eps: float = option(1e-8, EPS, param_group=True)
    worker_scale_scope: str = option("block", WORKER_SCALE_SCOPE)

    def _check_together(self) -> None:
        super()._check_together()
        object.__setattr__(self, "betas", tuple(self.betas))  # JSON gives a list
        self.build_compressor()  # 'tensor' needs a scaled sign; an instance's own scope must agree

    def build_compressor(self) -> Compressor:
        """The compressor, with ``worker_scale_scope`` (a setting of the scaled-sign compressors,
        ``compressors.sign``). A ``Compressor`` instance carries its own scope: the keyword left at its
        default defers to it, any other value must agree with it."""
        scope: str | None = self.worker_scale_scope
        if isinstance(self.compressor, Compressor) and scope == default_of(type(self), "worker_scale_scope"):
            scope = None
        return get_compressor(self.compressor, worker_scale_scope=scope)


HIERARCHY = Choice(
    "'flat': one exchange over all ranks; 'node': exact average inside each node group (fp32 reduce-scatter and "
    "all-gather; Birder: its 1-bit signs), the compressed exchange across node groups only",
    HIERARCHIES,
)
RANKS_PER_NODE = Int(
    "ranks per node group with hierarchy 'node', ranks placed node by node (to emulate nodes on one machine)",
    ge=1,
    none_means="the launcher's LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed)",
)


@dataclass(frozen=True, kw_only=True)
class NodeHierarchyOptions(_Checked):
    """``hierarchy`` and ``ranks_per_node``, for the optimizers that run hierarchically (hierarchical_exchange)."""

    hierarchy: str = option("flat", HIERARCHY)
    ranks_per_node: int | None = option(None, RANKS_PER_NODE)

    def _check_together(self) -> None:
        super()._check_together()
        if self.hierarchy == "flat":
            if self.ranks_per_node is not None:
                raise ValueError(
                    f"Invalid ranks_per_node={self.ranks_per_node!r} with hierarchy='flat': node groups are used with "
                    "hierarchy='node' only. Set hierarchy='node', or drop ranks_per_node."
                )
            return
        # the node-level exchange shards each node's part into plain blocks, one worker scale per block
        if getattr(self, "scale_blocks", "fixed") != "fixed":
            raise ValueError(f"Invalid scale_blocks={self.scale_blocks!r} with hierarchy='node'. Allowed: fixed.")
        scope = self.build_compressor().worker_scale_scope  # type: ignore[attr-defined] - every user's config has it
        if scope != "block":
            raise ValueError(f"Invalid worker_scale_scope={scope!r} with hierarchy='node'. Allowed: block.")
        if getattr(self, "exchange", None) == "none":
            raise ValueError(
                "Invalid exchange='none' with hierarchy='node': the exact all-reduce has no compressed level. "
                "Use hierarchy='flat', or a compressed exchange."
            )


BUCKET_CAP_MB = Number(
    "largest communication bucket (its flat buffer, whole parameters, in order) in MB (2**20 bytes); a "
    "parameter larger than the cap is a bucket alone",
    gt=0,
    finite=True,
    none_means="one bucket per dtype and device (25 with overlap on, PyTorch DDP's default)",
)
OVERLAP = Bool(
    "start each bucket's exchange during backward, as soon as its gradients are ready (same result, bit for "
    "bit, as without; exchange 'markov', hierarchy 'flat', scale_blocks 'fixed', parameters on the CPU)"
)
#: ``bucket_cap_mb`` when ``overlap`` is on and the cap is not given (PyTorch DDP's ``bucket_cap_mb``).
OVERLAP_DEFAULT_BUCKET_CAP_MB = 25.0


@dataclass(frozen=True, kw_only=True)
class CDAdamConfig(NodeHierarchyOptions, AdamConfig):
    """``CDAdam``'s arguments (see its docstring for the defaults' measurements)."""

    betas: tuple[float, float] = redefault(AdamConfig, "betas", (0.9, 0.99))
    block_size: int | None = redefault(AdamConfig, "block_size", 256)
    amsgrad: bool = option(True, AMSGRAD, param_group=True)
    bias_correction: bool = option(False, BIAS_CORRECTION, param_group=True)
    exchange: str = option("markov", EXCHANGE)
    bucket_cap_mb: float | None = option(None, BUCKET_CAP_MB)
    overlap: bool = option(False, OVERLAP)

    def _check_together(self) -> None:
        super()._check_together()
        if not self.overlap:
            return
        needs = {"exchange": ("markov", self.exchange), "hierarchy": ("flat", self.hierarchy),
                 "scale_blocks": ("fixed", self.scale_blocks)}  # fmt: skip
        for key, (wanted, value) in needs.items():
            if value != wanted:
                raise ValueError(
                    f"{self.KEY_PREFIX}overlap=True needs {self.KEY_PREFIX}{key}={wanted!r} (got {value!r}): the "
                    "exchange started during backward is the Markov exchange over fixed blocks. Set overlap to false, "
                    f"or {key} to {wanted!r}."
                )
        if self.bucket_cap_mb is None:
            object.__setattr__(self, "bucket_cap_mb", OVERLAP_DEFAULT_BUCKET_CAP_MB)


@dataclass(frozen=True, kw_only=True)
class OneBitAdamConfig(NodeHierarchyOptions, AdamConfig):
    """``OneBitAdam``'s arguments (upstream OnebitAdam's defaults)."""

    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = OneBitAdamDeepSpeedOptions

    compressor: str | Compressor = redefault(AdamConfig, "compressor", "sign_l2")
    freeze_step: int = option(100000, FREEZE_STEP)


VAR_FREEZE_STEP = Int(
    "last step of the first phase (variance refreshed on an exponentially growing interval, 1-bit averaged "
    "gradients between refreshes); after it the variance is frozen and local steps with 1-bit syncs begin",
    ge=1,
)
VAR_UPDATE_SCALER = Int("kappa: variance refreshes at each interval length before the interval doubles", ge=1)
LOCAL_STEP_SCALER = Int(
    "steps of the second phase at each local-step interval length before the interval doubles", ge=1
)
LOCAL_STEP_CLIPPER = Int("H: the longest local-step interval (steps from one 1-bit sync to the next)", ge=1)


@dataclass(frozen=True, kw_only=True)
class ZeroOneAdamDeepSpeedOptions(DeepSpeedOptions):
    """Also upstream ZeroOneAdam's keys without effect, so that its configs load unchanged."""

    bias_correction: bool = option(
        True, Bool("upstream ZeroOneAdam's key: accepted and ignored (0/1 Adam applies no bias correction)")
    )
    eps_inside_sqrt: bool = option(
        False,
        Only(
            "upstream ZeroOneAdam's key: only false (eps is added outside the square root)",
            value=False,
            refusal=(
                "is not supported by ZeroOneAdam (upstream ZeroOneAdam ignored it); eps is added outside the "
                "square root"
            ),
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ZeroOneAdamConfig(AdamConfig):
    """``ZeroOneAdam``'s arguments: upstream ZeroOneAdam's defaults, and its compressed all-reduce's
    layout (each tensor padded, one worker scale per tensor)."""

    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = ZeroOneAdamDeepSpeedOptions

    compressor: str | Compressor = redefault(AdamConfig, "compressor", "sign_l2")
    scale_blocks: str = redefault(AdamConfig, "scale_blocks", "tensor_padded")
    worker_scale_scope: str = redefault(AdamConfig, "worker_scale_scope", "tensor")
    var_freeze_step: int = option(100000, VAR_FREEZE_STEP)
    var_update_scaler: int = option(16, VAR_UPDATE_SCALER)
    local_step_scaler: int = option(32678, LOCAL_STEP_SCALER)  # upstream's default (sic: not 32768)
    local_step_clipper: int = option(16, LOCAL_STEP_CLIPPER)


@dataclass(frozen=True, kw_only=True)
class OneBitLambDeepSpeedOptions(DeepSpeedOptions):
    """Also upstream OnebitLamb's keys without effect, so that its configs load unchanged."""

    bias_correction: bool = option(
        True, Bool("upstream OnebitLamb's key: accepted and ignored (1-bit LAMB applies no bias correction)")
    )
    eps_inside_sqrt: bool = option(
        False,
        Only(
            "upstream OnebitLamb's key: only false (eps is added outside the square root)",
            value=False,
            refusal=(
                "is not supported by OneBitLamb (upstream OnebitLamb ignored it); eps is added outside the square root"
            ),
        ),
    )


@dataclass(frozen=True, kw_only=True)
class OneBitLambConfig(AdamConfig):
    """``OneBitLamb``'s arguments (upstream OnebitLamb's defaults; its one fused 1-bit exchange by default)."""

    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = OneBitLambDeepSpeedOptions

    compressor: str | Compressor = redefault(AdamConfig, "compressor", "sign_l2")
    scale_blocks: str = option(
        "tensor_padded",
        Choice(
            "'tensor_padded': the whole bucket is one tensor zero-padded to a multiple of world_size * "
            "lcm(world_size, 8), one server scale per chunk (upstream's one fused momentum buffer); 'fixed': "
            "blocks of block_size over each server shard, no padding",
            ("tensor_padded", "fixed"),
        ),
    )
    worker_scale_scope: str = option(
        "tensor",
        Choice(
            "'tensor': one worker scale over the whole (padded) bucket, upstream's one fused buffer; 'block': one "
            "per block",
            WORKER_SCALE_SCOPES,
        ),
    )
    freeze_step: int = option(
        100000,
        Int(
            "LAMB warm-up steps (exact average, trust ratio) before the variance and the coefficient freeze "
            "and the momentum is compressed",
            ge=1,
            note="the frozen coefficient is the warm-up's running average of the trust ratio",
        ),
    )
    max_coeff: float = option(
        10.0, Number("upper clip of the warm-up trust ratio ||x|| / ||update|| per tensor", gt=0.0, finite=True),
        param_group=True,
    )  # fmt: skip
    min_coeff: float = option(
        0.01, Number("lower clip of the warm-up trust ratio per tensor", ge=0.0, finite=True), param_group=True
    )
    coeff_beta: float = option(
        0.9,
        Number(
            "decay rate of the running average of the trust ratio (the frozen coefficient; upstream advises "
            "1 / (1 - coeff_beta) <= freeze_step)",
            ge=0.0,
            lt=1.0,
        ),
    )
    factor_max: float = option(
        4.0, Number("upper clip of the compressed phase's variance factor per tensor", ge=1.0, finite=True)
    )
    factor_min: float = option(
        0.5,
        Number(
            "lower clip of the compressed phase's variance factor per tensor", gt=0.0, le=1.0,
            note="the factor starts at 1.0",
        ),
    )  # fmt: skip
    factor_threshold: float = option(
        0.1, Number("largest relative change of the factor from one step to the next", ge=0.0, finite=True)
    )

    def _check_together(self) -> None:
        super()._check_together()
        check_lamb_coeff_range(self.min_coeff, self.max_coeff)


def check_lamb_coeff_range(min_coeff: float, max_coeff: float, where: str = "") -> None:
    """``min_coeff <= max_coeff`` (each already valid alone); ``where`` names a parameter group."""
    if min_coeff > max_coeff:
        raise ValueError(
            f"Invalid min_coeff={min_coeff!r} > max_coeff={max_coeff!r}{where}. Must be min_coeff <= max_coeff."
        )


@dataclass(frozen=True, kw_only=True)
class EF21Config(CommonConfig):
    """``EF21``'s arguments: SGD's lr, top-k with the paper's ratio."""

    #: The paper's K = 0.016 d: top-k's 64 bits per kept coordinate then cost about one bit per coordinate.
    DEFAULT_RATIO: ClassVar[float] = 0.016

    lr: float = redefault(CommonConfig, "lr", 0.01)
    compressor: str | Compressor = redefault(CommonConfig, "compressor", "topk")
    ratio: float | None = option(None, RATIO)

    @property
    def resolved_ratio(self) -> float | None:
        """``ratio``, or for a "topk" / "randk" name without one the paper's ``DEFAULT_RATIO``."""
        if self.ratio is None and self.compressor in ("topk", "randk"):
            return self.DEFAULT_RATIO
        return self.ratio

    def build_compressor(self) -> Compressor:
        if isinstance(self.compressor, Compressor):
            if self.ratio is not None:
                raise ValueError(
                    f"Invalid ratio={self.ratio!r} with a Compressor instance: the instance carries its own."
                )
            return self.compressor
        return get_compressor(self.compressor, ratio=self.resolved_ratio)  # a ratio for a sign compressor is an error

    def _check_together(self) -> None:
        super()._check_together()
        self.build_compressor()
        if self.scale_blocks in PADDED_SCALE_BLOCKS:  # its flat state (an exchange's) would be padded
            raise ValueError(f"Invalid scale_blocks={self.scale_blocks!r} for EF21. Allowed: fixed, tensor.")


MOMENTUM = Number(
    "SGD momentum of each worker's own model (torch.optim.SGD's, applied after the compensation; never averaged)",
    ge=0.0,
    lt=1.0,
)
AVERAGE_PERIOD = Int(
    "H: every H-th step averages the models and the gradients in full precision (the server error is added to "
    "the gradient and reset); the other steps send 1 bit per coordinate both ways",
    ge=1,
)
SCALE_BUCKET_SIZE = Int(
    "bytes of whole tensors per scale bucket, one scale each both ways (the authors' --bucket-size, grouped as "
    "torch._utils._take_tensors; 4 bytes per fp32 coordinate)",
    ge=1,
    none_means="one scale bucket per communication bucket",
)


@dataclass(frozen=True, kw_only=True)
class LIECSGDConfig(CommonConfig):
    """``LIECSGD``'s arguments: the defaults of the authors' code (lr 0.1, momentum 0, weight decay 5e-4,
    average period 100, 52428800-byte buckets)."""

    lr: float = redefault(CommonConfig, "lr", 0.1)
    weight_decay: float = redefault(CommonConfig, "weight_decay", 5e-4)
    momentum: float = option(0.0, MOMENTUM, param_group=True)
    average_period: int = option(100, AVERAGE_PERIOD)
    bucket_size: int | None = option(52428800, SCALE_BUCKET_SIZE)

    def _check_together(self) -> None:
        super()._check_together()
        if self.block_size is not None:
            raise ValueError(
                f"Invalid block_size={self.block_size!r} for LIECSGD. Must be None: its scales follow bucket_size "
                "(one scale per bucket of whole tensors, both ways)."
            )
        if self.scale_blocks != "fixed":
            raise ValueError(
                f"Invalid scale_blocks={self.scale_blocks!r} for LIECSGD. Allowed: fixed (its scale buckets are "
                "set by bucket_size)."
            )
        if self.build_compressor().worker_scale_scope != "block":
            raise ValueError(
                f"Invalid compressor={self.compressor!r} for LIECSGD: its worker_scale_scope must be 'block' (one "
                "scale per scale bucket, set by bucket_size)."
            )


BIRDER_LR = Number("step size eta: a coordinate moves by at most lr per step (plus weight decay)", ge=0.0, finite=True)
BIRDER_BETA = Number("beta: the one decay rate of both m (EMA of g) and b (EMA of |g|), so |m| <= b", ge=0.0, lt=1.0)
BIRDER_WEIGHT_DECAY = Number("weight decay, added to the update: x -= lr * (qbar + weight_decay * x)", ge=0.0)
BIRDER_AMSGRAD = Bool(
    "Algorithm 1's AMSGrad-style running max bhat = max(bhat, b) as the denominator of m / bhat (theory only: the "
    "authors do not run it in practice)"
)
BIRDER_SEED = Int("base of the per-rank, per-step seeds of the Bernoulli draws (reproducible from seed, step, bucket)")


@dataclass(frozen=True, kw_only=True)
class BirderConfig(NodeHierarchyOptions):
    """``Birder``'s arguments. No compressor, block or scale options: its messages are unscaled signs.

    Defaults are ours (the paper's hyperparameters were not retrieved, ../shared/SEED_SPECS.md section 1):
    lr 1e-3, Adam's (on BERT MLM, 2 ranks, 600 steps: test loss 6.52 at lr 1e-3, 6.55 at 4e-4, 6.67 at
    1e-4; Adam 6.55 at 4e-4), beta 0.9.
    """

    #: The DeepSpeed-only ``optimizer.params`` keys of this optimizer type.
    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = DeepSpeedOptions
    #: What ``CompressedOptimizer`` reads of every config; fixed for Birder (no scales).
    block_size: ClassVar[None] = None
    scale_blocks: ClassVar[str] = "fixed"

    lr: float = option(1e-3, BIRDER_LR, param_group=True)
    beta: float = option(0.9, BIRDER_BETA, param_group=True)
    weight_decay: float = option(0.0, BIRDER_WEIGHT_DECAY, param_group=True)
    amsgrad: bool = option(False, BIRDER_AMSGRAD, param_group=True)
    timeout_s: float = option(DEFAULT_TIMEOUT_S, TIMEOUT_S)
    seed: int = option(0, BIRDER_SEED)
    nonfinite_grads: str = option("error", NONFINITE_GRADS)
    consistency_check_every: int = option(0, CONSISTENCY_CHECK_EVERY)

    def param_group_defaults(self) -> dict[str, Any]:
        """The ``defaults`` of ``torch.optim.Optimizer``: the fields a parameter group may override."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata[PARAM_GROUP]}

    def build_compressor(self) -> StochasticSign:
        return StochasticSign()


@dataclass(frozen=True)
class LevelRatios(Spec):
    """AdaCGD's top-k levels: a list or tuple of ratios in (0, 1], strictly increasing (cheapest first)."""

    def must_be(self) -> str:
        return ratios_must_be()

    def check(self, name: str, value: object) -> None:
        check_ratios(value, name)


ADACGD_WEIGHT_DECAY = Number("decoupled weight decay, as EF21: x <- (1 - lr * weight_decay) x - lr * gtil", ge=0.0)
ADACGD_RATIOS = LevelRatios(
    "the top-k levels C_1 .. C_m, each the kept fraction of every server shard, cheapest first; the last is the "
    "finest, sent when no cheaper level (nor a skip) meets the acceptance rule"
)
ADACGD_ZETA = Number(
    "zeta, the acceptance threshold of both directions: skip if ||x - h||^2 <= zeta ||x - y||^2, else the cheapest "
    "level j < m with ||x - z_j||^2 <= zeta ||x - y||^2, else the finest (0: EF21 at the finest level)",
    ge=0.0,
    finite=True,
)


@dataclass(frozen=True, kw_only=True)
class AdaCGDConfig(_Checked):
    """``AdaCGD``'s arguments. No compressor, block or scale options: its levels are top-k (``ratios``).

    Defaults are ours (the paper's K-sets and zeta were not retrieved, ../shared/SEED_SPECS.md section 3):
    EF21's lr 0.01; levels 0.1%, 0.4% and 1.6% of each shard (the finest is EF21's paper ratio 0.016, each
    cheaper level a quarter of the next); zeta 1.
    """

    #: The DeepSpeed-only ``optimizer.params`` keys of this optimizer type.
    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = DeepSpeedOptions
    #: What ``CompressedOptimizer`` reads of every config; fixed for AdaCGD (top-k: no scales, no randomness).
    block_size: ClassVar[None] = None
    scale_blocks: ClassVar[str] = "fixed"
    seed: ClassVar[int] = 0

    lr: float = option(0.01, LR, param_group=True)
    weight_decay: float = option(0.0, ADACGD_WEIGHT_DECAY, param_group=True)
    ratios: tuple[float, ...] = option((0.001, 0.004, 0.016), ADACGD_RATIOS)
    zeta: float = option(1.0, ADACGD_ZETA)
    timeout_s: float = option(DEFAULT_TIMEOUT_S, TIMEOUT_S)
    nonfinite_grads: str = option("error", NONFINITE_GRADS)
    consistency_check_every: int = option(0, CONSISTENCY_CHECK_EVERY)

    def _check_together(self) -> None:
        super()._check_together()
        object.__setattr__(self, "ratios", check_ratios(self.ratios))  # JSON gives a list

    def param_group_defaults(self) -> dict[str, Any]:
        """The ``defaults`` of ``torch.optim.Optimizer``: the fields a parameter group may override."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata[PARAM_GROUP]}

    def build_compressor(self) -> NestedTopK:
        return NestedTopK(self.ratios)


SKETCH_EPS = Number(
    "v_0 = vhat_0 = eps, the floor of vhat: the update divides by sqrt(vhat), no eps is added there", gt=0.0
)
SKETCH_WEIGHT_DECAY = Number(
    "decoupled weight decay, as AdamW: x <- (1 - lr * weight_decay) x - lr * u / sqrt(vhat), on every coordinate",
    ge=0.0,
)
SKETCH_K = Int("k: coordinates sent per bucket and step, the top-k of the estimate (at most the bucket's size)", ge=1)
SKETCH_ROWS = Int(
    "r: rows of each bucket's count sketch", ge=1, none_means="ceil(log2 d) for a bucket of d coordinates"
)
SKETCH_COLUMNS = Int("c: columns of each bucket's count sketch", ge=1, none_means="16 k")
CANDIDATE_FACTOR = Int(
    "P, Sketched-SGD's p2: 0 for one round (u takes the sketch's estimates); P >= 1 for a second round that averages "
    "the workers' exact a_i on the P k coordinates of largest estimate and keeps the k largest of those",
    ge=0,
)
SKETCH_SEED = Int("base of the per-step seeds of the hash functions, the same on every rank (from seed, step, bucket)")


@dataclass(frozen=True, kw_only=True)
class SketchedAMSGradConfig(_Checked):
    """``SketchedAMSGrad``'s arguments. No compressor, block or scale options: its compressor is the count
    sketch that ``k``, ``sketch_rows`` and ``sketch_columns`` size.

    Defaults are ours (the paper's were not retrieved, ../shared/SEED_SPECS.md section 2): AMSGrad's lr,
    betas and eps; k 1000 per bucket (a constant, so the bytes grow as log d: the paper's O(k log d));
    r = ceil(log2 d) rows and c = 16 k columns (what recovers a top k: CountSketch); one round.
    """

    #: The DeepSpeed-only ``optimizer.params`` keys of this optimizer type.
    DEEPSPEED_OPTIONS: ClassVar[type[DeepSpeedOptions]] = DeepSpeedOptions
    #: What ``CompressedOptimizer`` reads of every config; fixed for SketchedAMSGrad (a sketch has no scales).
    block_size: ClassVar[None] = None
    scale_blocks: ClassVar[str] = "fixed"

    lr: float = option(1e-3, LR, param_group=True)
    betas: tuple[float, float] = option((0.9, 0.999), BETAS, param_group=True)
    eps: float = option(1e-8, SKETCH_EPS, param_group=True)
    weight_decay: float = option(0.0, SKETCH_WEIGHT_DECAY, param_group=True)
    k: int = option(1000, SKETCH_K)
    sketch_rows: int | None = option(None, SKETCH_ROWS)
    sketch_columns: int | None = option(None, SKETCH_COLUMNS)
    candidate_factor: int = option(0, CANDIDATE_FACTOR)
    timeout_s: float = option(DEFAULT_TIMEOUT_S, TIMEOUT_S)
    seed: int = option(0, SKETCH_SEED)
    nonfinite_grads: str = option("error", NONFINITE_GRADS)
    consistency_check_every: int = option(0, CONSISTENCY_CHECK_EVERY)

    def _check_together(self) -> None:
        super()._check_together()
        object.__setattr__(self, "betas", tuple(self.betas))  # JSON gives a list

    def param_group_defaults(self) -> dict[str, Any]:
        """The ``defaults`` of ``torch.optim.Optimizer``: the fields a parameter group may override."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata[PARAM_GROUP]}

    def build_compressor(self) -> CountSketch:
        return CountSketch(self.k, self.sketch_rows, self.sketch_columns)


def json_keys(config_cls: type[CommonConfig]) -> tuple[str, ...]:
    """The DeepSpeed ``optimizer.params`` keys of an optimizer type: its fields, then its DeepSpeed-only keys."""
    return field_names(config_cls) + field_names(config_cls.DEEPSPEED_OPTIONS)


def describe(config_cls: type[CommonConfig]) -> str:
    """One line per JSON key: default, doc, what it must be (generated documentation)."""
    lines = []
    for cls in (config_cls, config_cls.DEEPSPEED_OPTIONS):
        for f in fields(cls):
            spec: Spec = f.metadata[SPEC]
            must_be = spec.must_be()
            lines.append(f"{f.name} (default {f.default!r}): {spec.doc}." + (f" Must be {must_be}." if must_be else ""))
    return "\n".join(lines)

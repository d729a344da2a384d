"""DeepSpeed integration: ``"optimizer": {"type": "CDAdam" | "OneBitAdam" | "EF21", "params": {...}}``.

``register()`` (called by ``import deepspeed_cdadam`` if DeepSpeed is imported already, else by an
import hook once DeepSpeed's engine and pipeline-engine modules have loaded) wraps a few ``DeepSpeedEngine`` methods (``PATCHED_METHODS``)
so that an unmodified ``deepspeed.initialize`` builds our optimizers from the JSON config; every
other optimizer type goes to DeepSpeed as before. Registration is idempotent, and it never breaks
``import deepspeed``: it checks that every method it wraps exists (with the parameters it relies
on) and catches any failure; then it warns once, naming the DeepSpeed version and what is
missing, and leaves DeepSpeed unpatched. A DeepSpeed outside ``SUPPORTED_DEEPSPEED_VERSIONS``
(the releases CI tests) that passes those checks is registered, with one warning. This is the
only module that imports ``deepspeed``.

What the engine does differently with our optimizers, built from the JSON config or by the
client (``deepspeed.initialize(optimizer=CDAdam(...))``, or a callable returning one), alike:

* Its own gradient all-reduce is turned off while the optimizer communicates compressed: from
  the first step for CD-Adam and EF21; after ``freeze_step`` for 1-bit Adam (during the warm-up
  the engine averages the gradients and our 1-bit Adam uses them as they are, as upstream does);
  for 0/1 Adam it is on for exactly its variance-refresh steps (``EXACT`` in its schedule), as upstream's is.
* ZeRO (any stage >= 1) and MoE models are refused at initialize: the optimizer needs whole
  gradients, and it averages every gradient over the whole data-parallel group (an expert's
  gradient must be averaged over its expert-data-parallel group only).
* The optimizer communicates over the engine's data-parallel group (the mpu's, else the
  engine's); a client optimizer built with a transport for another group is refused.
* fp16 / bf16 (without ZeRO): always DeepSpeed's unfused wrapper ``FP16_UnfusedOptimizer``
  (``_configure_fp16_optimizer``). DeepSpeed 0.19.6 picks its flattening ``FP16_Optimizer`` for
  the type name "OneBitAdam" (the name of its own, since deleted, 1-bit Adam) and the unfused one
  for any other name; 0.19.7+ picks the unfused one for every non-fused optimizer. Pinning the
  unfused one gives every DeepSpeed release, and all three of our types, the same wrapper: fp32
  master copies per parameter (not one flat tensor), the same loss-scale defaults and the same
  checkpoint layout. Our optimizers flatten their gradients themselves, so flattening would gain
  nothing. Its zero-gradient set-up call to ``step()`` is not counted as a step.
* fp16 overflow: the wrapper checks its local gradients and skips the step if it overflowed.
  Every rank must skip alike, or the ranks' collectives pair up across different steps. We do not
  rely on DeepSpeed for that (its ``CheckOverflow.has_overflow`` all-reduces the flag only in a
  branch kept for its deleted 1-bit optimizers): the wrapper's overflow check is wrapped so that
  its result is OR-ed over the optimizer's own transport (one 4-byte all-reduce per step,
  counted as control bytes; redundant while that branch exists, needed once it is gone).
* Bytes: after every optimizer step the bytes this rank's optimizer sent and received in that
  step go to DeepSpeed's monitor (TensorBoard / CSV / W&B / Comet, whatever the config enables)
  as ``Train/Samples/optimizer_bytes_sent``, ``..._received`` and ``..._sent_total``, at
  ``global_samples`` like the engine's own events, written by rank 0; every ``steps_per_print``
  steps a line on DeepSpeed's logger gives the mean per step since the last one, at INFO next to
  the engine's own ``step=..., skipped=...`` line (both shown with ``"log_level": "info"``,
  hidden at DeepSpeed's default WARNING). Received equals sent: every
  collective we use is symmetric (``comm.accounting``). The engine's own fp32 all-reduce (1-bit
  Adam's warm-up) is not included.
* Checkpoints: ``engine.save_checkpoint`` writes, before DeepSpeed's files, one file per rank
  with that rank's compression state, and ``load_checkpoint`` restores it (``checkpoint.py`` says
  what happens with missing, corrupted or mismatched files). With ``load_optimizer_states=False``
  or ``load_module_only=True`` (a warm start) nothing of ours is read: the optimizer state stays
  as it was (fresh, for a new engine) and the fp16/bf16 wrapper's fp32 master weights are
  refreshed from the loaded model weights; every rank must pass the same arguments.
* Models that differ between ranks (LIEC-SGD between its averages; ``PARAMETERS_PER_RANK``): the
  engine's all-reduce stays off (the optimizer averages the models itself every H steps), DeepSpeed
  saves rank 0's model, and each rank's file also holds its own parameters, which ``load_checkpoint``
  puts back into the optimizer and the model (under the fp16/bf16 wrapper: its fp32 copies, then the
  model rounded from them), so every rank resumes its own model bit for bit. Module buffers
  (BatchNorm statistics) are not the optimizer's: DeepSpeed keeps rank 0's.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
import warnings
from typing import Any

import torch

from ..checkpoint import load_rank_state, save_rank_state
from ..comm.accounting import all_reduce_bytes_sent
from ..comm.mpi import MpiTransport
from ..comm.transport import TorchDistributedTransport, Transport, control_device
from ..config import CommonConfig, field_names, json_keys
from ..optim.base import CompressedOptimizer
from ..optim.adacgd import AdaCGD
from ..optim.birder import Birder
from ..optim.cd_adam import CDAdam
from ..optim.ef21 import EF21
from ..optim.liec_sgd import LIECSGD
from ..optim.onebit_adam import OneBitAdam
from ..optim.onebit_lamb import OneBitLamb
from ..optim.sketched_amsgrad import SketchedAMSGrad
from ..optim.zero_one_adam import ZeroOneAdam

logger = logging.getLogger(__name__)

#: DeepSpeed releases the integration is tested with (first, last; CI runs both).
SUPPORTED_DEEPSPEED_VERSIONS = ("0.19.6", "0.19.8")

#: DeepSpeed ``optimizer.type`` (case-insensitive) -> our class.
OPTIMIZER_TYPES: dict[str, type[CompressedOptimizer]] = {
    "cdadam": CDAdam,
    "onebitadam": OneBitAdam,
    "onebitlamb": OneBitLamb,  # upstream OnebitLamb's engine name
    "ef21": EF21,
    "liecsgd": LIECSGD,  # "LIECSGD" in the JSON (types are matched lower-cased)
    "birder": Birder,
    "adacgd": AdaCGD,  # "AdaCGD" in the JSON
    "zerooneadam": ZeroOneAdam,  # upstream ZeroOneAdam's engine name
    "sketchedamsgrad": SketchedAMSGrad,  # "SketchedAMSGrad" in the JSON
}

#: DeepSpeed ``optimizer.type`` -> the config dataclass of its arguments (``deepspeed_cdadam.config``).
CONFIG_TYPES: dict[str, type[CommonConfig]] = {
    name: cls.CONFIG for name, cls in OPTIMIZER_TYPES.items()  # type: ignore[attr-defined]
}
#: JSON ``optimizer.params`` keys each type accepts, generated: its config's fields, then its DeepSpeed-only keys.
ALLOWED_KEYS: dict[str, tuple[str, ...]] = {name: json_keys(config) for name, config in CONFIG_TYPES.items()}
#: ``comm_backend_name`` values that mean "torch.distributed" (upstream names included).
TORCH_BACKEND_NAMES = ("torch", "nccl", "gloo", "compressed", "hccl", "ccl", "xccl", "mpi_torch")

#: What ``register()`` wraps: (class, method) in DeepSpeed's ``deepspeed_classes()``.
PATCHED_METHODS: tuple[tuple[str, str], ...] = (
    ("DeepSpeedEngine", "_is_supported_optimizer"),
    ("DeepSpeedEngine", "_configure_basic_optimizer"),
    ("DeepSpeedEngine", "_configure_optimizer"),
    ("DeepSpeedEngine", "_configure_fp16_optimizer"),
    ("DeepSpeedEngine", "_take_model_step"),
    ("DeepSpeedEngine", "save_checkpoint"),
    ("DeepSpeedEngine", "load_checkpoint"),
    ("PipelineEngine", "__init__"),
)
#: Parameters of wrapped methods the wrappers read: (class, method) -> names.
REQUIRED_PARAMETERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("DeepSpeedEngine", "load_checkpoint"): ("load_dir", "tag", "load_optimizer_states", "load_module_only"),
    ("DeepSpeedEngine", "save_checkpoint"): ("save_dir", "tag"),
    ("DeepSpeedEngine", "_configure_optimizer"): ("client_optimizer", "model_parameters"),
}
#: Engine methods the wrappers call (not wrapped).
REQUIRED_ENGINE_METHODS = ("optimizer_name", "optimizer_params", "zero_optimization", "steps_per_print")

_PATCH_MARK = "_deepspeed_cdadam_original"
_warned: set[str] = set()  # warnings already given (each once per process)
_mpi_timeout_logged = False
#: What the unfused fp16 wrapper is picked by: any optimizer name DeepSpeed does not special-case.
_UNFUSED_WRAPPER_NAME = "deepspeed_cdadam"


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _reject_unknown_keys(type_name: str, params: dict[str, Any]) -> None:
    allowed = ALLOWED_KEYS[type_name]
    for key in params:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(
                f"Unknown key optimizer.params.{key} for optimizer type {type_name!r}. "
                f"Allowed: {', '.join(allowed)}.{extra}"
            )


def _check_backend_name(name: object) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator_name = get_accelerator().communication_backend_name()
    if name == "mpi":
        return
    if not isinstance(name, str) or (name not in TORCH_BACKEND_NAMES and name != accelerator_name):
        raise ValueError(
            f"Invalid optimizer.params.comm_backend_name={name!r}. Allowed: "
            f"{', '.join(TORCH_BACKEND_NAMES)} (all use torch.distributed), {accelerator_name!r}, or 'mpi' (mpi4py)."
        )


def check_engine_supported(engine: Any, type_name: str) -> None:
    """Refuse what our optimizers cannot do inside DeepSpeed: ZeRO, MoE (JSON and client optimizers)."""
    if engine.zero_optimization():
        raise ValueError(
            f"Optimizer type {type_name!r} does not support ZeRO (zero_optimization.stage="
            f"{engine.zero_optimization_stage()}): it compresses whole gradients. Set zero_optimization.stage to 0."
        )
    if getattr(engine, "has_moe_layers", False):
        raise ValueError(
            f"Optimizer type {type_name!r} does not support MoE models (the model has deepspeed.moe layers): it "
            "averages every gradient over the whole data-parallel group, while an expert's gradient must be averaged "
            "over its expert-data-parallel group only. Use a DeepSpeed optimizer for MoE models "
            '("optimizer": {"type": "Adam", ...}), or a model without MoE layers.'
        )


def _data_parallel_group(engine: Any) -> Any:
    return engine.mpu.get_data_parallel_group() if engine.mpu is not None else engine.seq_data_parallel_group


def build_optimizer(engine: Any, type_name: str, model_parameters: Any) -> CompressedOptimizer:
    """Build our optimizer for ``engine`` from its JSON ``optimizer.params``.

    ``comm_backend_name: "mpi"`` communicates over ``MPI.COMM_WORLD`` with mpi4py. MPI has no
    per-operation timeout: ``timeout_s`` is not enforced there (a rank that dies makes ``mpiexec``
    end the job; a rank that stalls stalls the others); an info line says so once.
    """
    params = dict(engine.optimizer_params() or {})
    _reject_unknown_keys(type_name, params)
    check_engine_supported(engine, engine.optimizer_name())
    config_cls = CONFIG_TYPES[type_name]
    deepspeed_keys = field_names(config_cls.DEEPSPEED_OPTIONS)
    options = config_cls.DEEPSPEED_OPTIONS(**{key: params.pop(key) for key in deepspeed_keys if key in params})
    _check_backend_name(options.comm_backend_name)
    # the optimizer's own keys: checked by the dataclass its constructor builds, with the same messages
    config = config_cls(**params)
    timeout_given, timeout_s = "timeout_s" in params, config.timeout_s
    if options.comm_backend_name == "mpi":
        if engine.mpu is not None:
            raise ValueError(
                "comm_backend_name='mpi' uses MPI.COMM_WORLD; with an mpu (model parallelism) use 'torch'."
            )
        transport: Transport = MpiTransport(cuda_aware=options.cuda_aware)
        global _mpi_timeout_logged
        if timeout_given and not _mpi_timeout_logged:
            _mpi_timeout_logged = True
            logger.info(
                "optimizer.params.timeout_s=%s is not enforced with comm_backend_name='mpi': MPI has no per-operation "
                "timeout (a rank that dies makes mpiexec end the job). Use comm_backend_name 'torch' for timeouts.",
                timeout_s,
            )
    else:
        transport = TorchDistributedTransport(_data_parallel_group(engine), timeout_s)
    optimizer = OPTIMIZER_TYPES[type_name](model_parameters, transport=transport, **config.kwargs())
    configure_engine_for(engine, optimizer)
    return optimizer


def _group_ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def adopt_client_optimizer(engine: Any, optimizer: CompressedOptimizer) -> None:
    """Set ``engine`` and a client-built ``optimizer`` up as the JSON path does (see the module doc)."""
    import torch.distributed as dist

    name = type(optimizer).__name__
    check_engine_supported(engine, name)
    group = _data_parallel_group(engine)
    wanted = _group_ranks(group)
    transport = optimizer._transport
    if transport is None:  # not used yet: built on the group it was given (default: the world)
        have = _group_ranks(optimizer._process_group)
        if have == wanted:
            optimizer._transport = TorchDistributedTransport(group, optimizer._timeout_s)
    elif isinstance(transport, TorchDistributedTransport):
        have = _group_ranks(transport.process_group)
    else:  # MPI, in-process or a custom transport: its size and this rank's place in it must match
        me = wanted.index(dist.get_rank()) if dist.get_rank() in wanted else -1
        same = transport.world_size == len(wanted) and transport.rank == me
        if isinstance(transport, MpiTransport) and engine.mpu is not None:
            same = False  # MPI.COMM_WORLD is not a data-parallel group under model parallelism
        what = f"{transport.world_size} ranks of {type(transport).__name__}, this rank {transport.rank}"
        have = wanted if same else [what]
    if have != wanted:
        raise ValueError(
            f"The client optimizer {name} was built with a transport for another group (ranks {have}) than the "
            f"engine's data-parallel group (ranks {wanted}): it would average gradients over the wrong ranks. Build it "
            "without transport= and process_group= (it then uses the engine's data-parallel group), with "
            "process_group=mpu.get_data_parallel_group(), or give it in the config instead: "
            f'"optimizer": {{"type": "{name}", "params": {{...}}}}.'
        )
    configure_engine_for(engine, optimizer)


def configure_engine_for(engine: Any, optimizer: CompressedOptimizer) -> None:
    """Names for messages, the engine's all-reduce per phase, steps ignored until the wrappers exist."""
    optimizer.param_names = {id(p): name for name, p in engine.module.named_parameters()}
    optimizer.ignore_steps = True  # the fp16/bf16 wrapper's zero-gradient set-up step; undone in _configure_optimizer
    # DeepSpeed saves rank 0's optimizer state_dict and loads it on every rank; our per-rank files
    # then restore each rank's own compression state (load_checkpoint below)
    optimizer.accept_foreign_rank_state = True
    # the engine averages the gradients on the steps the optimizer lets it (1-bit Adam's warm-up)
    optimizer.engine_averages_exact_steps = optimizer.ENGINE_MAY_AVERAGE_EXACT_STEPS
    optimizer.on_next_step = lambda opt: _set_engine_allreduce(engine, opt.engine_allreduces())
    sync_engine_allreduce(engine, optimizer)


def copy_rank_parameters_to_model(engine: Any, optimizer: CompressedOptimizer) -> None:
    """After ``load_rank_state`` gave the optimizer this rank's own parameters back (LIEC-SGD), give
    them to the model. Without a wrapper they are the model's. Under the fp16/bf16 wrapper they are
    its fp32 copies: each model parameter takes its copy rounded, as the wrapper's step does."""
    wrapper = engine.optimizer
    if wrapper is optimizer:
        return
    fp32_groups, model_groups = getattr(wrapper, "fp32_groups", None), getattr(wrapper, "fp16_groups", None)
    if fp32_groups is None or model_groups is None:
        raise RuntimeError(
            f"{type(optimizer).__name__} keeps each rank's own parameters, restored from its per-rank file into "
            f"the optimizer's; DeepSpeed's wrapper {type(wrapper).__name__} has no fp32_groups / fp16_groups to "
            "give them to the model through. Run without fp16/bf16, or with DeepSpeed's unfused fp16 wrapper."
        )
    for fp32_group, model_group in zip(fp32_groups, model_groups):
        for fp32_param, model_param in zip(fp32_group, model_group):
            model_param.data.copy_(fp32_param.data)


def sync_engine_allreduce(engine: Any, optimizer: CompressedOptimizer) -> None:
    """The engine's all-reduce on exactly when the optimizer's next step needs it (``engine_allreduces``)."""
    _set_engine_allreduce(engine, optimizer.engine_allreduces())


def _set_engine_allreduce(engine: Any, enabled: bool) -> None:
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = enabled
    engine.enable_backward_allreduce = enabled


def _our_optimizer(engine: Any) -> CompressedOptimizer | None:
    basic = getattr(engine, "basic_optimizer", None)
    return basic if isinstance(basic, CompressedOptimizer) else None


# --- fp16 overflow: agreed over our transport -----------------------------------------------------
def any_rank(optimizer: CompressedOptimizer, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank of the optimizer's transport."""
    tr = optimizer.transport
    votes = torch.tensor([1.0 if flag else 0.0], device=control_device(tr))
    votes = tr.all_reduce_sum(votes)
    stats = optimizer.comm_stats
    stats.bytes_control += all_reduce_bytes_sent(4, tr.world_size)
    stats.bytes_handed += 4
    stats.collective_calls += 1
    return bool(votes.item() > 0)


def agree_on_overflow(wrapper: Any, optimizer: CompressedOptimizer) -> None:
    """Make the fp16/bf16 wrapper's overflow checks answer alike on every rank (see the module doc)."""
    checker = getattr(wrapper, "overflow_checker", None)
    if checker is None or getattr(checker, _PATCH_MARK, False):
        return
    for method in ("has_overflow", "check_using_norm"):  # check() calls has_overflow
        local_check = getattr(checker, method, None)
        if local_check is None:
            continue

        def agreed(*args: Any, _local_check: Any = local_check, **kwargs: Any) -> bool:
            return any_rank(optimizer, bool(_local_check(*args, **kwargs)))

        setattr(checker, method, agreed)
    setattr(checker, _PATCH_MARK, True)


# --- bytes per step: DeepSpeed's monitor and progress lines ---------------------------------------
#: Engine attribute: [bytes sent after the last step, bytes sent at the last log line, its step].
_LAST_REPORT = "_deepspeed_cdadam_last_bytes"


def _reset_byte_report(engine: Any, optimizer: CompressedOptimizer) -> None:
    sent = optimizer.comm_stats.bytes_sent
    setattr(engine, _LAST_REPORT, [sent, sent, engine.global_steps])


def report_bytes(engine: Any, optimizer: CompressedOptimizer) -> None:
    """After an optimizer step: this rank's bytes of that step to the monitor; a line every steps_per_print."""
    sent_total = optimizer.comm_stats.bytes_sent
    last = getattr(engine, _LAST_REPORT, None)
    if last is None:
        last = [0.0, 0.0, 0]
        setattr(engine, _LAST_REPORT, last)
    sent = sent_total - last[0]
    received = sent  # every collective we use receives what it sends (comm.accounting)
    last[0] = sent_total
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        samples = engine.global_samples
        monitor.write_events(
            [
                ("Train/Samples/optimizer_bytes_sent", sent, samples),
                ("Train/Samples/optimizer_bytes_received", received, samples),
                ("Train/Samples/optimizer_bytes_sent_total", sent_total, samples),
            ]
        )
    every = engine.steps_per_print()
    if every and engine.global_steps % every == 0:
        from deepspeed.utils import log_dist

        steps = max(engine.global_steps - last[2], 1)
        mean = (sent_total - last[1]) / steps
        log_dist(
            f"step={engine.global_steps}, {type(optimizer).__name__} bytes sent per step={mean:.0f}, "
            f"received per step={mean:.0f} (this rank, mean of the last {steps} steps), bytes sent in all="
            f"{sent_total:.0f}",
            ranks=[0],
        )
        last[1], last[2] = sent_total, engine.global_steps


# --- registration -------------------------------------------------------------------------------
ENGINE_MODULE = "deepspeed.runtime.engine"
PIPE_MODULE = "deepspeed.runtime.pipe.engine"


def deepspeed_classes() -> dict[str, type]:
    """The DeepSpeed classes ``PATCHED_METHODS`` names."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return {"DeepSpeedEngine": DeepSpeedEngine, "PipelineEngine": PipelineEngine}


def _deepspeed_version(deepspeed: Any) -> str:
    version = getattr(deepspeed, "__version__", None)  # unset while `import deepspeed` is under way
    if version is None:
        from importlib.metadata import version as installed_version

        version = installed_version("deepspeed")
    return str(version)


def compatibility_problems(classes: dict[str, type]) -> list[str]:
    """What the given DeepSpeed classes lack of what ``register()`` wraps or calls (empty: all there)."""
    problems = []
    for cls_name, method in PATCHED_METHODS:
        cls = classes.get(cls_name)
        if cls is None:
            problems.append(f"{cls_name} (class)")
            continue
        function = cls.__dict__.get(method) if method == "__init__" else getattr(cls, method, None)
        if not callable(function):
            problems.append(f"{cls_name}.{method}")
            continue
        for parameter in REQUIRED_PARAMETERS.get((cls_name, method), ()):
            try:
                names = inspect.signature(function).parameters
            except (TypeError, ValueError):
                names = {}
            if parameter not in names:
                problems.append(f"{cls_name}.{method} has no parameter {parameter!r}")
    engine = classes.get("DeepSpeedEngine")
    for method in REQUIRED_ENGINE_METHODS:
        if engine is not None and not callable(getattr(engine, method, None)):
            problems.append(f"DeepSpeedEngine.{method}")
    return problems


def _version_key(version: str) -> tuple:
    from packaging.version import Version

    return Version(version).release


def version_is_tested(version: str) -> bool:
    """Whether ``version`` lies in ``SUPPORTED_DEEPSPEED_VERSIONS`` (inclusive)."""
    try:
        low, high = (_version_key(v) for v in SUPPORTED_DEEPSPEED_VERSIONS)
        return low <= _version_key(version) <= high
    except Exception:  # noqa: BLE001 - an unparsable version is not a tested one
        return False


def register() -> bool:
    """Make DeepSpeed build ``CDAdam`` / ``OneBitAdam`` / ``EF21`` from JSON configs. Idempotent.

    Returns whether DeepSpeed is patched. Never raises: if DeepSpeed lacks a method we wrap, or
    anything fails, one warning names the DeepSpeed version and the problem, and DeepSpeed is left
    importable and unpatched (the optimizer types are then unknown to it).

    Called by ``import deepspeed_cdadam``'s import hook right after ``ENGINE_MODULE`` and after
    ``PIPE_MODULE`` have loaded. DeepSpeed 0.19.7+ imports ``PIPE_MODULE`` first, which imports
    ``ENGINE_MODULE``: when the latter has loaded, ``PipelineEngine`` does not exist yet, and
    registration waits (returns False, no warning) until ``PIPE_MODULE`` has loaded.
    """
    version = "(unknown version)"
    tested = f"{SUPPORTED_DEEPSPEED_VERSIONS[0]} - {SUPPORTED_DEEPSPEED_VERSIONS[1]}"
    try:
        import deepspeed

        version = _deepspeed_version(deepspeed)
        engine_module = importlib.import_module(ENGINE_MODULE)
        if hasattr(getattr(engine_module, "DeepSpeedEngine", None), _PATCH_MARK):
            return True
        pipe_module = sys.modules.get(PIPE_MODULE)
        if pipe_module is not None and not hasattr(pipe_module, "PipelineEngine"):
            return False  # PIPE_MODULE is loading (it imported ENGINE_MODULE): called again once it has
        classes = deepspeed_classes()  # may import PIPE_MODULE, whose import hook registers first
        if hasattr(classes["DeepSpeedEngine"], _PATCH_MARK):
            return True
        problems = compatibility_problems(classes)
        if problems:
            _warn_once(
                "incompatible",
                f"deepspeed_cdadam: DeepSpeed {version} lacks {', '.join(problems)}, which the integration wraps "
                f"(tested with DeepSpeed {tested}). The optimizer types CDAdam, OneBitAdam and EF21 are not registered "
                "and DeepSpeed is left unpatched. Install a tested release (pip install "
                f"'deepspeed>={SUPPORTED_DEEPSPEED_VERSIONS[0]},<={SUPPORTED_DEEPSPEED_VERSIONS[1]}'), or use the "
                "optimizers without DeepSpeed (torch.distributed).",
            )
            return False
        if not version_is_tested(version):
            _warn_once(
                "version",
                f"deepspeed_cdadam is tested with DeepSpeed {tested}; this is DeepSpeed {version}. Every method it "
                "wraps exists, so CDAdam, OneBitAdam and EF21 are registered; if training misbehaves, install a tested "
                f"release (pip install 'deepspeed>={SUPPORTED_DEEPSPEED_VERSIONS[0]},"
                f"<={SUPPORTED_DEEPSPEED_VERSIONS[1]}').",
            )
        _patch(classes)
        return True
    except Exception as err:  # noqa: BLE001 - never break `import deepspeed`
        try:
            unregister()
        except Exception:  # noqa: BLE001
            pass
        _warn_once(
            "error",
            f"deepspeed_cdadam: registering with DeepSpeed {version} failed ({type(err).__name__}: {err}); tested with "
            f"DeepSpeed {tested}. The optimizer types CDAdam, OneBitAdam and EF21 are not registered and DeepSpeed is "
            "left unpatched.",
        )
        return False


def _patch(classes: dict[str, type]) -> None:
    DeepSpeedEngine, PipelineEngine = classes["DeepSpeedEngine"], classes["PipelineEngine"]
    originals = {(cls_name, method): getattr(classes[cls_name], method) for cls_name, method in PATCHED_METHODS}
    originals[("PipelineEngine", "__init__")] = PipelineEngine.__dict__["__init__"]
    # what each class itself defined (None: inherited), which unregister() puts back
    own = {(cls_name, method): classes[cls_name].__dict__.get(method) for cls_name, method in PATCHED_METHODS}
    original_supported = originals[("DeepSpeedEngine", "_is_supported_optimizer")]
    original_configure = originals[("DeepSpeedEngine", "_configure_basic_optimizer")]
    original_configure_wrappers = originals[("DeepSpeedEngine", "_configure_optimizer")]
    original_fp16 = originals[("DeepSpeedEngine", "_configure_fp16_optimizer")]
    original_take_step = originals[("DeepSpeedEngine", "_take_model_step")]
    original_save = originals[("DeepSpeedEngine", "save_checkpoint")]
    original_load = originals[("DeepSpeedEngine", "load_checkpoint")]
    original_pipeline_init = originals[("PipelineEngine", "__init__")]
    load_signature = inspect.signature(original_load)

    def _is_supported_optimizer(self: Any, optimizer_name: str) -> bool:
        return optimizer_name.lower() in OPTIMIZER_TYPES or original_supported(self, optimizer_name)

    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        name = (self.optimizer_name() or "").lower()
        if name in OPTIMIZER_TYPES:
            return build_optimizer(self, name, model_parameters)  # ignores steps until the wrappers exist
        return original_configure(self, model_parameters)

    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        adopted: list[CompressedOptimizer] = []

        def adopt(built: CompressedOptimizer) -> None:
            adopt_client_optimizer(self, built)
            adopted.append(built)

        if isinstance(client_optimizer, CompressedOptimizer):
            adopt(client_optimizer)
        elif callable(client_optimizer) and not isinstance(client_optimizer, torch.optim.Optimizer):
            build = client_optimizer

            def client_optimizer(params: Any) -> Any:  # the engine calls it with the model parameters
                built = build(params)
                if isinstance(built, CompressedOptimizer):
                    adopt(built)
                return built

        try:
            # The fp16/bf16 wrappers call basic_optimizer.step() once with zero gradients while they
            # are built; our optimizers ignore steps until the wrappers are done.
            result = original_configure_wrappers(self, client_optimizer, model_parameters)
        finally:
            optimizer = _our_optimizer(self)
            for ours in [*adopted, *([optimizer] if optimizer is not None else [])]:
                ours.ignore_steps = False
        if optimizer is not None:
            if self.optimizer is not optimizer:
                agree_on_overflow(self.optimizer, optimizer)
            _reset_byte_report(self, optimizer)
        return result

    def _configure_fp16_optimizer(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(optimizer, CompressedOptimizer):
            return original_fp16(self, optimizer, *args, **kwargs)
        # DeepSpeed picks its wrapper by optimizer name; a name it does not special-case gets the
        # unfused wrapper on every release (see the module doc).
        self.optimizer_name = lambda: _UNFUSED_WRAPPER_NAME
        try:
            return original_fp16(self, optimizer, *args, **kwargs)
        finally:
            del self.optimizer_name

    def _take_model_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_take_step(self, *args, **kwargs)
        optimizer = _our_optimizer(self)
        if optimizer is not None:
            report_bytes(self, optimizer)
        return result

    def save_checkpoint(self: Any, save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        if tag is None:
            tag = f"global_step{self.global_steps}"
        optimizer = _our_optimizer(self)
        if optimizer is not None:
            # Our files first: DeepSpeed writes 'latest' last, so a crash anywhere before it leaves
            # the previous checkpoint the one that loads.
            failure: Exception | None = None
            try:
                save_rank_state(optimizer, os.path.join(save_dir, str(tag)))
            except Exception as err:  # noqa: BLE001 - reported on every rank below, not on this one alone
                failure = err
            barrier = torch.zeros(1, device=control_device(optimizer.transport))
            barrier += failure is not None
            failed = int(optimizer.transport.all_reduce_sum(barrier).item())  # every rank's file is on disk
            if failed:
                raise RuntimeError(
                    f"Saving the per-rank compression state to {save_dir}/{tag} failed on {failed} rank(s)"
                    + (f"; here: {type(failure).__name__}: {failure}" if failure is not None else "")
                    + ". Nothing of this checkpoint was written by DeepSpeed; the previous one still loads."
                ) from failure
        return original_save(self, save_dir, tag, *args, **kwargs)

    def load_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = load_signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        restore = bool(call.arguments["load_optimizer_states"]) and not bool(call.arguments["load_module_only"])
        result = original_load(self, *args, **kwargs)
        optimizer = _our_optimizer(self)
        load_path = result[0] if isinstance(result, tuple) else None
        if optimizer is not None:
            # every rank enters the agreement, also one that found no checkpoint (then all must have none)
            restored = load_rank_state(optimizer, os.path.dirname(load_path) if load_path else None, restore=restore)
            if load_path is None:  # no rank found one: nothing was loaded
                return result
            if restored and optimizer.PARAMETERS_PER_RANK:  # this rank's own model, not rank 0's
                copy_rank_parameters_to_model(self, optimizer)
            if not restore and self.optimizer is not optimizer and hasattr(self.optimizer, "refresh_fp32_params"):
                # DeepSpeed loaded the model weights but (load_optimizer_states=False) not the
                # wrapper's fp32 master weights: the next step would write the old ones back.
                self.optimizer.refresh_fp32_params()
            sync_engine_allreduce(self, optimizer)
            _reset_byte_report(self, optimizer)
        return result

    def pipeline_init(self: Any, *args: Any, **kwargs: Any) -> None:
        # PipelineEngine.__init__ sets pipeline_enable_backward_allreduce = True after the base
        # engine built our optimizer: put the flag back to what the optimizer's phase wants.
        original_pipeline_init(self, *args, **kwargs)
        optimizer = _our_optimizer(self)
        if optimizer is not None:
            sync_engine_allreduce(self, optimizer)

    wrappers = {
        ("DeepSpeedEngine", "_is_supported_optimizer"): _is_supported_optimizer,
        ("DeepSpeedEngine", "_configure_basic_optimizer"): _configure_basic_optimizer,
        ("DeepSpeedEngine", "_configure_optimizer"): _configure_optimizer,
        ("DeepSpeedEngine", "_configure_fp16_optimizer"): _configure_fp16_optimizer,
        ("DeepSpeedEngine", "_take_model_step"): _take_model_step,
        ("DeepSpeedEngine", "save_checkpoint"): save_checkpoint,
        ("DeepSpeedEngine", "load_checkpoint"): load_checkpoint,
        ("PipelineEngine", "__init__"): pipeline_init,
    }
    assert set(wrappers) == set(PATCHED_METHODS), "every patched method has a wrapper"
    setattr(DeepSpeedEngine, _PATCH_MARK, (classes, own))  # first: unregister() can undo a partial patch
    for (cls_name, method), wrapper in wrappers.items():
        setattr(classes[cls_name], method, wrapper)


def unregister() -> None:
    """Undo ``register()`` (tests)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    patched = DeepSpeedEngine.__dict__.get(_PATCH_MARK)
    if patched is None:
        return
    classes, own = patched
    for (cls_name, method), original in own.items():
        cls = classes[cls_name]
        if original is not None:
            setattr(cls, method, original)
        elif method in cls.__dict__:
            delattr(cls, method)  # it was inherited
    delattr(DeepSpeedEngine, _PATCH_MARK)

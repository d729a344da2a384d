"""DeepSpeed integration: ``"optimizer": {"type": "CDAdam" | "OneBitAdam" | "EF21", "params": {...}}``.

``register()`` (called by ``import deepspeed_cdadam`` when deepspeed is installed) wraps
``DeepSpeedEngine._configure_basic_optimizer`` so that an unmodified ``deepspeed.initialize``
builds our optimizers from the JSON config; every other optimizer type goes to DeepSpeed as
before. Registration is idempotent. This is the only module that imports ``deepspeed``.

What the engine does differently with our optimizers:

* Its own gradient all-reduce is turned off while the optimizer communicates compressed: from
  the first step for CD-Adam; after ``freeze_step`` for 1-bit Adam (during the warm-up the
  engine averages the gradients and our 1-bit Adam uses them as they are, as upstream does).
* ZeRO (any stage >= 1) is refused at initialize: the optimizer needs whole gradients.
* Checkpoints: ``engine.save_checkpoint`` writes, before DeepSpeed's files, one file per rank
  with that rank's compression state, and ``load_checkpoint`` restores it (``checkpoint.py`` says
  what happens with missing, corrupted or mismatched files).
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch

from ..checkpoint import load_rank_state, save_rank_state
from ..comm.mpi import MpiTransport
from ..comm.transport import TorchDistributedTransport, Transport, control_device
from ..optim.base import CompressedOptimizer
from ..optim.cd_adam import CDAdam
from ..optim.ef21 import EF21
from ..optim.onebit_adam import OneBitAdam

#: DeepSpeed ``optimizer.type`` (case-insensitive) -> our class.
OPTIMIZER_TYPES: dict[str, type[CompressedOptimizer]] = {"cdadam": CDAdam, "onebitadam": OneBitAdam, "ef21": EF21}

_COMMON_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "compressor",
    "block_size",
    "comm_backend_name",
    "cuda_aware",
    "timeout_s",
    "seed",
    "worker_scale_scope",
    "nonfinite_grads",
    "consistency_check_every",
)
#: JSON ``optimizer.params`` keys each type accepts.
ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "cdadam": _COMMON_KEYS + ("amsgrad", "exchange"),
    "onebitadam": _COMMON_KEYS + ("freeze_step", "bias_correction", "eps_inside_sqrt"),
    "ef21": tuple(k for k in _COMMON_KEYS if k not in ("betas", "eps", "worker_scale_scope")) + ("ratio",),
}
#: ``comm_backend_name`` values that mean "torch.distributed" (upstream names included).
TORCH_BACKEND_NAMES = ("torch", "nccl", "gloo", "compressed", "hccl", "ccl", "xccl", "mpi_torch")

_PATCH_MARK = "_deepspeed_cdadam_original"


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


def build_optimizer(engine: Any, type_name: str, model_parameters: Any) -> CompressedOptimizer:
    """Build our optimizer for ``engine`` from its JSON ``optimizer.params``."""
    params = dict(engine.optimizer_params() or {})
    _reject_unknown_keys(type_name, params)
    if engine.zero_optimization():
        raise ValueError(
            f"Optimizer type {engine.optimizer_name()!r} does not support ZeRO (zero_optimization.stage="
            f"{engine.zero_optimization_stage()}): it compresses whole gradients. Set zero_optimization.stage to 0."
        )
    backend_name = params.pop("comm_backend_name", "torch")
    _check_backend_name(backend_name)
    cuda_aware = params.pop("cuda_aware", False)
    if not isinstance(cuda_aware, bool):
        raise TypeError(f"Invalid optimizer.params.cuda_aware={cuda_aware!r}. Must be a bool.")
    if params.pop("eps_inside_sqrt", False) is not False:
        raise ValueError(
            "optimizer.params.eps_inside_sqrt=True is not supported by OneBitAdam (upstream OnebitAdam ignored it); "
            "eps is added outside the square root."
        )
    bias_correction = params.pop("bias_correction", True)
    if not isinstance(bias_correction, bool):
        raise TypeError(f"Invalid optimizer.params.bias_correction={bias_correction!r}. Must be a bool.")
    if "betas" in params and isinstance(params["betas"], list):
        params["betas"] = tuple(params["betas"])

    timeout_s = params.pop("timeout_s", 300.0)
    if backend_name == "mpi":
        if engine.mpu is not None:
            raise ValueError(
                "comm_backend_name='mpi' uses MPI.COMM_WORLD; with an mpu (model parallelism) use 'torch'."
            )
        transport: Transport = MpiTransport(cuda_aware=cuda_aware)
    else:
        group = engine.mpu.get_data_parallel_group() if engine.mpu is not None else engine.seq_data_parallel_group
        transport = TorchDistributedTransport(group, timeout_s)  # validates timeout_s too
    # timeout_s also goes to the optimizer, which validates it (MPI itself has no per-call timeout)
    optimizer = OPTIMIZER_TYPES[type_name](model_parameters, transport=transport, timeout_s=timeout_s, **params)
    optimizer.param_names = {id(p): name for name, p in engine.module.named_parameters()}

    if isinstance(optimizer, OneBitAdam):
        optimizer.warmup_grads_are_averaged = True  # the engine all-reduces during the warm-up
        optimizer.on_phase_change = lambda compressed: _set_engine_allreduce(engine, not compressed)
        _set_engine_allreduce(engine, optimizer.freeze_step > 0)
    else:
        _set_engine_allreduce(engine, False)
    return optimizer


def _set_engine_allreduce(engine: Any, enabled: bool) -> None:
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = enabled
    engine.enable_backward_allreduce = enabled


def _our_optimizer(engine: Any) -> CompressedOptimizer | None:
    basic = getattr(engine, "basic_optimizer", None)
    return basic if isinstance(basic, CompressedOptimizer) else None


def register() -> None:
    """Make DeepSpeed build ``CDAdam`` / ``OneBitAdam`` / ``EF21`` from JSON configs. Idempotent."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    if hasattr(DeepSpeedEngine, _PATCH_MARK):
        return
    original_configure = DeepSpeedEngine._configure_basic_optimizer
    original_configure_wrappers = DeepSpeedEngine._configure_optimizer
    original_supported = DeepSpeedEngine._is_supported_optimizer
    original_save = DeepSpeedEngine.save_checkpoint
    original_load = DeepSpeedEngine.load_checkpoint

    def _is_supported_optimizer(self: Any, optimizer_name: str) -> bool:
        return optimizer_name.lower() in OPTIMIZER_TYPES or original_supported(self, optimizer_name)

    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        name = (self.optimizer_name() or "").lower()
        if name in OPTIMIZER_TYPES:
            optimizer = build_optimizer(self, name, model_parameters)
            optimizer.ignore_steps = True  # until _configure_optimizer has built the wrappers
            return optimizer
        return original_configure(self, model_parameters)

    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        # The fp16/bf16 wrappers call basic_optimizer.step() once with zero gradients while they
        # are built; our optimizers ignore steps until the wrappers are done.
        result = original_configure_wrappers(self, client_optimizer, model_parameters)
        optimizer = _our_optimizer(self)
        if optimizer is not None:
            optimizer.ignore_steps = False
        return result

    def save_checkpoint(self: Any, save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        if tag is None:
            tag = f"global_step{self.global_steps}"
        optimizer = _our_optimizer(self)
        if optimizer is not None:
            # Our files first: DeepSpeed writes 'latest' last, so a crash anywhere before it leaves
            # the previous checkpoint the one that loads.
            save_rank_state(optimizer, os.path.join(save_dir, str(tag)))
            barrier = torch.zeros(1, device=control_device(optimizer.transport))
            optimizer.transport.all_reduce_sum(barrier)  # every rank's file is on disk
        return original_save(self, save_dir, tag, *args, **kwargs)

    def load_checkpoint(self: Any, load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        result = original_load(self, load_dir, tag, *args, **kwargs)
        optimizer = _our_optimizer(self)
        load_path = result[0] if isinstance(result, tuple) else None
        if optimizer is not None and load_path is not None:
            load_rank_state(optimizer, os.path.dirname(load_path))
            if isinstance(optimizer, OneBitAdam):
                optimizer.notify_phase()
        return result

    from deepspeed.runtime.pipe.engine import PipelineEngine

    original_pipeline_init = PipelineEngine.__init__

    def pipeline_init(self: Any, *args: Any, **kwargs: Any) -> None:
        # PipelineEngine.__init__ sets pipeline_enable_backward_allreduce = True after the base
        # engine built our optimizer: put the flag back to what the optimizer's phase wants.
        original_pipeline_init(self, *args, **kwargs)
        optimizer = _our_optimizer(self)
        if isinstance(optimizer, OneBitAdam):
            optimizer.notify_phase()
        elif optimizer is not None:
            _set_engine_allreduce(self, False)

    PipelineEngine.__init__ = pipeline_init
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    DeepSpeedEngine.save_checkpoint = save_checkpoint
    DeepSpeedEngine.load_checkpoint = load_checkpoint
    setattr(
        DeepSpeedEngine,
        _PATCH_MARK,
        (original_configure, original_supported, original_configure_wrappers, original_save, original_load),
    )
    setattr(PipelineEngine, _PATCH_MARK, original_pipeline_init)


def unregister() -> None:
    """Undo ``register()`` (tests)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    originals = getattr(DeepSpeedEngine, _PATCH_MARK, None)
    if originals is None:
        return
    (
        DeepSpeedEngine._configure_basic_optimizer,
        DeepSpeedEngine._is_supported_optimizer,
        DeepSpeedEngine._configure_optimizer,
        DeepSpeedEngine.save_checkpoint,
        DeepSpeedEngine.load_checkpoint,
    ) = originals
    delattr(DeepSpeedEngine, _PATCH_MARK)
    from deepspeed.runtime.pipe.engine import PipelineEngine

    PipelineEngine.__init__ = getattr(PipelineEngine, _PATCH_MARK)
    delattr(PipelineEngine, _PATCH_MARK)

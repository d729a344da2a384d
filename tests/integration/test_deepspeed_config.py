"""deepspeed.initialize with bad optimizer configs fails early with the exact message (1 rank, gloo)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from deepspeed_cdadam import CDAdam
from deepspeed_cdadam.integration.deepspeed import register


@pytest.fixture(scope="module", autouse=True)
def one_rank_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _init(optimizer: dict, **extra):
    model = torch.nn.Linear(4, 3)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "optimizer": optimizer, **extra}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)


@pytest.mark.parametrize(
    "optimizer,extra,error,message",
    [
        (
            {"type": "CDAdam", "params": {"lr": 1e-3, "betaz": [0.9, 0.99]}},
            {},
            ValueError,
            (
                "Unknown key optimizer.params.betaz for optimizer type 'cdadam'. Allowed: lr, betas, eps, weight_decay, "
                "compressor, block_size, comm_backend_name, cuda_aware, timeout_s, seed, worker_scale_scope, "
                "nonfinite_grads, consistency_check_every, amsgrad, exchange. Did you mean 'betas'?"
            ),
        ),
        (
            {"type": "OneBitAdam", "params": {"amsgrad": True}},
            {},
            ValueError,
            "Unknown key optimizer.params.amsgrad for optimizer type 'onebitadam'.",
        ),
        (
            {"type": "CDAdam", "params": {"lr": "fast"}},
            {},
            ValueError,
            "Invalid lr='fast'. Must be a finite number >= 0.0.",
        ),
        (
            {"type": "CDAdam", "params": {"betas": [0.9, 1.5]}},
            {},
            ValueError,
            "Invalid beta parameter at index 1: 1.5. Must be in [0.0, 1.0).",
        ),
        (
            {"type": "OneBitAdam", "params": {"freeze_step": -2}},
            {},
            ValueError,
            "Invalid freeze_step=-2. Must be an int >= 0.",
        ),
        ({"type": "CDAdam", "params": {"timeout_s": -1}}, {}, ValueError, "Invalid timeout_s=-1. Must be a number > 0"),
        (
            {"type": "CDAdam", "params": {}},
            {"zero_optimization": {"stage": 1}},
            ValueError,
            (
                "Optimizer type 'CDAdam' does not support ZeRO (zero_optimization.stage=1): it compresses whole "
                "gradients. Set zero_optimization.stage to 0."
            ),
        ),
        (
            {"type": "CDAdam", "params": {"comm_backend_name": "tcp"}},
            {},
            ValueError,
            "Invalid optimizer.params.comm_backend_name='tcp'. Allowed: torch, nccl,",
        ),
        (
            {"type": "OneBitAdam", "params": {"eps_inside_sqrt": True}},
            {},
            ValueError,
            "optimizer.params.eps_inside_sqrt=True is not supported by OneBitAdam",
        ),
        (
            {"type": "CDAdam", "params": {"cuda_aware": "yes"}},
            {},
            TypeError,
            "Invalid optimizer.params.cuda_aware='yes'. Must be a bool.",
        ),
    ],
)
def test_bad_config_is_a_clear_error(optimizer, extra, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _init(optimizer, **extra)


def test_registration_is_idempotent_and_leaves_other_types_alone():
    register()
    register()
    engine, optimizer, _, _ = _init({"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}})
    assert isinstance(optimizer, torch.optim.Adam)
    assert engine.enable_backward_allreduce
    engine, optimizer, _, _ = _init({"type": "cdadam", "params": {"lr": 1e-3, "comm_backend_name": "gloo"}})
    assert isinstance(optimizer, CDAdam)
    assert not engine.enable_backward_allreduce


def test_lr_scheduler_drives_our_lr():
    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4}}
    engine, optimizer, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}}, scheduler=scheduler)
    lrs = []
    for _ in range(3):
        loss = engine(torch.ones(2, 4)).sum()
        engine.backward(loss)
        engine.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] < lrs[1] < lrs[2] <= 0.01


def test_bf16_with_gradient_accumulation_counts_only_real_steps():
    optimizer = {"type": "CDAdam", "params": {"lr": 0.01, "weight_decay": 0.1}}
    engine, opt, _, _ = _init(optimizer, bf16={"enabled": True}, gradient_accumulation_steps=2)
    assert isinstance(engine.basic_optimizer, CDAdam) and opt is not engine.basic_optimizer  # wrapped for bf16
    w0 = engine.module.weight.detach().clone()
    assert not engine.basic_optimizer.state  # the wrapper's zero-gradient set-up step was not taken
    for micro in range(4):
        loss = engine(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum()
        engine.backward(loss)
        engine.step()
        if micro == 0:
            assert torch.equal(engine.module.weight.detach(), w0)  # no step before the accumulation boundary
    (state,) = engine.basic_optimizer.state.values()
    assert state["step"] == engine.global_steps == 2
    assert engine.module.weight.dtype == torch.bfloat16 and not torch.equal(engine.module.weight.detach(), w0)


def test_gradient_clipping_applies_to_the_gradient_our_optimizer_compresses():
    engine, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}}, gradient_clipping=0.5)
    seen = []
    original = engine.basic_optimizer.flat_grad
    engine.basic_optimizer.flat_grad = lambda params: seen.append(original(params).norm().item()) or original(params)
    loss = 100.0 * engine(torch.ones(2, 4)).sum()
    engine.backward(loss)
    raw = torch.cat([p.grad.reshape(-1) for p in engine.module.parameters()]).norm().item()
    engine.step()
    assert raw > 1.0 and seen == [pytest.approx(0.5, rel=1e-5)]


def test_nan_loss_without_fp16_is_a_clear_error_naming_the_parameter():
    engine, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    loss = engine(torch.full((2, 4), float("nan"))).sum()
    engine.backward(loss)
    with pytest.raises(FloatingPointError, match=re.escape("on rank(s) [0] (on this rank first in 'weight')")):
        engine.step()


def _steps(engine, n):
    for _ in range(n):
        engine.backward(engine(torch.ones(2, 4)).sum())
        engine.step()


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import deepspeed_cdadam.checkpoint as ckpt

    engine, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    _steps(engine, 2)
    engine.save_checkpoint(str(tmp_path))
    _steps(engine, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint(str(tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "global_step2"
    fresh, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    path, _ = fresh.load_checkpoint(str(tmp_path))
    assert path is not None and "global_step2" in path
    (state,) = fresh.basic_optimizer.state.values()
    assert state["step"] == 2


def test_checkpoint_of_another_optimizer_is_a_clear_error(tmp_path):
    engine, _, _, _ = _init({"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}})
    _steps(engine, 1)
    engine.save_checkpoint(str(tmp_path))
    fresh, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    with pytest.raises(ValueError, match="was not written by CDAdam"):
        fresh.load_checkpoint(str(tmp_path))


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))
EXPECTED_OPTIMIZER = {
    "cdadam": "CDAdam",
    "onebitadam": "OneBitAdam",
    "ef21": "EF21",
    "amsgrad": "CDAdam",
    "adam": "AdamW",
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_committed_configs_build_and_step(path):
    """Every config in configs/ builds its optimizer in an unmodified deepspeed.initialize and takes a step."""
    config = json.loads(path.read_text())
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert type(engine.basic_optimizer).__name__ == EXPECTED_OPTIMIZER[path.stem.split("_")[1]]
    before = model.weight.detach().clone()
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    assert not torch.equal(before, model.weight.detach())


def test_ef21_unknown_key_names_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"Unknown key optimizer.params.betas for optimizer type 'ef21'\. Allowed: lr, "
    ):
        _init({"type": "EF21", "params": {"lr": 0.1, "betas": [0.9, 0.99]}})

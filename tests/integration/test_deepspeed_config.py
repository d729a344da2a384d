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

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam, Transport
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
                "Unknown key optimizer.params.betaz for optimizer type 'cdadam'. Allowed: lr, weight_decay, compressor, "
                "block_size, scale_blocks, timeout_s, seed, nonfinite_grads, consistency_check_every, betas, eps, "
                "worker_scale_scope, hierarchy, ranks_per_node, amsgrad, bias_correction, exchange, bucket_cap_mb, overlap, "
                "comm_backend_name, cuda_aware. "
                "Did you mean 'betas'?"
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
        (
            {"type": "LIECSGD", "params": {"average_priod": 32}},
            {},
            ValueError,
            "Unknown key optimizer.params.average_priod for optimizer type 'liecsgd'. Allowed: lr, weight_decay, ",
        ),
        (
            {"type": "LIECSGD", "params": {"average_period": 0}},
            {},
            ValueError,
            "Invalid average_period=0. Must be an int >= 1.",
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
    original = engine.basic_optimizer.bucket_grad
    engine.basic_optimizer.bucket_grad = lambda bucket: seen.append(original(bucket).norm().item()) or original(bucket)
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


@pytest.mark.parametrize("bf16", [False, True])
def test_overlap_in_the_engine_equals_plain_steps(bf16):
    """``overlap`` from the JSON: with the fp32 engine backward starts the buckets' exchanges (one per
    parameter here); under DeepSpeed's bf16 wrapper the optimizer's fp32 parameters get their gradients
    by assignment (no hook fires) and every exchange starts in step(). Either way, the plain steps' bits."""
    weights, started = [], []
    extra = {"bf16": {"enabled": True}} if bf16 else {}
    for overlap in (False, True):
        torch.manual_seed(0)
        params = {"lr": 0.01, "overlap": overlap, "bucket_cap_mb": 1e-5}  # 2 coordinates: weight, bias apart
        engine, _, _, _ = _init({"type": "CDAdam", "params": params}, **extra)
        x = torch.ones(2, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
        for _ in range(3):
            engine.backward(engine(x).sum())
            engine.step()
        weights.append([p.detach().clone() for p in engine.module.parameters()])
        opt = engine.basic_optimizer
        assert len(opt.buckets()) == 2
        started.append(opt._overlap.started_during_backward if overlap else None)
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert started[1] == (0 if bf16 else 2 * 3)


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import deepspeed_cdadam.checkpoint as ckpt

    engine, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    _steps(engine, 2)
    engine.save_checkpoint(str(tmp_path))
    _steps(engine, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    # every rank reports it (one rank's failure travels in the save barrier): no rank waits in it
    with pytest.raises(RuntimeError, match=r"failed on 1 rank\(s\); here: OSError: disk full"):
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
    "zero": "ZeroOneAdam",  # bert_zero_one_adam.json
    "onebitadam": "OneBitAdam",
    "onebit": "OneBitLamb",  # bert_onebit_lamb.json
    "ef21": "EF21",
    "liec": "LIECSGD",  # resnet_liec_sgd.json
    "birder": "Birder",
    "adacgd": "AdaCGD",  # resnet_adacgd.json
    "sketched": "SketchedAMSGrad",  # bert_sketched_amsgrad.json
    "amsgrad": "CDAdam",
    "adam": "AdamW",
    "adamw": "AdamW",  # llm_adamw.json
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


# --- warm start: load_checkpoint without optimizer states ---------------------------------------


@pytest.mark.parametrize("load_kwargs", [{"load_optimizer_states": False}, {"load_module_only": True}])
def test_warm_start_without_optimizer_states_loads_the_weights_and_starts_fresh(tmp_path, load_kwargs):
    engine, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    _steps(engine, 2)
    engine.save_checkpoint(str(tmp_path))
    fresh, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    assert not torch.equal(fresh.module.weight, engine.module.weight)
    path, _ = fresh.load_checkpoint(str(tmp_path), **load_kwargs)
    assert path is not None
    assert torch.equal(fresh.module.weight, engine.module.weight) and torch.equal(fresh.module.bias, engine.module.bias)
    assert not fresh.basic_optimizer.state  # fresh optimizer state: nothing restored into it
    _steps(fresh, 1)
    (state,) = fresh.basic_optimizer.state.values()
    assert state["step"] == 1


def test_warm_start_under_bf16_trains_from_the_loaded_weights(tmp_path):
    """A fine-tune from an Adam pre-training checkpoint: the bf16 wrapper's fp32 master weights must
    be the loaded ones, or the first step writes the fresh model's weights back."""
    pre, _, _, _ = _init({"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}}, bf16={"enabled": True})
    pre.backward(pre(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum())
    pre.step()
    pre.save_checkpoint(str(tmp_path))
    tune, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.0, "weight_decay": 0.0}}, bf16={"enabled": True})
    tune.load_checkpoint(str(tmp_path), load_optimizer_states=False, load_lr_scheduler_states=False)
    tune.backward(tune(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum())
    tune.step()  # lr 0: the weights stay the loaded ones
    assert torch.equal(tune.module.weight, pre.module.weight)


# --- client-built optimizers: deepspeed.initialize(optimizer=CDAdam(...)) ------------------------


def _init_client(make_optimizer, seed=0, callable_optimizer=False, **extra):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, **extra}
    optimizer = make_optimizer if callable_optimizer else make_optimizer(model.parameters())
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)


def _batches(engine, n, dtype=torch.float32):
    for step in range(n):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step)).to(dtype)
        engine.backward(engine(x).float().pow(2).sum())
        engine.step()


def test_client_optimizer_is_handled_like_the_json_one():
    from tests.integration.ds_common import count_allreduce_calls

    client, _, _, _ = _init_client(lambda ps: CDAdam(ps, lr=0.01, betas=(0.9, 0.99)))
    opt = client.basic_optimizer
    assert isinstance(opt, CDAdam) and not client.enable_backward_allreduce
    assert opt.param_names == {id(p): n for n, p in client.module.named_parameters()}
    assert opt.transport.process_group is client.seq_data_parallel_group
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0}
    config["optimizer"] = {"type": "CDAdam", "params": {"lr": 0.01, "betas": [0.9, 0.99]}}
    from_json, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    calls = [count_allreduce_calls(client), count_allreduce_calls(from_json)]
    _batches(client, 3)
    _batches(from_json, 3)
    assert [c["allreduce"] for c in calls] == [0, 0]  # no fp32 all-reduce under the compressed one
    assert torch.equal(client.module.weight, from_json.module.weight)


@pytest.mark.parametrize("callable_optimizer", [False, True], ids=["instance", "callable"])
def test_client_optimizer_under_bf16_does_not_count_the_wrapper_set_up_step(callable_optimizer):
    engine, _, _, _ = _init_client(
        lambda ps: CDAdam(ps, lr=0.01), callable_optimizer=callable_optimizer, bf16={"enabled": True}
    )
    assert isinstance(engine.basic_optimizer, CDAdam) and not engine.enable_backward_allreduce
    assert not engine.basic_optimizer.state  # the wrapper's zero-gradient set-up step was not taken
    _batches(engine, 2, torch.bfloat16)
    (state,) = engine.basic_optimizer.state.values()
    assert state["step"] == 2


def test_client_onebitadam_turns_the_engine_allreduce_off_after_its_warmup():
    engine, _, _, _ = _init_client(lambda ps: OneBitAdam(ps, lr=0.01, freeze_step=2))
    assert engine.enable_backward_allreduce and engine.basic_optimizer.engine_averages_exact_steps
    _batches(engine, 2)
    assert not engine.enable_backward_allreduce


def test_client_optimizer_with_zero_is_refused():
    with pytest.raises(ValueError, match=re.escape("Optimizer type 'CDAdam' does not support ZeRO")):
        _init_client(lambda ps: CDAdam(ps, lr=0.01), zero_optimization={"stage": 1})


def test_client_optimizer_with_a_transport_for_another_group_is_refused():
    world = InProcessWorld(2)  # 2 ranks, the engine's data-parallel group has 1
    with pytest.raises(ValueError, match="was built with a transport for another group"):
        _init_client(lambda ps: CDAdam(ps, lr=0.01, transport=world.transports[0]))


# --- MoE -------------------------------------------------------------------------------------


class _MoEModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(hidden_size=4, expert=torch.nn.Linear(4, 4), num_experts=2, ep_size=1, k=1)
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.moe(x)[0])


@pytest.mark.parametrize("client", [False, True], ids=["json", "client"])
def test_moe_models_are_refused(client):
    model = _MoEModel()
    config = {"train_micro_batch_size_per_gpu": 2}
    if client:
        kwargs = {"optimizer": CDAdam(model.parameters(), lr=0.01)}
    else:
        config["optimizer"] = {"type": "CDAdam", "params": {"lr": 0.01}}
        kwargs = {"model_parameters": model.parameters()}
    with pytest.raises(ValueError, match=re.escape("Optimizer type 'CDAdam' does not support MoE models")):
        deepspeed.initialize(model=model, config=config, **kwargs)


# --- the fp16 wrapper ------------------------------------------------------------------------


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    # The CPU accelerator says fp16 is unsupported (it is slow, not wrong): allow it for the tests.
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)


@pytest.mark.parametrize("type_name", ["OneBitAdam", "CDAdam", "EF21"])
def test_fp16_wrapper_is_the_unfused_one_on_every_deepspeed_version(fp16_on_cpu, type_name):
    """DeepSpeed 0.19.6 picks its flattening FP16_Optimizer for the name "OneBitAdam" (its own 1-bit
    Adam's), 0.19.7+ the unfused one: ours get the unfused one everywhere."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    fp16 = {"enabled": True, "initial_scale_power": 4}
    engine, _, _, _ = _init({"type": type_name, "params": {"lr": 0.01}}, fp16=fp16)
    assert type(engine.optimizer) is FP16_UnfusedOptimizer
    masters = engine.basic_optimizer.param_groups[0]["params"]
    assert [m.shape for m in masters] == [p.shape for p in engine.module.parameters()]  # not flattened
    assert all(m.dtype == torch.float32 for m in masters)
    assert not any(engine.basic_optimizer.state.values())  # the set-up step was not taken
    w0 = engine.module.weight.detach().clone()
    _batches(engine, 1, torch.float16)
    assert engine.basic_optimizer.steps_taken == 1 and not torch.equal(engine.module.weight, w0)


# --- timeouts --------------------------------------------------------------------------------


def test_timeout_default_is_the_transport_constant():
    from deepspeed_cdadam.comm.transport import DEFAULT_TIMEOUT_S

    engine, _, _, _ = _init({"type": "CDAdam", "params": {"lr": 0.01}})
    assert engine.basic_optimizer.transport.timeout.total_seconds() == DEFAULT_TIMEOUT_S


def test_timeout_with_mpi_is_logged_once_as_not_enforced(monkeypatch, caplog):
    import deepspeed_cdadam.integration.deepspeed as integration

    class FakeMpiTransport(Transport):  # one rank, no mpi4py needed
        device = None
        rank, world_size = 0, 1

        def __init__(self, cuda_aware=False):
            pass

        def all_to_all(self, send):
            return send.clone()

        def all_gather(self, send):
            return send.clone()

        def all_reduce_sum(self, x):
            return x

    monkeypatch.setattr(integration, "MpiTransport", FakeMpiTransport)
    monkeypatch.setattr(integration, "_mpi_timeout_logged", False, raising=False)
    params = {"lr": 0.01, "comm_backend_name": "mpi", "timeout_s": 20}
    with caplog.at_level("INFO", logger="deepspeed_cdadam.integration.deepspeed"):
        _init({"type": "CDAdam", "params": params})
        _init({"type": "CDAdam", "params": params})
    notes = [r.getMessage() for r in caplog.records if "timeout_s" in r.getMessage()]
    assert len(notes) == 1 and "MPI has no per-operation timeout" in notes[0]

"""Real NCCL, a world of one rank (two processes cannot share one GPU): every tensor handed to the
transport lives on the GPU, and the optimizers run, check, skip, checkpoint and resume there."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist

from deepspeed_cdadam import EF21, CDAdam, OneBitAdam, OneBitLamb, TorchDistributedTransport, without_rank_state
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = {
    "cdadam_block2048": (CDAdam, {"block_size": 2048}),
    "cdadam_one_block": (CDAdam, {"block_size": None}),
    "cdadam_tensor_blocks": (CDAdam, {"scale_blocks": "tensor"}),
    "onebit": (OneBitAdam, {"freeze_step": 2}),
    "onebit_tensor_padded": (
        OneBitAdam,
        {"freeze_step": 2, "scale_blocks": "tensor_padded", "worker_scale_scope": "tensor", "compressor": "sign_l2",
         "block_size": None},
    ),
    "ef21": (EF21, {}),
    "onebitlamb": (OneBitLamb, {"freeze_step": 2}),  # one rank: its warm-up and uncompressed phase
}  # fmt: skip


@pytest.fixture(scope="module")
def nccl_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_runs_on_nccl(nccl_world, case, tmp_path):
    cls, kwargs = CASES[case]
    transport = TorchDistributedTransport(timeout_s=60)
    assert transport.device.type == "cuda"
    init = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=init).cuda()) for n in (5000, 300, 7)]
    opt = cls(params, lr=1e-2, transport=transport, nonfinite_grads="skip", consistency_check_every=1, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).cuda()
        if step == 3:
            params[1].grad[0] = float("nan")  # skipped, on the GPU's own flag
        opt.step()
    assert opt.skipped_steps == 1 and opt.completed_steps() == 4
    assert all(bool(torch.isfinite(p).all()) for p in params)
    save_rank_state(opt, str(tmp_path))
    assert load_rank_state(opt, str(tmp_path))
    sd = opt.state_dict()
    fresh = cls([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, transport=transport, **kwargs)
    fresh.load_state_dict(without_rank_state(sd))
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    fresh.step()
    fresh.check_ranks_agree()


def test_cpu_gradients_are_refused_with_a_message_on_nccl(nccl_world):
    p = torch.nn.Parameter(torch.ones(8))
    opt = CDAdam([p], transport=TorchDistributedTransport(timeout_s=60))
    p.grad = torch.ones(8)
    with pytest.raises(ValueError, match="is on cpu, but the transport TorchDistributedTransport moves tensors on cuda"):
        opt.step()


@pytest.mark.parametrize("name,block_size", [("cdadam", 2048), ("cdadam", None), ("onebit", None)])
def test_steps_wait_for_nothing_on_cuda(nccl_world, monkeypatch, name, block_size):
    """From CD-Adam's second step (1-bit Adam's third: its warm-up step and its first compressed step agree on
    the host) a step on the Triton kernels queues its work and returns: under
    ``torch.cuda.set_sync_debug_mode("error")`` any synchronizing call raises. The one read per step, of the
    previous step's outcome (an event of work queued a step ago), is let through. A NaN at step 4 is
    skipped on the device: the parameters after it are those before it."""
    from deepspeed_cdadam.optim import safety

    monkeypatch.delenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", raising=False)
    real_read = safety.DecidedSkip.read

    def read(self):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(safety.DecidedSkip, "read", read)
    p = torch.nn.Parameter(torch.randn(300_001, generator=torch.Generator().manual_seed(0)).cuda())
    transport = TorchDistributedTransport(timeout_s=60)
    if name == "cdadam":
        opt = CDAdam([p], lr=1e-2, weight_decay=0.1, block_size=block_size, transport=transport, nonfinite_grads="skip")
    else:
        opt = OneBitAdam([p], lr=1e-2, weight_decay=0.1, freeze_step=1, transport=transport, nonfinite_grads="skip")
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).cuda() for t in range(6)]
    grads[3][5] = float("nan")
    agreed = 1 if name == "cdadam" else 2
    for t in range(agreed):
        p.grad = grads[t]
        opt.step()  # agreed on the host
    before_nan = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(agreed, 6):
            if t == 3:
                before_nan = p.detach().clone()
            p.grad = grads[t]
            opt.step()
            if t == 3:
                after_nan = p.detach().clone()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt._pending_skip is not None
    assert torch.equal(after_nan, before_nan)
    assert opt.completed_steps() == 5 and opt.skipped_steps == 1
    assert bool(torch.isfinite(p).all())

"""The transport's device is the only device a tensor handed to it lives on (NCCL refuses CPU tensors).

Without a GPU the contract is checked with tensors that would land on the wrong device: every rank
runs with ``torch.device("meta")`` as its default device while the model lives on the CPU and the
transport moves CPU tensors only (as NCCL moves CUDA tensors only). A control tensor made without an
explicit device (non-finite flags, fingerprints, the checkpoint agreement) lands on ``meta`` and the
transport refuses it, as NCCL refuses a CPU tensor on a GPU run.
"""

import pytest
import torch

from deepspeed_cdadam import (
    EF21,
    LIECSGD,
    AdaCGD,
    Birder,
    CDAdam,
    InProcessWorld,
    OneBitAdam,
    OneBitLamb,
    SketchedAMSGrad,
)
from deepspeed_cdadam.checkpoint import load_rank_state, save_rank_state
from deepspeed_cdadam.comm.transport import _backend_device, control_device

OPTIMIZERS = {
    "cdadam": (CDAdam, {"block_size": 16}),
    "cdadam_one_block": (CDAdam, {"block_size": None}),
    "onebit": (OneBitAdam, {"freeze_step": 2}),
    "onebitlamb": (OneBitLamb, {"freeze_step": 2}),
    "ef21": (EF21, {}),
    "birder": (Birder, {}),
    "sketchedamsgrad": (SketchedAMSGrad, {"k": 4}),
    "adacgd": (AdaCGD, {"ratios": (0.1, 0.5)}),  # headers, envelopes, norms; the exact first step
    "liecsgd": (LIECSGD, {"momentum": 0.9, "average_period": 2, "bucket_size": 64}),  # an averaging step
}
# 0/1 Adam's own test (tests/optim/test_zero_one_adam.py) walks every kind of step it plans.


def test_in_process_transport_refuses_other_devices():
    world = InProcessWorld(1)
    with pytest.raises(TypeError, match="a tensor on meta was handed to a transport that moves tensors on cpu"):
        world.transports[0].all_reduce_sum(torch.zeros(3, device="meta"))


@pytest.mark.parametrize(
    "backend, device_type",
    [("gloo", "cpu"), ("nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cuda"), ("mpi", "cpu"), ("xccl", "xpu")],
)
def test_backend_device(backend, device_type):
    assert _backend_device(backend).type == device_type


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_collective_gets_transport_device_tensors(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")  # the CPU kernels are C code: keep them out of meta
    cls, kwargs = OPTIMIZERS[name]

    def run(rank, transport):
        init = torch.Generator().manual_seed(0)  # the same model on every rank, different gradients
        params = [torch.nn.Parameter(torch.randn(40, generator=init)), torch.nn.Parameter(torch.randn(9, generator=init))]
        gen = torch.Generator().manual_seed(rank)
        opt = cls(params, lr=1e-2, transport=transport, nonfinite_grads="skip", consistency_check_every=1, **kwargs)
        # Wrong-device tensors are what the default device makes: on meta, never what the transport moves.
        with torch.device("meta"):
            for step in range(4):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, device="cpu")
                if step == 2 and rank == 1:
                    params[0].grad[3] = float("inf")  # the skip agreement runs too
                opt.step()
            save_rank_state(opt, str(tmp_path))
            assert load_rank_state(opt, str(tmp_path))
            opt.check_ranks_agree()
        assert opt.skipped_steps == 1
        assert control_device(transport) == torch.device("cpu")
        return [p.detach().clone() for p in params], opt.PARAMETERS_PER_RANK

    out = InProcessWorld(2).run(run)
    if not out[0][1]:  # LIEC-SGD's ranks keep their own models between averages
        assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0]))  # the model moved alike on both ranks


def test_gradients_on_another_device_than_the_transport_are_refused():
    transport = InProcessWorld(1, device="meta").transports[0]
    p = torch.nn.Parameter(torch.ones(8))
    opt = CDAdam([p], transport=transport)
    p.grad = torch.ones(8)
    with pytest.raises(ValueError, match=r"param_groups\[0\] is on cpu, but the transport .* moves tensors on meta"):
        opt.step()

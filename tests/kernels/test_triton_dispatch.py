"""exchange.py picks the Triton kernels for GPU buffers and the eager path otherwise (no triton needed:
the device check and triton's import are mocked, the kernels never run)."""

from __future__ import annotations

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, kernels
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1, TopK
from deepspeed_cdadam.compressors.sign import ScaledSignL2
from deepspeed_cdadam.exchange import make_exchange
from deepspeed_cdadam.kernels import triton_exchange as tx

RUNNERS = {"markov": "run_markov", "error_feedback": "run_error_feedback"}


def _exchange(scheme, layout=ShardLayout(4096, 1, 8), compressor=None, scope="block"):
    transport = InProcessWorld(layout.world_size).transports[0]
    ex = make_exchange(scheme, transport, layout, compressor or ScaledSignL1(), worker_scale_scope=scope)
    state: dict = {}
    ex.init_state(state, torch.zeros(layout.numel))
    return ex, state


@pytest.fixture
def on_cuda(monkeypatch):
    """Buffers look like CUDA tensors to the dispatch, and triton imports; the runners are spies."""
    monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tx, "import_failure", lambda: None)
    monkeypatch.delenv("DEEPSPEED_CDADAM_KERNELS", raising=False)
    calls = []
    for name in RUNNERS.values():
        monkeypatch.setattr(tx, name, lambda ex, x, *state, name=name: calls.append(name) or x)
    return calls


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
@pytest.mark.parametrize(
    "layout,compressor,scope",
    [
        (ShardLayout(4096, 1, 8), ScaledSignL1(), "block"),
        (ShardLayout(4099, 3, None), ScaledSignL2(), "block"),  # one-block shards
        (ShardLayout(4099, 2, 2048), ScaledSignL2(), "tensor"),
        (ShardLayout(4099, 2, 24), ScaledSignL1(), "block"),
    ],
)
def test_cuda_buffers_take_the_triton_path(on_cuda, scheme, layout, compressor, scope):
    """The runner is a spy, so no collective runs: rank 0 of a larger world can be asked alone."""
    ex, state = _exchange(scheme, layout, compressor, scope)
    x = torch.randn(layout.numel)
    assert ex.exchange(x, state, step=1) is x
    assert on_cuda == [RUNNERS[scheme]]


@pytest.mark.parametrize(
    "layout,compressor",
    [
        (ShardLayout(4096, 1, 12), ScaledSignL1()),  # blocks not whole bytes
        (ShardLayout(4096, 1, 8), TopK(0.1)),  # not a scaled sign
    ],
)
def test_other_layouts_and_compressors_stay_eager(on_cuda, layout, compressor):
    ex, state = _exchange("markov", layout, compressor)
    ex.exchange(torch.randn(layout.numel), state, step=1)
    assert on_cuda == []


def test_half_precision_and_strided_buffers_stay_eager(on_cuda):
    ex, state = _exchange("markov")
    assert not tx.applies(ex, torch.zeros(4096, dtype=torch.float16))
    assert not tx.applies(ex, torch.zeros(8192)[::2])
    assert tx.applies(ex, torch.zeros(4096))


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
def test_cpu_buffers_keep_the_cpu_logic(monkeypatch, scheme):
    monkeypatch.setattr(tx, "import_failure", lambda: None)
    called = []
    monkeypatch.setattr(tx, RUNNERS[scheme], lambda *a: called.append(1))
    ex, state = _exchange(scheme)
    ex.exchange(torch.randn(4096), state, step=1)
    assert called == []


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
def test_without_triton_the_eager_path_runs(monkeypatch, caplog, scheme):
    """auto: no triton means the eager path (its exact result) and one warning; eager mode never asks."""
    monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tx, "import_failure", lambda: "ImportError: No module named 'triton'")
    monkeypatch.setattr(tx, "_warned", False)
    monkeypatch.setattr(tx, RUNNERS[scheme], lambda *a: pytest.fail("the Triton path ran without triton"))
    monkeypatch.delenv("DEEPSPEED_CDADAM_KERNELS", raising=False)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    ex, state = _exchange(scheme)
    got = [ex.exchange(x, state, step=t).clone() for t in range(2)]
    assert caplog.text.count("Triton GPU kernels unavailable, using the eager torch path") == 1
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    ex, state = _exchange(scheme)
    want = [ex.exchange(x, state, step=t).clone() for t in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_eager_mode_never_imports_triton(monkeypatch):
    monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tx, "import_failure", lambda: pytest.fail("triton was asked for in eager mode"))
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    ex, state = _exchange("markov")
    assert not tx.applies(ex, torch.zeros(4096), *state.values())


def test_fused_mode_without_triton_raises(monkeypatch):
    monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tx, "import_failure", lambda: "ImportError: No module named 'triton'")
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "fused")
    ex, state = _exchange("markov")
    with pytest.raises(kernels.KernelUnavailableError, match="Triton GPU kernels are unavailable: ImportError"):
        ex.exchange(torch.zeros(4096), state, step=1)

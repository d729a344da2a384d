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


def _exchange(scheme, layout=ShardLayout(4096, 1, 8), compressor=None):
    transport = InProcessWorld(layout.world_size).transports[0]
    ex = make_exchange(scheme, transport, layout, compressor or ScaledSignL1())
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
        monkeypatch.setattr(tx, name, lambda ex, x, *state, name=name, **kw: calls.append(name) or x)
    return calls


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
@pytest.mark.parametrize(
    "layout,compressor",
    [
        (ShardLayout(4096, 1, 8), ScaledSignL1()),
        (ShardLayout(4099, 3, None), ScaledSignL2()),  # one-block shards
        (ShardLayout(4099, 2, 2048), ScaledSignL2(worker_scale_scope="tensor")),
        (ShardLayout(4099, 2, 24), ScaledSignL1()),
    ],
)
def test_cuda_buffers_take_the_triton_path(on_cuda, scheme, layout, compressor):
    """Every rank runs (they agree that triton imports: one all-reduce); the runner is a spy."""

    def rank_fn(rank, transport):
        ex = make_exchange(scheme, transport, layout, compressor)
        state: dict = {}
        ex.init_state(state, torch.zeros(layout.numel))
        x = torch.randn(layout.numel)
        return ex.exchange(x, state, step=1) is x

    assert InProcessWorld(layout.world_size, timeout_s=10).run(rank_fn) == [True] * layout.world_size
    assert on_cuda == [RUNNERS[scheme]] * layout.world_size


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
    monkeypatch.setattr(tx, RUNNERS[scheme], lambda *a, **k: called.append(1))
    ex, state = _exchange(scheme)
    ex.exchange(torch.randn(4096), state, step=1)
    assert called == []


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
def test_without_triton_the_eager_path_runs(monkeypatch, caplog, scheme):
    """auto: no triton means the eager path (its exact result) and one warning; eager mode never asks."""
    monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tx, "import_failure", lambda: "ImportError: No module named 'triton'")
    monkeypatch.setattr(tx, "_warned", False)
    monkeypatch.setattr(tx, RUNNERS[scheme], lambda *a, **k: pytest.fail("the Triton path ran without triton"))
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
    with pytest.raises(kernels.KernelUnavailableError, match=r"Triton GPU kernels are unavailable on rank\(s\) \[0\] of 1; here: ImportError"):
        ex.exchange(torch.zeros(4096), state, step=1)


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_triton_missing_on_one_rank_keeps_every_rank_on_one_path(monkeypatch, mode):
    """triton imports on rank 0 only: the ranks agree before the first step, so in ``auto`` mode every
    rank runs the eager lines (rank 0 must not run the Triton kernels while rank 1 runs eager ones:
    their results differ in the last bits) and in ``fused`` mode every rank raises, naming rank 1."""
    import threading

    local = threading.local()
    monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tx, "import_failure", lambda: None if local.rank == 0 else "ImportError: no triton here")
    monkeypatch.setattr(tx, "run_markov", lambda *a, **k: pytest.fail("a rank ran the Triton kernels"))
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", mode)
    layout = ShardLayout(4096, 2, 8)

    def rank_fn(rank, transport):
        local.rank = rank
        ex = make_exchange("markov", transport, layout, ScaledSignL1())
        state: dict = {}
        ex.init_state(state, torch.zeros(layout.numel))
        try:
            return ex.exchange(torch.randn(layout.numel, generator=torch.Generator().manual_seed(rank)), state, step=1)
        except kernels.KernelUnavailableError as err:
            return str(err)

    got = InProcessWorld(2, timeout_s=10).run(rank_fn)
    if mode == "fused":
        assert all(isinstance(m, str) and "unavailable on rank(s) [1] of 2" in m for m in got), got
        assert "ImportError: no triton here" in got[1]
    else:
        assert torch.equal(got[0], got[1])  # both eager: the same estimate on both ranks

"""The fused kernels' runtime: ranks agree on using them, C++ errors become Python exceptions, and the
thread pool is reused and sized to this rank's share of the node."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from deepspeed_cdadam import InProcessWorld, kernels
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1
from deepspeed_cdadam.exchange import make_exchange
from deepspeed_cdadam.types import DOWN_MARKOV_STATE, WORKER_ERROR

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the fused kernel does not build here (no g++)")

NUMEL, BLOCK = 4096, 8


def _fail_on_ranks(monkeypatch, bad_ranks):
    """Fake a build failure on ``bad_ranks`` only: each rank's thread sets ``local.rank`` first.
    Returns (local, calls): ``calls[r]`` counts rank ``r``'s availability checks."""
    local, calls = threading.local(), {}
    real = kernels.build_failure

    def build_failure():
        rank = getattr(local, "rank", None)
        calls[rank] = calls.get(rank, 0) + 1
        if rank in bad_ranks:
            return kernels.KernelUnavailableError(f"fake build failure on rank {rank}")
        return None if rank is not None else real()

    monkeypatch.setattr(kernels, "build_failure", build_failure)
    return local, calls


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
def test_fused_mode_raises_on_every_rank_naming_the_failed_one(monkeypatch, scheme):
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "fused")
    local, _ = _fail_on_ranks(monkeypatch, {1})

    def rank_fn(rank, transport):
        local.rank = rank
        ex = make_exchange(scheme, transport, ShardLayout(NUMEL, 2, BLOCK), ScaledSignL1())
        x = torch.zeros(NUMEL)
        try:
            return ex.uses_fused_kernel(x, x)
        except kernels.KernelUnavailableError as err:
            return str(err)

    got = InProcessWorld(2, timeout_s=10).run(rank_fn)
    for message in got:
        assert isinstance(message, str), got  # no rank went on to the fused path (and waited for a dead peer)
        assert "unavailable on rank(s) [1] of 2" in message
    assert "fake build failure on rank 1" in got[1]


def _run_steps(rank, transport, local, steps=3, world=2, scheme="markov"):
    local.rank = rank
    layout = ShardLayout(NUMEL, world, BLOCK)
    ex = make_exchange(scheme, transport, layout, ScaledSignL1())
    state: dict = {}
    ex.init_state(state, torch.zeros(NUMEL))
    fused = []
    for t in range(steps):
        x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(10 * t + rank))
        fused.append(ex.uses_fused_kernel(x, state[DOWN_MARKOV_STATE if scheme == "markov" else WORKER_ERROR]))
        out = ex.exchange(x, state, step=t + 1).clone()
    return out, fused, ex.stats


@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
def test_auto_mode_falls_back_on_every_rank_when_one_cannot_build(monkeypatch, scheme):
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "auto")
    local, calls = _fail_on_ranks(monkeypatch, {1})
    got = InProcessWorld(2, timeout_s=10).run(lambda r, tr: _run_steps(r, tr, local, scheme=scheme))
    assert all(fused == [False, False, False] for _, fused, _ in got)
    assert torch.equal(got[0][0], got[1][0])
    assert calls == {0: 1, 1: 1}  # agreed once per exchange, not per step
    for _, _, stats in got:
        assert stats.collective_calls == 1 + 3 * 2  # the agreement, then all_to_all + all_gather per step
        assert stats.bytes_setup == all_reduce_bytes_sent(4 * 2, 2) and stats.bytes_control == 0


@needs_kernel
@pytest.mark.parametrize("scheme", ["markov", "error_feedback"])
def test_agreement_is_one_counted_all_reduce_per_exchange(monkeypatch, scheme):
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "fused")
    local = threading.local()
    fused_run = InProcessWorld(3, timeout_s=10).run(lambda r, tr: _run_steps(r, tr, local, world=3, scheme=scheme))
    for _, fused, stats in fused_run:
        assert fused == [True, True, True]
        assert stats.collective_calls == 1 + 3 * 2
        assert stats.bytes_setup == all_reduce_bytes_sent(4 * 3, 3) and stats.bytes_control == 0
        assert stats.bytes_sent == stats.bytes_up + stats.bytes_down + stats.bytes_control
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")  # eager: no agreement message at all
    eager_run = InProcessWorld(3, timeout_s=10).run(lambda r, tr: _run_steps(r, tr, local, world=3, scheme=scheme))
    for (f_out, _, f_stats), (e_out, _, e_stats) in zip(fused_run, eager_run):
        assert torch.equal(f_out, e_out)
        assert e_stats.collective_calls == 3 * 2 and e_stats.bytes_setup == 0
        assert f_stats.bytes_up == e_stats.bytes_up and f_stats.bytes_down == e_stats.bytes_down


@needs_kernel
@pytest.mark.parametrize(
    "kind,code,what",
    [(1, 3, "out of memory"), (2, 4, "system error"), (3, 5, "test exception"), (4, 6, "unknown C\\+\\+ exception")],
)
@pytest.mark.parametrize("nthreads,task", [(1, 0), (3, 0), (3, 2)])  # thrown in the caller, or in a pool thread
def test_cpp_exception_becomes_runtime_error(kind, code, what, nthreads, task):
    with pytest.raises(RuntimeError, match=rf"cdadam_test_throw failed with error code {code}: .*{what}"):
        kernels._call("cdadam_test_throw", kind, nthreads, task)
    kernels._call("cdadam_test_throw", 0, nthreads, task)  # the pool still works afterwards


@needs_kernel
def test_invalid_arguments_return_error_codes():
    null = None
    with pytest.raises(RuntimeError, match="error code 1: .*block must be a positive multiple of 8"):
        kernels._call("cdadam_markov_worker_step", 0, null, null, 0, null, null, 12, 0, 0, null, 1, 1)
    with pytest.raises(RuntimeError, match="error code 2: .*dtype_code"):
        kernels._call("cdadam_decode_mean_add", 7, null, 1, 0, 0, 8, 0, null, 1)
    with pytest.raises(RuntimeError, match="error code 1: .*a block that is a positive multiple of 8"):
        kernels._call("cdadam_markov_server_step", 0, null, 1, 0, 0, 12, 0, 0, null, null, null, 1)
    ef = "cdadam_error_feedback_step"
    with pytest.raises(RuntimeError, match="error code 1: .*norm must be 1 or 2"):
        kernels._call(ef, 0, null, null, null, 0, 0, 1, null, null, 8, 0, 0, null, null, null, 3, 1)
    with pytest.raises(RuntimeError, match="error code 1: .*norm 2 scales are taken by the caller"):
        kernels._call(ef, 0, null, null, null, 0, 0, 1, null, null, 8, 0, 0, null, null, null, 2, 1)
    with pytest.raises(RuntimeError, match="error code 1: .*messages need one shard"):
        kernels._call(ef, 0, null, null, 1, 1, 0, 2, null, null, 8, 0, 0, null, null, null, 1, 1)
    with pytest.raises(RuntimeError, match="error code 2: .*dtype_code"):
        kernels._call(ef, 5, null, null, null, 0, 0, 1, null, null, 8, 0, 0, null, null, null, 1, 1)
    with pytest.raises(RuntimeError, match="error code 1: .*block must be 0 or a positive multiple of 8"):
        kernels._call("cdadam_decode_shards", 0, null, 0, 1, null, null, 12, 0, null, 1, -1, 1)


@pytest.mark.parametrize(
    "env,torch_threads,cpus,want",
    [
        (None, 8, (16, 16), 8),  # one rank: torch's count
        ("4", 8, (16, 16), 4),  # 4 ranks share 16 CPUs: 4 each
        ("3", 16, (16, 16), 5),
        ("32", 8, (16, 16), 1),  # more ranks than CPUs: still one thread
        ("0", 8, (16, 16), 8),  # nonsense: one rank
        ("two", 8, (16, 16), 8),
        (None, 8, (16, 2), 2),  # this process may only run on 2 CPUs
    ],
)
def test_num_threads_shares_the_node_between_local_ranks(monkeypatch, env, torch_threads, cpus, want):
    if env is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", env)
    monkeypatch.setattr(kernels, "_cpu_counts", lambda: cpus)
    monkeypatch.setattr(kernels.torch, "get_num_threads", lambda: torch_threads)
    assert kernels.num_threads() == want


def _worker_step_case(seed, numel=50_001, world=3, block=16):
    layout = ShardLayout(numel, world, block)
    gen = torch.Generator().manual_seed(seed)
    g, h = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    return layout, g, h, ScaledSignL1().wire_nbytes(layout.capacity, layout.max_blocks, torch.float32)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 64])
def test_thread_count_never_changes_the_bits(monkeypatch, threads):
    """Ranges cut at any unit (mid-shard, at a shard's short last block) give the one-thread result."""
    layout, g, h, width = _worker_step_case(threads, numel=20_007, world=7, block=8)
    monkeypatch.setattr(kernels, "num_threads", lambda: 1)
    want_h = h.clone()
    want = kernels.markov_worker_step(g, want_h, layout, width)
    monkeypatch.setattr(kernels, "num_threads", lambda: threads)
    got_h = h.clone()
    assert torch.equal(kernels.markov_worker_step(g, got_h, layout, width), want)
    assert torch.equal(got_h, want_h)


@needs_kernel
def test_pool_threads_are_created_once_and_reused(monkeypatch):
    monkeypatch.setattr(kernels, "num_threads", lambda: 3)
    layout, g, h, width = _worker_step_case(0, numel=400_000)
    out = torch.zeros(layout.shard_sizes[0])

    def one_step():
        wire = kernels.markov_worker_step(g, h, layout, width)
        kernels.decode_mean_add(wire.view(3, -1), out, layout, 0)
        kernels.markov_encode(g[layout.shard_slice(0)], h[layout.shard_slice(0)], layout, 0, width)

    one_step()  # warm: the pool has its threads now
    warm = kernels.threads_created()
    assert warm >= 2  # 3-way calls: the caller plus at least two pool threads
    for _ in range(10):
        one_step()
    assert kernels.threads_created() == warm


@needs_kernel
def test_concurrent_callers_share_the_pool(monkeypatch):
    """Ranks as threads of one process call the kernels at once: every result is still exact."""
    monkeypatch.setattr(kernels, "num_threads", lambda: 3)
    cases = [_worker_step_case(seed) for seed in range(4)]
    want = []
    for layout, g, h, width in cases:
        h2 = h.clone()
        want.append((kernels.markov_worker_step(g, h2, layout, width), h2))
    errors, results = [], {}

    def caller(i):
        try:
            layout, g, h, width = cases[i]
            for k in range(10):
                h2 = h.clone()
                results[i, k] = (kernels.markov_worker_step(g, h2, layout, width), h2)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for (i, _), (wire, h2) in results.items():
        assert torch.equal(wire, want[i][0]) and torch.equal(h2, want[i][1])


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_pool_works_in_a_forked_child(monkeypatch):
    """A child inherits the pool object but not its threads: it must make its own, not wait forever."""
    monkeypatch.setattr(kernels, "num_threads", lambda: 3)
    layout, g, h, width = _worker_step_case(1)
    want = kernels.markov_worker_step(g, h.clone(), layout, width).numpy().tobytes()  # the parent's pool is warm
    h_child, before = h.clone(), kernels.threads_created()
    pid = os.fork()
    if pid == 0:  # the child (no torch parallel ops here: OpenMP may hang after fork): never return into pytest
        ok = False
        try:
            got = kernels.markov_worker_step(g, h_child, layout, width).numpy().tobytes()
            ok = got == want and kernels.threads_created() > before  # its own, new threads
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the kernel hung in a forked child")

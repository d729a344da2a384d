"""Steps whose non-finite skip is decided on the device (``optim.base._step_decided_on_device``).

Each rank's NaN/inf flag travels inside its messages up (``exchange.mark_skipped``: the sign bit of each
message's first scale, which no computed scale has), every rank learns the same answer from the
exchange it runs anyway (``skipped_anywhere``), and the update kernel (``kernels.triton_amsgrad``) reads
it: no control message, no host read in the step. Without a GPU the Triton kernels run on the CPU
interpreter standing in for it (as in ``test_triton_exchange``); with one, compiled on CUDA (marked gpu).

What must hold: a rank with a non-finite gradient sends exactly the zero correction (the exchange equals
one where that rank's gradient is its Markov state ``h_i``); no parameter or moment changes on a skipped
step, on any rank; step counts are put back and the skip counted (or ``FloatingPointError`` raised on
every rank) when the outcome is read; without a NaN the step equals the host-agreed one; and the
host reads nothing in the step but the previous step's outcome.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam
from deepspeed_cdadam.comm.layout import ShardLayout
from deepspeed_cdadam.compressors import ScaledSignL1
from deepspeed_cdadam.compressors.sign import ScaledSignL2
from deepspeed_cdadam.exchange import StepSkip, make_exchange, mark_skipped, skipped_anywhere
from deepspeed_cdadam.kernels import triton_amsgrad, triton_exchange as tx
from deepspeed_cdadam.optim import safety
from deepspeed_cdadam.types import (
    DOWN_MARKOV_STATE, EXP_AVG, EXP_AVG_SQ, MARKOV_STATE, MASTER_PARAMS, MAX_EXP_AVG_SQ, SERVER_ERROR,
    SERVER_MARKOV_STATE, STEP, WORKER_ERROR,
)  # fmt: skip

from .test_triton_exchange import DEVICE, _interpreter, assert_bits_equal

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []


@pytest.fixture(autouse=True)
def _on_the_kernels(monkeypatch):
    """The Triton path (the interpreter standing in for the GPU on CPU), device-decided steps on."""
    monkeypatch.delenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", raising=False)
    monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "auto")
    if DEVICE == "cpu":
        monkeypatch.setattr(tx, "_on_gpu", lambda t: True)
    with _interpreter():
        yield


def _grad(numel, t, r):
    return torch.randn(numel, generator=torch.Generator().manual_seed(100 * t + r))


# ------------------------------------------------------------------------------------------------
# the mark


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [ShardLayout(1001, 3, 8), ShardLayout(1001, 3, None), ShardLayout(2, 4, 16)])
def test_the_mark_is_read_from_every_message_and_no_computed_scale_carries_it(layout, dtype):
    """Zero, tiny, huge and random vectors encode with no mark; a marked rank is seen in any of its
    messages, including an empty shard's (``ShardLayout(2, 4, 16)``: shards of 1, 1, 0, 0 coordinates)."""
    ex = make_exchange("markov", InProcessWorld(layout.world_size).transports[0], layout, ScaledSignL1())
    n = layout.world_size
    for x in (torch.zeros(layout.numel), torch.full((layout.numel,), 1e-30), torch.full((layout.numel,), -1e30), _grad(layout.numel, 0, 0)):
        wire = ex.encode_up(x.to(dtype), step=0, group=0)[0].view(n, -1)
        assert not bool(skipped_anywhere(wire, layout, dtype))
        start, item = (layout.capacity + 7) // 8, torch.empty((), dtype=dtype).element_size()
        for row in range(n):  # the messages one server receives: one from each rank, any of them marked
            marked = wire.clone()
            marked[row, start : start + item] = 0  # a skipping rank's scales are +0.0
            mark_skipped(marked[row : row + 1], torch.tensor(True), layout, dtype)
            assert bool(skipped_anywhere(marked, layout, dtype))
            unmarked = wire.clone()
            mark_skipped(unmarked, torch.tensor(False), layout, dtype)
            assert torch.equal(unmarked, wire)
            broken = wire.clone()  # a NaN scale of either sign (a state already broken) is not a mark
            broken[row, start : start + item] = torch.tensor([-float("nan")], dtype=dtype).view(torch.uint8)
            assert not bool(skipped_anywhere(broken, layout, dtype))


# ------------------------------------------------------------------------------------------------
# the exchange


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize(
    "layout,compressor",
    [(ShardLayout(3001, 3, 64), ScaledSignL1()), (ShardLayout(2003, 2, None), ScaledSignL2()),
     (ShardLayout(1003, 3, 16), ScaledSignL1(worker_scale_scope="tensor"))],
)  # fmt: skip
def test_a_skipping_rank_sends_exactly_a_zero_correction(monkeypatch, use_triton, layout, compressor):
    """Rank 1's gradient holds a NaN and its flag is set: every rank's result and state equal those of the
    plain exchange in which rank 1's gradient is its own ``h_1`` (so ``g_1 - h_1 = 0``), bit for bit, and
    every rank learns ``anywhere``; with no flag set the step equals the plain one and ``anywhere`` is False."""
    if not use_triton:
        monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    world, steps = layout.world_size, 3

    def rank(r, transport):
        def run(with_skip, bad):
            ex = make_exchange("markov", transport, layout, compressor)
            state: dict = {}
            ex.init_state(state, torch.zeros(layout.numel, device=DEVICE))
            outs, flags = [], []
            for t in range(steps):
                x = _grad(layout.numel, t, r).to(DEVICE)
                if t == steps - 1 and r == 1 and bad:
                    x = x.clone()
                    x[7] = float("nan") if with_skip else 0.0
                    if not with_skip:  # the reference: rank 1 sends the zero correction
                        x = state[MARKOV_STATE].clone()
                if with_skip:
                    skip = StepSkip(torch.tensor(bad and r == 1 and t == steps - 1, device=DEVICE))
                    outs.append(ex.exchange(x, state, step=t, skip=skip).clone().cpu())
                    flags.append(bool(skip.anywhere))
                else:
                    outs.append(ex.exchange(x, state, step=t).clone().cpu())
            return outs, {k: v.clone().cpu() for k, v in state.items()}, flags

        return run(True, True), run(False, True), run(True, False), run(False, False)

    for r, (skipped, reference, plain_skip, plain) in enumerate(InProcessWorld(world, device=DEVICE).run(rank)):
        assert skipped[2] == [False, False, True]
        assert plain_skip[2] == [False, False, False]
        for got, want in ((skipped, reference), (plain_skip, plain)):
            for a, b in zip(got[0], want[0]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)  # equal values (a -0.0 may stand for 0.0)
            for key in (MARKOV_STATE, SERVER_MARKOV_STATE, DOWN_MARKOV_STATE):
                torch.testing.assert_close(got[1][key], want[1][key], rtol=0, atol=0)


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize(
    "layout,compressor",
    [(ShardLayout(3001, 3, None), ScaledSignL2()), (ShardLayout(2003, 2, 64), ScaledSignL1()),
     (ShardLayout(1003, 3, 16), ScaledSignL2(worker_scale_scope="tensor"))],
)  # fmt: skip
def test_a_skipping_rank_sends_zero_and_keeps_its_error(monkeypatch, use_triton, layout, compressor):
    """Error feedback: rank 1 skips at the last step. Every rank's result and server error equal those of the
    plain exchange in which rank 1 sends zero (its ``x_1 = -e_1``, so ``p_1 = 0``), bit for bit; the other
    ranks' errors too; rank 1 keeps its error as it was."""
    if not use_triton:
        monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", "eager")
    world, steps = layout.world_size, 3

    def rank(r, transport):
        def run(with_skip):
            ex = make_exchange("error_feedback", transport, layout, compressor)
            state: dict = {}
            ex.init_state(state, torch.zeros(layout.numel, device=DEVICE))
            outs, kept = [], None
            for t in range(steps):
                x = _grad(layout.numel, t, r).to(DEVICE)
                last = t == steps - 1 and r == 1
                if last:
                    kept = state[WORKER_ERROR].clone().cpu()
                    if with_skip:
                        x[7] = float("nan")
                    else:
                        x = -state[WORKER_ERROR]
                if with_skip:
                    skip = StepSkip(torch.tensor(last, device=DEVICE))
                    outs.append(ex.exchange(x.clone(), state, step=t, skip=skip).clone().cpu())
                    assert bool(skip.anywhere) == (t == steps - 1)
                else:
                    outs.append(ex.exchange(x, state, step=t).clone().cpu())
            return outs, {k: v.clone().cpu() for k, v in state.items()}, kept

        return run(True), run(False)

    for r, (skipped, reference) in enumerate(InProcessWorld(world, device=DEVICE).run(rank)):
        for a, b in zip(skipped[0], reference[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(skipped[1][SERVER_ERROR], reference[1][SERVER_ERROR], rtol=0, atol=0)
        if r == 1:
            assert_bits_equal(skipped[1][WORKER_ERROR], skipped[2])
        else:
            torch.testing.assert_close(skipped[1][WORKER_ERROR], reference[1][WORKER_ERROR], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the update kernel


@pytest.mark.parametrize("amsgrad", [True, False])
@pytest.mark.parametrize("bias_correction_step", [None, 7])
def test_update_kernel_matches_the_eager_lines_and_a_skip_writes_nothing(amsgrad, bias_correction_step):
    from deepspeed_cdadam.optim.functional import amsgrad_direction

    n, kw = 5003, dict(beta1=0.9, beta2=0.99, eps=1e-8, bias_correction_step=bias_correction_step)
    gen = torch.Generator().manual_seed(3)
    g, m = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen)
    vmax = v + torch.rand(n, generator=gen)
    want_state = [m.clone(), v.clone(), vmax.clone()]
    want = amsgrad_direction(g, want_state[0], want_state[1], want_state[2] if amsgrad else None, **kw)
    for skip in (False, True):
        state = [t.clone().to(DEVICE) for t in (m, v, vmax)]
        got = triton_amsgrad.amsgrad_direction(
            g.to(DEVICE), state[0], state[1], state[2] if amsgrad else None, torch.tensor(skip, device=DEVICE), **kw
        )
        if skip:
            assert torch.equal(got.cpu(), torch.zeros(n))
            for a, b in zip(state, (m, v, vmax)):
                assert_bits_equal(a, b)
        else:
            # a few ulps of the terms (torch may contract m * beta1 + (1 - beta1) * g into an FMA; the kernel does not)
            torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
            for a, b in zip(state, want_state):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def test_update_kernel_refuses_what_it_cannot_take():
    x = torch.zeros(16, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous fp32 buffers"):
        triton_amsgrad.amsgrad_direction(x.double(), x.double(), x.double(), None, torch.tensor(False), beta1=0.9, beta2=0.99, eps=1e-8)
    with pytest.raises(ValueError, match="skip must be one element"):
        triton_amsgrad.amsgrad_direction(x, x.clone(), x.clone(), None, torch.zeros(2, dtype=torch.bool, device=DEVICE), beta1=0.9, beta2=0.99, eps=1e-8)


# ------------------------------------------------------------------------------------------------
# the optimizer


NUMEL, WORLD = 3001, 2


def _build(name, p, transport, policy, weight_decay=0.1, bias_correction=False):
    if name == "cdadam":
        return CDAdam([p], lr=1e-2, block_size=64, weight_decay=weight_decay, transport=transport,
                      nonfinite_grads=policy, bias_correction=bias_correction)  # fmt: skip
    # 1-bit Adam: warm-up steps 1-2 agree on the host, and so does step 3 (a new kind of step)
    return OneBitAdam([p], lr=1e-2, freeze_step=2, weight_decay=weight_decay, transport=transport,
                      nonfinite_grads=policy)  # fmt: skip


def _train(monkeypatch, name="cdadam", *, agreement="device", nan_at=None, policy="skip", steps=5, **kwargs):
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", agreement)

    def rank(r, transport):
        p = torch.nn.Parameter(torch.linspace(-1, 1, NUMEL, device=DEVICE))
        opt = _build(name, p, transport, policy, **kwargs)
        history = []
        for t in range(steps):
            grad = _grad(NUMEL, t, r)
            if t == nan_at and r == 1:
                grad[11] = float("inf")
            p.grad = grad.to(DEVICE)
            try:
                opt.step()
            except FloatingPointError as e:
                history.append(("raised", str(e), p.detach().cpu().clone()))
                return history, opt
            state = opt.state[p]
            history.append(
                (p.detach().cpu().clone(), {k: v.cpu().clone() for k, v in state.items() if torch.is_tensor(v)})
            )
        opt.synchronize()
        return history, opt

    return InProcessWorld(WORLD, device=DEVICE).run(rank)


@pytest.mark.parametrize("name,bias_correction", [("cdadam", False), ("cdadam", True), ("onebit", False)])
def test_without_a_nan_the_step_equals_the_host_agreed_one(monkeypatch, name, bias_correction):
    """CD-Adam: within a few ulps (its update kernel rounds as the eager lines do, but without FMA); 1-bit
    Adam: bit for bit (its update is the eager lines, scaled by a device scalar)."""
    extra = {"bias_correction": bias_correction} if name == "cdadam" else {}
    device = _train(monkeypatch, name, **extra)
    host = _train(monkeypatch, name, agreement="host", **extra)
    keys = (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, MARKOV_STATE, DOWN_MARKOV_STATE) if name == "cdadam" else (EXP_AVG, WORKER_ERROR, SERVER_ERROR)
    tol = dict(rtol=1e-5, atol=1e-7) if name == "cdadam" else dict(rtol=0, atol=0)
    for r in range(WORLD):
        (dev_hist, dev_opt), (host_hist, host_opt) = device[r], host[r]
        assert_bits_equal(dev_hist[0][0], host_hist[0][0])  # the first step is agreed by the host in both
        for (p_dev, s_dev), (p_host, s_host) in zip(dev_hist, host_hist):
            torch.testing.assert_close(p_dev, p_host, **tol)
            for key in keys:
                if key in s_host:
                    torch.testing.assert_close(s_dev[key], s_host[key], **tol)
        assert_bits_equal(dev_hist[-1][0], device[0][0][-1][0])  # the ranks hold the same parameters
        assert dev_opt.completed_steps() == host_opt.completed_steps() == 5
        assert dev_opt.skipped_steps == 0


@pytest.mark.parametrize("name", ["cdadam", "onebit"])
def test_a_skipped_step_changes_no_parameter_or_moment_on_any_rank(monkeypatch, name):
    """An inf on rank 1 at step 4 (index 3): parameters and moments after it are those before it, bit for bit,
    on every rank; rank 1's compression state stays, rank 0's advances; the skip is counted and the step count
    put back once read; training goes on with the ranks identical."""
    out = _train(monkeypatch, name, nan_at=3, steps=6)
    moments, own = ((EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ), MARKOV_STATE) if name == "cdadam" else ((EXP_AVG, EXP_AVG_SQ), WORKER_ERROR)
    for r in range(WORLD):
        hist, opt = out[r]
        (p_before, s_before), (p_skip, s_skip) = hist[2], hist[3]
        assert_bits_equal(p_skip, p_before)
        for key in moments:
            assert_bits_equal(s_skip[key], s_before[key])
        assert torch.equal(s_skip[own], s_before[own]) == (r == 1)
        if name == "cdadam":
            assert not torch.equal(s_skip[DOWN_MARKOV_STATE], s_before[DOWN_MARKOV_STATE])  # gtil follows ghat
        assert not torch.equal(hist[4][0], p_skip)  # the next step trains
        assert opt.skipped_steps == 1 and opt.completed_steps() == 5 and opt.steps_taken == 5
        assert opt.state[opt.param_groups[0]["params"][0]][STEP] == 5
        for step in range(6):
            assert_bits_equal(hist[step][0], out[0][0][step][0])


def test_error_policy_raises_at_the_next_step_on_every_rank(monkeypatch):
    out = _train(monkeypatch, nan_at=2, policy="error", steps=5)
    for r in range(WORLD):
        hist, opt = out[r]
        assert len(hist) == 4 and hist[3][0] == "raised"  # raised when step 4 read step 3's outcome
        assert "at step 3" in hist[3][1] and ("including this one" if r == 1 else "not this one") in hist[3][1]
        assert_bits_equal(hist[3][2], hist[1][0])  # neither step 3 nor step 4 moved the parameters
        assert opt.completed_steps() == 2 and opt.skipped_steps == 0


def test_only_the_first_step_and_the_first_after_a_load_agree_on_the_host(monkeypatch):
    calls = []
    real = safety.agree_on_step
    monkeypatch.setattr("deepspeed_cdadam.optim.base.agree_on_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device")

    def rank(r, transport):
        p = torch.nn.Parameter(torch.linspace(-1, 1, NUMEL, device=DEVICE))
        opt = CDAdam([p], lr=1e-2, block_size=64, transport=transport)
        for t in range(6):
            if t == 3:
                opt.load_state_dict(opt.state_dict())
            p.grad = _grad(NUMEL, t, r).to(DEVICE)
            opt.step()
        return opt.completed_steps()

    assert InProcessWorld(WORLD, device=DEVICE).run(rank) == [6, 6]
    assert len(calls) == 2 * WORLD  # steps 1 and 4 on each rank


def test_a_bad_setting_of_the_switch_is_named(monkeypatch):
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "sometimes")
    with pytest.raises(ValueError, match=r"DEEPSPEED_CDADAM_STEP_AGREEMENT='sometimes' is not allowed: use 'device'"):
        safety.step_agreement()


class _HostReads(TorchFunctionMode):
    """Counts what would make the host wait for a GPU: reading a tensor's value (``item``, ``tolist``,
    ``bool``/``int``/``float`` of a tensor, ``cpu``, ``numpy``)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and not self.paused:
            import traceback

            self.reads.append(name + "\n" + "".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["cdadam", "onebit"])
def test_the_host_reads_nothing_in_a_step_but_the_previous_steps_outcome(monkeypatch, name):
    """Steps 3-6 (CD-Adam's step 1 and 1-bit Adam's warm-up step 1 and first compressed step 2 agree on the
    host) under a mode that records every host read of a tensor; the
    kernels' launches (the CPU interpreter reads its arrays on the host) and the previous step's outcome
    (``DecidedSkip.read``, of work queued a step ago) are left out. On a GPU, ``tests/optim/test_nccl.py`` runs
    such steps under ``torch.cuda.set_sync_debug_mode("error")``."""
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device")
    guard = _HostReads()

    def paused(fn):
        def run(*a, **k):
            guard.paused += 1
            try:
                return fn(*a, **k)
            finally:
                guard.paused -= 1

        return run

    monkeypatch.setattr(tx, "_launch", paused(tx._launch))
    monkeypatch.setattr(safety.DecidedSkip, "read", paused(safety.DecidedSkip.read))
    world = InProcessWorld(1, device=DEVICE)  # one rank: the in-process collectives run on this thread
    transport = world.transports[0]
    monkeypatch.setattr(transport, "all_to_all", paused(transport.all_to_all))
    monkeypatch.setattr(transport, "all_gather", paused(transport.all_gather))
    p = torch.nn.Parameter(torch.linspace(-1, 1, NUMEL, device=DEVICE))
    if name == "cdadam":
        opt = CDAdam([p], lr=1e-2, block_size=64, weight_decay=0.1, transport=transport)
    else:
        opt = OneBitAdam([p], lr=1e-2, freeze_step=1, weight_decay=0.1, transport=transport)
    for t in range(2):
        p.grad = _grad(NUMEL, t, 0).to(DEVICE)
        opt.step()
    with guard:
        for t in range(2, 6):
            p.grad = _grad(NUMEL, t, 0).to(DEVICE)
            opt.step()
    assert guard.reads == []
    assert opt._pending_skip is not None  # the last step's outcome is still unread
    assert opt.completed_steps() == 6 and opt._pending_skip is None


def test_a_step_whose_outcome_decides_the_next_plan_is_read_at_once(monkeypatch):
    """A schedule that changes after 3 completed steps (as 1-bit Adam's freeze step): step 3's outcome decides
    the plan of step 4, so step 3 reads it before returning (a skip there keeps step 4 in the old plan on every
    rank); the other device-decided steps leave theirs unread."""
    from deepspeed_cdadam.schedule import StepKind

    class Scheduled(CDAdam):
        def planned_step(self):
            return StepKind.EXACT if self.completed_steps() < 3 else StepKind.COMPRESSED

    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device")

    def rank(r, transport):
        p = torch.nn.Parameter(torch.linspace(-1, 1, NUMEL, device=DEVICE))
        opt = Scheduled([p], lr=1e-2, block_size=64, transport=transport)
        unread = []
        for t in range(5):
            p.grad = _grad(NUMEL, t, r).to(DEVICE)
            opt.step()
            unread.append(opt._pending_skip is not None)
        return unread

    # step 1 agrees on the host; 2 decided on the device; 3 too, read at once; 4 agrees (a new plan); 5 device
    assert InProcessWorld(WORLD, device=DEVICE).run(rank) == [[False, True, False, False, True]] * WORLD


def test_reading_the_outcome_outside_step_counts_it_and_the_error_waits_for_the_next_step(monkeypatch):
    """``nonfinite_grads="error"``: ``state_dict()`` (which rank 0 may call alone, to save) reads the outcome
    and puts the counters back without raising; the next ``step()`` raises on every rank. A ``load_state_dict``
    with an outcome unread counts it and drops the error with the state it replaces."""
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device")

    def rank(r, transport):
        p = torch.nn.Parameter(torch.linspace(-1, 1, NUMEL, device=DEVICE))
        opt = CDAdam([p], lr=1e-2, block_size=64, transport=transport, nonfinite_grads="error")
        for t in range(3):
            p.grad = _grad(NUMEL, t, r).to(DEVICE)
            if t == 2 and r == 1:
                p.grad[0] = float("nan")
            opt.step()
        saved = opt.state_dict()["state"][0][STEP] if r == 0 else None  # rank 0 alone: no raise there
        counts = [opt.completed_steps(), opt.steps_taken]
        p.grad = _grad(NUMEL, 3, r).to(DEVICE)
        with pytest.raises(FloatingPointError, match="at step 3"):
            opt.step()
        p.grad = _grad(NUMEL, 4, r).to(DEVICE)
        opt.step()  # raised once: training may go on
        p.grad = _grad(NUMEL, 5, r).to(DEVICE)
        p.grad[1] = float("inf")
        opt.step()  # decided on the device, unread
        opt.load_state_dict(opt.state_dict())  # reads it (its error goes with the replaced state)
        p.grad = _grad(NUMEL, 6, r).to(DEVICE)
        opt.step()
        return saved, counts, opt.completed_steps()

    assert InProcessWorld(WORLD, device=DEVICE).run(rank) == [(2, [2, 2], 4), (None, [2, 2], 4)]


def test_an_optimizer_with_no_trainable_parameter_steps_as_before(monkeypatch):
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device")
    p = torch.nn.Parameter(torch.zeros(10, device=DEVICE), requires_grad=False)
    opt = CDAdam([p], transport=InProcessWorld(1, device=DEVICE).transports[0])
    for _ in range(3):
        opt.step()
    assert opt.completed_steps() == 0 and opt._pending_skip is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_bucket_skips_together_and_low_precision_parameters_keep_their_master(monkeypatch, dtype):
    """Four parameters in three buckets (``bucket_cap_mb``), bf16 parameters on fp32 master copies: an inf in
    one parameter of rank 1 skips every bucket on every rank (the flag is the OR over all of a rank's
    gradients, marked in every bucket's messages), and the parameters, masters and moments stay as they
    were; the steps before and after it are decided on the device."""
    monkeypatch.setenv("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device")
    sizes = (3000, 2000, 1000, 500)
    decided = []
    real = CDAdam._step_decided_on_device
    monkeypatch.setattr(CDAdam, "_step_decided_on_device", lambda self, *a: decided.append(1) or real(self, *a))

    def rank(r, transport):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, n, device=DEVICE).to(dtype)) for n in sizes]
        opt = CDAdam(params, lr=1e-2, block_size=64, weight_decay=0.1, transport=transport, nonfinite_grads="skip",
                     bucket_cap_mb=3000 * 4 / 2**20)  # fmt: skip
        snapshots = []
        for t in range(4):
            for i, p in enumerate(params):
                p.grad = _grad(p.numel(), 10 * t + i, r).to(device=DEVICE, dtype=dtype)
            if t == 2 and r == 1:
                params[3].grad[4] = float("inf")
            opt.step()
            state = {(b.index, k): v.cpu().clone() for b in opt.buckets() for k, v in opt.bucket_state(b).items() if torch.is_tensor(v)}
            snapshots.append(([p.detach().cpu().clone() for p in params], state))
        opt.synchronize()
        return len(opt.buckets()), snapshots, opt.skipped_steps, opt.completed_steps()

    kept = (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, MASTER_PARAMS)
    out = InProcessWorld(WORLD, device=DEVICE).run(rank)
    for buckets, snapshots, skipped, completed in out:
        assert buckets == 3 and skipped == 1 and completed == 3
        (p_before, s_before), (p_skip, s_skip), (p_after, _) = snapshots[1], snapshots[2], snapshots[3]
        assert all(torch.equal(a, b) for a, b in zip(p_skip, p_before))  # every parameter of every bucket kept
        assert {k for _, k in s_before} >= ({MASTER_PARAMS} if dtype == torch.bfloat16 else {EXP_AVG})
        for key, value in s_skip.items():
            if key[1] in kept:
                assert torch.equal(value, s_before[key]), key  # moments and masters kept, bit for bit
        assert not torch.equal(s_skip[0, DOWN_MARKOV_STATE], s_before[0, DOWN_MARKOV_STATE])  # gtil moved
        assert not any(torch.equal(a, b) for a, b in zip(p_after, p_skip))  # training goes on, in every bucket
        assert all(torch.equal(a, b) for a, b in zip(p_after, out[0][1][3][0]))  # the ranks agree
    assert len(decided) == 3 * WORLD  # steps 2-4, on each rank

"""Exchanges started during backward (``overlap=True``, ``optim/overlap.py``): bit for bit the
non-overlapped step, with the same bytes, on in-process ranks and on gloo; gradients changed after
backward (clipping, accumulation) and non-finite gradients handled as without overlap."""

from __future__ import annotations

import logging

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, TorchDistributedTransport
from tests.distributed import spawn

CAP_MB = 0.002  # 524 fp32 coordinates: the model below makes 4 buckets


def _model() -> torch.nn.Module:
    """The same model on every rank (in-process ranks are threads: no global RNG)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _train(rank, transport, overlap, *, steps=4, clip=None, micro_batches=1, pause=False, bad_step=None, **kwargs):
    """Train ``_model`` on rank-own batches; returns parameters, state, bytes and the optimizer's counters.
    Between backward and step() the loss is all-reduced on ``transport`` (a training loop's logging), while
    the exchanges started during backward run on the optimizer's own communicator."""
    model = _model()
    opt = CDAdam(model.parameters(), lr=1e-2, transport=transport, bucket_cap_mb=CAP_MB, overlap=overlap, **kwargs)
    gen = torch.Generator().manual_seed(rank)
    for step in range(steps):
        opt.zero_grad()
        for micro in range(micro_batches):
            x, y = torch.randn(16, 20, generator=gen), torch.randn(16, 5, generator=gen)
            if step == bad_step and rank == 1:
                x[0, 0] = float("nan")
            last = micro == micro_batches - 1
            with opt.no_overlap() if pause and not last else torch.enable_grad():
                torch.nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        transport.all_reduce_sum(torch.ones(1))  # the loop's own collective, as a logged loss
        opt.step()
    # by parameter (overlap creates the buckets' states in the order backward completes them)
    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()]
    started = opt._overlap.started_during_backward if opt._overlap is not None else 0
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": state,
        "bytes": (opt.comm_stats.bytes_up, opt.comm_stats.bytes_down),
        "buckets": len(opt.buckets()),
        "started": started,
        "skipped": opt.skipped_steps,
    }


def _both(world, **kwargs):
    plain = InProcessWorld(world).run(lambda r, t: _train(r, t, False, **kwargs))
    overlapped = InProcessWorld(world).run(lambda r, t: _train(r, t, True, **kwargs))
    return plain, overlapped


def _assert_identical(plain, overlapped):
    for a, b in zip(plain, overlapped):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        assert len(a["state"]) == len(b["state"])
        for sa, sb in zip(a["state"], b["state"]):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a["bytes"] == b["bytes"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("block_size", [256, None], ids=["fused_cpu_kernels", "torch_lines"])
def test_overlapped_steps_equal_plain_steps_bit_for_bit(world, block_size, monkeypatch):
    from deepspeed_cdadam.kernels import cpu_exchange

    fused = []
    original = cpu_exchange.prepare_markov
    monkeypatch.setattr(cpu_exchange, "prepare_markov", lambda *a: fused.append(1) or original(*a))
    plain, overlapped = _both(world, block_size=block_size)
    # blocks of 256: the large buckets run the fused CPU kernels, the bias buckets' short shards the torch
    # lines (both kinds in one step); one block per shard: the torch lines only
    assert (0 < len(fused) < world * 4 * 4) if block_size else not fused
    _assert_identical(plain, overlapped)
    assert plain[0]["buckets"] == 4
    # backward completed (and started) every bucket before step(), on every rank and step
    assert all(r["started"] == 4 * 4 for r in overlapped)
    assert plain[0]["params"][0].abs().sum() > 0


def test_clipping_after_backward_redoes_the_exchanges_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="deepspeed_cdadam"):
        plain, overlapped = _both(2, clip=0.05)
    for a, b in zip(plain, overlapped):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        assert b["bytes"][0] == 2 * a["bytes"][0]  # every step's messages sent twice
    assert "gradients changed after their exchange started" in caplog.text


@pytest.mark.parametrize("pause", [True, False], ids=["no_overlap_context", "second_backward"])
def test_gradient_accumulation(pause):
    plain, overlapped = _both(2, micro_batches=3, pause=pause)
    for a, b in zip(plain, overlapped):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        # paused micro-batches start nothing: the last backward starts every bucket once per step;
        # unpaused, the first micro-batch starts them and the second makes them stale (sent again at step())
        assert b["bytes"][0] == (1 if pause else 2) * a["bytes"][0]
    assert all(r["started"] == 4 * 4 for r in overlapped)


def test_a_skipped_step_leaves_the_state_as_without_overlap():
    plain, overlapped = _both(2, bad_step=1, nonfinite_grads="skip")
    for a, b in zip(plain, overlapped):
        b_bytes = b.pop("bytes")
        a_bytes = a.pop("bytes")
        # the skipped step's messages had left during backward (3 steps ran: one more step's bytes)
        assert b_bytes[0] == a_bytes[0] * 4 / 3 and b_bytes[1] == a_bytes[1] * 4 / 3
        a["bytes"] = b["bytes"] = None
    _assert_identical(plain, overlapped)
    assert all(r["skipped"] == 1 for r in plain + overlapped)


def test_gradients_set_without_backward_start_at_step():
    def work(rank, transport):
        model = _model()
        opt = CDAdam(model.parameters(), lr=1e-2, transport=transport, overlap=True, bucket_cap_mb=CAP_MB)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1 * (rank + 1))
        opt.step()
        return [p.detach().clone() for p in model.parameters()], opt._overlap.started_during_backward

    for params, started in InProcessWorld(2).run(work):
        assert started == 0
        # CD-Adam's first step: gtil = C(mean g) = 0.15 everywhere; m = 0.1 gtil, v = 0.01 gtil^2 -> step lr * 1
        # (eps 1e-8 under the root: 1 - 2e-5 of it)
        assert all(torch.allclose(p, q - 1e-2, rtol=0, atol=1e-6) for p, q in zip(params, _model().parameters()))


def test_bucket_cap_fills_buckets_with_whole_parameters_in_order():
    model = _model()  # 600, 30, 900, 30, 150, 5 coordinates; the cap: 2097 bytes = 524 fp32 coordinates
    opt = CDAdam(model.parameters(), lr=1e-3, bucket_cap_mb=CAP_MB)
    # a parameter over the cap is a bucket alone; the next one starts a new bucket when it would pass the cap
    assert [[p.numel() for p in b.params] for b in opt.buckets()] == [[600], [30], [900], [30, 150, 5]]
    assert len(CDAdam(model.parameters(), lr=1e-3).buckets()) == 1  # no cap: one bucket per dtype and device
    one = InProcessWorld(1).transports[0]
    assert len(CDAdam(model.parameters(), lr=1e-3, overlap=True, transport=one).buckets()) == 1  # 25 MB with overlap


@pytest.mark.parametrize(
    "kwargs, key",
    [({"exchange": "naive"}, "exchange"), ({"scale_blocks": "tensor"}, "scale_blocks"), ({"hierarchy": "node"}, "hierarchy")],
)
def test_overlap_refuses_what_it_does_not_run(kwargs, key):
    with pytest.raises(ValueError, match=f"overlap=True needs {key}="):
        CDAdam(_model().parameters(), overlap=True, **kwargs)


def test_overlap_refuses_parameters_off_the_cpu():
    p = torch.nn.Parameter(torch.empty(8, device="meta"))
    with pytest.raises(ValueError, match="CPU parameters only"):
        CDAdam([p], overlap=True)


def _gloo_train(rank, world_size, out_dir):
    results = {flag: _train(rank, TorchDistributedTransport(timeout_s=60), flag) for flag in (False, True)}
    torch.save(results, f"{out_dir}/overlap-{rank}.pt")


def test_overlap_on_gloo_equals_plain_steps(tmp_path):
    spawn(_gloo_train, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"overlap-{rank}.pt")
        _assert_identical([got[False]], [got[True]])
        assert got[True]["started"] == 4 * 4

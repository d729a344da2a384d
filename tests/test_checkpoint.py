"""Per-rank compression state files: restore, reset, and every way a file can be wrong."""

import re
from pathlib import Path

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam
from deepspeed_cdadam.checkpoint import CheckpointMismatchError, load_rank_state, rank_state_path, save_rank_state


def _trained(opt_cls, rank, transport, numel=10, steps=3):
    p = torch.nn.Parameter(torch.linspace(-1, 1, numel, dtype=torch.float64))
    opt = opt_cls([p], lr=1e-2, transport=transport, **({"freeze_step": 1} if opt_cls is OneBitAdam else {}))
    for t in range(steps):
        p.grad = torch.randn(numel, generator=torch.Generator().manual_seed(10 * t + rank), dtype=torch.float64)
        opt.step()
    return opt


def test_round_trip_restores_each_ranks_own_state(tmp_path):
    def worker(rank, tr):
        trained = _trained(CDAdam, rank, tr)
        save_rank_state(trained, str(tmp_path))
        fresh = _trained(CDAdam, rank, tr, steps=1)
        assert load_rank_state(fresh, str(tmp_path))
        # the byte counters continue from the checkpoint, and the exchange keeps adding to them
        assert fresh.comm_stats == trained.comm_stats and fresh.steps_taken == 3
        before = fresh.comm_stats.bytes_up
        fresh.param_groups[0]["params"][0].grad = torch.ones(10, dtype=torch.float64)
        fresh.step()
        assert fresh.comm_stats.bytes_up > before
        return fresh.state[fresh.param_groups[0]["params"][0]]["markov_state"]

    states = InProcessWorld(2).run(worker)
    assert not torch.equal(states[0], states[1])  # per rank, not rank 0's copied everywhere


def _load_all(tmp_path, opt_cls, numel=10):
    return InProcessWorld(2).run(lambda r, tr: load_rank_state(_trained(opt_cls, r, tr, numel=numel), str(tmp_path)))


def _save_all(tmp_path, opt_cls=CDAdam):
    InProcessWorld(2).run(lambda r, tr: save_rank_state(_trained(opt_cls, r, tr), str(tmp_path)))


def test_missing_files_reset_on_every_rank(tmp_path, caplog):
    assert _load_all(tmp_path, CDAdam) == [False, False]
    assert "resetting the compression state" in caplog.text


def test_truncated_file_is_an_error_on_every_rank(tmp_path):
    _save_all(tmp_path)
    path = Path(rank_state_path(str(tmp_path), 1, 2))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match=re.escape("problems on rank(s) [1]")):
        _load_all(tmp_path, CDAdam)


def test_other_optimizer_type_is_an_error(tmp_path):
    _save_all(tmp_path, OneBitAdam)
    with pytest.raises(CheckpointMismatchError, match="was written by OneBitAdam, not CDAdam"):
        InProcessWorld(2).run(lambda r, tr: load_rank_state(_trained(CDAdam, r, tr), str(tmp_path)))


def test_other_parameter_layout_is_an_error(tmp_path):
    _save_all(tmp_path)
    with pytest.raises(
        CheckpointMismatchError, match=re.escape("holds buckets of sizes [10], the model has [12]")
    ):
        _load_all(tmp_path, CDAdam, numel=12)


def test_state_from_another_optimizer_is_an_error():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    adam = torch.optim.Adam([p])
    p.grad = torch.ones(3, 4)
    adam.step()
    opt = CDAdam([p], transport=InProcessWorld(1).transports[0])
    opt.load_state_dict(adam.state_dict())
    with pytest.raises(CheckpointMismatchError, match="was not written by CDAdam"):
        load_rank_state(opt, "/nonexistent")


def test_warm_start_reads_no_file_and_keeps_the_optimizer_state(tmp_path):
    """restore=False (load_optimizer_states=False / load_module_only=True): nothing read, nothing reset."""
    _save_all(tmp_path)
    Path(rank_state_path(str(tmp_path), 1, 2)).write_bytes(b"not read")

    def worker(rank, tr):
        opt = _trained(CDAdam, rank, tr, steps=2)
        state = opt.state[opt.param_groups[0]["params"][0]]
        before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        assert load_rank_state(opt, str(tmp_path), restore=False) is False
        assert all(torch.equal(state[k], v) for k, v in before.items()) and state["step"] == 2

    InProcessWorld(2).run(worker)


def test_ranks_disagreeing_on_restoring_is_an_error_on_every_rank(tmp_path):
    _save_all(tmp_path)
    errors = [None, None]

    def worker(rank, tr):
        try:
            load_rank_state(_trained(CDAdam, rank, tr), str(tmp_path), restore=rank == 0)
        except CheckpointMismatchError as err:
            errors[rank] = str(err)

    InProcessWorld(2).run(worker)
    assert all(e is not None and "rank(s) [1] load without them" in e for e in errors), errors


def _two_groups(rank, transport, steps=2):
    """A decay / no-decay split: two groups, one bucket of 10 + 6 coordinates."""
    p0 = torch.nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
    p1 = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
    opt = CDAdam([{"params": [p0], "weight_decay": 0.1}, {"params": [p1]}], lr=1e-2, transport=transport)
    for t in range(steps):
        for p in (p0, p1):
            p.grad = torch.randn(p.numel(), generator=torch.Generator().manual_seed(10 * t + rank), dtype=p.dtype)
        opt.step()
    return opt


def _as_format_1(path: Path, layout: list[int]) -> None:
    """Rewrite a rank file as the per-parameter-group format 1 (one entry per group) would hold it."""
    saved = torch.load(path, weights_only=True)
    (entry,) = saved.pop("buckets")
    offsets = [0, layout[0], sum(layout)]
    saved["groups"] = [
        {k: v[offsets[i] : offsets[i + 1]] if v.numel() == sum(layout) else v for k, v in entry.items()}
        for i in range(len(layout))
    ]
    saved.update(format=1, layout=layout)
    torch.save(saved, path)


def test_rank_files_of_the_per_group_layout_are_refused(tmp_path):
    InProcessWorld(2).run(lambda r, tr: save_rank_state(_two_groups(r, tr), str(tmp_path)))
    for rank in range(2):
        _as_format_1(Path(rank_state_path(str(tmp_path), rank, 2)), [10, 6])
    msg = "holds one flat buffer per parameter group (format 1, groups of sizes [10, 6]); CDAdam now keeps one per "
    with pytest.raises(CheckpointMismatchError, match=re.escape(msg) + r".*sizes \[16\]"):
        InProcessWorld(2).run(lambda r, tr: load_rank_state(_two_groups(r, tr), str(tmp_path)))


def test_rank_files_of_format_1_with_one_group_are_its_one_bucket(tmp_path):
    _save_all(tmp_path)
    for rank in range(2):
        path = Path(rank_state_path(str(tmp_path), rank, 2))
        saved = torch.load(path, weights_only=True)
        saved.update(format=1, groups=saved.pop("buckets"))
        torch.save(saved, path)
    assert _load_all(tmp_path, CDAdam) == [True, True]


def test_state_dict_of_the_per_group_layout_is_refused():
    def run(rank, tr):
        opt = _two_groups(rank, tr)
        sd = opt.state_dict()
        (entry,) = sd["state"].values()  # the bucket's state, under the first parameter
        sd["state"] = {
            i: {k: v[sl] if torch.is_tensor(v) and v.numel() == 16 else v for k, v in entry.items()}
            for i, sl in ((0, slice(0, 10)), (1, slice(10, 16)))
        }
        with pytest.raises(CheckpointMismatchError, match=r"param_groups\[0\]\['params'\]\[0\] holds flat buffers of 10 "
                           r"coordinates in the per-parameter-group layout .* sizes \[16\]"):
            _two_groups(rank, tr, steps=0).load_state_dict(sd)
        return True

    assert InProcessWorld(2).run(run) == [True, True]


def test_a_checkpoint_found_on_some_ranks_only_is_an_error_on_every_rank(tmp_path):
    """A node-local checkpoint directory: the ranks that found none still enter the agreement."""

    def run(rank, tr):
        p = torch.nn.Parameter(torch.ones(10))
        opt = CDAdam([p], lr=1e-2, transport=tr)
        p.grad = torch.ones(10)
        opt.step()
        save_rank_state(opt, str(tmp_path))
        with pytest.raises(CheckpointMismatchError, match=r"found on some ranks only: rank\(s\) \[1\] found none"):
            load_rank_state(opt, str(tmp_path) if rank == 0 else None)
        return load_rank_state(opt, None)  # no rank found one: nothing to do, on every rank

    assert InProcessWorld(2).run(run) == [False, False]

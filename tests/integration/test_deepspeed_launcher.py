"""`deepspeed --num_gpus 2 ...` on CPU: JSON "CDAdam"/"OneBitAdam" through an unmodified deepspeed.initialize.

Each launch trains 8 steps on 2 gloo ranks and records gradients and parameters (ds_train.py).
Checked: the engine's all-reduce call count; the engine's parameters equal a replay of the recorded
gradients through our optimizer outside DeepSpeed, bit for bit (so the engine adds nothing and
loses nothing); CD-Adam equals the simulator; save at step k + load + continue == uninterrupted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from deepspeed_cdadam import CDAdam, InProcessWorld, OneBitAdam, ShardLayout
from deepspeed_cdadam.simulate import CDAdamReference
from tests.launch import deepspeed_cmd, run_checked

STEPS, SAVE_AT = 8, 5


def write_config(directory: Path, optimizer: dict, **extra) -> Path:
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0, "optimizer": optimizer, **extra}
    directory.mkdir(exist_ok=True)
    (directory / "ds.json").write_text(json.dumps(config))
    return directory / "ds.json"


def launch(
    tmp_path: Path, optimizer: dict, *script_args: str, world_size: int = 2, save: bool = True, **extra
) -> list[dict]:
    return launch_with_output(tmp_path, optimizer, *script_args, world_size=world_size, save=save, **extra)[0]


def launch_with_output(
    tmp_path: Path, optimizer: dict, *script_args: str, world_size: int = 2, save: bool = True, **extra
) -> tuple[list[dict], str]:
    """``launch``, also returning the ranks' output (stdout and stderr)."""
    config = write_config(tmp_path, optimizer, **extra)
    cmd = [
        *deepspeed_cmd(world_size, "tests/integration/ds_train.py"),
        "--deepspeed_config",
        str(config),
        "--out",
        str(tmp_path),
        "--steps",
        str(STEPS),
        *(("--save-at", str(SAVE_AT)) if save and "--load-from" not in script_args else ()),
        *script_args,
    ]
    output = run_checked(cmd)
    prefix = "loaded_rank" if "--load-from" in script_args else "rank"
    return [torch.load(tmp_path / f"{prefix}{r}.pt") for r in range(world_size)], output


def replay(cls, kwargs: dict, records: list[dict]) -> list[list[torch.Tensor]]:
    """The recorded gradients through our optimizer outside DeepSpeed (2 in-process ranks)."""

    def run(rank, transport):
        p = torch.nn.Parameter(records[rank]["x0"].clone())
        opt = cls([p], transport=transport, **kwargs)
        if isinstance(opt, OneBitAdam):
            opt.engine_averages_exact_steps = True  # the engine averaged them during the warm-up
        out = []
        for g in records[rank]["grads"]:
            p.grad = g.clone()
            opt.step()
            out.append(p.detach().clone())
        return out

    return InProcessWorld(2).run(run)


def test_cdadam_from_json(tmp_path):
    records = launch(tmp_path, {"type": "CDAdam", "params": {"lr": 0.01, "betas": [0.9, 0.99]}})
    assert records[0]["optimizer"] == "CDAdam"
    assert [r["allreduce_calls"] for r in records] == [0, 0]  # compressed from step 1: engine all-reduce off
    replayed = replay(CDAdam, {"lr": 0.01, "betas": (0.9, 0.99)}, records)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(records[rank]["params"], replayed[rank]))
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1])
    x0 = records[0]["x0"]
    ref = CDAdamReference(x0, 2, ShardLayout(x0.numel(), 2), lr=0.01, betas=(0.9, 0.99))
    for t in range(STEPS):
        torch.testing.assert_close(
            ref.step([r["grads"][t] for r in records]), records[0]["params"][t], rtol=0, atol=1e-6
        )
    assert not torch.equal(records[0]["params"][-1], x0)

    # The same run over MPI (mpiexec, comm_backend_name="mpi"): the same bytes, so the same weights.
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if mpiexec.exists():
        mpi_params = {"lr": 0.01, "betas": [0.9, 0.99], "comm_backend_name": "mpi"}
        config = write_config(tmp_path / "mpi", {"type": "CDAdam", "params": mpi_params})
        run_checked(
            [
                str(mpiexec),
                "-n",
                "2",
                sys.executable,
                "tests/integration/ds_train.py",
                "--deepspeed_config",
                str(config),
                "--out",
                str(tmp_path / "mpi"),
                "--steps",
                str(STEPS),
                "--save-at",
                str(SAVE_AT),
            ]
        )
        for rank in range(2):
            over_mpi = torch.load(tmp_path / "mpi" / f"rank{rank}.pt")
            assert over_mpi["allreduce_calls"] == 0
            assert all(torch.equal(a, b) for a, b in zip(over_mpi["params"], records[rank]["params"]))
            assert torch.equal(over_mpi["resumed_params"], records[rank]["params"][-1])

    # With a model-parallel unit (model parallel size 1): the optimizer takes its data-parallel group.
    (tmp_path / "mpu").mkdir()
    with_mpu = launch(tmp_path / "mpu", {"type": "CDAdam", "params": {"lr": 0.01, "betas": [0.9, 0.99]}}, "--mpu")
    for rank in range(2):
        assert with_mpu[rank]["allreduce_calls"] == 0
        assert all(torch.equal(a, b) for a, b in zip(with_mpu[rank]["params"], records[rank]["params"]))
        assert torch.equal(with_mpu[rank]["resumed_params"], records[rank]["params"][-1])

    # The pipeline engine (1 stage, 2 data-parallel ranks, same layers and batches): its all-reduce
    # stays off too, and it takes the very same steps.
    config = write_config(tmp_path / "pipe", {"type": "CDAdam", "params": {"lr": 0.01, "betas": [0.9, 0.99]}})
    run_checked(
        [
            *deepspeed_cmd(2, "tests/integration/ds_pipe.py"),
            "--deepspeed_config",
            str(config),
            "--out",
            str(tmp_path / "pipe"),
        ]
    )
    for rank in range(2):
        piped = torch.load(tmp_path / "pipe" / f"pipe{rank}.pt")
        assert piped["optimizer"] == "CDAdam" and piped["allreduce_calls"] == 0 and not piped["pipeline_allreduce"]
        assert all(torch.equal(a, b) for a, b in zip(piped["params"], records[rank]["params"][:4]))

    # Resume the 2-rank checkpoint (saved at step SAVE_AT) on 1 rank: documented behaviour is a
    # reset of the compression state on every rank, with moments, step and weights kept.
    saved = torch.load(next((tmp_path / "ckpt").glob("global_step*/cdadam_rank0_of_2.pt")))
    assert saved["world_size"] == 2 and saved["buckets"][0]["markov_state"].abs().sum() > 0
    (loaded,) = launch(
        tmp_path, {"type": "CDAdam", "params": {"lr": 0.01}}, "--load-from", str(tmp_path / "ckpt"), world_size=1
    )
    assert loaded["step"] == SAVE_AT
    assert loaded["markov_state"].abs().sum() == 0 and loaded["down_markov_state"].abs().sum() == 0
    assert loaded["server_markov_state"].numel() == x0.numel()  # one rank serves the whole buffer now
    assert loaded["exp_avg"].abs().sum() > 0


def test_onebitadam_from_json_uses_engine_allreduce_only_in_warmup(tmp_path):
    params = {"lr": 0.01, "freeze_step": 3, "comm_backend_name": "nccl", "cuda_aware": False}
    records = launch(tmp_path, {"type": "OneBitAdam", "params": params})
    assert records[0]["optimizer"] == "OneBitAdam"
    assert [r["allreduce_calls"] for r in records] == [3, 3]  # warm-up steps only
    for t in range(3):  # warm-up: the engine averaged the gradients
        assert torch.equal(records[0]["grads"][t], records[1]["grads"][t])
    assert not torch.equal(records[0]["grads"][3], records[1]["grads"][3])  # compressed: local gradients
    replayed = replay(OneBitAdam, {"lr": 0.01, "freeze_step": 3}, records)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(records[rank]["params"], replayed[rank]))
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1])


def test_fp16_overflow_on_one_rank_skips_the_step_on_all_ranks(tmp_path):
    records = launch(
        tmp_path,
        {"type": "CDAdam", "params": {"lr": 0.01}},
        "--inf-at",
        "1:4",
        fp16={"enabled": True, "initial_scale_power": 8},
    )
    for r in records:
        assert r["skipped_steps"] == 1
        steps = [s["step"] for s in r["opt_state"]]
        assert steps == [1, 2, 3, 3, 4, 5, 6, 7]  # step 4 overflowed on rank 1 and was skipped on both ranks
        before, skipped = r["opt_state"][2], r["opt_state"][3]
        for key in ("markov_state", "server_markov_state", "down_markov_state", "exp_avg", "max_exp_avg_sq"):
            assert torch.equal(before[key], skipped[key]), key  # compression state untouched
        assert torch.equal(r["params"][2], r["params"][3])
        assert torch.isfinite(r["params"][-1]).all()
    assert torch.equal(records[0]["params"][-1], records[1]["params"][-1])


@pytest.mark.slow
def test_fp16_overflow_agreement_does_not_rest_on_deepspeeds_onebit_branch(tmp_path):
    """DeepSpeed's fp16 overflow check all-reduces the flag over the data-parallel ranks only while
    the engine's own all-reduce is off (a branch kept for its 1-bit optimizers, which it deleted).
    With that branch patched out, one rank's inf gradient must still skip the step on every rank."""
    records = launch(
        tmp_path,
        {"type": "CDAdam", "params": {"lr": 0.01, "timeout_s": 30}},
        "--inf-at",
        "1:4",
        "--drop-deepspeed-overflow-agreement",
        save=False,
        fp16={"enabled": True, "initial_scale_power": 8},
    )
    for r in records:
        assert r["skipped_steps"] == 1
        assert [s["step"] for s in r["opt_state"]] == [1, 2, 3, 3, 4, 5, 6, 7]
        assert torch.equal(r["params"][2], r["params"][3])  # the overflowed step changed nothing
    for t in range(STEPS):
        assert torch.equal(records[0]["params"][t], records[1]["params"][t]), f"step {t + 1}"


def test_bytes_per_step_reach_the_monitor_and_the_progress_lines(tmp_path):
    """Bytes this rank's optimizer sent / received each step go to DeepSpeed's monitor (csv_monitor
    here) and, every steps_per_print steps, to the engine's progress lines."""
    records, output = launch_with_output(
        tmp_path,
        {"type": "OneBitAdam", "params": {"lr": 0.01, "freeze_step": 3}},
        save=False,
        steps_per_print=4,
        log_level="info",  # DeepSpeed's logger prints the engine's step lines (and ours) at INFO
        csv_monitor={"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "job"},
    )

    def column(name: str) -> list[tuple[int, float]]:
        rows = (tmp_path / "monitor" / "job" / f"Train_Samples_{name}.csv").read_text().split()
        assert rows[0] == f"step,{name}"
        return [(int(s), float(v)) for s, v in (row.split(",") for row in rows[1:])]

    sent, received, total = column("optimizer_bytes_sent"), column("optimizer_bytes_received"), column(
        "optimizer_bytes_sent_total"
    )
    assert [s for s, _ in sent] == [16 * t for t in range(1, STEPS + 1)]  # DeepSpeed's x axis: samples
    per_step = [v for _, v in sent]
    assert per_step == [v for _, v in received]  # every collective sends what it receives
    assert sum(per_step) == records[0]["bytes_sent"] == total[-1][1]
    assert len(set(per_step[:3])) == 1 and len(set(per_step[3:])) == 1  # warm-up; compressed
    assert per_step[3] > 4 * per_step[0]  # the compressed steps move the 1-bit momentum (328 coordinates)
    for step in (4, 8):
        assert f"step={step}, skipped=0" in output  # the engine's own line ...
        line = next(line for line in output.splitlines() if f"step={step}, OneBitAdam" in line)  # ... and ours
        assert "bytes sent per step" in line and "received per step" in line
    assert "step=2, OneBitAdam" not in output


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed.runtime.fp16.onebit") is None,
    reason="upstream OnebitAdam was removed after deepspeed 0.19.6",
)
@pytest.mark.parametrize(
    "model, layout, extra",
    [
        pytest.param("single", {}, {}, marks=pytest.mark.slow),  # the multi-tensor case covers it
        ("layers", {"scale_blocks": "tensor_padded"}, {}),
        pytest.param(
            "layers", {"scale_blocks": "group_padded"}, {"fp16": {"enabled": True, "loss_scale": 128}},
            marks=pytest.mark.slow,
        ),  # fmt: skip
    ],
    ids=["one_tensor", "multi_tensor_per_tensor_scales", "multi_tensor_fp16_per_group_scales"],
)
def test_onebitadam_matches_upstream_onebitadam_bit_for_bit(tmp_path, model, layout, extra):
    """DeepSpeed 0.19.6's own OnebitAdam (its compressed all-reduce code, CPU bit packing swapped in)
    against ours inside the same engine: identical parameters through warm-up and compressed phase.

    Lining the two up: upstream's first step() only initialises (a zero-gradient step is given to it
    first, so its freeze_step is one higher); one worker scale per tensor as upstream
    (worker_scale_scope="tensor"). ``single``: one weight tensor of 128 = 8 * 8 * 2 coordinates, where
    upstream's per-tensor padding is a no-op. ``layers``: 3 Linear layers, 6 tensors of 520, 40, 960,
    24, 120 and 5 coordinates (none a multiple of 16, so upstream pads every one): with
    scale_blocks="tensor_padded" each tensor is padded and chunked across the 2 servers as upstream's
    compressed all-reduce does, one worker scale per padded tensor, one server scale per chunk.
    Equal step for step, bit for bit, across the freeze_step boundary (steps 1-3 exact, 4-8 compressed).
    ``fp16``: upstream runs under DeepSpeed's fused fp16 wrapper, which hands it one flat fp32 tensor
    per param group (so its "tensor" is the group); ours under the unfused one, with
    scale_blocks="group_padded" padding and scaling each group's segment as upstream does.
    """
    (tmp_path / "up").mkdir()
    (tmp_path / "ours").mkdir()
    upstream = launch(
        tmp_path / "up",
        # fp16: the fused wrapper's own set-up step() is upstream's initialising call, so ds_train's extra
        # zero-gradient step is an uncompressed update (of zero: m, v, weights stay put): freeze one call later
        {"type": "OneBitAdam", "params": {"lr": 0.01, "freeze_step": 5 if extra else 4, "comm_backend_name": "compressed"}},
        "--model",
        model,
        "--upstream",
        save=False,
        **extra,
    )
    ours_params = {"lr": 0.01, "freeze_step": 3, "worker_scale_scope": "tensor", **layout}
    ours = launch(tmp_path / "ours", {"type": "OneBitAdam", "params": ours_params}, "--model", model, save=False, **extra)
    assert upstream[0]["optimizer"] == "OnebitAdam" and ours[0]["optimizer"] == "OneBitAdam"
    for a, b in zip(upstream, ours):
        assert a["allreduce_calls"] == b["allreduce_calls"] == 3
        assert torch.equal(a["x0"], b["x0"])
        for t in range(STEPS):
            assert torch.equal(a["params"][t], b["params"][t]), f"step {t + 1}"
        assert not torch.equal(a["params"][-1], a["params"][3])  # the compressed phase moved the weights


@pytest.mark.slow
def test_fused_cpu_kernels_inside_the_engine_equal_the_eager_path(tmp_path, monkeypatch):
    """CD-Adam from JSON on the multi-tensor model with blocks of 8 (the fused CPU kernel applies):
    DEEPSPEED_CDADAM_KERNELS=fused (raises on every rank if it cannot run) equals eager bit for bit."""
    optimizer = {"type": "CDAdam", "params": {"lr": 0.01, "block_size": 8}}
    runs = {}
    for mode in ("fused", "eager"):
        monkeypatch.setenv("DEEPSPEED_CDADAM_KERNELS", mode)
        runs[mode] = launch(tmp_path / mode, optimizer, "--model", "layers", save=False)
    for rank in range(2):
        fused, eager = runs["fused"][rank]["params"], runs["eager"][rank]["params"]
        assert len(fused) == STEPS and all(torch.equal(a, b) for a, b in zip(fused, eager))
    assert not torch.equal(runs["fused"][0]["params"][-1], runs["fused"][0]["x0"])

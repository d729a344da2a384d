"""benchmarks/time_to_accuracy.py and scripts/ddp_train.py: the parts the code could get wrong.

* the exposed-communication arithmetic on a hand-made profile (no launch);
* PowerSGD's byte formula on known shapes (no launch);
* ``--quick`` end to end: 2 ranks in network namespaces at 1 Gbit/s, AdamW (DeepSpeed fp32 all-reduce),
  DDP + PowerSGD rank 1 and CD-Adam with overlap, a few steps of a tiny ResNet: the report's columns,
  AdamW's bytes (the ring all-reduce of the model's fp32 gradients, counted from the model here),
  PowerSGD's counted bytes equal to its formula's, and the namespaces and bridge removed afterwards.
  Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.launch import ROOT, run_checked

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import time_to_accuracy as tta  # noqa: E402

COLUMNS = [
    "task", "rate", "world", "method", "label", "status", "steps", "micro_batch", "params", "final_ema_loss",
    "target_loss", "wall_to_target_s", "steps_to_target", "bytes_to_target", "speedup_vs_adamw", "test_loss",
    "test_acc", "wall_s", "s_per_step", "bytes_total", "bytes_per_step", "warmup_steps", "profiled_steps",
    "profiled_phase", "prof_step_s", "prof_compute_s", "prof_comm_s", "exposed_comm_s", "overlap_prepare_s_per_step",
    "overlap_exposed_s_per_step", "overlap_exposed_over_prepare", "overlap_buckets", "profiler_overhead_s", "run_dir",
]  # fmt: skip


def test_exposed_communication_arithmetic():
    """Main thread 1: compute 0-40 and 70-100 us, a collective launched at 40-42, a Python range 60-100
    waiting until 70; the collective runs on gloo's thread 40-90; a comm-hook callback on thread 3 at
    95-110 (partly after the window)."""
    events = [
        (tta.MARK, 1, 0.0, 100.0, True),
        ("aten::mm", 1, 0.0, 40.0, False),
        ("autograd::engine::evaluate_function: X", 1, 38.0, 43.0, False),  # encloses the launch
        ("c10d::allreduce_", 1, 40.0, 42.0, False),
        ("gloo:all_reduce", 2, 40.0, 90.0, False),
        ("Optimizer.step#X.step", 1, 60.0, 100.0, True),  # a Python range: encloses a wait (60-70)
        ("aten::copy_", 1, 70.0, 100.0, False),
        ("aten::bmm", 3, 95.0, 110.0, False),
    ]
    (step,) = tta.comm_breakdown(events, [7])
    assert step["step"] == 7 and step["step_s"] == pytest.approx(100e-6)
    assert step["comm_s"] == pytest.approx(55e-6)  # 40-90 and 95-100
    assert step["compute_s"] == pytest.approx(71e-6)  # 0-40, 42-43, 70-100 (the launch is not compute)
    assert step["exposed_s"] == pytest.approx(29e-6)  # 40-42 (the launch) and 43-70 (waiting)


def test_powersgd_bytes_formula():
    import torch

    from ddp_train import powersgd_split, step_bytes

    shapes = [torch.Size([512, 512]), torch.Size([512]), torch.Size([16, 8, 3, 3]), torch.Size([10, 3])]
    # 512x512 rank 4: (512+512)*4*2 < 512^2, compressed; 16x72: (16+72)*4*2 = 704 < 1152, compressed;
    # 10x3: rank 3, (13*3)*2 = 78 > 30, uncompressed; the 1-D bias never is
    assert powersgd_split(shapes, 4, 2) == (512 + 30, 512 * 4 + 16 * 4, 512 * 4 + 72 * 4)
    numel = 512 * 512 + 512 + 16 * 72 + 30
    assert step_bytes("none", shapes, 4, 1, 1000, 2) == 2 * 3 / 4 * 4 * numel
    assert step_bytes("bf16", shapes, 4, 1, 1000, 2) == 2 * 3 / 4 * 2 * numel
    assert step_bytes("powersgd4", shapes, 2, 1000, 1000, 2) == 4 * numel  # still PowerSGD's warm-up
    assert step_bytes("powersgd4", shapes, 2, 1001, 1000, 2) == 4 * (542 + 2112 + 2336)


def read_csv(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # about 60-75 s of launches on 2 cores: make test-slow (CI runs it)
def test_quick_time_to_accuracy_on_the_emulated_cluster(tmp_path):
    from emulated_cluster import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    methods = ["adamw", "ddp_powersgd1", "cdadam_overlap"]
    run_checked(
        [sys.executable, "benchmarks/time_to_accuracy.py", "--quick", "--tasks", "resnet", "--worlds", "2",
         "--rates", "1gbit", "--methods", *methods, "--results", str(tmp_path)],
        timeout=300,
    )  # fmt: skip
    rows = read_csv(tmp_path / "time_to_accuracy.csv")
    assert list(rows[0]) == COLUMNS
    assert [r["method"] for r in rows] == methods
    assert all(r["status"] == "ok" and r["rate"] == "1gbit" and r["world"] == "2" for r in rows), rows
    for r in rows:
        assert 0 <= float(r["exposed_comm_s"]) <= float(r["prof_comm_s"]) + 1e-9 <= float(r["prof_step_s"]) + 1e-9
        assert r["profiled_steps"] == "9 10 11"

    # AdamW: DeepSpeed's fp32 ring all-reduce, 2 ranks: 2 (n-1)/n x 4 bytes x params per step, params counted here
    from tasks.resnet import ResNet18

    params = sum(p.numel() for p in ResNet18(in_channels=1, num_classes=10, width=4).parameters())
    adamw = rows[0]
    assert int(adamw["params"]) == params
    steps = read_csv(tmp_path / adamw["run_dir"] / "steps.csv")
    assert [float(s["bytes_total"]) for s in steps] == [4.0 * params * k for k in range(1, 13)]
    assert float(adamw["bytes_per_step"]) == 4.0 * params

    # PowerSGD (compressed from step 3 in --quick): its all-reduces, counted as they ran, equal the formula
    summary = json.loads((tmp_path / rows[1]["run_dir"] / "summary.json").read_text())
    assert summary["bytes_check"] == "ok" and summary["bytes_measured"] == summary["bytes_total"]
    assert summary["bytes_total"] < 12 * 4.0 * params
    assert rows[1]["profiled_phase"] == "compressed" and rows[1]["warmup_steps"] == "2"

    # CD-Adam with overlap: its own counters were read; it sent far less than AdamW
    assert 0 <= float(rows[2]["overlap_exposed_over_prepare"]) and float(rows[2]["overlap_prepare_s_per_step"]) > 0
    assert float(rows[2]["bytes_total"]) < float(adamw["bytes_total"]) / 20

    assert "## Targets (issue 16)" in (tmp_path / "time_to_accuracy.md").read_text()
    assert (tmp_path / "time_to_accuracy_1gbit.png").stat().st_size > 0
    made = json.loads((tmp_path / "time_to_accuracy.json").read_text())["namespaces_and_bridges"]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert len(made) == 3 and not [n for n in made if n in namespaces or n in links]


def test_speedup_bound_is_adamws_step_over_its_step_without_exposed_communication():
    assert tta.speedup_bound({"prof_step_s": 0.312, "exposed_comm_s": 0.202}) == pytest.approx(0.312 / 0.110)
    assert tta.speedup_bound({"prof_step_s": 0.1, "exposed_comm_s": 0.0}) == pytest.approx(1.0)
    assert tta.speedup_bound({"prof_step_s": "", "exposed_comm_s": 0.1}) is None  # not profiled
    assert tta.speedup_bound({"prof_step_s": float("nan"), "exposed_comm_s": float("nan")}) is None  # no profiles
    assert tta.speedup_bound({"prof_step_s": 0.1, "exposed_comm_s": float("nan")}) is None
    assert tta.speedup_bound({"prof_step_s": 0.1, "exposed_comm_s": 0.1}) is None  # no compute: no bound

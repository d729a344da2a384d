"""scripts/train.py through the `deepspeed` launcher, 2 CPU ranks, a few steps of every task.

Each launch uses one of the committed configs (micro batch shrunk so it runs in seconds) and
checks what the CSV says against what it must be: one row per step, finite losses, and the bytes
each optimizer must send per step on this model (Adam: the fp32 ring all-reduce, 4 bytes x params
with 2 ranks; CD-Adam: at most 1/28 of that). A checkpointed run resumed mid-way writes the same
rows as one that never stopped.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest

from tests.launch import ROOT, deepspeed_cmd, run_checked

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")


def _data_or_skip(task: str) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from tasks import data

    try:
        {
            "resnet18-fashion": lambda: data.fashion_mnist("test"),
            "bert-mlm": lambda: data.wordnet_glosses(limit=1),
            "gpt2-tiny": lambda: data.wordnet_glosses(limit=1),
            "bert-sentiment": data.minilm_dir,
            "smollm2": data.smollm2_dir,
        }[task]()
        data.minilm_dir()
    except data.DataMissingError as err:
        pytest.skip(str(err))


def small_config(tmp_path: Path, name: str, micro_batch: int, **params) -> Path:
    config = json.loads((ROOT / "configs" / name).read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["optimizer"]["params"].update(params)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def train(tmp_path: Path, config: Path, task: str, steps: int, *extra: str, out: str = "out") -> list[dict]:
    run_checked(
        [
            *deepspeed_cmd(2, "scripts/train.py"),
            "--deepspeed_config",
            str(config),
            "--task",
            task,
            "--steps",
            str(steps),
            "--out",
            str(tmp_path / out),
            "--eval-examples",
            "16",
            "--text-limit",
            "3000",
            *extra,
        ],
        timeout=600,
    )
    with open(tmp_path / out / "steps.csv") as fh:
        return list(csv.DictReader(fh))


def per_step_bytes(rows: list[dict]) -> list[float]:
    totals = [0.0] + [float(r["bytes_total"]) for r in rows]
    return [b - a for a, b in itertools.pairwise(totals)]


# task -> (committed config, extra optimizer params, expected per-step bytes: "adam" | "compressed" | "onebit")
CASES = {
    "resnet18-fashion": ("resnet_cdadam.json", {}, "compressed"),
    "bert-mlm": ("bert_onebitadam.json", {"freeze_step": 2}, "onebit"),
    "bert-sentiment": ("bert_ef21.json", {}, "ef21"),
    "gpt2-tiny": ("bert_adam.json", {}, "adam"),
    "smollm2": ("bert_cdadam.json", {"lr": 1e-5}, "compressed"),
}


#: beyond the default test budget (20-50 s each): run by `make test-slow`
SLOW_TASKS = ("smollm2", "bert-sentiment", "gpt2-tiny")


@pytest.mark.parametrize(
    "task", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_TASKS else t for t in sorted(CASES)]
)
def test_task_trains_through_launcher(tmp_path, task):
    _data_or_skip(task)
    name, params, kind = CASES[task]
    steps = 2 if task == "smollm2" else 4
    rows = train(tmp_path, small_config(tmp_path, name, 2, **params), task, steps)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(float(r["loss"])) and 0.0 <= float(r["acc"]) <= 1.0 for r in rows)
    assert math.isfinite(summary["test_loss"]) and rows[-1]["test_acc"] != ""
    fp32_allreduce = 4 * summary["params"]  # ring all-reduce with 2 ranks: 2 (n-1)/n x 4 bytes x params
    sent = per_step_bytes(rows)
    if kind == "adam":
        assert sent == [fp32_allreduce] * steps
    elif kind == "onebit":  # warm-up: the engine's fp32 all-reduce + our 8-byte non-finite flag; then 1-bit
        assert sent[:2] == [fp32_allreduce + 8] * 2 and all(0 < b <= fp32_allreduce / 28 for b in sent[2:])
    elif kind == "ef21":  # top-k 1%: an int32 index and an fp32 value per kept coordinate, both ways
        assert all(0 < b <= fp32_allreduce * 0.01 * 2 + 1000 for b in sent)
    else:
        assert all(0 < b <= fp32_allreduce / 28 for b in sent)


def test_resume_writes_the_same_rows(tmp_path):
    _data_or_skip("resnet18-fashion")
    config = small_config(tmp_path, "resnet_cdadam.json", 4)
    common = ("--width", "4", "--lr-decay-at", "0.5")
    straight = train(tmp_path, config, "resnet18-fashion", 6, *common, out="straight")
    save = ("--save-dir", str(tmp_path / "ckpt"), "--save-every", "3")
    train(tmp_path, config, "resnet18-fashion", 6, *common, *save, "--stop-at", "4", out="resumed")  # saved at 3
    resumed = train(tmp_path, config, "resnet18-fashion", 6, *common, *save, "--resume", out="resumed")
    assert [r["step"] for r in resumed] == [str(s) for s in range(1, 7)]
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["acc"], a["lr"], a["bytes_total"]) == (b["loss"], b["acc"], b["lr"], b["bytes_total"])
    assert float(straight[-1]["lr"]) == pytest.approx(1e-5)  # decayed x0.1 at half the run


# the methods added after the first head-to-head: committed config -> (task, optimizer params for a short run)
NEW_METHODS = {
    "bert_zero_one_adam.json": ("bert-mlm", {"var_freeze_step": 2, "local_step_scaler": 1, "local_step_clipper": 2}),
    "bert_onebit_lamb.json": ("bert-mlm", {"freeze_step": 2}),
    "bert_birder.json": ("bert-mlm", {}),
    "bert_sketched_amsgrad.json": ("bert-mlm", {}),
    "resnet_liec_sgd.json": ("resnet18-fashion", {"average_period": 4}),  # step 6 compressed
    "resnet_adacgd.json": ("resnet18-fashion", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEW_METHODS))
def test_every_new_method_trains_through_the_launcher(tmp_path, name):
    """``deepspeed --num_gpus 2 scripts/train.py --deepspeed_config configs/<method>.json`` on CPU: finite
    losses, an evaluation, and fewer bytes than an fp32 all-reduce over the run (each config's first
    steps may be exact: 0/1 Adam's variance refreshes, 1-bit LAMB's warm-up, AdaCGD's first step)."""
    task, params = NEW_METHODS[name]
    _data_or_skip(task)
    steps = 6
    rows = train(tmp_path, small_config(tmp_path, name, 2, **params), task, steps)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows) and math.isfinite(summary["test_loss"])
    sent = per_step_bytes(rows)
    assert 0 < sent[-1] < 4 * summary["params"] / 8, sent  # the last step is compressed (or local: > 0 control)

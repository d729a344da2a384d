"""scripts/llm_compare.py's gap study: the configs it runs and the gaps its table states."""

from __future__ import annotations

import json
import sys

import pytest

from deepspeed_cdadam.config import CDAdamConfig
from tests.launch import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import llm_compare as lc  # noqa: E402


def finished(run: lc.Run, eval_loss: float, mb: float = 100.0) -> lc.Run:
    run.summary = {"test_loss": eval_loss, "bytes_total": mb * 1e6}
    run.rows = [{"step": 1, "loss": 6.0, "test_loss": None, "bytes_total": 0.0},
                {"step": run.budget.steps, "loss": 3.0, "test_loss": eval_loss, "bytes_total": mb * 1e6}]  # fmt: skip
    return run


def test_gap_variants_change_one_thing_of_the_cdadam_config():
    base = lc.make_config(lc.CONFIGS["cdadam"], lc.FULL, lr=3e-5)["optimizer"]["params"]
    for name, label, params in lc.GAP_VARIANTS:
        run = lc.gap_run(name, label, params, 1e-4, lc.FULL, seed=2)
        got = run.config["optimizer"]["params"]
        assert run.config["optimizer"]["type"] == "CDAdam"
        assert got["lr"] == 1e-4 and run.seed == 2 and run.tag == f"gap/{name}_lr0.0001_seed2"
        changed = {k for k in got if got[k] != base.get(k)} - {"lr"}
        assert changed == set(params), name
        assert all(got[k] == v for k, v in params.items())
        # every key is a CDAdam argument with an allowed value (a typo would fail minutes into a launch)
        CDAdamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in got.items()})
    longs = lc.long_run("adamw", 1e-4, lc.LONG)
    assert longs.budget.steps == 240 and longs.config["optimizer"]["type"] == "AdamW"


def test_gap_report_states_each_variants_gap_to_adamws_mean():
    b = lc.FULL
    chosen = {
        "adamw": [finished(lc.seed_run("adamw", 1e-4, s, b), x) for s, x in zip((0, 1, 2), (3.60, 3.59, 3.62))],
        "cdadam": [finished(lc.seed_run("cdadam", 3e-5, s, b), x) for s, x in zip((0, 1, 2), (3.71, 3.70, 3.75))],
    }
    name, label, params = lc.GAP_VARIANTS[0]
    variants = {name: [finished(lc.gap_run(name, label, params, 3e-5, b), 3.65),
                       finished(lc.gap_run(name, label, params, 1e-4, b), 3.63)]}  # fmt: skip
    seeds = [finished(lc.gap_run(name, label, params, 1e-4, b, s), x) for s, x in ((1, 3.61), (2, 3.70))]
    failed = lc.gap_run("cdadam_eps1e-16", "compressed, eps 1e-16", {"eps": 1e-16}, 1e-4, b)
    failed.failed = "Training loss is nan at step 7"
    variants["cdadam_eps1e-16"] = [failed]
    text = "\n".join(lc.gap_report(chosen, variants, seeds, [], b))
    adamw_mean = (3.60 + 3.59 + 3.62) / 3
    assert f"{adamw_mean:.4f}" in text
    rows = {" | ".join(line.split(" | ")[:2]): line for line in text.splitlines() if line.startswith("| ")}
    assert f"{(3.71 + 3.70 + 3.75) / 3 - adamw_mean:+.4f}" in rows["| CD-Adam (the study) | 3e-05"]
    assert f"{3.65 - adamw_mean:+.4f}" in rows[f"| {label} | 3e-05"]  # seed 0 alone at 3e-5
    at_1e4 = rows[f"| {label} | 0.0001"]  # seed 0 and the two extra seeds at 1e-4
    assert " | 3 | " in at_1e4 and f"{(3.63 + 3.61 + 3.70) / 3 - adamw_mean:+.4f}" in at_1e4
    assert "Training loss is nan at step 7" in rows["| compressed, eps 1e-16 | 0.0001"]


def test_gap_report_without_adamw_states_no_gap():
    b = lc.FULL
    chosen = {"adamw": [lc.seed_run("adamw", 1e-4, 0, b)], "cdadam": [finished(lc.seed_run("cdadam", 3e-5, 0, b), 3.7)]}
    text = "\n".join(lc.gap_report(chosen, {}, [], [], b))
    assert "no AdamW run finished: no gap is stated" in text
    assert "| CD-Adam (the study) | 3e-05 | 1 | 3.7000 | — |" in text


def fake_run(results, run: lc.Run, eval_loss: float) -> None:
    """What train.py leaves: settings.json, steps.csv, summary.json."""
    out = results / "runs" / run.tag
    out.mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps(run.settings()))
    fields = "step,lr,loss,acc,bytes_up,bytes_down,bytes_total,wall_s,test_loss,test_acc"
    last = f"{run.budget.steps},{run.lr},3.0,0.3,5e6,5e6,1e7,10.0,{eval_loss},"
    (out / "steps.csv").write_text(f"{fields}\n1,{run.lr},6.0,0.1,5e4,5e4,1e5,0.1,,\n{last}\n")
    (out / "summary.json").write_text(json.dumps({"test_loss": eval_loss, "bytes_total": 1e7, "params": 1000,
                                                  "wall_s": 10.0}))  # fmt: skip


def test_report_keeps_every_run_on_disk_once_and_marks_the_gap_runs_not_run(tmp_path, monkeypatch):
    """--report: the study and the gap runs on disk (one gap run with other settings is not used), the rest
    of the gap study shown as not run, and summary.csv with each run once."""
    b = lc.FULL
    for opt, lrs in lc.SWEEP_LRS.items():
        for i, lr in enumerate(lrs):
            fake_run(tmp_path, lc.sweep_run(opt, lr, b), 3.6 + 0.01 * i + (0.1 if opt != "adamw" else 0.0))
    for opt, seeds in lc.SEEDS.items():
        lr = lc.SWEEP_LRS[opt][0]
        for seed in seeds[1:]:
            fake_run(tmp_path, lc.seed_run(opt, lr, seed, b), 3.6 + 0.001 * seed)
    name, label, params = lc.GAP_VARIANTS[0]
    fake_run(tmp_path, lc.gap_run(name, label, params, lc.GAP_LRS[0], b), 3.65)
    other = lc.gap_run(name, label, {**params, "eps": 1e-3}, lc.GAP_LRS[1], b)  # settings not the planned ones
    fake_run(tmp_path, other, 1.0)
    monkeypatch.setattr(sys, "argv", ["llm_compare.py", "--report", "--results", str(tmp_path)])
    lc.main()
    gap = (tmp_path / "gap.md").read_text()
    assert f"| {label} | 3e-05 | 1 | 3.6500 (2 more not run) |" in gap  # its seeds 1, 2: not on disk
    assert f"| {label} | 0.0001 | 1 | not run |" in gap and "1.0000" not in gap
    tags = [line.split(",")[0] for line in (tmp_path / "summary.csv").read_text().splitlines()[1:]]
    assert len(tags) == len(set(tags))
    assert f"gap/{name}_lr3e-05_seed0" in tags and "sweep/adamw_lr3e-05" in tags and "seeds/adamw_lr3e-05_seed2" in tags


@pytest.mark.parametrize("opt", ["adamw", "cdadam"])
def test_long_runs_are_kept_apart_from_the_study(opt):
    assert lc.long_run(opt, 1e-4, lc.LONG).tag == f"long/{opt}_lr0.0001_240steps"
    assert lc.long_run(opt, 1e-4, lc.LONG).settings() != lc.seed_run(opt, 1e-4, 0, lc.FULL).settings()

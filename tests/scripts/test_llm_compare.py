"""scripts/llm_compare.py's gap study: the configs it runs and the gaps its table states."""

from __future__ import annotations

import sys

import pytest

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
    longs = lc.long_run("adamw", 1e-4, lc.LONG)
    assert longs.budget.steps == 240 and longs.config["optimizer"]["type"] == "AdamW"


def test_gap_report_states_each_variants_gap_to_adamws_mean():
    b = lc.FULL
    chosen = {
        "adamw": [finished(lc.seed_run("adamw", 1e-4, s, b), x) for s, x in zip((0, 1, 2), (3.60, 3.59, 3.62))],
        "cdadam": [finished(lc.seed_run("cdadam", 3e-5, s, b), x) for s, x in zip((0, 1, 2), (3.71, 3.70, 3.72))],
    }
    name, label, params = lc.GAP_VARIANTS[0]
    variants = {name: [finished(lc.gap_run(name, label, params, 3e-5, b), 3.65),
                       finished(lc.gap_run(name, label, params, 1e-4, b), 3.63)]}  # fmt: skip
    seeds = [finished(lc.gap_run(name, label, params, 1e-4, b, s), x) for s, x in ((1, 3.61), (2, 3.65))]
    failed = lc.gap_run("cdadam_eps1e-16", "compressed, eps 1e-16", {"eps": 1e-16}, 1e-4, b)
    failed.failed = "Training loss is nan at step 7"
    variants["cdadam_eps1e-16"] = [failed]
    text = "\n".join(lc.gap_report(chosen, variants, seeds, [], b))
    adamw_mean = (3.60 + 3.59 + 3.62) / 3
    assert f"{adamw_mean:.4f}" in text
    rows = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert f"{3.71 - adamw_mean:+.4f}" in rows["| CD-Adam (the study) | 3e-05"]
    assert f"{3.65 - adamw_mean:+.4f}" in rows[f"| {label} | 3e-05"]  # seed 0 alone at 3e-5
    at_1e4 = rows[f"| {label} | 0.0001"]  # seed 0 and the two extra seeds at 1e-4
    assert " | 3 | " in at_1e4 and f"{(3.63 + 3.61 + 3.65) / 3 - adamw_mean:+.4f}" in at_1e4
    assert "Training loss is nan at step 7" in rows["| compressed, eps 1e-16 | 0.0001"]


@pytest.mark.parametrize("opt", ["adamw", "cdadam"])
def test_long_runs_are_kept_apart_from_the_study(opt):
    assert lc.long_run(opt, 1e-4, lc.LONG).tag.startswith("long/")
    assert lc.long_run(opt, 1e-4, lc.LONG).settings() != lc.seed_run(opt, 1e-4, 0, lc.FULL).settings()

"""The benchmark scripts run end to end on tiny sizes (so they cannot rot) and report values that must hold.

Timings are not checked here (benchmarks print ratios; tests never time); what the code could get
wrong is: the fused kernel's equality check, the byte counts, the CSV layout, the teardown.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
import sys

import pytest

from tests.launch import run_checked


def run_benchmark(script: str, *args: str) -> str:
    return run_checked([sys.executable, f"benchmarks/{script}", *args], timeout=300)


def read_csv(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_kernels_benchmark(tmp_path):
    text = run_benchmark("kernels.py", "--numel", "2e5", "--repeats", "1", "--threads", "1", "--results", str(tmp_path))
    assert "fused kernel == eager path, bit for bit (wire bytes and Markov state): True" in text
    assert "fused error-feedback step == eager path, bit for bit (wire bytes and worker error): True" in text
    assert "fused 1-bit Adam worker step = " in text
    rows = read_csv(tmp_path / "kernels.csv")
    assert rows[0]["piece"] == "copy (reference)" and float(rows[0]["times_copy"]) == 1.0
    assert any(r["piece"].startswith("worker step, fused kernel") for r in rows)
    assert any(r["piece"].startswith("1-bit Adam worker step, fused kernel") for r in rows)
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_collective_benchmark_bytes(tmp_path):
    run_benchmark("collective.py", "--world-sizes", "2", "--sizes", "1e5", "--repeats", "1", "--results", str(tmp_path))
    rows = {r["method"]: float(r["bytes_sent_per_rank"]) for r in read_csv(tmp_path / "collective.csv")}
    fp32 = rows.pop("fp32 all-reduce (Adam)")
    assert fp32 == 4 * 100_000  # ring all-reduce, 2 ranks: 2 (n-1)/n x 4 bytes x numel
    assert set(rows) == {
        "1-bit Adam compressed phase",
        "CD-Adam (block 2048, fused)",
        "CD-Adam (one scale per shard, eager)",
    }
    assert all(b <= fp32 / 28 for b in rows.values())


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    """The GPU benchmark's dry run (CPU, gloo, tiny sizes): every scheme and optimizer timed, ratios to the copy."""
    run_benchmark(
        "gpu.py", "--device", "cpu", "--sizes", "4e4", "--repeats", "1", "--gpt2-layers", "1", "--gpt2-width", "32",
        "--gpt2-vocab", "100", "--gpt2-seq", "16", "--gpt2-batch", "2", "--warmup", "2", "--steps", "1",
        "--results", str(tmp_path),
    )  # fmt: skip
    rows = read_csv(tmp_path / "gpu.csv")
    exchange = {(r["method"], r["piece"]): r for r in rows if r["part"] == "exchange"}
    assert float(exchange["device copy", "copy"]["times_copy"]) == 1.0
    for method in ("CD-Adam, block 2048", "CD-Adam, one block per shard", "1-bit Adam (error feedback, L2 sign)"):
        for piece in ("worker step", "whole exchange"):
            r = exchange[method, piece]
            assert float(r["times_copy"]) == pytest.approx(float(r["seconds"]) / float(exchange["device copy", "copy"]["seconds"]))
    optim = {r["method"]: r for r in rows if r["part"] == "gpt2" and r["piece"] == "optimizer step"}
    assert set(optim) == {"AdamW (torch, fused)", "CDAdam (block 2048)", "OneBitAdam (compressed phase, lr 0)",
                          "CDAdam (block 2048), host agreement", "OneBitAdam (compressed phase, lr 0), host agreement"}  # fmt: skip
    assert float(optim["AdamW (torch, fused)"]["times_adamw_optimizer"]) == 1.0
    assert all(r["device"].startswith("CPU") for r in rows)
    assert (tmp_path / "gpu.png").stat().st_size > 0
    profile = (tmp_path / "profile_cdadam.txt").read_text()
    assert "Optimizer.step#CDAdam.step" in profile and "aminmax" in profile  # the step and its non-finite check


def test_gpu_benchmark_picks_gpt2_methods_and_its_host_agreement_row_agrees_on_the_host(tmp_path):
    """``--gpt2-methods``: AdamW and the named rows only. The host-agreement row's optimizer never decides
    a step on the device (``DEEPSPEED_CDADAM_STEP_AGREEMENT=host``'s behaviour): a NaN raises at its own step."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu

    run_benchmark(
        "gpu.py", "--device", "cpu", "--sizes", "2e4", "--repeats", "1", "--gpt2-layers", "1", "--gpt2-width", "32",
        "--gpt2-vocab", "100", "--gpt2-seq", "16", "--gpt2-batch", "2", "--warmup", "1", "--steps", "1",
        "--no-profile", "--gpt2-methods", "CDAdam (block 2048), host", "--results", str(tmp_path),
    )  # fmt: skip
    optim = {r["method"] for r in read_csv(tmp_path / "gpu.csv") if r["part"] == "gpt2" and r["piece"] == "optimizer step"}
    assert optim == {"AdamW (torch, fused)", "CDAdam (block 2048), host agreement"}
    assert not (tmp_path / "profile_cdadam.txt").exists()

    from deepspeed_cdadam import InProcessWorld

    p = torch.nn.Parameter(torch.ones(64))
    opt = gpu.cdadam_host_agreement([p], transport=InProcessWorld(1).transports[0])
    assert opt._decides_on_device([], [], opt.planned_step()) is False
    p.grad = torch.full((64,), float("nan"))
    with pytest.raises(FloatingPointError, match="No parameter or optimizer state was changed"):
        opt.step()


def test_gpu_tune_sweeps_each_setting_and_names_the_best(tmp_path):
    """gpu_tune.py's dry run: one row per (setting, scheme, piece), the defaults with and without vector
    loads first, the fused-vs-eager check on the first setting only, and the summary picks the fastest."""
    run_benchmark("gpu_tune.py", "--device", "cpu", "--sizes", "2e4", "--tiles", "4096", "8192", "--warps", "auto",
                  "8", "--repeats", "1", "--results", str(tmp_path))  # fmt: skip
    rows = read_csv(tmp_path / "gpu_tune.csv")
    settings = list(dict.fromkeys((r["tile"], r["warps"], r["vector_loads"]) for r in rows))
    assert settings == [("4096", "auto", "True"), ("4096", "auto", "False"), ("4096", "8", "True"),
                        ("8192", "auto", "True"), ("8192", "8", "True")]  # fmt: skip
    worker = [r for r in rows if r["method"] == "CD-Adam, block 2048" and r["piece"] == "worker step"]
    assert len(worker) == 5
    assert [bool(r["check"]) for r in worker] == [True, False, False, False, False]
    best = min(worker, key=lambda r: float(r["times_copy"]))
    line = next(x for x in (tmp_path / "gpu_tune.txt").read_text().splitlines()
                if "CD-Adam, block 2048" in x and "worker step" in x)  # fmt: skip
    assert f"best {float(best['times_copy']):.2f}x at tile {best['tile']}, warps {best['warps']}" in line
    assert f"(scalar loads {float(worker[1]['times_copy']):>6.2f}x)" in line


UPSTREAM_ONEBIT_ON_CPU = """
import datetime, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, "benchmarks")
import gpu
from tests.integration import upstream_cpu_backend

upstream_cpu_backend.install()  # upstream's compressed backend with torch bit packing (its own needs an XPU op)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
cpu = torch.device("cpu")
assert gpu.upstream_onebit_builder(cpu)[0] is None  # no default backend off CUDA
build, name = gpu.upstream_onebit_builder(cpu, backend="compressed")
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
before = [p.detach().clone() for p in model.parameters()]
opt = build(model.parameters())
for _ in range(3):  # as gpt2_method_rows: warm-up steps take it past freeze_step 1
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
assert opt.adam_freeze_key, "still in the warm-up"
assert all("worker_error" in opt.state[p] for p in model.parameters()), "no compressed step ran"
assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "lr 0 moved a parameter"
print(name)
dist.destroy_process_group()
"""


def test_gpu_benchmark_builds_upstream_onebit_adam_as_its_loop_needs():
    """The side-by-side row's optimizer: DeepSpeed's own OnebitAdam made by gpu.py's builder, on gloo with
    upstream's compressed backend (on CUDA it takes the NCCL one): past the freeze, compressed, lr 0."""
    from tests.launch import free_port

    out = run_checked([sys.executable, "-c", UPSTREAM_ONEBIT_ON_CPU, str(free_port())], timeout=120)
    assert "OnebitAdam (compressed, lr 0)" in out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root")
def test_emulated_cluster_runs_and_cleans_up(tmp_path):
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    text = run_benchmark(
        "emulated_cluster.py", "--numel", "1e5", "--rates", "1gbit", "--repeats", "1", "--results", str(tmp_path)
    )
    if "skipped" in text:
        pytest.skip(text.strip())
    rows = read_csv(tmp_path / "emulated_cluster.csv")
    assert {r["method"] for r in rows} == {
        "fp32 all-reduce (Adam)", "1-bit Adam compressed phase", "CD-Adam (block 2048, fused)",
        "CD-Adam (one scale per shard, eager)",
    }  # fmt: skip
    assert all(r["rate"] == "1gbit" and float(r["seconds"]) > 0 for r in rows)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert after == before  # every namespace removed
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "cdbr" not in links and "cdv" not in links


def test_overlap_benchmark_runs_and_reports_both_settings(tmp_path):
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    text = run_benchmark(
        "overlap.py", "--width", "64", "--layers", "3", "--steps", "2", "--warmup", "1", "--rates", "1gbit",
        "--results", str(tmp_path),
    )  # fmt: skip
    if "skipped" in text:
        pytest.skip(text.strip())
    rows = read_csv(tmp_path / "overlap.csv")
    assert [(r["rate"], r["overlap"]) for r in rows] == [("1gbit", "False"), ("1gbit", "True")]
    off, on = rows
    assert off["comm_s"] == off["exposed_s"]  # without overlap all of the exchange is waited for
    assert float(on["exposed_s"]) <= float(on["iteration_s"]) and float(on["comm_s"]) > 0
    assert off["mb_sent_per_step"] == on["mb_sent_per_step"]  # the same messages
    for r in rows:  # the exchanging thread's CPU time: positive, and within the exchanges' wall time
        assert 0 < float(r["comm_cpu_s"]) <= float(r["comm_s"]) + 1e-3
    assert "exposed communication" in (tmp_path / "overlap.txt").read_text()
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert after == before


def test_host_overhead_times_each_optimizer(tmp_path):
    """host_overhead.py's dry run: one positive time per optimizer, with the machine named."""
    run_benchmark("host_overhead.py", "--repeat", "2", "--steps", "3", "--results", str(tmp_path))
    rows = read_csv(tmp_path / "host_overhead.csv")
    assert [r["method"] for r in rows] == ["AdamW (torch, foreach)", "CDAdam (block 2048)", "OneBitAdam (compressed phase)"]
    assert all(float(r["ms_per_step"]) > 0 and r["params"] == "10" and "torch" in r["machine"] for r in rows)
    assert "10 parameters" in (tmp_path / "host_overhead.txt").read_text()

"""A rank that dies or stalls makes the others fail with a clear error within the timeout, never hang."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepspeed_cdadam import CDAdam, TorchDistributedTransport

TIMEOUT_S = 3.0


def _rank(rank: int, init_file: str, out_dir: str, fault: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = CDAdam([p], lr=1e-3, transport=TorchDistributedTransport(timeout_s=TIMEOUT_S))
    start = None
    try:
        for step in range(1, 50):
            if rank == 1 and step == 4:
                if fault == "dies":
                    os._exit(3)
                time.sleep(4 * TIMEOUT_S)  # stalls
            p.grad = torch.randn(1000)
            start = time.monotonic()
            opt.step()
        message = "finished without error"
    except Exception as err:  # noqa: BLE001 - the test inspects what the user would see
        message = f"{type(err).__name__}: {err} after {time.monotonic() - start:.1f}s"
    with open(f"{out_dir}/rank{rank}.txt", "w") as fh:
        fh.write(message)
    os._exit(0)  # no teardown collectives with a dead peer


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_peer_fault_is_a_clear_error_within_the_timeout(tmp_path, fault):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), str(tmp_path), fault)) for r in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    procs[0].join(timeout=120)
    elapsed = time.monotonic() - t0
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not procs[0].is_alive() and elapsed < 120
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("CommTimeoutError: ") and "rank 0/2" in message, message
    assert "a peer may have died or stalled" in message
    waited = float(message.rsplit(" after ", 1)[1].rstrip("s"))
    assert waited <= TIMEOUT_S + 5.0  # failed within the configured timeout (plus slack), not after a hang

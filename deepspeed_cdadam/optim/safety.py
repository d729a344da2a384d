"""Checks that keep every rank's training identical and finite, each agreed on by all ranks.

* ``agree_on_step``: which ranks hold a NaN/inf gradient this step, and that every rank plans the
  same kind of step (``schedule.StepKind``), in one small all-reduce: every rank raises, or every
  rank skips, or every rank runs the same step; no rank is left waiting in a collective.
* ``DecidedSkip``: where a step's skip is decided on the device instead (``optim.base``,
  ``exchange.StepSkip``: the flag travels inside the messages up), its outcome, read later.
* ``check_ranks_agree``: exact fingerprints of parameters and rank-identical optimizer state,
  all-gathered and compared with rank 0's; the first differing tensor is named.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..comm.accounting import CommStats, all_gather_bytes_sent, all_reduce_bytes_sent
from ..comm.transport import Transport, control_device
from ..schedule import ScheduleMismatchError, StepKind

NONFINITE_POLICIES = ("error", "skip")
#: ``DEEPSPEED_CDADAM_STEP_AGREEMENT``: "device" (default): a step's skip is decided on the device where the
#: kernels allow it (``optim.base._decides_on_device``); "host": every step agrees by a control message
#: that the host reads (the behaviour everywhere else). Must be the same on every rank.
STEP_AGREEMENTS = ("device", "host")

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _count(stats: CommStats | None, handed: int, sent: float) -> None:
    if stats is not None:
        stats.bytes_control += sent
        stats.bytes_handed += handed
        stats.collective_calls += 1


def nonfinite(g: torch.Tensor) -> torch.Tensor:
    """True (a 0-dim bool on ``g``'s device) if ``g`` holds a NaN or an inf. From its min and max (NaN
    propagates through both, an inf is one of them): no full-size temporary, unlike ``isfinite(g).all()``."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=g.device)
    low, high = torch.aminmax(g)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def step_agreement() -> str:
    """``DEEPSPEED_CDADAM_STEP_AGREEMENT`` (default "device"), checked."""
    value = os.environ.get("DEEPSPEED_CDADAM_STEP_AGREEMENT", "device").strip().lower() or "device"
    if value not in STEP_AGREEMENTS:
        raise ValueError(
            f"DEEPSPEED_CDADAM_STEP_AGREEMENT={value!r} is not allowed: use 'device' (a step's non-finite skip "
            "decided on the device where the kernels allow it, no host read) or 'host' (a control message read "
            "by the host every step)."
        )
    return value


def any_nonfinite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether any of ``grads`` holds a NaN or an inf: a 0-dim bool on their device, not read by the host."""
    flag = nonfinite(grads[0])
    for g in grads[1:]:
        flag = flag | nonfinite(g).to(flag.device)
    return flag


class DecidedSkip:
    """A step's outcome decided on the device (``exchange.StepSkip``): whether any rank skipped, and
    whether this rank's gradient was the non-finite one, copied to the host as the step's last work
    and read later (``read``), so the host never waits for the step it has just queued."""

    def __init__(self, skip: Any, states: list[dict], step: int) -> None:
        flags = torch.stack([skip.anywhere, skip.mine.to(skip.anywhere.device)])
        if flags.is_cuda:  # into pinned memory behind the step's work; an event marks when it has landed
            self._host = torch.empty(2, dtype=torch.bool, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event: Any = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = flags, None
        self.states = states
        self.step = step

    def read(self) -> tuple[bool, bool]:
        """(any rank skipped, this rank's gradient was non-finite): waits for this step's work only."""
        if self._event is not None:
            self._event.synchronize()
        anywhere, mine = (bool(v) for v in self._host.tolist())
        return anywhere, mine


def agree_on_step(
    transport: Transport,
    grads: Sequence[torch.Tensor],
    planned: StepKind,
    stats: CommStats | None = None,
    *,
    stale: bool = False,
    agreement: dict | None = None,
) -> list[int]:
    """Ranks whose gradients contain NaN or inf (the same list on every rank), after checking that
    every rank planned the same kind of step.

    One float per rank travels: ``4 * planned + 2 * stale + nonfinite`` in the rank's own slot (exact
    in fp32); ``stale``: this rank's exchanges started during backward are out of date
    (``optim.overlap``). ``agreement`` (a dict) receives ``"stale"``: whether any rank said so.
    Raises ``ScheduleMismatchError`` on every rank if the plans differ.
    """
    device = control_device(transport)
    flags = torch.zeros(transport.world_size, dtype=torch.float32, device=device)
    for g in grads:  # no host round trip per gradient: the flag is computed where the gradient lives
        flags[transport.rank] = torch.maximum(flags[transport.rank], nonfinite(g).to(device=device, dtype=torch.float32))
    flags[transport.rank] += 4.0 * int(planned) + 2.0 * bool(stale)
    transport.all_reduce_sum(flags)
    _count(stats, 4 * transport.world_size, all_reduce_bytes_sent(4 * transport.world_size, transport.world_size))
    codes = [int(c) for c in flags.tolist()]
    plans = [StepKind(c // 4) for c in codes]
    if len(set(plans)) > 1:
        raise ScheduleMismatchError(
            "Ranks planned different kinds of step: "
            + ", ".join(f"rank {r}: {p.name}" for r, p in enumerate(plans))
            + ". Their optimizer settings or states differ (e.g. freeze_step, or a checkpoint loaded on some "
            "ranks only); stop and restart every rank from the same checkpoint and config."
        )
    if agreement is not None:
        agreement["stale"] = any(c & 2 for c in codes)
    return [r for r, c in enumerate(codes) if c % 2]


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of ``t``'s exact bit patterns (plain and position-weighted), computed on
    ``t``'s device: any change of any bit of any element changes them, barring a collision."""
    flat = t.detach().reshape(-1).contiguous()
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=flat.device)
    return torch.stack([bits.sum(), (bits * weights).sum()])


def check_ranks_agree(
    transport: Transport, named: Sequence[tuple[str, torch.Tensor]], step: int, stats: CommStats | None = None
) -> None:
    """Raise ``RuntimeError`` on every rank if any named tensor differs between ranks."""
    if not named:
        return
    device = control_device(transport)
    mine = torch.stack([fingerprint(t).to(device) for _, t in named])  # [k, 2]
    everyone = transport.all_gather(mine.reshape(-1)).view(transport.world_size, len(named), 2)
    _count(stats, mine.numel() * 8, all_gather_bytes_sent(mine.numel() * 8, transport.world_size))
    differs = (everyone != everyone[0]).any(dim=2).cpu()  # [ranks, k]
    if bool(differs.any()):
        first = int(differs.any(dim=0).nonzero()[0])
        ranks = [r for r in range(transport.world_size) if bool(differs[r, first])]
        raise RuntimeError(
            f"Ranks diverged by step {step}: {named[first][0]} differs from rank 0's on rank(s) {ranks}. "
            "Training state is no longer identical across ranks; stop and resume from the last checkpoint."
        )

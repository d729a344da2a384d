"""Per-rank compression state on disk: one file per rank, written atomically, checked on load.

The Markov states, server shards and error buffers differ between ranks, so each rank writes its
own ``cdadam_rank{r}_of_{n}.pt`` next to the framework's checkpoint. Loading is decided by all
ranks together (one small all-reduce), so they all restore, all reset, or all raise:

* every rank's file is present and matches (optimizer type, parameter layout): restored (with the
  byte and skipped-step counters), and a resumed run continues bit-identically;
* files are missing (another world size, or a checkpoint from before): the compression state is
  reset on every rank, with a warning; moments, step counts and weights are kept;
* any file is unreadable (corrupted, truncated) or was written by another optimizer type or for
  another parameter layout: ``CheckpointMismatchError`` on every rank, naming the problem;
* ``restore=False`` on every rank (the framework did not load optimizer states: a warm start):
  no file is read and the compression state is left as it is; ``restore`` differing between
  ranks is a ``CheckpointMismatchError`` on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from .comm.transport import control_device
from .state import PER_RANK, keys_with_scope
from .types import STEP

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_OK, _MISSING, _BAD, _SKIPPED = 0, 1, 2, 3


class CheckpointMismatchError(ValueError):
    """A checkpoint cannot be resumed into this optimizer (corrupted, other optimizer or layout)."""


def rank_state_path(directory: str, rank: int, world_size: int) -> str:
    return os.path.join(directory, f"cdadam_rank{rank}_of_{world_size}.pt")


def group_layout(optimizer: Any) -> list[int]:
    """Coordinates of each parameter group's flat buffer."""
    return [optimizer.group_numel(g) for g in optimizer.param_groups]


def save_rank_state(optimizer: Any, directory: str) -> str:
    """Write this rank's per-rank compression state atomically; returns the file name."""
    tr = optimizer.transport
    os.makedirs(directory, exist_ok=True)
    per_rank = keys_with_scope(optimizer.state_specs(), PER_RANK)
    payload = {
        "format": FORMAT_VERSION,
        "optimizer": type(optimizer).__name__,
        "world_size": tr.world_size,
        "rank": tr.rank,
        "layout": group_layout(optimizer),
        # counters, so a resumed run keeps counting bytes and skipped steps where it stopped
        "comm_stats": dataclasses.asdict(optimizer.comm_stats),
        "skipped_steps": optimizer.skipped_steps,
        "steps_taken": optimizer.steps_taken,
        "groups": [
            {k: v.detach().cpu().clone() for k, v in optimizer.group_state(g).items() if k in per_rank}
            for g in optimizer.param_groups
        ],
    }
    path = rank_state_path(directory, tr.rank, tr.world_size)
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name
    return path


def _read(optimizer: Any, path: str) -> tuple[int, str, dict | None]:
    if not os.path.exists(path):
        return _MISSING, f"{path} is missing", None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported the same way
        return _BAD, f"{path} is unreadable (corrupted or truncated): {type(err).__name__}: {err}", None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT_VERSION:
        return _BAD, f"{path} is not a deepspeed_cdadam rank-state file (format {FORMAT_VERSION})", None
    if saved["optimizer"] != type(optimizer).__name__:
        return _BAD, f"{path} was written by {saved['optimizer']}, not {type(optimizer).__name__}", None
    if saved["layout"] != group_layout(optimizer):
        return (
            _BAD,
            f"{path} holds parameter groups of sizes {saved['layout']}, the model has {group_layout(optimizer)}",
            None,
        )
    return _OK, "", saved


def check_loaded_state(optimizer: Any) -> None:
    """Raise if the (framework-loaded) optimizer state is not this optimizer's flat group state."""
    for gi, (group, numel) in enumerate(zip(optimizer.param_groups, group_layout(optimizer))):
        state = optimizer.group_state(group) if numel else {}
        key = optimizer.FLAT_STATE_KEY
        ours = (
            key in state
            and state[key].dim() == 1
            and state[key].numel() == numel
            and isinstance(state.get(STEP), int)  # torch.optim keeps a tensor step
        )
        if state and not ours:
            raise CheckpointMismatchError(
                f"The optimizer state loaded for param_groups[{gi}] was not written by {type(optimizer).__name__} "
                f"(expected flat buffers of {numel} coordinates): was the checkpoint made with another optimizer?"
            )


def load_rank_state(optimizer: Any, directory: str, restore: bool = True) -> bool:
    """Restore this rank's compression state (True), or reset it on every rank (False); see the module doc.

    ``restore=False`` (the optimizer states were not loaded): nothing is read or changed (False).
    Every rank decides together, so all restore, all reset, all skip, or all raise.
    """
    tr = optimizer.transport
    if restore:
        code, problem, saved = _read(optimizer, rank_state_path(directory, tr.rank, tr.world_size))
    else:
        code, problem, saved = _SKIPPED, "", None
    codes = torch.zeros(tr.world_size, device=control_device(tr))
    codes[tr.rank] = float(code)
    codes = tr.all_reduce_sum(codes).cpu()
    skipped = [r for r in range(tr.world_size) if codes[r] == _SKIPPED]
    if skipped and len(skipped) < tr.world_size:
        raise CheckpointMismatchError(
            f"Ranks disagree on loading the optimizer states from {directory}: rank(s) {skipped} load without them "
            "(load_optimizer_states=False or load_module_only=True), the others with them. Pass the same "
            "load_checkpoint arguments on every rank."
        )
    if skipped:
        logger.info(
            "Optimizer states not loaded from %s (load_optimizer_states=False or load_module_only=True): the "
            "per-rank compression state is not restored; the optimizer state is kept as it was.",
            directory,
        )
        return False
    bad = [r for r in range(tr.world_size) if codes[r] == _BAD]
    if bad:
        raise CheckpointMismatchError(
            f"Cannot resume the compression state from {directory}: problems on rank(s) {bad}"
            + (f"; here: {problem}." if problem else ".")
        )
    check_loaded_state(optimizer)
    if any(codes[r] == _MISSING for r in range(tr.world_size)):
        logger.warning(
            "No per-rank compression state for world_size=%d in %s: resetting the compression state "
            "(Markov states / error buffers) on every rank; moments, step counts and weights are kept.",
            tr.world_size,
            directory,
        )
        optimizer.reset_compression_state()
        return False
    assert saved is not None
    for group, per_rank in zip(optimizer.param_groups, saved["groups"]):
        state = optimizer.group_state(group)
        for key, value in per_rank.items():
            state[key] = value.to(device=state[optimizer.FLAT_STATE_KEY].device)
    if "comm_stats" in saved:
        for name, value in saved["comm_stats"].items():  # in place: the exchanges hold this object
            setattr(optimizer.comm_stats, name, value)
        optimizer.skipped_steps, optimizer.steps_taken = saved["skipped_steps"], saved["steps_taken"]
    return True

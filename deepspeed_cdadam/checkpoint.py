"""Per-rank compression state on disk: one file per rank, written atomically, checked on load.

The Markov states, server shards and error buffers differ between ranks, so each rank writes its
own ``cdadam_rank{r}_of_{n}.pt`` next to the framework's checkpoint. Loading is decided by all
ranks together (one small all-reduce), so they all restore, all reset, or all raise:

* every rank's file is present and matches (optimizer type, parameter layout): restored (with the
  byte and skipped-step counters), and a resumed run continues bit-identically; an optimizer whose
  ranks hold different parameters (``PARAMETERS_PER_RANK``: LIEC-SGD between averages) also gets
  its own parameters and fp32 master copy back (the framework restored one rank's model on all);
* files are missing (another world size, or a checkpoint from before): the compression state is
  reset on every rank, with a warning; moments, step counts and weights are kept;
* any file is unreadable (corrupted, truncated) or was written by another optimizer type or for
  another parameter layout: ``CheckpointMismatchError`` on every rank, naming the problem;
* a file of format 1 (one flat buffer per parameter group, before communication buckets) is
  refused the same way, unless each of its groups is exactly one bucket (the same buffers);
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
from .types import MASTER_PARAMS, STEP

logger = logging.getLogger(__name__)

#: 2: one entry per communication bucket (``optim.base.Bucket``); 1: one per parameter group.
FORMAT_VERSION = 2
_OK, _MISSING, _BAD, _SKIPPED, _NO_CHECKPOINT = 0, 1, 2, 3, 4


class CheckpointMismatchError(ValueError):
    """A checkpoint cannot be resumed into this optimizer (corrupted, other optimizer or layout)."""


def rank_state_path(directory: str, rank: int, world_size: int) -> str:
    return os.path.join(directory, f"cdadam_rank{rank}_of_{world_size}.pt")


def bucket_layout(optimizer: Any) -> list[int]:
    """Coordinates of each communication bucket's flat buffer."""
    return [b.numel for b in optimizer.buckets()]


def _per_group_layout_is_bucket_layout(optimizer: Any) -> bool:
    """True if every parameter group with trainable parameters is exactly one bucket, in order:
    then the per-group flat buffers of format 1 are the bucket buffers."""
    groups = [gi for gi, g in enumerate(optimizer.param_groups) if optimizer.trainable(g)]
    buckets = optimizer.buckets()
    return len(groups) == len(buckets) and all(
        len(b.segments) == 1 and b.segments[0].group_index == gi
        and len(b.params) == len(optimizer.trainable(optimizer.param_groups[gi]))
        for gi, b in zip(groups, buckets)
    )


def check_bucket_layout(optimizer: Any) -> None:
    """Refuse a loaded optimizer state in the per-group layout (state under a parameter that does not
    start a bucket, or one bucket's worth of flat buffers of another size): it predates buckets."""
    firsts = {id(b.params[0]): b for b in optimizer.buckets()}
    key = optimizer.FLAT_STATE_KEY
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p, {})
            flat = state.get(key)
            if not torch.is_tensor(flat) or flat.dim() != 1 or not isinstance(state.get(STEP), int):
                continue  # not our flat state (another optimizer's is reported by check_loaded_state)
            bucket = firsts.get(id(p))
            if bucket is not None and flat.numel() == bucket.numel:
                continue
            raise CheckpointMismatchError(
                f"The optimizer state loaded for param_groups[{gi}]['params'][{pi}] holds flat buffers of "
                f"{flat.numel()} coordinates in the per-parameter-group layout of deepspeed_cdadam before "
                f"communication buckets; {type(optimizer).__name__} now keeps one flat buffer per bucket (all "
                f"groups' parameters of one dtype and device: sizes {bucket_layout(optimizer)}). Resume it with "
                "the version that wrote it, or load the model weights only (load_optimizer_states=False)."
            )


def rank_parameters(optimizer: Any) -> list[dict[str, torch.Tensor]]:
    """Each bucket's parameters (flat, in their dtype) and fp32 master copy, if it has one: this rank's own."""
    out = []
    for bucket in optimizer.buckets():
        entry = {"params": torch.cat([p.detach().reshape(-1) for p in bucket.params]).cpu()}
        master = optimizer.bucket_state(bucket).get(MASTER_PARAMS)
        if master is not None:
            entry[MASTER_PARAMS] = master.detach().cpu().clone()
        out.append(entry)
    return out


def restore_rank_parameters(optimizer: Any, saved: list[dict[str, torch.Tensor]]) -> None:
    """Put ``rank_parameters``' output back: the parameters, and the master copy (dropped if none was saved)."""
    for bucket, entry in zip(optimizer.buckets(), saved):
        offset = 0
        for p in bucket.params:
            p.detach().copy_(entry["params"][offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        state = optimizer.bucket_state(bucket)
        if MASTER_PARAMS in entry:
            state[MASTER_PARAMS] = entry[MASTER_PARAMS].to(device=bucket.params[0].device)
        else:
            state.pop(MASTER_PARAMS, None)


def save_rank_state(optimizer: Any, directory: str) -> str:
    """Write this rank's per-rank compression state atomically; returns the file name."""
    tr = optimizer.transport
    os.makedirs(directory, exist_ok=True)
    optimizer._settle_skip()  # the last step's outcome, where it was decided on the device (its counters; no raise)
    per_rank = keys_with_scope(optimizer.state_specs(), PER_RANK)
    payload = {
        "format": FORMAT_VERSION,
        "optimizer": type(optimizer).__name__,
        "world_size": tr.world_size,
        "rank": tr.rank,
        "layout": bucket_layout(optimizer),
        "compression_layout": optimizer.compression_layout(),
        # counters, so a resumed run keeps counting bytes and skipped steps where it stopped
        "comm_stats": dataclasses.asdict(optimizer.comm_stats),
        "skipped_steps": optimizer.skipped_steps,
        "steps_taken": optimizer.steps_taken,
        "buckets": [
            {k: v.detach().cpu().clone() for k, v in optimizer.bucket_state(b).items() if k in per_rank}
            for b in optimizer.buckets()
        ],
        # this rank's own parameters where ranks hold different ones (LIEC-SGD between averages): the
        # framework saves one rank's model only
        "parameters": rank_parameters(optimizer) if getattr(optimizer, "PARAMETERS_PER_RANK", False) else None,
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
    if not isinstance(saved, dict) or saved.get("format") not in (1, FORMAT_VERSION):
        return _BAD, f"{path} is not a deepspeed_cdadam rank-state file (format {FORMAT_VERSION})", None
    if saved["optimizer"] != type(optimizer).__name__:
        return _BAD, f"{path} was written by {saved['optimizer']}, not {type(optimizer).__name__}", None
    if saved["format"] == 1:  # one entry per parameter group (before buckets)
        groups = [(n, entry) for n, entry in zip(saved["layout"], saved["groups"]) if n]
        if not _per_group_layout_is_bucket_layout(optimizer) or [n for n, _ in groups] != bucket_layout(optimizer):
            return (
                _BAD,
                f"{path} holds one flat buffer per parameter group (format 1, groups of sizes {saved['layout']}); "
                f"{type(optimizer).__name__} now keeps one per communication bucket (all groups' parameters of one "
                f"dtype and device: sizes {bucket_layout(optimizer)}), so its compression state cannot be resumed",
                None,
            )
        saved = {**saved, "layout": [n for n, _ in groups], "buckets": [entry for _, entry in groups]}
    saved_layout = saved.get("compression_layout", {"scale_blocks": "fixed", "exchanges": saved.get("exchanges")})
    if saved_layout.get("exchanges") is None:  # files before this key: only the fixed layout existed
        saved_layout = {**saved_layout, "exchanges": optimizer.compression_layout()["exchanges"]}
    if saved_layout != optimizer.compression_layout():
        return (
            _BAD,
            f"{path} was written with {saved_layout}, this optimizer runs {optimizer.compression_layout()}: "
            "its compression state is laid out differently; resume with the saved settings",
            None,
        )
    if saved["layout"] != bucket_layout(optimizer):
        return (
            _BAD,
            f"{path} holds buckets of sizes {saved['layout']}, the model has {bucket_layout(optimizer)}",
            None,
        )
    return _OK, "", saved


def check_loaded_state(optimizer: Any) -> None:
    """Raise if the (framework-loaded) optimizer state is not this optimizer's flat bucket state."""
    for bucket in optimizer.buckets():
        state, numel = optimizer.bucket_state(bucket), bucket.numel
        key = optimizer.FLAT_STATE_KEY
        ours = (
            key in state
            and state[key].dim() == 1
            and state[key].numel() == numel
            and isinstance(state.get(STEP), int)  # torch.optim keeps a tensor step
        )
        if state and not ours:
            raise CheckpointMismatchError(
                f"The optimizer state loaded for {bucket.describe()} was not written by {type(optimizer).__name__} "
                f"(expected flat buffers of {numel} coordinates): was the checkpoint made with another optimizer?"
            )


def load_rank_state(optimizer: Any, directory: str | None, restore: bool = True) -> bool:
    """Restore this rank's compression state (True), or reset it on every rank (False); see the module doc.

    ``restore=False`` (the optimizer states were not loaded): nothing is read or changed (False).
    ``directory=None`` (the framework found no checkpoint on this rank): nothing to restore here.
    Every rank decides together, so all restore, all reset, all skip, or all raise.
    """
    tr = optimizer.transport
    if directory is None:
        code, problem, saved = _NO_CHECKPOINT, "", None
    elif restore:
        code, problem, saved = _read(optimizer, rank_state_path(directory, tr.rank, tr.world_size))
    else:
        code, problem, saved = _SKIPPED, "", None
    codes = torch.zeros(tr.world_size, device=control_device(tr))
    codes[tr.rank] = float(code)
    codes = tr.all_reduce_sum(codes).cpu()
    absent = [r for r in range(tr.world_size) if codes[r] == _NO_CHECKPOINT]
    if absent and len(absent) < tr.world_size:
        raise CheckpointMismatchError(
            f"The checkpoint was found on some ranks only: rank(s) {absent} found none (a checkpoint directory "
            "that is not shared by every node, or a missing 'latest' / tag there). Put the checkpoint where every "
            "rank reads it."
        )
    if absent:
        return False
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
    check_bucket_layout(optimizer)
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
    for bucket, per_rank in zip(optimizer.buckets(), saved["buckets"]):
        state = optimizer.bucket_state(bucket)
        for key, value in per_rank.items():
            state[key] = value.to(device=state[optimizer.FLAT_STATE_KEY].device)
    if saved.get("parameters") is not None:
        restore_rank_parameters(optimizer, saved["parameters"])
    optimizer._rank_state_pending = False  # every rank's own per-rank state is back
    if "comm_stats" in saved:
        for name, value in saved["comm_stats"].items():  # in place: the exchanges hold this object
            setattr(optimizer.comm_stats, name, value)
        optimizer.skipped_steps, optimizer.steps_taken = saved["skipped_steps"], saved["steps_taken"]
    return True

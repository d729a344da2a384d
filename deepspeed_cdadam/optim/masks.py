"""Upstream's ``exp_avg_mask`` param-group key (1-bit Adam, 0/1 Adam, 1-bit LAMB): one entry per
coordinate of the group's trainable parameters, multiplied into the momentum after each 1-bit
exchange (1-bit compression cannot represent exact zeros, e.g. of embedding rows without gradient)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import Bucket, CompressedOptimizer, Segment


def check_exp_avg_mask(mask: object, numel: int) -> None:
    """Refuse a mask that is not a tensor with one entry per coordinate of the group (``numel``)."""
    if not torch.is_tensor(mask) or mask.numel() != numel:
        raise ValueError(
            f"Invalid exp_avg_mask: must be a tensor with one entry per coordinate of the group "
            f"({numel}), got {mask.shape if torch.is_tensor(mask) else type(mask).__name__}."
        )


def segment_mask(optimizer: CompressedOptimizer, seg: Segment, mask: object, like: torch.Tensor) -> torch.Tensor:
    """The entries of the group's ``exp_avg_mask`` for the segment's coordinates (in ``like``'s dtype and device).

    Kept from step to step while the mask, its contents (``_version``, bumped by any in-place edit), the
    segment's parameters and ``like``'s dtype and device stay the same: a mask held on the CPU is copied to
    the GPU once, not every step (a copy from pageable memory makes the host wait)."""
    check_exp_avg_mask(mask, optimizer.group_numel(seg.group))  # the group may have been edited since construction
    version = mask._version  # type: ignore[union-attr]
    key = (id(mask), version, tuple(id(p) for p in seg.params), tuple(seg.group_offsets), like.device, like.dtype)
    cache = optimizer.__dict__.setdefault("_segment_masks", {})
    hit = cache.get(id(seg))
    if hit is not None and hit[0] == key and hit[1] is mask:
        return hit[2]
    flat = mask.reshape(-1)  # type: ignore[union-attr]
    parts = [flat[o : o + p.numel()] for o, p in zip(seg.group_offsets, seg.params)]
    out = torch.cat(parts).to(device=like.device, dtype=like.dtype)
    cache[id(seg)] = (key, mask, out)
    return out


def apply_exp_avg_masks(optimizer: CompressedOptimizer, bucket: Bucket, out: torch.Tensor) -> None:
    """``out[segment] *= mask`` for each segment of ``bucket`` whose group has an ``exp_avg_mask``
    (``out``: a flat buffer of the bucket, the momentum after its 1-bit exchange)."""
    for seg in bucket.segments:
        mask = seg.group.get("exp_avg_mask")
        if mask is not None:
            out[seg.slice].mul_(segment_mask(optimizer, seg, mask, out))

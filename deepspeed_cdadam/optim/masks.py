"""Upstream's ``exp_avg_mask`` param-group key (1-bit Adam, 0/1 Adam, 1-bit LAMB): one entry per
coordinate of the group's trainable parameters, multiplied into the momentum after each 1-bit
exchange (1-bit compression cannot represent exact zeros, e.g. of embedding rows without gradient)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import CompressedOptimizer, Segment


def check_exp_avg_mask(mask: object, numel: int) -> None:
    """Refuse a mask that is not a tensor with one entry per coordinate of the group (``numel``)."""
    if not torch.is_tensor(mask) or mask.numel() != numel:
        raise ValueError(
            f"Invalid exp_avg_mask: must be a tensor with one entry per coordinate of the group "
            f"({numel}), got {mask.shape if torch.is_tensor(mask) else type(mask).__name__}."
        )


def segment_mask(optimizer: CompressedOptimizer, seg: Segment, mask: object, like: torch.Tensor) -> torch.Tensor:
    """The entries of the group's ``exp_avg_mask`` for the segment's coordinates (in ``like``'s dtype and device)."""
    check_exp_avg_mask(mask, optimizer.group_numel(seg.group))  # the group may have been edited since construction
    flat = mask.reshape(-1)  # type: ignore[union-attr]
    parts = [flat[o : o + p.numel()] for o, p in zip(seg.group_offsets, seg.params)]
    return torch.cat(parts).to(device=like.device, dtype=like.dtype)

"""Nested top-k levels and AdaCGD's acceptance rule (its adaptive three-point compressor).

``NestedTopK(ratios)`` is top-k at ``m`` levels, cheapest to finest: level ``j`` (1-based) keeps
``k_j(d) = min(d, max(1, ceil(ratios[j-1] * d)))`` coordinates of a vector of length ``d`` (0 of an
empty one), the largest ``|v|``, ties going to the lower index. With increasing ratios the levels are
nested (``K_1 <= ... <= K_m``): one stable sort of ``|v|`` serves them all (``order``), the first
``k_j`` indices of it are level ``j``'s. On the wire a level-``j`` message is ``TopK(ratios[j-1])``'s
(``k_j(capacity)`` values, then as many int32 indices); level 0 means "skip", nothing but a header.

As a plain ``Compressor`` (``compress`` / ``to_wire`` / ...) it is its finest level ``C_m``.

``adaptive_level`` is the rule that picks the level (../shared/SEED_SPECS.md section 3, SECONDARY,
the per-worker 3PC form; the skip convention is the PRIMARY LAG/CLAG code's, send iff
``||x - h||^2 > zeta ||x - y||^2``)::

    C^AC_{h,y}(x):  if ||x - h||^2 <= zeta ||x - y||^2:            level 0, h        (skip)
                    for j = 1 .. m-1, z_j = h + C_j(x - h):
                        if ||x - z_j||^2 <= zeta ||x - y||^2:        level j, z_j      (cheapest accepted)
                    otherwise                                        level m, h + C_m(x - h)

This module knows nothing about distribution: vectors are one server shard, norms are handed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..types import Compressed
from .base import Compressor, check_blocks
from .topk import TopK

#: Levels a one-byte header can name (0 is "skip").
MAX_LEVELS = 255


def check_ratios(ratios: object, name: str = "ratios") -> tuple[float, ...]:
    """``ratios`` as a tuple: 1 to ``MAX_LEVELS`` numbers in (0, 1], strictly increasing (cheapest first)."""
    ok = (
        isinstance(ratios, (list, tuple))
        and 1 <= len(ratios) <= MAX_LEVELS
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r <= 1.0 for r in ratios)
        and all(a < b for a, b in zip(ratios, ratios[1:]))
    )
    if not ok:
        raise ValueError(f"Invalid {name}={ratios!r}. Must be {ratios_must_be()}.")
    return tuple(float(r) for r in ratios)  # type: ignore[union-attr]


def ratios_must_be() -> str:
    return (
        f"a list of 1 to {MAX_LEVELS} top-k ratios in (0.0, 1.0], strictly increasing (cheapest level first, "
        "the last one the finest)"
    )


def adaptive_level(skip_error: float, level_errors: Iterable[float], budget: float, num_levels: int) -> int:
    """The level ``C^AC`` picks: 0 (skip) if ``skip_error <= budget``, else the first ``j`` (1-based)
    with ``level_errors[j-1] <= budget``, else ``num_levels`` (the finest, accepted without a test).

    ``skip_error = ||x - h||^2``; ``level_errors`` yields ``||x - z_j||^2`` for the ``num_levels - 1``
    levels below the finest, in order (it may be a generator: it is read only up to the first accepted
    level); ``budget = zeta ||x - y||^2``. Non-strict ``<=``: the PRIMARY LAG/CLAG code sends iff ``>``.
    """
    if skip_error <= budget:
        return 0
    for j, error in zip(range(1, num_levels), level_errors):
        if error <= budget:
            return j
    return num_levels


class NestedTopK(Compressor):
    """Top-k at ``len(ratios)`` nested levels (module docstring); as a ``Compressor``, the finest."""

    name = "nested_topk"
    max_numel = 2**31 - 1  # indices travel as int32
    payload_size = "variable"  # a header says which level (and so how much) a message carries

    def __init__(self, ratios: Sequence[float]) -> None:
        self.ratios = check_ratios(ratios)
        self.topk = tuple(TopK(r) for r in self.ratios)  # level j is self.topk[j - 1]

    @property
    def num_levels(self) -> int:
        return len(self.ratios)

    def k(self, level: int, numel: int) -> int:
        """Coordinates level ``level`` (1..m) keeps of a vector of ``numel``; level 0 keeps none."""
        return 0 if level == 0 else self.topk[level - 1].k(numel)

    def order(self, v: torch.Tensor) -> torch.Tensor:
        """The one sort of all levels: indices of ``v`` by decreasing ``|v|``, ties to the lower index,
        at least the finest level's ``k_m`` of them (the first entries of a stable sort of ``|v|``).

        A partial sort: ``topk`` finds the ``k_m``-th largest ``|v|``, and only the coordinates at least
        that large (``k_m``, or more on a tie) are sorted, stably, in index order: every coordinate left
        out is smaller than all of them, so the prefix is the full stable sort's."""
        magnitudes = v.abs()
        k = self.k(self.num_levels, v.numel())
        if k == v.numel():
            return torch.sort(magnitudes, descending=True, stable=True).indices
        threshold = torch.topk(magnitudes, k, sorted=False).values.min()
        candidates = torch.nonzero(magnitudes >= threshold).squeeze(1)  # in index order
        return candidates[torch.sort(magnitudes[candidates], descending=True, stable=True).indices]

    def compress_level(self, v: torch.Tensor, order: torch.Tensor, level: int) -> Compressed:
        """``C_level(v)`` from ``order = self.order(v)``: the first ``k_level`` indices and their values."""
        idx = order[: self.k(level, v.numel())]
        return Compressed(v[idx], idx, v.numel(), (v.numel(),))

    def decompress(self, c: Compressed, *, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        out = torch.zeros(c.numel, dtype=dtype, device=c.payload.device)
        out[c.scale.long()] = c.payload.to(dtype)
        return out

    def level_wire_nbytes(self, level: int, capacity: int, dtype: torch.dtype) -> int:
        """Bytes of a level-``level`` message sized for vectors of up to ``capacity`` (0 for level 0)."""
        return 0 if level == 0 else self.topk[level - 1].wire_nbytes(capacity, 1, dtype)

    def level_to_wire(self, c: Compressed, level: int, capacity: int, dtype: torch.dtype, width: int) -> torch.Tensor:
        """``c`` (level ``level``) serialised, zero-padded to ``width`` bytes (an envelope of a wider level)."""
        wire = torch.zeros(width, dtype=torch.uint8, device=c.payload.device)
        if level > 0:
            own = self.topk[level - 1].to_wire(c, capacity, 1, dtype)
            wire[: own.numel()] = own
        return wire

    def level_from_wire(
        self, wire: torch.Tensor, level: int, numel: int, capacity: int, dtype: torch.dtype
    ) -> Compressed:
        """Inverse of ``level_to_wire`` for a vector of ``numel`` coordinates (the envelope's padding ignored)."""
        if level == 0:
            empty = torch.empty(0, dtype=dtype, device=wire.device)
            return Compressed(empty, torch.empty(0, dtype=torch.long, device=wire.device), numel, (numel,))
        return self.topk[level - 1].from_wire(wire, numel, (numel,), capacity, dtype)

    def level_payload_bits(self, level: int, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Information bits of a level-``level`` message for ``numel`` coordinates (no header, no padding)."""
        return 0 if level == 0 else self.topk[level - 1].payload_bits((numel,), dtype)

    # --- the Compressor interface: the finest level -------------------------------------------
    def compress(self, x: torch.Tensor, block_sizes: Sequence[int], *, seed: int = 0) -> Compressed:
        check_blocks(x, block_sizes)
        return self.compress_level(x, self.order(x), self.num_levels)

    def wire_nbytes(self, capacity: int, num_blocks: int, dtype: torch.dtype) -> int:
        return self.level_wire_nbytes(self.num_levels, capacity, dtype)

    def to_wire(self, c: Compressed, capacity: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        m = self.num_levels
        return self.level_to_wire(c, m, capacity, dtype, self.level_wire_nbytes(m, capacity, dtype))

    def from_wire(
        self, wire: torch.Tensor, numel: int, block_sizes: Sequence[int], capacity: int, dtype: torch.dtype
    ) -> Compressed:
        return self.level_from_wire(wire, self.num_levels, numel, capacity, dtype)

    def payload_bits(self, block_sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        return self.level_payload_bits(self.num_levels, sum(block_sizes), dtype)

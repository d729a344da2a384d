"""What each piece of optimizer state is, declared where it is made, so policy is generic.

Every exchange scheme and every optimizer lists its flat state buffers as ``StateSpec``s: the
key, whether the buffer spans the whole flat buffer (``FULL``) or only this rank's server shard
(``SHARD``), and its scope:

* ``RANK_IDENTICAL``: bit-identical on every rank (moments, the down Markov state): checked by
  the consistency check, saved once by the framework.
* ``PER_RANK``: differs between ranks (worker Markov states, error buffers, server shards): saved
  per rank, refused by ``load_state_dict`` when it comes from another rank or world size.
* ``TRANSIENT``: scratch that is rebuilt when missing: never checked, never saved per rank.

Checkpointing, ``reset_compression_state``, the consistency check and ``state_dict`` read these
declarations; a new scheme declares its buffers and needs no edit anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SHARD = "full", "shard"
#: The padding coordinates a padded layout adds past the bucket (1-bit LAMB's fused buffer: its
#: optimizer makes the buffer, of the layout's length minus the bucket's).
PADDING = "padding"
RANK_IDENTICAL, PER_RANK, TRANSIENT = "rank_identical", "per_rank", "transient"


@dataclass(frozen=True)
class StateSpec:
    key: str
    length: str  # FULL or SHARD
    scope: str  # RANK_IDENTICAL, PER_RANK or TRANSIENT
    doc: str = ""

    def __post_init__(self) -> None:
        if self.length not in (FULL, SHARD, PADDING):
            raise ValueError(f"StateSpec {self.key!r}: length={self.length!r}, allowed: {FULL}, {SHARD}, {PADDING}.")
        if self.scope not in (RANK_IDENTICAL, PER_RANK, TRANSIENT):
            raise ValueError(
                f"StateSpec {self.key!r}: scope={self.scope!r}, allowed: {RANK_IDENTICAL}, {PER_RANK}, {TRANSIENT}."
            )

    def zeros(self, like: torch.Tensor, shard_numel: int) -> torch.Tensor:
        """A zero buffer of this spec's length, with ``like``'s dtype and device."""
        if self.length == PADDING:
            raise ValueError(f"StateSpec {self.key!r}: a padding buffer is made by its optimizer, not here.")
        if self.length == FULL:
            return torch.zeros_like(like)
        return torch.zeros(shard_numel, dtype=like.dtype, device=like.device)


def keys_with_scope(specs: tuple[StateSpec, ...], scope: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.key for s in specs if s.scope == scope))

"""Bytes each rank sends, per collective, under the standard (ring / pairwise) algorithms.

These are the counts the benchmarks and the 1/28 claim are made of. With ``n`` ranks:

* ``all_to_all`` of ``n`` chunks of ``W`` bytes: the rank keeps its own chunk, sends ``(n-1) W``.
* ``all_gather`` of one chunk of ``W`` bytes: ring algorithm, each rank sends ``(n-1) W``.
* ``all_reduce`` of ``B`` bytes: ring reduce-scatter + all-gather, each rank sends ``2 (n-1) B / n``.
* ``reduce_scatter`` of ``B`` bytes (``n`` chunks): ring, each rank sends ``(n-1) B / n``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def all_to_all_bytes_sent(chunk_nbytes: int, world_size: int) -> int:
    return (world_size - 1) * chunk_nbytes


def all_gather_bytes_sent(chunk_nbytes: int, world_size: int) -> int:
    return (world_size - 1) * chunk_nbytes


def all_reduce_bytes_sent(nbytes: int, world_size: int) -> float:
    return 2 * (world_size - 1) * nbytes / world_size


def reduce_scatter_bytes_sent(nbytes: int, world_size: int) -> float:
    """Ring reduce-scatter of ``nbytes`` (``world_size`` equal chunks): each rank sends ``(n-1)/n`` of it."""
    return (world_size - 1) * nbytes / world_size


@dataclass
class CommStats:
    """Bytes this rank handed to collectives and sent, split by direction, summed over steps."""

    bytes_up: float = 0.0  # worker -> server (all_to_all, or the reduce-scatter half of all_reduce)
    bytes_down: float = 0.0  # server -> worker (all_gather, or the all-gather half of all_reduce)
    bytes_handed: int = 0  # input bytes given to collectives (what the code really moved into them)
    collective_calls: int = 0
    bytes_control: float = 0.0  # small agreement messages (non-finite flags, consistency fingerprints)
    # one-time set-up messages of a process (fused-kernel agreement), sent again by a resumed run:
    # kept out of ``bytes_sent`` so that a resumed run counts its training bytes as if it never stopped
    bytes_setup: float = 0.0

    @property
    def bytes_sent(self) -> float:
        return self.bytes_up + self.bytes_down + self.bytes_control

    def snapshot(self) -> CommStats:
        return CommStats(**dataclasses.asdict(self))

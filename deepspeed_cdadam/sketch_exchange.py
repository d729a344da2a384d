"""SketchedAMSGrad's exchange (scheme ``count_sketch``): sketches summed over the ranks, one decoding.

The input on worker ``i`` is its momentum ``m_i``; ``e_i`` (``worker_error``) is what of its past
momenta was not sent. With ``C`` the ``compressors.count_sketch.CountSketch`` of the bucket (``r``
rows, ``c`` columns, ``k`` kept; its hashes drawn from ``shared_seed(seed, t, bucket, 0, 0, 0)``,
the same on every rank)::

    (1) worker i:  a_i = m_i + e_i
    (2)            S(a_i): the r x c table of a_i
    (3) all:       Sbar = (1/n) sum_i S(a_i)              reduce-scatter + all-gather of r c values
    (4)            u = Top-k(U(Sbar))                     U: median of the r row estimates
        with candidate_factor P >= 1 (Sketched-SGD's second round, p2), instead:
                   J = the P k coordinates of largest |U(Sbar)|
                   abar_J = (1/n) sum_i a_i[J]            reduce-scatter + all-gather of P k values
                   u = abar_J on the k coordinates of J of largest |abar_J|, 0 elsewhere
    (5) worker i:  e_i = a_i - u                          (so a_i = u + e_i exactly)
    returns u (the same on every rank)

Sketches are linear (``S(a) + S(b) = S(a + b)`` for one set of hashes), so the ranks' tables are
summed in compressed space and decoded once; nothing is decoded per sender. Every rank decodes the
same summed table with the same hashes, so there is no master: the broadcast of the ``k`` values
and indices that a parameter server would send is not needed (it would cost ``k`` values + ``k``
indices per rank and step). The sum is a reduce-scatter (each rank sums one chunk, in the
transport's order) followed by an all-gather of the summed chunks, so the table every rank decodes
is the same bits by construction, whatever the backend's all-reduce algorithm; it sends what a ring
all-reduce sends, ``2 (n-1)/n`` of the table (padded to a multiple of ``n`` values).

Bytes per rank and step (``CommStats``), ``w`` the bytes of one value (4 in fp32),
``T = ceil(r c / n) n`` and, with a second round, ``Q = ceil(min(P k, d) / n) n``::

    up (reduce-scatter):  (n-1) T/n w   [+ (n-1) Q/n w]
    down (all-gather):    (n-1) T/n w   [+ (n-1) Q/n w]

``O(r c) = O(k log d)`` with the default sizes, independent of ``d`` but through ``r``.
"""

from __future__ import annotations

import torch

from .comm.accounting import CommStats, all_gather_bytes_sent
from .comm.layout import ShardLayout
from .comm.hierarchy import reduce_scatter_bytes_sent
from .comm.transport import Transport
from .compressors.base import Compressor
from .compressors.count_sketch import CountSketch, top_k_indices
from .exchange import CompressedExchange, shared_seed
from .state import FULL, PER_RANK, StateSpec
from .types import WORKER_ERROR


class CountSketchExchange(CompressedExchange):
    """``count_sketch``: error feedback around ``Top-k(U(mean_i S(a_i)))`` (module docstring, (1)-(5))."""

    scheme_name = "count_sketch"
    STATE = (StateSpec(WORKER_ERROR, FULL, PER_RANK, "e_i, this worker's momentum not sent yet"),)
    #: It runs with this compressor only (CDAdam's ``exchange`` option does not offer it).
    COMPRESSOR_CLASS = CountSketch
    OWNER = "SketchedAMSGrad"
    OWNER_NOTE = "it sums count sketches of the workers' momenta with error feedback and sends the top-k of their estimate"

    def __init__(
        self,
        transport: Transport,
        layout: ShardLayout,
        compressor: Compressor,
        stats: CommStats | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(compressor, CountSketch):
            raise ValueError(
                f"exchange='count_sketch' is SketchedAMSGrad's: it needs the CountSketch compressor, not "
                f"{getattr(compressor, 'name', compressor)!r}. Use deepspeed_cdadam.SketchedAMSGrad."
            )
        if compressor.max_numel is not None and layout.numel > compressor.max_numel:
            raise ValueError(
                f"A bucket of {layout.numel} coordinates is too long for a count sketch (at most "
                f"{compressor.max_numel}: coordinates are hashed as residues of 2^31 - 1)."
            )
        super().__init__(transport, layout, compressor, stats, seed)
        self.compressor: CountSketch = compressor
        #: P (Sketched-SGD's p2): 0, one round; P >= 1, a second round for the exact values of P k candidates.
        self.candidate_factor = 0

    def hash_seed(self, step: int, group: int) -> int:
        """The seed of step ``step``'s hashes for bucket ``group``: the same on every rank."""
        return shared_seed(self.seed, step, group, 0, 0, 0)

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``sum_i values_i``, the same bits on every rank: a reduce-scatter of ``values`` padded to a
        multiple of ``n``, then an all-gather of the summed chunks (bytes counted)."""
        n, numel = self.transport.world_size, values.numel()
        width = -(-numel // n)
        padded = torch.zeros(width * n, dtype=values.dtype, device=values.device)
        padded[:numel] = values
        chunk = self.transport.reduce_scatter_sum(padded)
        total = self.transport.all_gather(chunk)[:numel]
        w = values.element_size()
        self.stats.bytes_up += reduce_scatter_bytes_sent(width * n * w, n)
        self.stats.bytes_down += all_gather_bytes_sent(width * w, n)
        self.stats.bytes_handed += (width * n + width) * w
        self.stats.collective_calls += 2
        return total

    def exchange(self, x: torch.Tensor, state: dict, *, step: int, group: int = 0) -> torch.Tensor:
        e, n = state[WORKER_ERROR], self.transport.world_size
        seed = self.hash_seed(step, group)
        shape = self.compressor.shape(x.numel())
        # (1) a_i = m_i + e_i
        a = x + e
        # (2) S(a_i), with the hashes every rank draws from this step's seed
        mine = self.compressor.compress(a, (a.numel(),), seed=seed)
        # (3) Sbar = (1/n) sum_i S(a_i): summed in compressed space, decoded once
        summed = mine._replace(payload=self.sum_over_ranks(mine.payload) / n)
        # (4) u = Top-k(U(Sbar)), or the top k of the exact mean over P k candidates
        estimate = self.compressor.estimate(summed, seed=seed)
        if self.candidate_factor == 0:
            kept = top_k_indices(estimate, shape.k)
            values = estimate[kept]
        else:
            candidates = top_k_indices(estimate, self.candidate_factor * shape.k)
            exact = self.sum_over_ranks(a[candidates]) / n
            best = top_k_indices(exact, shape.k)
            kept, values = candidates[best], exact[best]
        u = torch.zeros_like(a)
        u[kept] = values
        # (5) e_i = a_i - u
        torch.sub(a, u, out=e)
        return u

"""SketchedAMSGrad, plainly: n workers in one process, written from ../shared/SEED_SPECS.md section 2.

The update rule is the spec's RECONSTRUCTION (Algorithm 1 of the paper was not available), with the
choices the optimizer's docstring lists where the spec is silent::

    worker i:  m_i <- beta1 m_i + (1 - beta1) g_i
               a_i = m_i + e_i
    all:       Sbar = (1/n) sum_i S(a_i)                 S: count sketch, r rows, c columns
               est = U(Sbar)                             median over the rows (the lower one for even r)
               u = est on the k largest |est|, 0 elsewhere (ties: lower index)
                 or, with P >= 1 (second round): J = the P k largest |est|;
                 u = mean_i a_i on the k largest |mean_i a_i| of J, 0 elsewhere
    worker i:  e_i = a_i - u
    all:       v <- beta2 v + (1 - beta2) u^2            v_0 = vhat_0 = eps
               vhat <- max(vhat, v)
               x <- (1 - lr weight_decay) x - lr u / sqrt(vhat)

The count sketch is written here with Python integers and floats, coordinate by coordinate:
``S[j][h_j(i)] += s_j(i) a_i``, ``h_j(i) = ((A_j i + B_j) mod p) mod c``, ``s_j(i) = +1`` if
``(C3 i^3 + C2 i^2 + C1 i + C0) mod p`` is odd else ``-1``, ``p = 2^31 - 1``. What is shared with
the optimizer is only the convention of the draws: the coefficients of step ``t``'s hashes come
from ``torch.Generator().manual_seed(shared_seed(seed, t, bucket, 0, 0, 0))`` as ``randint`` draws,
in this order: ``A`` (r values in [1, p)), ``B`` (r in [0, p)), then r rows of ``C3, C2, C1, C0``
(each in [0, p)). Sizes: ``k`` at most ``d``; ``r = ceil(log2 d)`` (at least 1) and ``c = 16 k``
unless given. Hyperparameters may be floats or per-coordinate tensors (``simulate.per_coordinate``)
for a bucket of several parameter groups.
"""

from __future__ import annotations

import math

import torch

from ..exchange import shared_seed

P = 2**31 - 1


def hash_coefficients(rows: int, seed: int) -> list[tuple[int, int, int, int, int, int]]:
    """Per row ``(A, B, C3, C2, C1, C0)``, drawn by the shared convention (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(1, P, (rows,), generator=gen, dtype=torch.int64).tolist()
    b = torch.randint(0, P, (rows,), generator=gen, dtype=torch.int64).tolist()
    c = torch.randint(0, P, (rows, 4), generator=gen, dtype=torch.int64).tolist()
    return [(a[j], b[j], *c[j]) for j in range(rows)]


def sketch_sizes(d: int, k: int, rows: int | None, columns: int | None) -> tuple[int, int, int]:
    """``(r, c, k)`` of a vector of ``d`` coordinates."""
    k = min(k, d)
    r = rows if rows is not None else max(1, math.ceil(math.log2(d)))
    c = columns if columns is not None else 16 * k
    return r, c, k


class CountSketchReference:
    """The hashes of one sketch of ``d`` coordinates, and ``S`` / ``U`` written out."""

    def __init__(self, d: int, rows: int, columns: int, seed: int) -> None:
        self.d, self.rows, self.columns = d, rows, columns
        self.where: list[list[tuple[int, int]]] = []  # per row: (bucket, sign) of each coordinate
        for a, b, c3, c2, c1, c0 in hash_coefficients(rows, seed):
            buckets = [(a * i + b) % P % columns for i in range(d)]
            signs = [1 if (c3 * i**3 + c2 * i**2 + c1 * i + c0) % P % 2 else -1 for i in range(d)]
            self.where.append(list(zip(buckets, signs)))

    def sketch(self, x: list[float]) -> list[list[float]]:
        table = [[0.0] * self.columns for _ in range(self.rows)]
        for j in range(self.rows):
            for i in range(self.d):
                bucket, sign = self.where[j][i]
                table[j][bucket] += sign * x[i]
        return table

    def unsketch(self, table: list[list[float]]) -> list[float]:
        out = []
        for i in range(self.d):
            values = sorted(self.where[j][i][1] * table[j][self.where[j][i][0]] for j in range(self.rows))
            out.append(values[(self.rows - 1) // 2])
        return out


def largest(values: list[float], k: int, among: list[int]) -> list[int]:
    """The ``k`` indices of ``among`` with the largest ``|values[i]|`` (ties: the lower index), increasing."""
    return sorted(sorted(among, key=lambda i: (-abs(values[i]), i))[:k])


class SketchedAMSGradReference:
    """``n`` workers of SketchedAMSGrad on one bucket ``x`` (one sketch per step)."""

    def __init__(
        self, x0, n_workers, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, k=1000,
        sketch_rows=None, sketch_columns=None, candidate_factor=0, seed=0, group=0,
    ):  # fmt: skip
        self.x = x0.detach().clone().reshape(-1)
        self.n, self.d = n_workers, self.x.numel()
        self.lr, (self.beta1, self.beta2), self.wd = lr, betas, weight_decay
        self.r, self.c, self.k = sketch_sizes(self.d, k, sketch_rows, sketch_columns)
        self.candidates = min(self.d, candidate_factor * self.k)
        self.seed, self.group, self.t = seed, group, 0
        zeros = torch.zeros_like(self.x)
        self.m = [zeros.clone() for _ in range(n_workers)]
        self.e = [zeros.clone() for _ in range(n_workers)]
        self.v = zeros + eps
        self.vhat = zeros + eps
        self.last_u = zeros.clone()

    def sent(self, a: list[torch.Tensor]) -> torch.Tensor:
        """``u`` from the workers' ``a_i`` (this step's hashes)."""
        cs = CountSketchReference(self.d, self.r, self.c, shared_seed(self.seed, self.t, self.group, 0, 0, 0))
        tables = [cs.sketch(ai.tolist()) for ai in a]
        mean = [[sum(t[j][b] for t in tables) / self.n for b in range(self.c)] for j in range(self.r)]
        estimate = cs.unsketch(mean)
        u = [0.0] * self.d
        if self.candidates == 0:
            for i in largest(estimate, self.k, list(range(self.d))):
                u[i] = estimate[i]
        else:
            candidates = largest(estimate, self.candidates, list(range(self.d)))
            exact = {i: sum(ai[i].item() for ai in a) / self.n for i in candidates}
            for i in largest(exact, self.k, candidates):
                u[i] = exact[i]
        return torch.tensor(u, dtype=self.x.dtype)

    def step(self, worker_grads):
        self.t += 1
        a = []
        for i, g in enumerate(worker_grads):
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * g
            a.append(self.m[i] + self.e[i])
        u = self.sent(a)
        for i in range(self.n):
            self.e[i] = a[i] - u
        self.v = self.beta2 * self.v + (1 - self.beta2) * u * u
        self.vhat = torch.maximum(self.vhat, self.v)
        self.x = (1 - self.lr * self.wd) * self.x - self.lr * u / self.vhat.sqrt()
        self.last_u = u
        return self.x

"""Small test problems with known structure, for convergence checks and quick experiments."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NonconvexLogistic:
    """Logistic regression with the nonconvex regulariser of the CD-Adam paper (section 7.1).

    Worker ``i`` holds ``(A_i, y_i)`` and ``f_i(x) = mean_j log(1 + exp(-y_ij a_ij^T x)) +
    lam * sum_k x_k^2 / (1 + x_k^2)``; the global objective is the mean of the ``f_i``.
    """

    features: list[torch.Tensor]
    labels: list[torch.Tensor]
    lam: float = 0.1

    @classmethod
    def synthetic(
        cls,
        n_workers: int = 4,
        samples: int = 200,
        dim: int = 20,
        lam: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> NonconvexLogistic:
        """Heterogeneous workers: each draws features around its own mean and labels from a shared
        noisy linear model."""
        gen = torch.Generator().manual_seed(seed)
        w_true = torch.randn(dim, generator=gen, dtype=dtype)
        feats, labels = [], []
        for _ in range(n_workers):
            shift = torch.randn(dim, generator=gen, dtype=dtype)
            a = torch.randn(samples, dim, generator=gen, dtype=dtype) + shift
            logits = a @ w_true + 0.5 * torch.randn(samples, generator=gen, dtype=dtype)
            feats.append(a)
            labels.append(torch.where(logits >= 0, 1.0, -1.0).to(dtype))
        return cls(feats, labels, lam)

    @property
    def n_workers(self) -> int:
        return len(self.features)

    def loss(self, x: torch.Tensor, worker: int | None = None) -> torch.Tensor:
        workers = range(self.n_workers) if worker is None else [worker]
        total = sum(
            torch.nn.functional.softplus(-self.labels[i] * (self.features[i] @ x)).mean() for i in workers
        ) / len(workers)
        return total + self.lam * (x * x / (1 + x * x)).sum()

    def grad(self, worker: int, x: torch.Tensor) -> torch.Tensor:
        """Exact gradient of ``f_worker`` at ``x``."""
        a, y = self.features[worker], self.labels[worker]
        s = torch.sigmoid(-y * (a @ x))
        data = -(a * (y * s).unsqueeze(1)).mean(0)
        return data + self.lam * 2 * x / (1 + x * x) ** 2

    def grad_norm(self, x: torch.Tensor) -> float:
        """``||grad f(x)||_2`` of the global objective."""
        return float(torch.linalg.vector_norm(sum(self.grad(i, x) for i in range(self.n_workers)) / self.n_workers))

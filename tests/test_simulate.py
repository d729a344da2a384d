"""The simulator against a line-by-line transcription of the papers (float64, zero tolerance)."""

import torch

from deepspeed_cdadam.comm import ShardLayout
from deepspeed_cdadam.simulate import CDAdamReference, OneBitAdamReference, run


def C(x):
    """Scaled sign, one block: ||x||_1 / d * sign(x), sign(0) = +1."""
    return x.abs().sum() / x.numel() * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def C2(x):
    return x.norm() / x.numel() ** 0.5 * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def grads_for(n, d, T, seed=0):
    G = torch.randn(T, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda i, x, t: G[t - 1, i] * (1 + x.abs())


def test_cd_adam_reference_is_algorithm_1():
    n, d, T, lr, b1, b2, nu = 3, 13, 30, 1e-2, 0.9, 0.99, 1e-8
    g = grads_for(n, d, T)
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # Algorithm 1, as printed (line 9 read as the Markov sequence C(ghat_t - gtil_{t-1})).
    x, m, v, vhat = x0.clone(), torch.zeros(d), torch.zeros(d), torch.zeros(d)
    m, v, vhat = m.double(), v.double(), vhat.double()
    ghat_i = [torch.zeros(d, dtype=torch.float64) for _ in range(n)]
    ghat, gtil = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    expected = []
    for t in range(1, T + 1):
        c = []
        for i in range(n):
            c.append(C(g(i, x, t) - ghat_i[i]))
            ghat_i[i] = ghat_i[i] + c[i]
        ghat = ghat + sum(c) / n
        ctil = C(ghat - gtil)
        gtil = gtil + ctil
        m = b1 * m + (1 - b1) * gtil
        v = b2 * v + (1 - b2) * gtil**2
        vhat = torch.maximum(vhat, v)
        x = x - lr * m / torch.sqrt(vhat + nu)
        expected.append(x.clone())
    ref = CDAdamReference(x0, n, ShardLayout(d, 1), lr=lr, betas=(b1, b2), eps=nu)
    got = run(ref, g, T)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert not torch.equal(got[-1], x0)


def test_onebit_adam_reference_follows_deepspeed_semantics():
    n, d, T, F, lr, b1, b2, eps, wd = 2, 9, 12, 4, 1e-2, 0.9, 0.999, 1e-8, 0.01
    g = grads_for(n, d, T, seed=1)
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x, m, v = x0.clone(), torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    e = [torch.zeros(d, dtype=torch.float64) for _ in range(n)]
    ebar = torch.zeros(d, dtype=torch.float64)
    expected = []
    for t in range(1, T + 1):
        grads = [g(i, x, t) for i in range(n)]
        if t <= F:
            gm = sum(grads) / n
            m = b1 * m + (1 - b1) * gm
            v = b2 * v + (1 - b2) * gm * gm
        else:
            cs = []
            for i in range(n):
                p = b1 * m + (1 - b1) * grads[i] + e[i]
                cs.append(C2(p))
                e[i] = p - cs[i]
            q = sum(cs) / n + ebar
            m = C2(q)
            ebar = q - m
        x = x - lr * (m / (v.sqrt() + eps) + wd * x)
        expected.append(x.clone())
    ref = OneBitAdamReference(x0, n, ShardLayout(d, 1), lr=lr, freeze_step=F, betas=(b1, b2), eps=eps, weight_decay=wd)
    for a, b in zip(run(ref, g, T), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_ef21_both_ways_converges_with_topk():
    from deepspeed_cdadam.problems import NonconvexLogistic
    from deepspeed_cdadam.simulate import EF21Reference

    problem = NonconvexLogistic.synthetic(n_workers=4, samples=200, dim=20)
    x0 = torch.zeros(20, dtype=torch.float64)
    ref = EF21Reference(x0, 4, ShardLayout(20, 4), lr=0.3, ratio=0.2)
    xs = run(ref, lambda i, x, t: problem.grad(i, x), 500)
    assert problem.grad_norm(xs[-1]) < 1e-9 * problem.grad_norm(x0)
    # top-k 20% of each 5-coordinate shard: 1 value (64-bit here) + 1 int32 index per shard
    assert ref.bits_up == 500 * 4 * 4 * (64 + 32)
    assert ref.bits_down == 500 * 4 * (64 + 32)


def test_bit_counts_cd_adam_vs_uncompressed():
    from deepspeed_cdadam.simulate import AMSGradReference

    n, d, T = 4, 1000, 3
    g = grads_for(n, d, T)
    x0 = torch.zeros(d, dtype=torch.float32)
    cd = CDAdamReference(x0, n, ShardLayout(d, n))
    ams = AMSGradReference(x0, n, ShardLayout(d, n))
    run(cd, lambda i, x, t: g(i, x.double(), t).float(), T)
    run(ams, lambda i, x, t: g(i, x.double(), t).float(), T)
    assert cd.bits_up == T * n * (d + 32 * n) and cd.bits_down == T * (d + 32 * n)
    assert ams.bits_up == T * n * 32 * d and ams.bits_down == T * 32 * d
    assert (cd.bits_up + cd.bits_down) / (ams.bits_up + ams.bits_down) < 1 / 28

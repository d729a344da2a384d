"""``functional.apply_update_`` (multi-tensor operations in chunks) against the per-parameter loop it replaced."""

from __future__ import annotations

import pytest
import torch

from deepspeed_cdadam.optim import functional


def per_parameter_update(params, direction, *, lr, weight_decay, decoupled=True, overwrite_direction=False):
    """The update as it was written before: one parameter at a time, the same operations in the same order."""
    offset = 0
    with torch.no_grad():
        for p in params:
            d = direction[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if decoupled:
                if weight_decay != 0.0:
                    p.mul_(1 - lr * weight_decay)
                p.add_(d.to(p.dtype), alpha=-lr)
            elif overwrite_direction:
                if weight_decay > 0.0:
                    d.add_(weight_decay * p)
                p.add_(d.mul_(-lr).to(p.dtype))
            else:
                update = d + weight_decay * p if weight_decay > 0.0 else d
                p.add_((-lr * update).to(p.dtype))


SIZES = [3, 1000, 17, 4096, 1, 250, 7, 2048]  # a quarter of all coordinates: several chunks
# on CUDA the multi-tensor kernels themselves run (on CPU foreach falls back to one op per tensor)
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def make(dtype_of, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(device=device, dtype=dtype_of(i)) for i, n in enumerate(SIZES)]
    direction = torch.randn(sum(SIZES), generator=gen).to(device)
    return params, direction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoupled,overwrite", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("mixed", [False, True])
def test_apply_update_equals_the_per_parameter_loop_bit_for_bit(decoupled, overwrite, weight_decay, mixed, device):
    dtype_of = (lambda i: torch.bfloat16 if i % 3 == 1 else torch.float32) if mixed else (lambda i: torch.float32)
    got_p, got_d = make(dtype_of, device=device)
    want_p, want_d = make(dtype_of, device=device)
    kw = dict(lr=0.01, weight_decay=weight_decay, decoupled=decoupled, overwrite_direction=overwrite)
    functional.apply_update_(got_p, got_d, **kw)
    per_parameter_update(want_p, want_d, **kw)
    for g, w in zip(got_p, want_p):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(got_d, want_d)  # overwritten alike (overwrite_direction), else untouched
    moved = sum(int(not torch.equal(g, p)) for g, p in zip(got_p, make(dtype_of, device=device)[0]))
    assert moved == len(SIZES)  # every parameter was updated (no chunk skipped)


def test_chunks_cover_every_parameter_in_order_within_the_bound():
    ps = [torch.empty(n) for n in SIZES]
    ds = [torch.empty(n) for n in SIZES]
    limit = max(max(SIZES), sum(SIZES) // 4)
    pieces = list(functional._chunks(ps, ds, SIZES))
    assert len(pieces) > 1
    assert [id(p) for piece, _ in pieces for p in piece] == [id(p) for p in ps]
    assert [id(d) for _, piece in pieces for d in piece] == [id(d) for d in ds]
    for piece, _ in pieces:
        assert len(piece) == 1 or sum(p.numel() for p in piece) <= limit
    assert list(functional._chunks([], [], [])) == []

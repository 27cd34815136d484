"""The Mahalanobis baseline on a real network's wide layer: above DENSE_UP_TO features the shrunk
covariance is inverted by Woodbury (no F × F matrix), giving the dense path's distances; a
resnet-sized flattened map (tens of thousands of features) fits in memory."""

from __future__ import annotations

import torch

from core.methods import detection as D


def _fit(monkeypatch, dense_up_to, a, y):
    monkeypatch.setattr(D, "DENSE_UP_TO", dense_up_to)
    return D.Gaussian(a, y, 3, shrink=0.1)


def test_woodbury_gives_the_dense_distances(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 60, generator=g) @ torch.randn(60, 60, generator=g)
    y = torch.arange(40) % 3
    dense = _fit(monkeypatch, 10_000, a, y)
    low = _fit(monkeypatch, 10, a, y)
    assert dense.precision is not None and dense.low_rank is None
    assert low.precision is None and low.low_rank is not None
    q = torch.randn(7, 60, generator=g)
    cls = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert torch.allclose(low.distance(q, cls), dense.distance(q, cls), rtol=1e-4, atol=1e-4)
    # the attack's penalty reads the same form, differentiably
    d = (q - dense.means.float()[cls]).requires_grad_(True)
    lr = tuple(t.float() for t in low.low_rank)
    val = low.form(d, None, lr)
    val.sum().backward()
    assert d.grad is not None and torch.allclose(
        val.detach(), dense.form(d.detach(), dense.precision.float()), rtol=1e-3, atol=1e-3)


def test_a_wide_layer_needs_no_feature_by_feature_matrix():
    g = torch.Generator().manual_seed(1)
    n, f = 64, 256 * 10 * 10 * 2  # a resnet18 layer3-sized map at 160 px, doubled: 51,200
    a = torch.randn(n, f, generator=g)
    y = torch.arange(n) % 2
    gauss = D.Gaussian(a, y, 2)
    assert gauss.precision is None
    assert max(t.numel() for t in gauss.low_rank) <= n * f
    out = gauss.distance(a[:5], y[:5])
    assert out.shape == (5,) and torch.isfinite(out).all() and (out > 0).all()

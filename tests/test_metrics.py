"""Metrics: hand-worked values, properties, and Quantus (0.6) as the oracle where it has the metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from core.methods import metrics as M

quantus = pytest.importorskip("quantus")

H = W = 28
P = H * W


def corner_mask(n: int, corners=None) -> torch.Tensor:
    """(N, 1, 28, 28) bool masks: a 4×4 patch in one of the four corners per example."""
    corners = [i % 4 for i in range(n)] if corners is None else corners
    m = torch.zeros(n, 1, H, W, dtype=torch.bool)
    for i, c in enumerate(corners):
        r0 = 0 if c in (0, 1) else H - 4
        c0 = 0 if c in (0, 2) else W - 4
        m[i, 0, r0:r0 + 4, c0:c0 + 4] = True
    return m


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 7 * 7, 10)).eval()


class PixelSetModel(nn.Module):
    """logits = [0, w · Σ_{p∈S} x_p]: class 1 depends only on the chosen pixel set S."""

    def __init__(self, pixels: torch.Tensor, w: float = 0.5):
        super().__init__()
        sel = torch.zeros(P)
        sel[pixels] = 1.0
        self.lin = nn.Linear(P, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.weight[1] = w * sel

    def forward(self, x):
        return self.lin(x.flatten(1))


def grad_x_input(model, inputs, targets, **_):
    x = torch.as_tensor(np.asarray(inputs)).float().clone().requires_grad_(True)
    t = torch.as_tensor(np.asarray(targets)).long()
    out = model(x)
    (g,) = torch.autograd.grad(out[torch.arange(len(x)), t].sum(), x)
    return (g * x).detach().numpy()


# --------------------------------------------------------------------------------------------
# region_mass


def test_region_mass_hand_values():
    m = corner_mask(3)
    a = torch.zeros(3, 1, H, W)
    a[0][m[0]] = 2.0                       # all positive mass on the patch
    a[0][~m[0]] = -5.0                     # negatives are ignored
    a[1] = 1.0                             # uniform: chance
    a[2][m[2]] = 1.0                       # 16 on the patch, 48 elsewhere: 16 / 64
    a[2, 0, 10, 10:14] = 12.0
    out = M.region_mass(a, m)
    assert out.shape == (3,)
    assert out[0] == pytest.approx(1.0)
    assert out[1] == pytest.approx(16 / 784)
    assert out[2] == pytest.approx(0.25)


def test_region_mass_no_positive_is_zero_and_empty_mask_nan():
    a = -torch.rand(2, H, W)
    m = corner_mask(2)[:, 0]
    assert torch.equal(M.region_mass(a, m), torch.zeros(2))
    assert torch.isnan(M.region_mass(torch.rand(1, H, W), torch.zeros(1, H, W, dtype=bool))).all()


def test_numpy_inputs_give_the_same_values():
    a = torch.randn(3, 1, H, W)
    m = corner_mask(3)
    for fn in (M.region_mass, M.wrong_reason, M.rank_accuracy):
        torch.testing.assert_close(fn(a.numpy(), m.numpy()), fn(a, m))
    torch.testing.assert_close(M.sparseness(a.numpy()), M.sparseness(a))


def test_region_mass_sums_channels_and_broadcasts_2d_mask():
    a = torch.rand(2, 3, H, W)
    m2 = corner_mask(1)[0, 0]
    expect = M.region_mass(a.sum(1, keepdim=True), m2.expand(2, 1, H, W))
    assert torch.allclose(M.region_mass(a, m2), expect)


def test_region_mass_equals_quantus_relevance_mass_on_nonnegative_maps():
    g = torch.Generator().manual_seed(1)
    n = 12
    a = torch.rand(n, 1, H, W, generator=g) ** 4
    a[:4] *= torch.rand(4, 1, H, W, generator=g) > 0.7      # exact zeros too
    m = corner_mask(n)
    x = torch.rand(n, 1, H, W, generator=g)
    q = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True,
                                      display_progressbar=False)
    ref = np.asarray(q(model=None, x_batch=x.numpy(), y_batch=np.zeros(n, dtype=int),
                       a_batch=a.numpy(), s_batch=m.numpy().astype(float), channel_first=True))
    np.testing.assert_allclose(M.region_mass(a, m).numpy(), ref, rtol=1e-5, atol=1e-7)


def test_region_mass_differs_from_quantus_with_negative_attribution():
    """Quantus's raw ratio Σa·m / Σa leaves [0, 1] when negatives dominate; ours stays in it."""
    a = torch.full((1, 1, H, W), -0.01)
    m = corner_mask(1)
    a[m] = 1.0
    raw = float((a * m).sum() / a.sum())            # 16 / (16 - 7.68) ≈ 1.92
    assert raw > 1.5
    assert M.region_mass(a, m)[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# wrong_reason


def test_wrong_reason_hand_values():
    m = corner_mask(4)
    a = torch.zeros(4, 1, H, W)
    a[0][m[0]] = -3.0                      # abs: the whole patch is hit
    a[1] = 1.0                             # uniform: nothing strictly above the mean
    idx = m[2, 0].nonzero()[:8]            # half the patch
    a[2, 0, idx[:, 0], idx[:, 1]] = 1.0
    a[2, 0, 14, 14] = 4.0                  # max elsewhere: 0.25 on the half patch, mean ≈ 0.0077
    out = M.wrong_reason(a, m)             # a[3] = 0 everywhere: nothing hit
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.5, 0.0]))


def test_wrong_reason_threshold_is_the_mean_of_the_normalised_map():
    # background 0.5, patch pixels 0.6 and 0.4 alternating: the mean sits just below 0.5,
    # so only the 0.6 pixels (8 of 16) and the background are above it
    m = corner_mask(1)
    a = torch.full((1, 1, H, W), 0.5)
    patch = m[0, 0].nonzero()
    for j, (r, c) in enumerate(patch.tolist()):
        a[0, 0, r, c] = 0.6 if j % 2 == 0 else 0.4
    assert M.wrong_reason(a, m)[0] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# rank_accuracy


def test_rank_accuracy_hand_values():
    m = corner_mask(3)
    a = torch.rand(3, 1, H, W) * 0.1
    a[0][m[0]] = 1.0 + torch.rand(16)                 # the 16 top pixels are the patch
    patch = m[1, 0].nonzero()
    a[1, 0, patch[:4, 0], patch[:4, 1]] = 2.0         # 4 patch pixels in the top 16
    a[1, 0, 10, :12] = 1.5
    a[2][m[2]] = -1.0                                 # patch ranked last
    torch.testing.assert_close(M.rank_accuracy(a, m), torch.tensor([1.0, 0.25, 0.0]))
    assert M.rank_accuracy(a, m, k=4)[1] == pytest.approx(1.0)


def test_rank_accuracy_equals_quantus():
    g = torch.Generator().manual_seed(2)
    n = 16
    m = corner_mask(n)
    a = torch.randn(n, 1, H, W, generator=g)
    a[m] += torch.rand(int(m.sum()), generator=g) * 2.5     # partly on the patch
    q = quantus.RelevanceRankAccuracy(abs=False, normalise=False, disable_warnings=True,
                                      display_progressbar=False)
    ref = np.asarray(q(model=None, x_batch=torch.rand(n, 1, H, W).numpy(),
                       y_batch=np.zeros(n, dtype=int), a_batch=a.numpy(),
                       s_batch=m.numpy().astype(float), channel_first=True))
    ours = M.rank_accuracy(a, m).numpy()
    assert 0 < ours.mean() < 1
    np.testing.assert_allclose(ours, ref, atol=1e-7)


# --------------------------------------------------------------------------------------------
# sparseness


def test_sparseness_hand_values():
    a = torch.zeros(3, H, W)
    a[0] = 1.0
    a[1, 3, 4] = -7.0
    a[2, 0, :2] = torch.tensor([1.0, 3.0])           # n = 784, values 1 and 3 at the top
    out = M.sparseness(a)
    assert out[0] == pytest.approx(0.0, abs=1e-6)
    assert out[1] == pytest.approx((P - 1) / P)
    g2 = ((2 * (P - 1) - P - 1) * 1.0 + (2 * P - P - 1) * 3.0) / (P * 4.0)
    assert out[2] == pytest.approx(g2)
    assert M.sparseness(torch.zeros(1, H, W))[0] == 0


def test_sparseness_equals_quantus():
    g = torch.Generator().manual_seed(3)
    n = 10
    a = torch.randn(n, 1, H, W, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 5
    a[:3] *= torch.rand(3, 1, H, W, generator=g) > 0.8
    q = quantus.Sparseness(abs=True, normalise=False, disable_warnings=True,
                           display_progressbar=False)
    ref = np.asarray(q(model=None, x_batch=torch.rand(n, 1, H, W).numpy(),
                       y_batch=np.zeros(n, dtype=int), a_batch=a.numpy(), channel_first=True))
    np.testing.assert_allclose(M.sparseness(a).numpy(), ref, atol=1e-6)


# --------------------------------------------------------------------------------------------
# spearman


def test_spearman_equals_scipy_with_ties():
    g = np.random.default_rng(4)
    a = g.integers(0, 6, size=(7, 50)).astype(np.float32)     # many ties
    b = (a + g.integers(0, 4, size=(7, 50))).astype(np.float32)
    b[3] = g.normal(size=50)
    ref = np.array([stats.spearmanr(a[i], b[i])[0] for i in range(7)])
    np.testing.assert_allclose(M.spearman(a, b).numpy(), ref, atol=1e-12)


def test_spearman_hand_values_and_constant_rows():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = M.spearman(a, b)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(-1.0)
    assert torch.isnan(out[2])


# --------------------------------------------------------------------------------------------
# deletion / insertion


def test_deletion_curve_equals_quantus_pixel_flipping():
    model = tiny_cnn(0)
    g = torch.Generator().manual_seed(5)
    n = 24
    x = torch.rand(n, 1, H, W, generator=g)
    x[:, :, :9] = 0.0                       # black rows: deleting them changes nothing
    y = torch.randint(0, 10, (n,), generator=g)
    a = torch.from_numpy(grad_x_input(model, x.numpy(), y.numpy()))
    a = a + 1e-6 * torch.randn(a.shape, generator=g)       # no ties: Quantus's sort is unstable
    ours = M.deletion_curve(model, x, y, a, step=28)
    pf = quantus.PixelFlipping(features_in_step=28, perturb_baseline="black", normalise=False,
                               abs=False, disable_warnings=True, display_progressbar=False)
    ref = np.asarray(pf(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(),
                        channel_first=True, device="cpu", batch_size=16))
    assert ours.shape == (n, 29) and ref.shape == (n, 28)
    np.testing.assert_allclose(ours[:, 1:].numpy(), ref, atol=1e-5)
    probs = torch.softmax(model(x), -1)[torch.arange(n), y]
    torch.testing.assert_close(ours[:, 0], probs.detach())


def reference_curves(model, x, y, attr, step, sigma):
    """Straight from the definition: one image per step, one forward each, no reuse."""
    n = x.shape[0]
    blurred = M.gaussian_blur(x, sigma)
    dele, ins = [], []
    with torch.no_grad():
        for i in range(n):
            order = sorted(range(P), key=lambda p: (-float(attr[i].flatten()[p]), p))
            d_row, i_row = [], []
            for s in range(math.ceil(P / step) + 1):
                top = torch.tensor(order[:s * step], dtype=torch.long)
                xd = x[i].clone().flatten()
                xd[top] = 0.0
                xi = blurred[i].clone().flatten()
                xi[top] = x[i].flatten()[top]
                for img, row in ((xd, d_row), (xi, i_row)):
                    row.append(torch.softmax(model(img.view(1, 1, H, W)), -1)[0, y[i]].item())
            dele.append(d_row)
            ins.append(i_row)
    return torch.tensor(dele), torch.tensor(ins)


def test_curves_equal_a_reference_written_from_the_definition():
    model = tiny_cnn(12)
    g = torch.Generator().manual_seed(12)
    x = torch.rand(3, 1, H, W, generator=g)
    x[:, :, 5:20] = 0.0
    y = torch.tensor([1, 4, 7])
    a = torch.randn(3, 1, H, W, generator=g)
    a[0, :, 5:20] = 0.0                                    # ties: stable order, lower index first
    out = M.deletion_insertion(model, x, y, a, step=50, blur_sigma=2.0)
    d_ref, i_ref = reference_curves(model, x, y, a, 50, 2.0)
    torch.testing.assert_close(out["deletion_curve"], d_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["insertion_curve"], i_ref, atol=1e-5, rtol=0)
    xs = torch.tensor([min(s * 50, P) / P for s in range(d_ref.shape[1])])
    torch.testing.assert_close(out["insertion_auc"], torch.trapezoid(i_ref, xs, dim=1),
                               atol=1e-5, rtol=0)


def test_deletion_insertion_hand_model():
    """logit_1 = w·Σ_S x depends on 28 pixels S: a perfect map clears S in exactly one step."""
    torch.manual_seed(6)
    s = torch.randperm(P)[:28]
    w = 0.5
    model = PixelSetModel(s, w).eval()
    x = torch.zeros(2, 1, H, W)
    x.view(2, -1)[:, s] = 1.0
    y = torch.ones(2, dtype=torch.long)
    perfect = torch.zeros(2, 1, H, W)
    perfect.view(2, -1)[:, s] = 1.0
    perfect[1] = torch.rand(1, H, W) * 0.5 + perfect[1]     # still ranks S first
    out = M.deletion_insertion(model, x, y, perfect, step=28, blur_sigma=3.0)
    top = torch.sigmoid(torch.tensor(28 * w))                # softmax([0, 14])[1]
    dele = out["deletion_curve"]
    assert dele.shape == (2, 29)
    torch.testing.assert_close(dele[:, 0], top.expand(2))
    torch.testing.assert_close(dele[:, 1:], torch.full((2, 28), 0.5))
    auc = ((top + 0.5) / 2 + 27 * 0.5) / 28
    torch.testing.assert_close(out["deletion_auc"], auc.expand(2))
    ins = out["insertion_curve"]
    torch.testing.assert_close(ins[:, 1:], top.expand(2, 28))
    blurred = M.gaussian_blur(x, 3.0)
    start = torch.sigmoid(w * blurred.view(2, -1)[:, s].sum(1))
    torch.testing.assert_close(ins[:, 0], start)


def test_perfect_map_beats_random_map():
    torch.manual_seed(7)
    s = torch.randperm(P)[:60]
    model = PixelSetModel(s, 0.2).eval()
    g = torch.Generator().manual_seed(7)
    n = 16
    x = torch.rand(n, 1, H, W, generator=g)
    y = torch.ones(n, dtype=torch.long)
    perfect = torch.zeros(n, 1, H, W)
    perfect.view(n, -1)[:, s] = 1.0
    rand = torch.rand(n, 1, H, W, generator=g)
    good = M.deletion_insertion(model, x, y, perfect)
    bad = M.deletion_insertion(model, x, y, rand)
    assert (good["insertion_auc"] > bad["insertion_auc"]).all()
    assert (good["deletion_auc"] < bad["deletion_auc"]).all()


def test_deletion_insertion_batching_mode_and_uneven_steps():
    model = tiny_cnn(1).train()
    g = torch.Generator().manual_seed(8)
    x = torch.rand(5, 1, H, W, generator=g)
    x[:, :, 20:] = 0
    y = torch.arange(5)
    a = torch.randn(5, H, W, generator=g)
    big = M.deletion_insertion(model, x, y, a, step=100, batch_size=4096)
    small = M.deletion_insertion(model, x, y, a, step=100, batch_size=3)
    assert model.training                                     # mode restored
    assert all(p.grad is None for p in model.parameters())
    for k in big:
        torch.testing.assert_close(big[k], small[k], atol=1e-6, rtol=0)
    assert big["deletion_curve"].shape == (5, math.ceil(P / 100) + 1)
    with torch.no_grad():
        model.eval()
        p_x = torch.softmax(model(x), -1)[torch.arange(5), y]
        p_0 = torch.softmax(model(torch.zeros_like(x)), -1)[torch.arange(5), y]
    torch.testing.assert_close(big["deletion_curve"][:, -1], p_0, atol=1e-6, rtol=0)
    torch.testing.assert_close(big["insertion_curve"][:, -1], p_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(M.deletion_curve(model, x, y, a, step=100),
                               big["deletion_curve"], atol=1e-6, rtol=0)


def test_gaussian_blur_keeps_interior_mass_and_sigma_zero_is_identity():
    x = torch.zeros(1, 1, H, W)
    x[0, 0, 14, 14] = 1.0
    b = M.gaussian_blur(x, 2.0)
    assert b.sum() == pytest.approx(1.0, abs=1e-5)
    assert b[0, 0, 14, 14] < 0.1 and b[0, 0, 14, 15] == pytest.approx(b[0, 0, 15, 14].item())
    assert torch.equal(M.gaussian_blur(x, 0), x)


# --------------------------------------------------------------------------------------------
# MPRT


def test_mprt_equals_quantus_and_leaves_model_untouched():
    model = tiny_cnn(9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    n = 8
    x = torch.rand(n, 1, H, W, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    rng_before = torch.random.get_rng_state()
    ours = M.mprt(model, x, y, lambda m, xx, yy: grad_x_input(m, xx, yy), seed=43)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert ours["layers"] == ["7", "3", "0"]
    assert ours["scores"].shape == (3, n)
    q = quantus.MPRT(seed=42, layer_order="top_down", abs=False, normalise=False,
                     disable_warnings=True, display_progressbar=False)
    ref = q(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
            a_batch=grad_x_input(model, x.numpy(), y.numpy()), explain_func=grad_x_input,
            channel_first=True, device="cpu")
    np.testing.assert_allclose(ref["original"], 1.0, atol=1e-9)
    for i, name in enumerate(ours["layers"]):
        np.testing.assert_allclose(ours["scores"][i].numpy(), ref[name], atol=1e-6)
    torch.testing.assert_close(ours["last"], ours["scores"][-1])


def test_mprt_is_cascading_top_down():
    """At the k-th explanation exactly the first k listed layers differ from the original."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 2))
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def explain(m, xx, yy):
        sd = m.state_dict()
        seen.append([name for name in ("3", "2", "0")
                     if not torch.equal(sd[f"{name}.weight"], orig[f"{name}.weight"])])
        return torch.rand(xx.shape[0], 6)

    out = M.mprt(model, torch.rand(3, 4), torch.zeros(3), explain, seed=1)
    assert out["layers"] == ["3", "2", "0"]
    assert seen == [[], ["3"], ["3", "2"], ["3", "2", "0"]]
    seen.clear()
    M.mprt(model, torch.rand(3, 4), torch.zeros(3), explain, layers=["2"], seed=1)
    assert seen == [[], ["2"]]


def test_mprt_parameter_free_explanation_is_perfectly_similar():
    model = tiny_cnn(11)
    x = torch.rand(4, 1, H, W)
    out = M.mprt(model, x, torch.zeros(4), lambda m, xx, yy: xx * 2)
    torch.testing.assert_close(out["scores"], torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        M.mprt(model, x, torch.zeros(4), lambda m, xx, yy: xx, layers=["1"])


def test_registry_lists_every_metric_with_a_direction():
    assert set(M.METRICS) == {"region_mass", "wrong_reason", "rank_accuracy", "deletion_auc",
                              "insertion_auc", "mprt_spearman", "sparseness"}
    assert not M.METRICS["region_mass"].higher_is_better
    assert M.METRICS["insertion_auc"].higher_is_better
    assert not M.METRICS["deletion_auc"].higher_is_better
    assert all(info.name == key and info.description for key, info in M.METRICS.items())


class _TwoHeads(torch.nn.Module):
    """A trunk with a class head and a box head beside it; the output is the class head only
    (the shape of MTCNN's ONet under the faces case's FaceDetector)."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(4, 6)
        self.cls = torch.nn.Linear(6, 2)
        self.box = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        self.box(h)  # computed, never part of the explained output
        return self.cls(h)


def test_feeding_layers_leave_out_a_head_that_does_not_feed_the_output():
    torch.manual_seed(0)
    model = _TwoHeads()
    x, y = torch.rand(3, 4), torch.tensor([0, 1, 1])
    assert M.randomisable_layers(model) == ["box", "cls", "trunk"]
    assert M.feeding_layers(model, x, y) == ["cls", "trunk"]
    assert all(p.grad is None for p in model.parameters())  # no .grad left behind
    # a dead unit still feeds: zero gradients are not "unused"
    with torch.no_grad():
        model.trunk.bias.fill_(-100.0)
    assert M.feeding_layers(model, x, y) == ["cls", "trunk"]


def test_mprt_over_feeding_layers_scores_what_the_full_cascade_scores_where_it_matters():
    torch.manual_seed(1)
    model = _TwoHeads().eval()
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 0, 1, 0])

    def explain(m, xx, yy):
        xx = xx.clone().requires_grad_(True)
        out = m(xx).gather(1, yy[:, None]).sum()
        return torch.autograd.grad(out, xx)[0] * xx

    full = M.mprt(model, x, y, explain, seed=2)
    part = M.mprt(model, x, y, explain, seed=2, layers=M.feeding_layers(model, x, y))
    assert full["layers"] == ["box", "cls", "trunk"] and part["layers"] == ["cls", "trunk"]
    # the box head's re-initialisation leaves the maps unchanged: similarity 1 after it
    assert torch.allclose(full["scores"][0], torch.ones(5, dtype=torch.float64))
    assert torch.allclose(part["last"], full["last"])

"""Experts (ranking, bootstrap stability), their interpretation, and the imaging helpers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from captum.attr import NeuronIntegratedGradients
from torch import nn

from core.engine.distributions import LinearDoI, PointDoI
from core.engine.experts import experts, interpret, rank_units, unit_scores
from core.engine.influence import influence
from core.engine.quantities import ClassQoI, UnitQoI
from core.methods.imaging import heatmap, masked_image, overlay, percentile_mask


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 4))


@pytest.fixture
def x():
    torch.manual_seed(5)
    return torch.rand(20, 1, 6, 6)


def test_unit_scores_by_hand():
    chi = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    assert torch.equal(unit_scores(chi, "sum"), torch.tensor([2.0, 2.0]))
    assert torch.equal(unit_scores(chi, "max"), torch.tensor([3.0, 0.5]))
    assert torch.equal(unit_scores(torch.tensor([1.0, -4.0]), "sum"), torch.tensor([1.0, -4.0]))
    assert rank_units(torch.tensor([1.0, -4.0, 2.0]), 2).tolist() == [2, 0]
    assert rank_units(torch.tensor([1.0, -4.0, 2.0]), 2, by="abs").tolist() == [1, 2]


def test_hand_weighted_expert_is_found():
    # Two channels; class 0 reads only channel 1 with weight 5, channel 0 with weight 1.
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    lin = nn.Linear(2 * 2 * 2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0] * 4 + [5.0] * 4]))
    m = nn.Sequential(conv, nn.Flatten(), lin)
    r = experts(m, torch.rand(3, 1, 2, 2), "0", ClassQoI(0), k=2)
    assert r.units == [1, 0]
    assert [e.score for e in r.experts] == [20.0, 4.0]  # 4 positions × weight


def test_experts_match_influence_and_bootstrap_is_sane(x):
    m = cnn()
    r = experts(m, x, "1", ClassQoI(2), LinearDoI(4), k=3, bootstrap=50, seed=1)
    scores = unit_scores(influence(m, x, "1", ClassQoI(2), LinearDoI(4)))
    assert torch.allclose(r.scores, scores, atol=1e-6)
    assert r.units == torch.topk(scores, 3).indices.tolist()
    for e in r.experts:
        assert 0.0 <= e.frequency <= 1.0
        assert e.ci_low <= e.ci_high
    again = experts(m, x, "1", ClassQoI(2), LinearDoI(4), k=3, bootstrap=50, seed=1)
    assert again.to_records() == r.to_records()


def test_bootstrap_of_identical_inputs_is_certain(x):
    m = cnn()
    same = x[:1].repeat(10, 1, 1, 1)
    r = experts(m, same, "1", ClassQoI(0), k=2, bootstrap=20, reduce="max")
    for e in r.experts:
        assert e.frequency == 1.0
        assert e.ci_low == pytest.approx(e.score, abs=1e-5)
        assert e.ci_high == pytest.approx(e.score, abs=1e-5)


def test_interpretation_equals_captum_neuron_integrated_gradients(x):
    m = cnn()
    ours = interpret(m, x[:4], "1", 3, resolution=16)
    nig = NeuronIntegratedGradients(m, m[1]).attribute(
        x[:4], neuron_selector=lambda out: out[:, 3].sum((1, 2)), n_steps=16,
        method="riemann_middle")
    assert torch.allclose(ours, nig, atol=1e-6)


def test_unit_quantity_neuron_and_position(x):
    m = cnn()
    a = influence(m, x[:2], None, UnitQoI("1", (3, 2, 2)), PointDoI(), per_input=True)
    xx = x[:2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m[:2](xx)[:, 3, 2, 2].sum(), xx)
    assert torch.allclose(a, g)


def test_heatmap_colours_and_masks():
    a = np.zeros((4, 4))
    a[0, 0], a[3, 3] = 2.0, -1.0
    h = heatmap(a)
    assert h.shape == (4, 4, 3) and h.dtype == np.uint8
    assert tuple(h[0, 0]) == (255, 0, 0)  # strongest positive: red
    assert tuple(h[1, 1]) == (255, 255, 255)  # zero: white
    assert h[3, 3, 2] == 255 and h[3, 3, 0] == 128  # half-strength negative: blue-ish
    assert heatmap(a, scale=3).shape == (12, 12, 3)

    rng = np.random.default_rng(0)
    attr = rng.normal(size=(28, 28))
    hard = percentile_mask(attr, q=95, blur=0)
    assert 0.04 <= hard.mean() <= 0.06
    assert set(np.unique(hard)) <= {0.0, 1.0}
    soft = percentile_mask(attr, q=95, blur=1.5)
    assert soft.max() == 1.0 and (soft > 0).sum() > (hard > 0).sum()
    img = rng.random((1, 28, 28))
    assert masked_image(img, attr, scale=2).shape == (56, 56, 3)
    assert overlay(img, attr).shape == (28, 28, 3)
    with pytest.raises(ValueError, match="percentile"):
        percentile_mask(attr, q=120)


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_bootstrap_scores_equal_a_loop_over_resamples(reduce):
    from core.engine.experts import bootstrap_scores

    torch.manual_seed(0)
    per = torch.randn(15, 4, 3, 3)
    fast = bootstrap_scores(per, reduce, resamples=30, seed=3)
    g = torch.Generator().manual_seed(3)
    draws = torch.randint(15, (30, 15), generator=g)
    slow = torch.stack([unit_scores(per[d].mean(0), reduce) for d in draws])
    assert torch.allclose(fast, slow, atol=1e-5)


# ---------------------------------------------------------------------------------------------- knife edges


def test_region_mass_interval_by_hand():
    from core.stages.experts import mass_interval

    assert mass_interval(torch.tensor([0.3])) == (None, None)  # one image: no interval
    lo, hi = mass_interval(torch.full((20,), 0.25, dtype=torch.float64))
    assert lo == hi == 0.25  # every image the same: zero width
    half = torch.tensor([0.0, 1.0] * 50, dtype=torch.float64)  # mean 0.5, sd of the mean 0.05
    lo, hi = mass_interval(half)
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62
    assert mass_interval(half) == (lo, hi)  # seeded: the same interval every time
    wider = mass_interval(half, confidence=0.99)
    assert wider[0] < lo and wider[1] > hi


def test_a_verdict_whose_interval_holds_the_threshold_is_undecided():
    from core.methods.shortcut import flag

    row = {"region_mass": 0.11, "mass_low": 0.07, "mass_high": 0.15}
    knife = flag(row, 0.10)
    assert knife["shortcut"] is True and knife["verdict"] == "undecided"  # 11% vs 10%: a tie
    assert flag({**row, "region_mass": 0.09}, 0.10)["verdict"] == "undecided"
    assert flag({**row, "mass_low": 0.105}, 0.10)["verdict"] == "carries"
    assert flag({"region_mass": 0.05, "mass_low": 0.03, "mass_high": 0.08}, 0.10)["verdict"] \
        == "does not"
    assert flag({"region_mass": 0.2}, 0.10)["verdict"] == "carries"  # no interval: the mean
    assert flag({"region_mass": None}, 0.10)["verdict"] is None
    assert "verdict" not in flag(row, None)  # no region: no rule


def test_a_bootstrap_or_confidence_out_of_bounds_is_one_line():
    from core.engine.experts import experts_many

    net, x = nn.Sequential(nn.Linear(2, 2)), torch.zeros(3, 2)
    for kwargs, word in (({"bootstrap": -3}, "bootstrap"), ({"bootstrap": 1.5}, "bootstrap"),
                         ({"confidence": 2}, "confidence"), ({"confidence": 0}, "confidence")):
        for fn, layer in ((experts, "0"), (experts_many, ["0"])):
            with pytest.raises(ValueError, match=word) as err:
                fn(net, x, layer, ClassQoI(0), **kwargs)
            assert len(str(err.value).splitlines()) == 1


def test_the_rule_in_words_writes_every_share_in_percent_and_names_no_built_in_case():
    from core.methods.shortcut import rule_of, shortcut_rule

    section = {"shortcut_factor": 5.0, "shortcut_quantile": 0.95}
    text = rule_of(section, 16 / 784, "decoy patch", "clean")
    assert "5 × chance (2.04%, the decoy patch's share of the image), i.e. 10.2%" in text
    assert "95% quantile" in text and "(clean)" in text
    assert not re.search(r"\b0\.\d", text)  # no fraction beside the percentages
    alone = rule_of(section, 0.03125, "watermark", None)
    assert alone.endswith("i.e. 15.6%") and "quantile" not in alone
    assert rule_of(section, None, "watermark", "ref") is None
    with pytest.raises(TypeError):  # chance, region and reference are the case's, never defaults
        shortcut_rule(5.0, 0.95)

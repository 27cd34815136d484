"""Essence curves, ablations and the causal checks of experts (core.stages.essence, issue 14)."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import core.stages.essence as E
from core.cases.decoy_mnist.data import decoy_mnist
from core.cases.decoy_mnist.net import DecoyCNN
from core.methods.training import set_seed, train_model
from core.stages.base import StageContext

# ----------------------------------------------------------------------------- a hand-built model
# x (N, W) → hidden = x (identity) → ReLU → logits, W = 32 units:
#   y0 = 2·h0 + 0.1·Σ h2..     (class 0 lives in unit 0 alone)
#   y1 = 1.2 + 0.1·Σ h2..      (class 1: the bias, when neither unit 0 nor unit 1 is on)
#   y2 = 2·h1 + 0.1·Σ h2..     (class 2 lives in unit 1)
# Units 2.. are uniform noise that every logit reads alike: their influence on y0 − y1 is 0.
W = 32


def hand_model() -> nn.Module:
    hidden = nn.Linear(W, W)
    out = nn.Linear(W, 3)
    with torch.no_grad():
        hidden.weight.copy_(torch.eye(W))
        hidden.bias.zero_()
        out.weight.zero_()
        out.weight[:, 2:] = 0.1
        out.weight[0, 0] = 2.0
        out.weight[2, 1] = 2.0
        out.bias.copy_(torch.tensor([0.0, 1.2, 0.0]))
    return nn.Sequential(OrderedDict(hidden=hidden, relu=nn.ReLU(), out=out)).eval()


def hand_data(n_per_class: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(3):
        x = torch.zeros(n_per_class, W)
        x[:, 2:] = torch.rand(n_per_class, W - 2, generator=g)
        if c == 0:
            x[:, 0] = 1.0
        if c == 2:
            x[:, 1] = 1.0
        xs.append(x)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


class Untraceable(nn.Module):
    """The hand model behind Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        m = hand_model()
        self.hidden, self.relu, self.out = m.hidden, m.relu, m.out

    def forward(self, x):
        h = self.relu(self.hidden(x))
        if float(h.sum()) >= -1.0:  # always true; data-dependent, so not traceable
            return self.out(h)
        return self.out(h) * 0


@pytest.fixture(scope="module")
def hand():
    m = hand_model()
    x, y = hand_data()
    assert bool((m(x).argmax(1) == y).all())  # the model is right on every image
    return m, x, y


@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_essence_curve_reaches_full_accuracy_at_k1_and_random_units_do_not(hand, fill):
    m, x, y = hand
    xt, yt = hand_data(seed=1)  # held-out images
    c = E.essence_curve(m, "hidden", x[y == 0], x[y == 1], xt, yt, 0, 1, fill=fill, random_draws=200,
                        seed=3)
    assert c["ks"] == [1, 2, 4, 8, 16, 32] and c["width"] == W
    assert c["ranking"][0] == 0  # unit 0 has the largest comparative influence
    assert c["full"] == 1.0
    assert c["top"][0] == 1.0  # unit 0 alone separates class 0 from class 1
    assert c["bottom"][0] == 0.5  # a noise unit alone: one class for every image
    assert c["random"]["median"][0] == 0.5  # 1 random unit of 32 is rarely unit 0
    assert c["random"]["high"][0] == 0.5 and c["random"]["low"][0] == 0.5
    assert c["random"]["mean"][0] == pytest.approx(0.5 + 0.5 / W, abs=0.03)
    assert c["random"]["mean"][2] == pytest.approx(0.5 + 0.5 * 4 / W, abs=0.05)  # k = 4
    assert all(rule[-1] == 1.0 for rule in (c["top"], c["bottom"], c["random"]["median"]))
    k = E.smallest_k(c, 0.95)
    assert k["top"] == 1 and k["random"] in (16, 32) and k["bottom"] == W
    json.dumps(c)


def test_ablating_unit0_removes_the_class(hand):
    m, x, y = hand
    for fill in ("zero", "mean"):
        r = E.ablation(m, "hidden", [0], x, y, 0, fill=fill)
        assert r["acc_before"] == 1.0 and r["acc_after"] == 0.0 and r["acc_drop"] == 1.0
        assert r["others_acc_drop"] == 0.0  # classes 1 and 2 do not use unit 0
        expected = 2.0 if fill == "zero" else 2.0 - 2.0 * float(x[:, 0].mean())
        assert r["logit_drop"] == pytest.approx(expected, abs=1e-5)
    noise = E.ablation(m, "hidden", [5], x, y, 0, fill="mean")
    assert noise["acc_drop"] == 0.0


def test_causal_check_experts_beat_random_and_another_class(hand):
    m, x, y = hand
    r = E.causal_check(m, "hidden", x, y, 0, [0], other_units=[1], fill="mean", random_draws=100, seed=1)
    assert r["experts"]["acc_drop"] == 1.0
    assert r["other"]["acc_drop"] == 0.0  # class 2's expert does not carry class 0
    assert r["random"]["acc_drop"]["median"] == 0.0
    assert r["beats_random"] is True
    assert r["share_random_at_least"] < 0.1  # only the draws that hit unit 0
    # a ranking whose "experts" are noise units does not beat random units
    bad = E.causal_check(m, "hidden", x, y, 0, [6], fill="mean", random_draws=100, seed=1)
    assert bad["beats_random"] is False


def test_ablation_table_shares_random_draws_and_is_seeded(hand):
    m, x, y = hand
    units = {0: [0], 1: [7], 2: [1]}
    a = E.ablation_table(m, "hidden", x, y, units, other={0: 2, 2: 0}, random_draws=30, seed=4)
    b = E.ablation_table(m, "hidden", x, y, units, other={0: 2, 2: 0}, random_draws=30, seed=4)
    assert a == b
    assert [r["class"] for r in a] == [0, 1, 2]
    assert a[0]["beats_random"] and a[2]["beats_random"]
    assert a[0]["other_class"] == 2 and a[0]["overlap"] == 0 and a[0]["other"]["acc_drop"] == 0.0
    assert a[1]["other"] is None
    json.dumps(a)


def test_keep_units_hook_is_removed_and_masks(hand):
    m, x, y = hand
    with E.keep_units(m, "hidden", [0], 0.0):
        z = m.hidden(x)
    assert bool((z[:, 1:] == 0).all()) and torch.equal(z[:, 0], x[:, 0])
    assert not m.hidden._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), E.keep_units(m, "hidden", [0], 0.0):
        raise RuntimeError("boom")
    assert not m.hidden._forward_hooks
    with pytest.raises(ValueError, match="out of range"), E.keep_units(m, "hidden", [W], 0.0):
        m(x)
    assert not m.hidden._forward_hooks


def test_untraceable_model_uses_the_hook_path(hand):
    _, x, y = hand
    m = Untraceable().eval()
    keeps = torch.tensor([[True] * W, [False] + [True] * (W - 1), [True] + [False] * (W - 1)])
    with torch.no_grad():
        want = torch.stack([m(x * k.float()) for k in keeps])  # hidden is the identity
    got = E.masked_logits(m, "hidden", x, keeps, "zero")
    assert torch.allclose(got, want, atol=1e-6)
    cut = E._Cut(m, "hidden")
    cut.logits(x, cut.slice(x), keeps, torch.zeros(W))
    assert cut.path == "hook"
    assert not m.hidden._forward_hooks


def test_most_confused_pairs_from_a_matrix():
    cm = torch.tensor([[9, 1, 0, 0],
                       [3, 7, 0, 0],
                       [0, 0, 8, 2],
                       [0, 0, 2, 8]])
    pairs = E.most_confused_pairs(None, None, None, 5, matrix=cm)
    assert [(p["a"], p["b"], p["confusions"]) for p in pairs] == [(1, 0, 4), (2, 3, 4)]
    assert pairs[0]["a_as_b"] == 3 and pairs[0]["b_as_a"] == 1
    assert E.most_confused_pairs(None, None, None, 1, matrix=cm) == pairs[:1]


def test_k_grid():
    assert E.k_grid(16) == [1, 2, 4, 8, 16]
    assert E.k_grid(10) == [1, 2, 4, 8, 10]
    assert E.k_grid(10, [3, 1, 50, 3]) == [1, 3, 10]
    assert E.k_grid(1) == [1]


def test_check_config():
    cfg = E.check_config({}, "essence")
    assert cfg == {**E.DEFAULTS, "confidence": 0.9, "share": 0.95}
    assert E.check_config({"pairs": [[4, 9], ["3", "8"]], "ks": [8, 2, 2]})["ks"] == [2, 8]
    for bad, match in [({"nope": 1}, "unknown key"), ({"random_draws": 1001}, "random_draws"),
                       ({"random_draws": True}, "random_draws"), ({"pairs": [[4, 4]]}, "pairs"),
                       ({"pairs": [[4]]}, "pairs"), ({"fills": ["mean", "mean"]}, "fills"),
                       ({"fills": ["median"]}, "fills"), ({"share": 1.5}, "share"),
                       ({"confidence": 1.0}, "confidence"), ({"by": "rank"}, "by"),
                       ({"ks": [0]}, "ks"), ({"n_eval": 1}, "n_eval"), ({"layers": []}, "layers"),
                       ({"top_k": 0}, "top_k")]:
        with pytest.raises(ValueError, match=match) as info:
            E.check_config(bad, "cases/x.toml [essence]")
        assert "\n" not in str(info.value) and "cases/x.toml [essence]" in str(info.value)


# ----------------------------------------------------------------------------- a real DecoyMNIST model

@pytest.fixture(scope="module")
def decoy():
    data = decoy_mnist(subset=30)
    set_seed(0)
    model = DecoyCNN()
    train_model(model, data.train.x, data.train.y, epochs=1, seed=0, device="cpu")
    return model.eval(), data


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc1"])
def test_batched_variants_equal_the_hooked_forward(decoy, layer):
    model, data = decoy
    x = data.test.x[:20]
    cut = E._Cut(model, layer)
    z = cut.slice(x)
    fill = E.unit_fill(model, layer, "mean", data.train.x)
    g = torch.Generator().manual_seed(0)
    keeps = torch.rand(5, z.shape[1], generator=g) < 0.5
    got = cut.logits(x, z, keeps, fill)
    assert cut.path == "fold"  # DecoyCNN: ReLU / pool / flatten, then a conv or dense consumer
    with torch.no_grad():
        want = []
        for k in keeps:
            with E.keep_units(model, layer, k, fill):
                want.append(model(x))
    assert torch.allclose(got, torch.stack(want), atol=1e-4)
    plain = E._Cut(model, layer)
    plain.fold = None
    assert torch.allclose(plain.logits(x, z, keeps, fill), got, atol=1e-4)
    assert plain.path == "tail"


def test_essence_curve_on_a_real_model(decoy):
    model, data = decoy
    a, b = 4, 9
    xa, xb = data.train.x[data.train.y == a], data.train.x[data.train.y == b]
    c = E.essence_curve(model, "fc1", xa, xb, data.test.x, data.test.y, a, b, random_draws=10, seed=1)
    sel = (data.test.y == a) | (data.test.y == b)
    with torch.no_grad():
        want = E.binary_accuracy(model(data.test.x), data.test.y, a, b)
    assert c["full"] == pytest.approx(float(want)) and c["n_eval"] == int(sel.sum())
    assert c["ks"] == [1, 2, 4, 8, 16, 32, 64, 128]
    for rule in (c["top"], c["bottom"], c["random"]["median"], c["random"]["low"], c["random"]["high"]):
        assert len(rule) == 8 and all(0.0 <= v <= 1.0 for v in rule) and rule[-1] == c["full"]
    assert all(lo <= m <= hi for lo, m, hi in zip(c["random"]["low"], c["random"]["median"],
                                                    c["random"]["high"], strict=True))
    assert sorted(c["ranking"]) == list(range(128))
    again = E.essence_curve(model, "fc1", xa, xb, data.test.x, data.test.y, a, b, random_draws=10, seed=1)
    assert again == c
    other = E.essence_curve(model, "fc1", xa, xb, data.test.x, data.test.y, a, b, random_draws=10, seed=2)
    assert other["top"] == c["top"]  # only the random draws depend on the seed


def test_region_check_on_decoy_data(decoy):
    model, data = decoy
    sets = {"decoy_test": (data.test.x, data.test.y, True),
            "clean_test": (data.test.x_clean, data.test.y, False)}
    r = E.region_check(model, "conv1", [0, 1, 2], sets, fill="zero", random_draws=5, seed=0)
    assert [s["name"] for s in r["sets"]] == ["decoy_test", "clean_test"]
    assert [s["region"] for s in r["sets"]] == [True, False]
    assert r["region_minus_clean"] == pytest.approx(r["region_drop"] - r["clean_drop"])
    assert r["region_moves_more"] == (abs(r["region_drop"]) > abs(r["clean_drop"]))
    nothing = E.region_check(model, "conv1", [], sets, random_draws=2)
    assert all(s["acc_drop"] == 0.0 for s in nothing["sets"])
    json.dumps(r)


# ----------------------------------------------------------------------------- the stage

def _context(model, data, section, rows, progress=None):
    """The essence stage's context without a case: vanilla under study, the experts rows."""
    return StageContext.standalone(
        "essence", data, {"vanilla": model}, section=section, subject="vanilla",
        experts={"layers": ["conv2", "fc1"], "k": 2, "classes": list(range(10)), "reduce": "sum",
                 "by": "value"},
        artifacts={"experts": {"rows": rows}}, progress=progress)


def test_build_with_a_stand_in_context(decoy):
    model, data = decoy
    rows = [{"model": "vanilla", "class": c, "layer": "fc1", "unit": u, "rank": r + 1, "influence": 1.0,
             "shortcut": (c, r) == (3, 0)} for c in range(10) for r, u in enumerate((c, c + 10))]
    section = {"pairs": [[4, 9]], "n_confused": 1, "random_draws": 4, "n_rank": 8}  # top_k: experts k
    seen = []
    out = E.build(_context(model, data, section, rows, lambda d, t, m: seen.append((d, t))))
    json.dumps(out)
    assert seen[-1][0] == seen[-1][1]
    assert out["pairs"][0]["a"] == 4 and out["pairs"][0]["source"] == "case"
    assert len(out["pairs"]) == 2
    assert len(out["rows"]) == len(out["curves"]) == 2 * 2 * 2  # pairs × layers × fills
    assert {r["ranking_source"] for r in out["ablation"] if r["layer"] == "fc1"} == {"experts stage"}
    assert {r["ranking_source"] for r in out["ablation"] if r["layer"] == "conv2"} == {"computed"}
    fc1 = [r for r in out["ablation"] if r["layer"] == "fc1" and r["class"] == 3]
    assert fc1[0]["units"] == [3, 13]
    region = [r for r in out["region"] if r["layer"] == "fc1"]
    assert region and region[0]["units"] == [3] and {s["region"] for s in region[0]["sets"]} == {True, False}
    assert all(r["units"] == [] for r in out["region"] if r["layer"] == "conv2")
    assert out["seeds"]["seed"] == 0 and all("seed" in c for c in out["curves"])
    assert out["config"]["top_k"] == 2 and all(r["k"] == 2 for r in out["ablation"])
    assert out == E.build(_context(model, data, section, rows)) | {"provenance": out["provenance"]}


# ----------------------------------------------------------------------------- degenerate results


def test_degenerate_names_k1_everywhere_and_a_layer_at_chance():
    from core.methods.essence import degenerate, near_chance

    ok = {"k_top": 1, "k_random": 4, "k_bottom": 16, "full_acc": 0.97, "n_eval": 200}
    assert degenerate(ok) is None
    flat = {**ok, "k_random": 1, "k_bottom": 1}  # a good layer where any one unit suffices
    assert degenerate(flat) == "k = 1 for every rule"
    # the faces case: the whole layer at 52% on 40 images: every rule at k = 1 *because* the
    # target (95% of 52%) is chance
    faces = {**flat, "full_acc": 0.52, "n_eval": 40}
    why = degenerate(faces)
    assert why.startswith("k = 1 for every rule; ") and "52%" in why and "near chance" in why
    assert degenerate({**ok, "full_acc": 0.54, "n_eval": 1000}) is not None  # under 0.5 + 0.05
    assert degenerate({**ok, "full_acc": 0.60, "n_eval": 1000}) is None
    # two binomial SEs at 20 images: 0.5 + 2·0.5/√20 = 0.724
    assert near_chance(0.70, 20) and not near_chance(0.75, 20)


def test_build_flags_degenerate_rows_from_its_own_numbers(decoy):
    model, data = decoy
    rows = [{"model": "vanilla", "class": c, "layer": "fc1", "unit": u, "rank": r + 1, "influence": 1.0,
             "shortcut": False} for c in range(10) for r, u in enumerate((c, c + 10))]
    section = {"pairs": [[4, 9]], "n_confused": 1, "random_draws": 4, "n_rank": 8, "layers": ["fc1"]}
    out = E.build(_context(model, data, section, rows))
    for r in out["rows"]:
        assert r["degenerate"] == E.degenerate(r)  # the stage's flag is its own rows' verdict
    for s in out["summary"]:
        mine = [r for r in out["rows"] if (r["model"], r["layer"], r["fill"]) ==
                (s["model"], s["layer"], s["fill"])]
        assert s["n_degenerate"] == sum(bool(r["degenerate"]) for r in mine)
        assert (s["degenerate"] is None) == (s["n_degenerate"] < len(mine))
    assert out["degenerate"]["n_rows"] == len(out["rows"])
    # a model whose output ignores the layer (its last layer zeroed: every logit ties, so A vs B
    # is the share of A among the images): the test cannot tell, and the flag says so
    import copy

    blank = copy.deepcopy(model).eval()
    with torch.no_grad():
        blank.fc2.weight.zero_()
        blank.fc2.bias.zero_()
    out = E.build(_context(blank, data, section, rows))
    assert out["rows"] and all(r["full_acc"] < 0.7 for r in out["rows"])
    assert all("near chance" in r["degenerate"] for r in out["rows"])
    assert out["degenerate"]["n_degenerate"] == len(out["rows"])
    assert all(s["degenerate"] for s in out["summary"])

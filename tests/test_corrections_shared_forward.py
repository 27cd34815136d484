"""The penalised fine-tune's one-forward step (train_model with a ``forward`` hook: a
:class:`~core.methods.corrections.common.SharedPenalty`) trains the same model as train_model with
the penalty as an extra loss (two forwards per step), within float rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from core.cases.decoy_mnist.data import decoy_mnist
from core.cases.decoy_mnist.net import build_model
from core.methods.corrections import common
from core.methods.training import set_seed, train_model
from core.stages import corrections as C


@pytest.fixture(scope="module")
def setup():
    data = decoy_mnist(seed=0, subset=30)  # 216 train images
    set_seed(0)
    m = build_model("decoy-cnn")
    train_model(m, data.train.x, data.train.y, epochs=2, lr=3e-3, batch_size=32, seed=0,
                device="cpu")
    return data, m.eval()


def _selector(model, x, layer, region):
    if layer is None:
        return region.float()[None]
    shape = common.slice_shape(model, x[:1], layer)
    r = torch.nn.functional.interpolate(region[None, None].float(), size=shape[-2:])[0]
    return r.expand(shape)


@pytest.mark.parametrize("kind,layer", [("rrr", None), ("influence", None),
                                        ("influence", "conv1")])
def test_one_forward_loop_matches_train_model(setup, kind, layer):
    data, vanilla = setup
    x, y, mask = data.train.x, data.train.y, data.train.mask.float()
    lam = 1.0
    sel = _selector(vanilla, x, layer, C.border_region(28, 4))

    if kind == "rrr":
        def extra(m, xb, yb, logits, idx):
            return lam * C.rrr_penalty(m, xb, mask[idx])

        def weigh(g, idx):
            return (mask[idx] * g).pow(2).flatten(1).sum(1).mean()
    else:
        def extra(m, xb, yb, logits, idx):
            return lam * C.influence_penalty(m, xb, sel, layer)

        def weigh(g, idx):
            return (sel * g).pow(2).flatten(1).sum(1).mean()

    old = copy.deepcopy(vanilla)
    h_old = train_model(old, x, y, epochs=2, lr=2e-3, batch_size=64, seed=3, device="cpu",
                        extra_loss=extra)
    new, h_new = common.fine_tune(vanilla, x, y, epochs=2, lr=2e-3, batch_size=64, seed=3,
                              extra_loss=common.SharedPenalty(lam, layer, weigh))
    # the penalty moved the weights (a loop that ignored it would differ from train_model)
    plain = copy.deepcopy(vanilla)
    train_model(plain, x, y, epochs=2, lr=2e-3, batch_size=64, seed=3, device="cpu")
    moved = max(float((a - b).abs().max()) for a, b in
                zip(plain.state_dict().values(), old.state_dict().values(), strict=True))
    assert moved > 1e-3
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), k
    assert h_new["loss"] == pytest.approx(h_old["loss"], rel=1e-4)
    assert h_new["acc"] == pytest.approx(h_old["acc"], abs=1e-9)
    assert not new.training
    assert all(p is not q for p, q in zip(new.parameters(), vanilla.parameters(), strict=True))


def test_a_partial_penalty_batch_keeps_the_two_forward_path():
    assert common.shares_forward(None, 128)
    assert common.shares_forward(128, 128)
    assert not common.shares_forward(32, 128)

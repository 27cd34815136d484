"""core.stages.corrections on models that are not a plain conv/dense chain (issue 19's generic-model
defect): expert suppression on torchvision resnet18's ``layer3`` (a Sequential of BasicBlocks),
on a conv followed by BatchNorm and an in-place ReLU, on a grouped conv, on a forward with a
skip the children's order hides; the fold and the output scale agree on a plain chain; one
failing method is one "could not run" entry, not a missing stage."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.cases.decoy_mnist.net import build_model
from core.engine.influence import activations
from core.methods.corrections import pclarc, suppression
from core.methods.training import evaluate, set_seed
from core.stages import corrections as C
from core.stages.base import StageContext

torchvision = pytest.importorskip("torchvision")

SIZE = 32


def _reference(model: nn.Module, layer: str, units, damping: float, x: torch.Tensor):
    """The original model's logits with ``layer``'s ``units`` scaled by a (removed) hook."""
    ref = copy.deepcopy(model).eval()

    def hook(_m, _a, out):
        scale = torch.ones(out.shape[1])
        scale[list(units)] = damping
        return out * scale.view(1, -1, *([1] * (out.dim() - 2)))

    h = ref.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return ref(x)
    finally:
        h.remove()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ synthetic data

def _split(n: int, seed: int):
    """3×32×32 images of two classes; class 1 carries a bright 4×4 corner patch (the region)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x_clean = 0.2 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    x_clean[:, :, 10:22, 10:22] += 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    mask = torch.zeros(n, 1, SIZE, SIZE)
    mask[:, :, :4, :4] = 1.0
    x = torch.where((mask.bool() & (y == 1).view(-1, 1, 1, 1)), torch.ones(()), x_clean)
    return SimpleNamespace(x=x, y=y, x_clean=x_clean, mask=mask, n=n)


@pytest.fixture(scope="module")
def data():
    return SimpleNamespace(train=_split(32, 0), val=_split(16, 1), test=_split(16, 2),
                           headline="decoy_test")


@pytest.fixture(scope="module")
def resnet():
    set_seed(0)
    return torchvision.models.resnet18(num_classes=2).eval()


# ------------------------------------------------------------------------ the plain chain: fold

@pytest.mark.parametrize("layer,units", [("conv1", [3, 7]), ("conv2", [0, 5, 31]), ("fc1", [2])])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_fold_and_output_scale_agree_on_a_plain_chain(layer, units, damping):
    set_seed(0)
    model = build_model("decoy-cnn").eval()
    x = torch.rand(8, 1, 28, 28)
    folded = C.suppress(model, layer, units, damping)
    scaled = suppression._scaled(model, layer, units, damping)
    checked = C.suppress(model, layer, units, damping, probe=x)
    # the plain chain keeps the fold: same architecture, same state dict keys, no wrapper
    assert not isinstance(folded.get_submodule(layer), C.UnitScale)
    assert set(folded.state_dict()) == set(model.state_dict())
    assert isinstance(scaled.get_submodule(layer), C.UnitScale)
    assert not isinstance(checked.get_submodule(layer), C.UnitScale), "probe kept the fold"
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(),
                                                 checked.state_dict().values(), strict=True))
    lf, ls = _logits(folded, x), _logits(scaled, x)
    assert torch.allclose(lf, ls, atol=1e-5), float((lf - ls).abs().max())
    assert torch.allclose(ls, _reference(model, layer, units, damping, x), atol=1e-5)


# ----------------------------------------------------------------- resnet18's layer3 (a block)

def test_resnet18_layer3_is_suppressed_by_an_output_scale(resnet):
    before = _state(resnet)
    units, x = [3, 10, 200], torch.rand(6, 3, SIZE, SIZE)
    # the stage used to die here: AttributeError 'Sequential' object has no attribute
    # 'out_features'
    sup = C.suppress(resnet, "layer3", units, 0.0)
    assert isinstance(sup.layer3, C.UnitScale)
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items()), "mutated"
    a0 = activations(resnet, x, "layer3")
    a1 = activations(sup, x, "layer3")
    assert a0.shape == a1.shape == (6, 256, 2, 2)
    assert a0[:, units].abs().sum() > 0 and torch.equal(a1[:, units], torch.zeros_like(a1[:, units]))
    keep = [u for u in range(256) if u not in units]
    assert torch.equal(a1[:, keep], a0[:, keep])
    assert torch.allclose(_logits(sup, x), _reference(resnet, "layer3", units, 0.0, x), atol=1e-5)
    # a unit the layer does not have is refused at the first forward, with the count
    with pytest.raises(ValueError, match="out of range"):
        _logits(C.suppress(resnet, "layer3", [256], 0.0), x)
    with pytest.raises(ValueError, match="damping"):
        C.suppress(resnet, "layer3", [0], -1.0)


def test_resnet18_suppressed_model_survives_state_dict_and_deepcopy(resnet):
    units, x = [1, 2], torch.rand(4, 3, SIZE, SIZE)
    sup = C.suppress(resnet, "layer3", units, 0.5)
    spec = suppression.suppression_spec(sup, "layer3", units, 0.5)
    assert spec == {"wrap": "scale", "layer": "layer3", "units": [1, 2], "damping": 0.5}
    buf = io.BytesIO()
    torch.save({"state": sup.state_dict(), "record": {"spec": spec}}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    shell = C.build_corrected("suppression", resnet, back["record"])
    shell.load_state_dict(back["state"])
    expected = _logits(sup, x)
    assert torch.allclose(_logits(shell, x), expected, atol=1e-6)
    assert torch.allclose(_logits(copy.deepcopy(sup), x), expected, atol=1e-6)
    assert suppression.suppression_spec(C.suppress(build_model("decoy-cnn"), "conv1", [0], 0.0),
                               "conv1", [0], 0.0) is None


def test_correct_suppression_runs_on_resnet18_layer3(resnet, data):
    before = _state(resnet)
    corr = C.correct("suppression", resnet, data, layers=["layer3"], n_units=[1, 2],
                     damping=[0.0], candidates=2, n_images=8, resolution=2)
    rec = corr.record
    assert rec["layer"] == "layer3" and rec["applied"] == "output scale"
    assert rec["spec"]["wrap"] == "scale" and rec["spec"]["units"] == rec["units"]
    assert len(rec["units"]) == rec["n_units"] and rec["grid"]
    assert isinstance(corr.model.layer3, C.UnitScale)
    x = data.test.x[:4]
    acts = activations(corr.model, x, "layer3")
    assert torch.equal(acts[:, rec["units"]], torch.zeros_like(acts[:, rec["units"]]))
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())


# ------------------------------------------------- BatchNorm, in-place ReLU, grouped, hidden skip

class _BNNet(nn.Module):
    """conv → BatchNorm → in-place ReLU → pool → conv → in-place ReLU → flatten → dense."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 16 * 16, 2)

    def forward(self, x):
        return self.fc(self.flat(self.relu2(self.conv2(self.pool(self.relu1(self.bn1(
            self.conv1(x))))))))


class _GroupedNet(nn.Module):
    """conv → ReLU → depthwise conv (groups = channels) → flatten → dense (a MobileNet step)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.flat(self.dw(self.relu(self.conv1(x)))))


class _HiddenSkip(nn.Module):
    """Children read like a chain (conv1, relu, conv2, flatten, fc), but conv1's output also
    skips past conv2: folding into conv2 would miss the skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 8 * 8, 2)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        return self.fc(self.flat(self.conv2(h) + h))


def _trained_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics (a few train-mode passes), then eval mode."""
    net.train()
    with torch.no_grad():
        for i in range(3):
            net(torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) * 2)
    return net.eval()


@pytest.mark.parametrize("layer", ["conv1", "bn1", "relu1", "conv2"])
def test_batchnorm_and_inplace_relu(layer):
    set_seed(0)
    net = _trained_bn(_BNNet())
    units, x = [1, 5], torch.rand(5, 3, SIZE, SIZE)
    sup = C.suppress(net, layer, units, 0.0, probe=x)
    expected = _reference(net, layer, units, 0.0, x)
    assert torch.allclose(_logits(sup, x), expected, atol=1e-5)
    # conv1 (BatchNorm after it), bn1 and relu1 cannot be folded; conv2 → fc folds
    assert isinstance(sup.get_submodule(layer), C.UnitScale) == (layer != "conv2")
    # gradients flow through the wrapper and the in-place ReLU after it (fine-tuning, IG)
    xx = x.clone().requires_grad_(True)
    sup(xx).sum().backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all()


def test_grouped_conv_after_the_layer_is_not_folded():
    set_seed(0)
    net = _GroupedNet().eval()
    units, x = [0, 6], torch.rand(4, 3, 8, 8)
    assert isinstance(suppression._fold_plan(net, "conv1"), str)
    sup = C.suppress(net, "conv1", units, 0.0)
    assert isinstance(sup.conv1, C.UnitScale)
    assert torch.allclose(_logits(sup, x), _reference(net, "conv1", units, 0.0, x), atol=1e-5)


def test_a_skip_the_children_hide_is_caught_by_the_probe():
    set_seed(0)
    net = _HiddenSkip().eval()
    units, x = [2, 3], torch.rand(4, 3, 8, 8)
    expected = _reference(net, "conv1", units, 0.0, x)
    blind = C.suppress(net, "conv1", units, 0.0)  # no probe: the children's order is trusted
    assert not torch.allclose(_logits(blind, x), expected, atol=1e-4)
    sup = C.suppress(net, "conv1", units, 0.0, probe=x[:2])
    assert isinstance(sup.conv1, C.UnitScale)
    assert torch.allclose(_logits(sup, x), expected, atol=1e-5)


def test_border_region_takes_a_non_square_shape():
    r = C.border_region((6, 9), 2)
    assert r.shape == (6, 9) and r[:2].all() and r[:, -2:].all() and not r[2:4, 2:7].any()
    assert torch.equal(C.border_region(28, 4), C.border_region((28, 28), 4))


# ---------------------------------------------------------------------- the stage, method alone

def test_stage_on_resnet18_keeps_suppression_and_reports_a_failing_method(resnet, data,
                                                                          monkeypatch):
    def broken(*_a, **_k):
        raise AttributeError("'Sequential' object has no attribute 'out_features'")

    monkeypatch.setitem(C.CORRECTORS, "rrr", broken)
    set_seed(1)
    clean = torchvision.models.resnet18(num_classes=2).eval()
    cfg = {"methods": ["suppression", "rrr", "finetune"], "n_explain": 4,
           "explain_resolution": 2, "epochs": 1, "batch_size": 16,
           "suppression": {"n_units": [1], "damping": [0.0], "candidates": 2, "n_images": 4,
                           "resolution": 2}}
    ctx = StageContext.standalone("corrections", data, {"vanilla": resnet, "clean": clean},
                                  section=cfg, experts={"layers": ["layer3"]}, reference="clean")
    payload = C.build(ctx)
    assert [r["method"] for r in payload["rows"]] == ["suppression", "finetune"]
    (sk,) = [s for s in payload["skipped"] if s["method"] == "rrr"]
    assert sk["reason"].startswith("could not run: AttributeError: 'Sequential'")
    assert sk["error"] == "AttributeError" and "\n" not in sk["reason"]
    sup_row = payload["rows"][0]
    assert sup_row["layer"] == "layer3" and payload["records"]["suppression"]["spec"]["wrap"] \
        == "scale"
    # the stored corrected model rebuilds (weights-only payload) and reproduces its accuracy
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    m = C.load_model(torch.load(buf, weights_only=True), "suppression", resnet)
    assert isinstance(m.layer3, C.UnitScale)
    assert evaluate(m, data.test.x, data.test.y) == pytest.approx(sup_row["decoy_test_acc"])


# ------------------------------------------------- P-ClArC: the activation "after" a layer

def _facts_of(model: nn.Module) -> dict:
    named = [(n, type(m).__name__) for n, m in model.named_modules() if n]
    return {"layers": [n for n, _ in named], "kinds": dict(named)}


def test_pclarc_projects_after_an_activation_only_when_it_reads_the_layer(resnet):
    set_seed(0)
    decoy = build_model("decoy-cnn").eval()
    pairs = pclarc.activation_pairs(_facts_of(decoy), ["conv1", "conv2", "fc1"])
    assert pclarc.checked_activations(decoy, pairs, torch.rand(1, 1, 28, 28)) == \
        ["relu1", "relu2", "relu3"] == pclarc.after_activation(_facts_of(decoy),
                                                           ["conv1", "conv2", "fc1"])
    # a BasicBlock's ReLU is listed after bn1 but is one module called twice (also on the sum
    # with the skip): P-ClArC stays at bn1; a block has no activation listed after it
    layers = ["layer3.0.bn1", "layer3"]
    pairs = pclarc.activation_pairs(_facts_of(resnet), layers)
    assert pairs == [("layer3.0.bn1", "layer3.0.relu"), ("layer3", "layer3")]
    assert pclarc.checked_activations(resnet, pairs, torch.rand(1, 3, SIZE, SIZE)) == layers
    # an in-place ReLU that does read the BatchNorm's output is kept
    net = _trained_bn(_BNNet())
    pairs = pclarc.activation_pairs(_facts_of(net), ["bn1", "conv2"])
    assert pclarc.checked_activations(net, pairs, torch.rand(1, 3, SIZE, SIZE)) == ["relu1", "relu2"]


def test_pclarc_runs_on_resnet18_layer3(resnet, data):
    corr = C.correct("pclarc", resnet, data, layers=["layer3"])
    assert isinstance(corr.model.layer3, C.ConceptProjection)
    shell = C.build_corrected("pclarc", resnet, corr.record)
    shell.load_state_dict(corr.model.state_dict())
    x = data.test.x[:4]
    assert torch.allclose(_logits(shell, x), _logits(corr.model, x), atol=1e-6)


@pytest.mark.parametrize("layer", ["features.5", "features.9.block.0", "classifier.0"])
def test_mobilenet_v3_small_blocks_and_a_nested_head(layer):
    set_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=2).eval()
    units, x = [0, 3], torch.rand(3, 3, SIZE, SIZE)
    sup = C.suppress(net, layer, units, 0.0, probe=x)
    assert isinstance(sup.get_submodule(layer), C.UnitScale)
    assert torch.allclose(_logits(sup, x), _reference(net, layer, units, 0.0, x), atol=1e-5)

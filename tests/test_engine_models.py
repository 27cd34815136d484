"""Issue 10: the engine on real models' shapes — several inputs and extra arguments, layers that give
tuples or dicts, models that return tuples — and several layers from one pass (``layers=[...]``,
``experts_many``), each against a reference written from the definition or separate calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.engine.distributions import GaussianDoI, LinearDoI, PointDoI
from core.engine.experts import experts, experts_many
from core.engine.influence import Slice, influence
from core.engine.quantities import ClassQoI, ComparativeQoI, UnitQoI


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5)).eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return torch.rand(6, 1, 8, 8)


# ----------------------------------------------------------------------------- several layers

LAYERS = [None, "0", "1", "4", "7"]


@pytest.mark.parametrize("doi", [PointDoI(), LinearDoI(4, method="gausslegendre"), GaussianDoI(3, stdev=0.2),
                                 LinearDoI(4, at="layer")], ids=repr)
def test_many_layers_equal_separate_calls(data, doi):
    m = cnn()
    layers = LAYERS if doi.at == "input" else LAYERS[1:]
    batch_size = 5 if doi.resolution > 1 else None
    for per_input, multiply in ((True, True), (False, False)):
        together = influence(m, data, layers=layers, qoi=ClassQoI(2), doi=doi, per_input=per_input,
                             multiply=multiply, batch_size=batch_size)
        assert list(together) == layers
        for layer in layers:
            alone = influence(m, data, layer, ClassQoI(2), doi, per_input=per_input, multiply=multiply,
                              batch_size=batch_size)
            assert torch.allclose(together[layer], alone, atol=1e-6), layer
    assert all_hooks(m) == 0


class Counting(nn.Module):
    """Counts forward calls of the wrapped model and backward passes through its input."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_many_layers_run_one_pass_per_chunk(data):
    m = Counting(cnn())
    names = ["inner.0", "inner.3", "inner.4", "inner.7"]
    influence(m, data, layers=names, qoi=ClassQoI(1), doi=LinearDoI(4), batch_size=24)
    one = m.calls
    m.calls = 0
    influence(m, data, "inner.3", ClassQoI(1), LinearDoI(4), batch_size=24)
    assert one == m.calls  # the same number of passes as for a single layer


def test_many_layers_unit_quantity_and_cut(data):
    m = cnn()
    out = influence(m, data, layers=[None, Slice("3", cut="input"), "0"], qoi=UnitQoI("4", 2),
                    doi=LinearDoI(3), per_input=True)
    assert torch.allclose(out[Slice("3", cut="input")],
                          influence(m, data, "2", UnitQoI("4", 2), LinearDoI(3), per_input=True))
    assert torch.allclose(out[None], influence(m, data, None, UnitQoI("4", 2), LinearDoI(3),
                                               per_input=True))
    with pytest.raises(ValueError, match="upstream"):
        influence(m, data, layers=["0", "5"], qoi=UnitQoI("4", 2))
    with pytest.raises(ValueError, match="either layer or layers"):
        influence(m, data, "0", ClassQoI(0), layers=["3"])
    with pytest.raises(ValueError, match="repeated"):
        influence(m, data, layers=["3", "3"], qoi=ClassQoI(0))


@pytest.mark.parametrize("doi", [PointDoI(), LinearDoI(3)], ids=repr)
def test_experts_many_equals_separate_experts(data, doi):
    m = cnn()
    layers = ["0", "3", "4"]
    many = experts_many(m, data, layers, ComparativeQoI(1, 3), doi, k=3, reduce="max", bootstrap=20,
                        seed=2)
    for layer in layers:
        alone = experts(m, data, layer, ComparativeQoI(1, 3), doi, k=3, reduce="max", bootstrap=20,
                        seed=2)
        assert many[layer].units == alone.units
        assert torch.allclose(many[layer].scores, alone.scores, atol=1e-6)
        for a, b in zip(many[layer].experts, alone.experts, strict=True):
            assert a.frequency == b.frequency
            assert a.ci_low == pytest.approx(b.ci_low, abs=1e-5)
        assert many[layer].layer == layer and many[layer].distribution == repr(doi)


# ----------------------------------------------------------------------------- several inputs

class TwoInputs(nn.Module):
    """f(image, mask, scale=…) with an integer mask and an extra keyword argument."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.side = nn.Linear(4, 3)
        self.head = nn.Linear(3 * 8 * 8 + 3, 4)

    def forward(self, image, side, mask, scale=1.0):
        z = torch.relu(self.conv(image * mask.unsqueeze(1).float())) * scale
        return self.head(torch.cat([z.flatten(1), torch.tanh(self.side(side))], 1))


def two_input_data():
    torch.manual_seed(2)
    image, side = torch.rand(5, 1, 8, 8), torch.randn(5, 4)
    mask = (torch.rand(5, 8, 8) > 0.2).long()
    return image, side, mask


def reference_two_inputs(m, image, side, mask, c, resolution, layer=None):
    """From the definition: one input at a time, the path on the image only, Riemann midpoints."""
    out = []
    for n in range(len(image)):
        total = 0
        for r in range(resolution):
            point = ((r + 0.5) / resolution * image[n:n + 1]).requires_grad_(True)
            if layer is None:
                q = m(point, side[n:n + 1], mask[n:n + 1], scale=2.0)[0, c]
                (g,) = torch.autograd.grad(q, point)
            else:
                store = {}
                handle = m.conv.register_forward_hook(
                    lambda mod, a, o, store=store: store.setdefault("z", o.detach().requires_grad_(True)))
                try:
                    q = m(point, side[n:n + 1], mask[n:n + 1], scale=2.0)[0, c]
                finally:
                    handle.remove()
                (g,) = torch.autograd.grad(q, store["z"])
            total = total + g
        out.append(total / resolution)
    return torch.cat(out)


def test_several_inputs_doi_on_the_named_one():
    m = TwoInputs()
    image, side, mask = two_input_data()
    kw = dict(doi_on=[0], forward_kwargs={"scale": 2.0}, per_input=True)
    chi = influence(m, (image, side, mask), None, ClassQoI(1), LinearDoI(4), **kw)
    assert isinstance(chi, tuple) and len(chi) == 1
    assert torch.allclose(chi[0], reference_two_inputs(m, image, side, mask, 1, 4), atol=1e-6)
    at_conv = influence(m, (image, side, mask), "conv", ClassQoI(1), LinearDoI(4), batch_size=7, **kw)
    assert torch.allclose(at_conv, reference_two_inputs(m, image, side, mask, 1, 4, "conv"), atol=1e-6)
    # a path at the slice with several inputs runs g through the model (no traced tail)
    at_layer = influence(m, (image, side, mask), "conv", ClassQoI(1), LinearDoI(4, at="layer"), **kw)
    assert at_layer.shape == (5, 3, 8, 8)
    assert all_hooks(m) == 0


def test_several_inputs_default_doi_and_forward_args():
    m = TwoInputs()
    image, side, mask = two_input_data()
    # default doi_on: every floating-point input (image and side), the integer mask passes through
    chi = influence(m, (image, side, mask), None, ClassQoI(0), PointDoI(), per_input=True,
                    forward_args=(2.0,))
    a, b = image.clone().requires_grad_(True), side.clone().requires_grad_(True)
    ga, gb = torch.autograd.grad(m(a, b, mask, 2.0)[:, 0].sum(), (a, b))
    assert torch.allclose(chi[0], ga, atol=1e-6) and torch.allclose(chi[1], gb, atol=1e-6)
    # a per-input baseline tuple and attribution space: × (x − x') for each
    doi = LinearDoI(3, baseline=(torch.zeros(1, 8, 8), torch.ones(4)))
    attr = influence(m, (image, side, mask), None, ClassQoI(0), doi, per_input=True, multiply=True,
                     forward_args=(2.0,))
    with torch.no_grad():
        gap = m(image, side, mask, 2.0)[:, 0] - m(torch.zeros_like(image), torch.ones_like(side), mask,
                                                  2.0)[:, 0]
    total = attr[0].flatten(1).sum(1) + attr[1].sum(1)
    assert torch.allclose(total, gap, atol=0.05)  # completeness, 3 points
    with pytest.raises(ValueError, match="floating point"):
        influence(m, (image, side, mask), None, ClassQoI(0), doi_on=[2], forward_args=(2.0,))


# ----------------------------------------------------------------------------- tuple outputs

class TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x):
        return self.a(x), torch.tanh(self.b(x))


class DictBlock(nn.Module):
    def forward(self, pair):
        a, b = pair
        return {"sum": a + b, "prod": a * b}


class TupleModel(nn.Module):
    """A block giving a tuple, one giving a dict, and an output (logits, aux) tuple."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.block, self.mix, self.head = TupleBlock(), DictBlock(), nn.Linear(4, 3)

    def forward(self, x):
        d = self.mix(self.block(x))
        return self.head(d["prod"] + d["sum"] ** 2), d["sum"]


def test_tuple_and_dict_layers_and_tuple_outputs():
    m = TupleModel()
    x = torch.randn(4, 3)
    qoi = ClassQoI(2, element=0)
    for sl, pick in ((Slice("block", element=1), lambda out: out[1]),
                     (Slice("mix", element="prod"), lambda out: out["prod"])):
        got = influence(m, x, sl, qoi, per_input=True)
        store = {}
        mod = m.get_submodule(sl.layer)

        def hook(module, args, out, pick=pick, store=store, sl=sl):
            z = pick(out).detach().requires_grad_(True)
            store["z"] = z
            if isinstance(out, tuple):
                return (out[0], z) if sl.element == 1 else out
            return {**out, sl.element: z}

        handle = mod.register_forward_hook(hook)
        try:
            q = m(x)[0][:, 2]
        finally:
            handle.remove()
        (expected,) = torch.autograd.grad(q.sum(), store["z"])
        assert torch.allclose(got, expected, atol=1e-6), sl
    # element by keyword on a name, several layers, the input cut's element
    both = influence(m, x, layers=["block", Slice("head", cut="input")], qoi=qoi, element=0)
    assert torch.allclose(both["block"], influence(m, x, Slice("block", element=0), qoi))
    assert all_hooks(m) == 0


def test_tuple_errors_are_one_line():
    m = TupleModel()
    x = torch.randn(4, 3)
    cases = [(dict(layer="block", qoi=ClassQoI(0, element=0)), "gives a tuple of 2.*element"),
             (dict(layer=Slice("block", element=5), qoi=ClassQoI(0, element=0)), "no element 5"),
             (dict(layer=Slice("mix", cut="input"), qoi=ClassQoI(0, element=0)), "tuple of 2 at its input"),
             (dict(layer=None, qoi=ClassQoI(0)), "tuple of 2, not a tensor.*element=0"),
             (dict(layer=None, qoi=ClassQoI(0, element="logits")), "reads element 'logits'")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            influence(m, x, **kwargs)
        assert "\n" not in str(err.value)
    assert all_hooks(m) == 0


# ----------------------------------------------------------------------------- several quantities

@pytest.mark.parametrize("doi", [LinearDoI(3), LinearDoI(3, at="layer")], ids=repr)
def test_several_quantities_share_the_forward(data, doi):
    m = Counting(cnn())
    qois = [ClassQoI(0), ComparativeQoI(2, 4), ClassQoI(3)]
    layers = ["inner.0", "inner.4"]
    influence(m, data, layers=layers, qoi=qois[0], doi=doi, batch_size=18)  # warm: fx traces the tail
    m.calls = 0
    together = influence(m, data, layers=layers, qoi=qois, doi=doi, per_input=True, multiply=True,
                         batch_size=18)
    calls = m.calls
    assert isinstance(together, list) and len(together) == 3
    for q, got in zip(qois, together, strict=True):
        for layer in layers:
            alone = influence(m, data, layer, q, doi, per_input=True, multiply=True, batch_size=18)
            assert torch.allclose(got[layer], alone, atol=1e-6)
    m.calls = 0
    influence(m, data, layers=layers, qoi=qois[0], doi=doi, per_input=True, multiply=True, batch_size=18)
    assert m.calls == calls  # three quantities cost the forward passes of one
    ranked = experts_many(m, data, layers, qois, doi, k=2)
    assert ranked[1]["inner.4"].units == experts(m, data, "inner.4", qois[1], doi, k=2).units
    with pytest.raises(ValueError, match="read different layers"):
        influence(m, data, "inner.0", [ClassQoI(0), UnitQoI("inner.4", 1)])

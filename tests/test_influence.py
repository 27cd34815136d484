"""The influence engine: hand-worked values, the paper's axioms, a slow reference, Captum as oracle."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from captum.attr import (
    IntegratedGradients,
    InternalInfluence,
    LayerGradientXActivation,
    NoiseTunnel,
    Saliency,
)
from torch import nn

from core.engine.distributions import GaussianDoI, LinearDoI, PointDoI
from core.engine.influence import LayerNotFound, influence, layer_names
from core.engine.quantities import ClassQoI, ComparativeQoI, MaxClassQoI, UnitQoI

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- tiny models

class Quad(nn.Module):
    """g(z) = (z0² + 3 z1, z0 z1): derivatives easy to work out by hand."""

    def forward(self, z):
        return torch.stack([z[:, 0] ** 2 + 3 * z[:, 1], z[:, 0] * z[:, 1]], dim=1)


def hand_model() -> nn.Module:
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    return nn.Sequential(lin, Quad())


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.fixture
def data():
    torch.manual_seed(1)
    return torch.rand(6, 1, 8, 8)


# ----------------------------------------------------------------------------- by hand

def test_hand_point_influence_at_layer_and_input():
    m = hand_model()
    x = torch.tensor([[1.0, 1.0]])  # z = (2, 1)
    # q = z0² + 3 z1: dq/dz = (2 z0, 3) = (4, 3); at the input W^T (4, 3) = (8, 3).
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), PointDoI()), torch.tensor([4.0, 3.0]))
    assert torch.allclose(influence(m, x, None, ClassQoI(0), PointDoI()), torch.tensor([8.0, 3.0]))
    # q = z0 z1: dq/dz = (z1, z0) = (1, 2)
    assert torch.allclose(influence(m, x, "0", ClassQoI(1)), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("at", ["input", "layer"])
def test_hand_linear_doi_midpoints(at):
    m = hand_model()
    x = torch.tensor([[1.0, 1.0]])
    # R = 2: α = 1/4, 3/4; z(α) = α (2, 1); dq/dz = (2·2α, 3) → mean (2, 3).
    chi = influence(m, x, "0", ClassQoI(0), LinearDoI(resolution=2, at=at))
    assert torch.allclose(chi, torch.tensor([2.0, 3.0]))
    # attribution space: × (z − 0) = (4, 3); sums to q(z) − q(0) = 4 + 3 (completeness).
    attr = influence(m, x, "0", ClassQoI(0), LinearDoI(resolution=2, at=at), multiply=True)
    assert torch.allclose(attr, torch.tensor([4.0, 3.0]))


def test_hand_gaussian_doi_is_seeded_average():
    m = hand_model()
    x = torch.tensor([[1.0, 1.0]])
    doi = GaussianDoI(resolution=4, stdev=0.5, seed=7)
    eps = doi.noise((2,), 0)  # the noise the engine draws for input 0
    pts = x + 0.5 * eps
    z0 = 2 * pts[:, 0]
    expected = torch.stack([(2 * z0 * 2).mean(), torch.tensor(3.0)])  # W^T (2 z0, 3)
    assert torch.allclose(influence(m, x, None, ClassQoI(0), doi), expected, atol=1e-6)


def test_unit_quantity_by_hand():
    m = hand_model()
    x = torch.tensor([[1.0, 3.0]])
    # unit 1 of layer "0" is z1 = x1: influence at the input (0, 1)
    assert torch.allclose(influence(m, x, None, UnitQoI("0", 1)), torch.tensor([0.0, 1.0]))
    assert torch.allclose(influence(m, x, None, UnitQoI("0", 0)), torch.tensor([2.0, 0.0]))


# ----------------------------------------------------------------------------- axioms

def test_linear_agreement():
    torch.manual_seed(3)
    m = nn.Linear(12, 4)
    x = torch.randn(9, 12)
    for doi in (PointDoI(), LinearDoI(7), GaussianDoI(5, stdev=1.0)):
        chi = influence(m, x, None, ClassQoI(2), doi)
        assert torch.allclose(chi, m.weight[2], atol=1e-6)


def test_distribution_linearity(data):
    m = cnn()
    a, b = data[:2], data[2:]
    doi = LinearDoI(5)
    chi_a = influence(m, a, "3", ClassQoI(1), doi)
    chi_b = influence(m, b, "3", ClassQoI(1), doi)
    chi_ab = influence(m, data, "3", ClassQoI(1), doi)
    mix = (len(a) * chi_a + len(b) * chi_b) / len(data)
    assert torch.allclose(chi_ab, mix, atol=1e-6)


def test_comparative_is_difference(data):
    m = cnn()
    for layer in (None, "1", "4"):
        d = influence(m, data, layer, ComparativeQoI(3, 1), LinearDoI(4))
        diff = (influence(m, data, layer, ClassQoI(3), LinearDoI(4))
                - influence(m, data, layer, ClassQoI(1), LinearDoI(4)))
        assert torch.allclose(d, diff, atol=1e-6)


def test_completeness_of_path_attribution(data):
    m = cnn()
    attr = influence(m, data, None, ClassQoI(2), LinearDoI(200), per_input=True, multiply=True)
    with torch.no_grad():
        gap = m(data)[:, 2] - m(torch.zeros_like(data))[:, 2]
    assert torch.allclose(attr.flatten(1).sum(1), gap, atol=2e-3)


def test_max_class_picks_the_argmax(data):
    m = cnn()
    with torch.no_grad():
        pred = m(data).argmax(1)
    chi = influence(m, data, "4", MaxClassQoI(), per_input=True)
    for i, c in enumerate(pred.tolist()):
        assert torch.allclose(chi[i], influence(m, data[i:i + 1], "4", ClassQoI(c)))


# ----------------------------------------------------------------------------- slow reference

def reference(model, x, layer_index, c, doi, multiply=False):
    """Straight from the definition: one input and one DoI point at a time, h and g separate."""
    h = model[:layer_index + 1] if layer_index is not None else nn.Identity()
    g = model[layer_index + 1:] if layer_index is not None else model
    out = []
    for n in range(len(x)):
        xn = x[n:n + 1]
        with torch.no_grad():
            z = h(xn)
        base_z = torch.zeros_like(z)
        if isinstance(doi, LinearDoI) and doi.at == "input":
            with torch.no_grad():
                base_z = h(torch.zeros_like(xn))
        total = torch.zeros_like(z)
        for r in range(doi.resolution):
            rn, nn_ = torch.tensor([r]), torch.tensor([n])
            if doi.at == "layer" or layer_index is None:
                point = doi.points(z, nn_, rn)
            else:
                with torch.no_grad():
                    point = h(doi.points(xn, nn_, rn))
            point = point.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(g(point)[0, c], point)
            total += grad
        chi = total / doi.resolution
        out.append(chi * (z - base_z) if multiply else chi)
    return torch.cat(out)


DOIS = [PointDoI(), LinearDoI(6), LinearDoI(6, at="layer"), GaussianDoI(5, stdev=0.3, seed=2)]


@pytest.mark.parametrize("doi", DOIS, ids=repr)
@pytest.mark.parametrize("layer", [None, 1, 4])
@pytest.mark.parametrize("batch_size", [None, 1, 7])
def test_batched_equals_reference(data, doi, layer, batch_size):
    m = cnn()
    name = None if layer is None else str(layer)
    ours = influence(m, data, name, ClassQoI(3), doi, per_input=True, batch_size=batch_size)
    ref = reference(m, data, layer, 3, doi)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-6)
    mean = influence(m, data, name, ClassQoI(3), doi, batch_size=batch_size)
    assert torch.allclose(mean, ref.mean(0), atol=1e-6)


@pytest.mark.parametrize("doi", [LinearDoI(5), LinearDoI(5, at="layer")], ids=repr)
def test_attribution_space_equals_reference(data, doi):
    m = cnn()
    ours = influence(m, data, "4", ClassQoI(0), doi, per_input=True, multiply=True, batch_size=4)
    assert torch.allclose(ours, reference(m, data, 4, 0, doi, multiply=True), atol=1e-6)


class Branchy(nn.Module):
    """Data-dependent control flow: cannot be traced by torch.fx, so the engine's fallback runs."""

    def __init__(self):
        super().__init__()
        self.body = cnn()

    def forward(self, x):
        if x.sum() > -1e9:
            return self.body(x)
        return -self.body(x)


def test_layer_path_fallback_equals_traced_tail(data):
    traced = cnn()
    branchy = Branchy()
    branchy.body.load_state_dict(traced.state_dict())
    doi = LinearDoI(6, at="layer")
    a = influence(traced, data, "3", ClassQoI(2), doi, per_input=True)
    b = influence(branchy, data, "body.3", ClassQoI(2), doi, per_input=True)
    assert torch.allclose(a, b, atol=1e-6)


def test_cut_at_layer_input_equals_previous_output(data):
    m = cnn()
    a = influence(m, data, "6", ClassQoI(1), LinearDoI(4), cut="input", per_input=True)
    b = influence(m, data, "5", ClassQoI(1), LinearDoI(4), per_input=True)
    assert torch.allclose(a, b)


# ----------------------------------------------------------------------------- Captum as oracle

def test_captum_layer_gradient_x_activation(data):
    m = cnn()
    for layer in ("1", "3", "5"):
        lg = LayerGradientXActivation(m, m.get_submodule(layer), multiply_by_inputs=False)
        expected = lg.attribute(data, target=4).mean(0)
        assert torch.allclose(influence(m, data, layer, ClassQoI(4), PointDoI()), expected,
                              atol=1e-7)


def test_captum_internal_influence(data):
    m = cnn()
    ii = InternalInfluence(m, m[3]).attribute(data, target=2, n_steps=20, method="riemann_middle")
    ours = influence(m, data, "3", ClassQoI(2), LinearDoI(20), per_input=True)
    assert torch.allclose(ours, ii, atol=1e-6)


def test_captum_integrated_gradients(data):
    m = cnn()
    base = torch.full_like(data[:1], 0.2)
    ig = IntegratedGradients(m).attribute(data, baselines=base, target=1, n_steps=25,
                                          method="riemann_middle")
    ours = influence(m, data, None, ClassQoI(1), LinearDoI(25, baseline=base[0]),
                     per_input=True, multiply=True)
    assert torch.allclose(ours, ig, atol=1e-6)


def test_captum_saliency_and_smoothgrad(data):
    m = cnn()
    sal = Saliency(m).attribute(data, target=0, abs=False)
    assert torch.allclose(influence(m, data, None, ClassQoI(0), per_input=True), sal)
    # SmoothGrad: same noise as Captum's NoiseTunnel when both draw it from the same stream.
    torch.manual_seed(11)
    sg = NoiseTunnel(Saliency(m)).attribute(data, nt_type="smoothgrad", nt_samples=8, stdevs=0.2,
                                            target=0, abs=False)
    torch.manual_seed(11)
    # Captum's draw: one torch.normal over the inputs each repeated nt_samples times in a row
    noise = torch.normal(0, torch.full((8 * len(data), *data.shape[1:]), 0.2))
    points = data.repeat_interleave(8, dim=0) + noise
    grads = influence(m, points, None, ClassQoI(0), per_input=True)
    ours = grads.view(len(data), 8, *data.shape[1:]).mean(1)
    assert torch.allclose(ours, sg, atol=1e-6)


# ----------------------------------------------------------------------------- hygiene

def test_no_parameter_gradients_and_mode_restored(data):
    m = cnn()
    m.train()
    m[3].eval()  # mixed modes are each restored
    influence(m, data, "3", ClassQoI(0), LinearDoI(3, at="layer"))
    influence(m, data, None, ClassQoI(0), LinearDoI(3))
    assert all(p.grad is None for p in m.parameters())
    assert m.training and m[0].training and not m[3].training


def test_eval_mode_is_used():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9), nn.Linear(4, 2))
    m.train()
    x = torch.randn(5, 4)
    a = influence(m, x, None, ClassQoI(0))
    b = influence(m, x, None, ClassQoI(0))
    assert torch.equal(a, b)
    assert torch.allclose(a, (m[2].weight[0] @ m[0].weight))
    assert m.training


def test_hooks_removed_after_exception(data):
    m = cnn()
    with pytest.raises(ValueError, match="out of range"):
        influence(m, data, "3", ClassQoI(99))
    with pytest.raises(ValueError):
        influence(m, torch.rand(2, 3, 8, 8), "3", ClassQoI(0))
    assert all_hooks(m) == 0


def test_many_calls_leave_no_hooks_and_no_growth(data):
    m = cnn()
    for _ in range(10):
        influence(m, data, "3", ClassQoI(0), LinearDoI(2, at="layer"))
    gc.collect()
    before = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    for i in range(100):
        doi = LinearDoI(2, at="layer") if i % 2 else PointDoI()
        influence(m, data, "3", ClassQoI(i % 5), doi)
    gc.collect()
    after = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    assert all_hooks(m) == 0
    assert after - before <= 2


def test_threads_agree_with_sequential(data):
    m = cnn()
    m.train()
    jobs = [(layer, c, doi) for layer in (None, "1", "4") for c in range(3)
            for doi in (PointDoI(), LinearDoI(4), LinearDoI(4, at="layer"))]
    jobs = [j for j in jobs if not (j[0] is None and j[2].at == "layer")]
    sequential = [influence(m, data, layer, ClassQoI(c), doi) for layer, c, doi in jobs]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i):
        try:
            layer, c, doi = jobs[i]
            results[i] = influence(m, data, layer, ClassQoI(c), doi)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, expected in enumerate(sequential):
        assert torch.equal(results[i], expected)
    assert m.training and all_hooks(m) == 0


class OOMAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches above a limit, as a too-large chunk would."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_halves_the_chunk(data):
    inner = cnn()
    m = OOMAbove(inner, limit=5)
    a = influence(m, data, None, ClassQoI(1), LinearDoI(4), per_input=True, batch_size=24)
    b = influence(inner, data, None, ClassQoI(1), LinearDoI(4), per_input=True)
    assert torch.allclose(a, b, atol=1e-6)
    assert 24 in m.sizes and max(s for s in m.sizes if s <= 5) == 3
    assert all_hooks(m) == 0


def test_device_override_leaves_model_in_place(data):
    m = cnn()
    chi = influence(m, data, "1", ClassQoI(0), device="cpu")
    assert chi.device.type == "cpu"
    assert next(m.parameters()).device.type == "cpu"


# ----------------------------------------------------------------------------- bad input

def test_unknown_layer_lists_valid_names(data):
    m = cnn()
    with pytest.raises(LayerNotFound, match=r"valid layers are: 0, 1, 2"):
        influence(m, data, "conv9", ClassQoI(0))
    assert "3" in layer_names(m)


def test_bad_inputs_give_one_line_errors(data):
    m = cnn()
    cases = [
        (dict(inputs=data[:0], qoi=ClassQoI(0)), "empty"),
        (dict(inputs=data, qoi=ClassQoI(5)), r"class index 5 is out of range.*0\.\.4"),
        (dict(inputs=data, qoi=ComparativeQoI(1, -7)), "out of range"),
        (dict(inputs=torch.rand(3, 1, 5, 7), qoi=ClassQoI(0)), "could not run on inputs shaped"),
        (dict(inputs=(data * 255).to(torch.uint8), qoi=ClassQoI(0)), "floating point"),
        (dict(inputs=data, qoi=UnitQoI("3", 17)), "unit 17 is out of range"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            influence(m, layer="1" if "Unit" not in repr(kwargs["qoi"]) else None, **kwargs)
        assert "\n" not in str(err.value).strip()
    assert all_hooks(m) == 0


def test_quantity_upstream_of_slice_is_refused(data):
    m = cnn()
    with pytest.raises(ValueError, match="upstream"):
        influence(m, data, "4", UnitQoI("1", 0))


def test_non_finite_influence_names_layer_and_quantity(data):
    m = cnn()
    with torch.no_grad():
        m[6].weight[2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer '3' for ClassQoI\(2\)"):
        influence(m, data, "3", ClassQoI(2))


def test_device_copy_path_hooks_the_copy(data):
    # "cpu:0" differs from the model's "cpu": the engine computes on a copy, whose layers it must hook
    m = cnn()
    for doi in (PointDoI(), LinearDoI(3, at="layer")):
        a = influence(m, data, "3", ClassQoI(1), doi, device="cpu:0", per_input=True)
        assert torch.allclose(a, influence(m, data, "3", ClassQoI(1), doi, per_input=True))
    assert all_hooks(m) == 0

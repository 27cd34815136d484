"""Issue 10: the engine's bugs (hand-worked values) and the peers' conventions as options.

Each bug test fails on the engine before the fix: attribution space at a biased layer, no_grad and
inference_mode, in-place operations after the slice, per-example baselines, non-finite inputs,
experts(reduce="median"), a layer the output does not use. Then the conventions: Captum's
quadratures, TruLens-Explain's endpoint-inclusive path, baselines (per example, callable, h(x') at
the slice) and saliency with and without ``abs``.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    IntegratedGradients,
    InternalInfluence,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Saliency,
)
from torch import nn

from core.engine.distributions import QUADRATURES, GaussianDoI, LinearDoI, PointDoI
from core.engine.experts import experts
from core.engine.influence import influence, saliency
from core.engine.quantities import ClassQoI


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def biased() -> nn.Sequential:
    """z = W x + b with W = [[1, 2], [3, 4]], b = (1, −1); q = 2 z0 − z1."""
    first = nn.Linear(2, 2)
    head = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        first.bias.copy_(torch.tensor([1.0, -1.0]))
        head.weight.copy_(torch.tensor([[2.0, -1.0]]))
    return nn.Sequential(first, head)


def cnn(seed: int = 0, inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5)).eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return torch.rand(6, 1, 8, 8)


# ----------------------------------------------------------------------------- bug: multiplier

@pytest.mark.parametrize("doi", [PointDoI(), GaussianDoI(3, stdev=0.5)], ids=repr)
def test_attribution_at_a_biased_layer_multiplies_by_the_activation(doi):
    m = biased()
    x = torch.tensor([[1.0, 1.0]])  # z = (1 + 2 + 1, 3 + 4 − 1) = (4, 6); dq/dz = (2, −1)
    attr = influence(m, x, "0", ClassQoI(0), doi, multiply=True)
    assert torch.allclose(attr, torch.tensor([8.0, -6.0]))  # (2·4, −1·6), not × (z − b) = (6, −7)


def test_path_at_the_input_still_multiplies_by_h_x_minus_h_baseline():
    m = biased()
    x = torch.tensor([[1.0, 1.0]])  # h(x) − h(0) = (4, 6) − (1, −1) = (3, 7)
    attr = influence(m, x, "0", ClassQoI(0), LinearDoI(4), multiply=True)
    assert torch.allclose(attr, torch.tensor([6.0, -7.0]))


def test_captum_layer_gradient_x_activation_multiplies_by_inputs(data):
    m = cnn()
    with torch.no_grad():  # biases well away from zero
        m[0].bias.fill_(0.3)
        m[3].bias.fill_(-0.2)
        m[4].bias.fill_(0.1)
    for layer in ("0", "3", "4", "5"):
        lg = LayerGradientXActivation(m, m.get_submodule(layer))  # multiply_by_inputs=True
        expected = lg.attribute(data, target=4)
        ours = influence(m, data, layer, ClassQoI(4), PointDoI(), per_input=True, multiply=True)
        assert torch.allclose(ours, expected, atol=1e-6), layer


# ----------------------------------------------------------------------------- bug: grad modes

def test_under_no_grad_and_inference_mode():
    m = biased()
    x = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    expected = torch.tensor([2.0, -1.0])
    with torch.no_grad():
        assert torch.allclose(influence(m, x, "0", ClassQoI(0)), expected)
        assert torch.allclose(influence(m, x, None, ClassQoI(0)), torch.tensor([-1.0, 0.0]))
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
        assert torch.allclose(influence(m, xi, "0", ClassQoI(0), LinearDoI(3)), expected)
        assert torch.allclose(influence(m, xi, "0", ClassQoI(0), LinearDoI(3, at="layer")), expected)
        assert torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled() and all_hooks(m) == 0
    assert all(p.grad is None for p in m.parameters())


# ----------------------------------------------------------------------------- bug: in-place ops

def test_in_place_relu_after_the_slice_by_hand():
    lin = nn.Linear(2, 2)
    head = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.copy_(torch.tensor([0.0, -1.0]))
        head.weight.copy_(torch.tensor([[3.0, 5.0]]))
    m = nn.Sequential(lin, nn.ReLU(inplace=True), head)
    x = torch.tensor([[1.0, 0.5]])  # z = (1, −0.5); ReLU passes z0 only: dq/dz = (3, 0)
    assert torch.allclose(influence(m, x, "0", ClassQoI(0)), torch.tensor([3.0, 0.0]))
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), LinearDoI(2, at="layer")),
                          torch.tensor([3.0, 0.0]))
    assert torch.allclose(influence(m, x, "1", ClassQoI(0)), torch.tensor([3.0, 5.0]))
    # attribution at the ReLU's output: × relu(z) = (1, 0)
    assert torch.allclose(influence(m, x, "1", ClassQoI(0), multiply=True), torch.tensor([3.0, 0.0]))


def test_batchnorm_feeding_an_in_place_relu_by_hand():
    lin = nn.Linear(2, 2, bias=False)
    bn = nn.BatchNorm1d(2, eps=0.0)
    head = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        bn.weight.fill_(2.0)  # y = 2 (z − μ) with μ = (0, 1), var 1
        bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
        head.weight.copy_(torch.tensor([[3.0, 5.0]]))
    m = nn.Sequential(lin, bn, nn.ReLU(inplace=True), head)
    x = torch.tensor([[1.0, 0.5]])  # y = (2, −1): dq/dy = (3, 0); dq/dz = 2·(3, 0)
    assert torch.allclose(influence(m, x, "1", ClassQoI(0)), torch.tensor([3.0, 0.0]))
    assert torch.allclose(influence(m, x, "0", ClassQoI(0)), torch.tensor([6.0, 0.0]))
    out = influence(m, x, layers=["0", "1", "2"], qoi=ClassQoI(0))
    assert torch.allclose(out["2"], torch.tensor([3.0, 5.0]))


@pytest.mark.parametrize("doi", [PointDoI(), LinearDoI(3), LinearDoI(3, at="layer")], ids=repr)
def test_in_place_model_equals_its_out_of_place_twin(data, doi):
    a, b = cnn(inplace=True), cnn(inplace=False)
    for layer in ("0", "1", "3", "4", "5"):
        ours = influence(a, data, layer, ClassQoI(2), doi, per_input=True, multiply=True)
        ref = influence(b, data, layer, ClassQoI(2), doi, per_input=True, multiply=True)
        assert torch.allclose(ours, ref, atol=1e-6), layer
    assert all_hooks(a) == 0


# ----------------------------------------------------------------------------- bug: baselines

class SumOfSquares(nn.Module):
    """f(x) = Σ x²: along a path from x' the midpoint rule gives the exact mean gradient x + x'."""

    def forward(self, x):
        return (x ** 2).sum(1, keepdim=True)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_per_example_baseline_by_hand(batch_size):
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    base = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    doi = LinearDoI(2, baseline=base)
    chi = influence(SumOfSquares(), x, None, ClassQoI(0), doi, per_input=True, batch_size=batch_size)
    assert torch.allclose(chi, x + base)
    attr = influence(SumOfSquares(), x, None, ClassQoI(0), doi, per_input=True, multiply=True,
                     batch_size=batch_size)
    assert torch.allclose(attr, x ** 2 - base ** 2)  # completeness, per input


def test_per_example_and_callable_baselines_equal_captum(data):
    m = cnn()
    base = torch.rand_like(data) * 0.3
    ig = IntegratedGradients(m).attribute(data, baselines=base, target=1, n_steps=6,
                                          method="riemann_middle")
    for spec in (base, lambda x: 0.3 * x.flip(-1)):
        expected = ig if isinstance(spec, torch.Tensor) else IntegratedGradients(m).attribute(
            data, baselines=0.3 * data.flip(-1), target=1, n_steps=6, method="riemann_middle")
        for batch_size in (6, 7, None):
            ours = influence(m, data, None, ClassQoI(1), LinearDoI(6, baseline=spec), per_input=True,
                             multiply=True, batch_size=batch_size)
            assert torch.allclose(ours, expected, atol=1e-6)


def test_per_example_baseline_with_the_wrong_rows_is_refused(data):
    with pytest.raises(ValueError, match="per-example baseline has 4 rows"):
        influence(cnn(), data, None, ClassQoI(1), LinearDoI(2, baseline=torch.zeros(4, 1, 8, 8)))


def test_layer_path_from_h_of_the_input_baseline_equals_captum_layer_ig(data):
    m = cnn()
    base = torch.full_like(data, 0.25)
    ours = {}
    for layer in ("0", "3"):
        lig = LayerIntegratedGradients(m, m.get_submodule(layer)).attribute(
            data, baselines=base, target=3, n_steps=8, method="riemann_middle")
        doi = LinearDoI(8, baseline=base, at="layer", baseline_at="input")
        ours[layer] = influence(m, data, layer, ClassQoI(3), doi, per_input=True, multiply=True)
        assert torch.allclose(ours[layer], lig, atol=1e-6), layer
    # the default at the slice is a zero activation: a different path, a different answer
    zero = influence(m, data, "0", ClassQoI(3), LinearDoI(8, at="layer"), per_input=True, multiply=True)
    assert not torch.allclose(zero, ours["0"], atol=1e-3)


# ----------------------------------------------------------------------------- bug: small ones

def test_non_finite_inputs_are_refused():
    m = biased()  # its influence is finite whatever the input: the engine must check the input
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            influence(m, torch.tensor([[1.0, bad]]), "0", ClassQoI(0))


def test_experts_refuses_an_unknown_reduction(data):
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'max'"):
        experts(cnn(), data, "3", ClassQoI(0), reduce="median")
    with pytest.raises(ValueError, match="by must be"):
        experts(cnn(), data, "3", ClassQoI(0), by="rank")


class WithAuxiliary(nn.Module):
    """An auxiliary head that runs but does not feed the output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        z = self.body(x)
        self.aux(z)
        return self.head(z)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_layer_the_output_does_not_use(frozen):
    m = WithAuxiliary()
    for p in m.parameters():
        p.requires_grad_(not frozen)
    with pytest.raises(ValueError, match="does not depend on layer 'aux'") as err:
        influence(m, torch.rand(3, 3), "aux", ClassQoI(0))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not depend on layer 'aux'"):
        influence(m, torch.rand(3, 3), layers=["body", "aux"], qoi=ClassQoI(0))
    assert all_hooks(m) == 0


# ----------------------------------------------------------------------------- quadratures

@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre"])
def test_quadratures_equal_captum(data, method):
    m = cnn()
    ii = InternalInfluence(m, m[3]).attribute(data, target=2, n_steps=7, method=method)
    ours = influence(m, data, "3", ClassQoI(2), LinearDoI(7, method=method), per_input=True,
                     batch_size=5)
    assert torch.allclose(ours, ii, atol=1e-6)
    base = torch.full_like(data[:1], 0.1)
    ig = IntegratedGradients(m).attribute(data, baselines=base, target=2, n_steps=7, method=method)
    ours = influence(m, data, None, ClassQoI(2), LinearDoI(7, baseline=base[0], method=method),
                     per_input=True, multiply=True)
    assert torch.allclose(ours, ig, atol=1e-6)


def test_trapezoid_is_a_true_average_and_captums_is_scaled(data):
    m = cnn()
    R = 5
    ii = InternalInfluence(m, m[3]).attribute(data, target=2, n_steps=R, method="riemann_trapezoid")
    ours = influence(m, data, "3", ClassQoI(2), LinearDoI(R, method="riemann_trapezoid"),
                     per_input=True)
    # Captum's step sizes are 1/R with halved ends: they sum to (R − 1)/R; ours sum to 1.
    assert torch.allclose(ours * (R - 1) / R, ii, atol=1e-6)
    lin = nn.Linear(4, 3)
    chi = influence(lin, torch.rand(2, 4), None, ClassQoI(1), LinearDoI(R, method="riemann_trapezoid"))
    assert torch.allclose(chi, lin.weight[1], atol=1e-6)  # linear agreement


def test_quadrature_weights_sum_to_one_and_exact_on_a_cubic():
    for method in QUADRATURES:
        doi = LinearDoI(4, method=method)
        w = doi.weights()
        assert w is None or abs(float(w.sum()) - 1) < 1e-12
    # Gauss–Legendre with 2 nodes integrates α³ exactly: f(x) = x⁴/4, ∂f = x³ along α x.
    quartic = lambda x: (x ** 4).sum(1, keepdim=True) / 4  # noqa: E731

    class Quartic(nn.Module):
        def forward(self, x):
            return quartic(x)

    x = torch.tensor([[2.0]], dtype=torch.float64)
    chi = influence(Quartic(), x, None, ClassQoI(0), LinearDoI(2, method="gausslegendre"))
    assert torch.allclose(chi, torch.tensor([2.0], dtype=torch.float64))  # ∫ (2α)³ dα = 2


def test_bad_quadrature_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        LinearDoI(4, method="simpson")
    with pytest.raises(ValueError, match="at least 2"):
        LinearDoI(1, method="riemann_trapezoid")
    with pytest.raises(ValueError, match="baseline_at"):
        LinearDoI(4, baseline_at="layer")


# ----------------------------------------------------------------------------- TruLens endpoints

def hand_quad() -> nn.Module:
    """g(z) = (z0² + 3 z1) after z = (2 x0, x1)."""

    class Quad(nn.Module):
        def forward(self, z):
            return torch.stack([z[:, 0] ** 2 + 3 * z[:, 1], z[:, 0] * z[:, 1]], dim=1)

    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    return nn.Sequential(lin, Quad())


@pytest.mark.parametrize("at", ["input", "layer"])
def test_endpoint_inclusive_path_by_hand(at):
    m = hand_quad()
    x = torch.tensor([[1.0, 1.0]])  # z = (2, 1)
    # R = 3: α = 0, ½, 1 (TruLens-Explain's LinearDoi); dq/dz = (4α, 3) → mean (2, 3)
    doi = LinearDoI(3, at=at, method="endpoints")
    assert torch.allclose(doi.alphas(torch.arange(3)), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), doi), torch.tensor([2.0, 3.0]))
    # R = 1 is the point itself: (4, 3), as PointDoI gives
    one = LinearDoI(1, at=at, method="endpoints")
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), one), torch.tensor([4.0, 3.0]))
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), one),
                          influence(m, x, "0", ClassQoI(0), PointDoI()))
    # attribution space: × (z − 0) = (8, 3) at R = 1 (gradient × activation)
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), one, multiply=True), torch.tensor([8.0, 3.0]))


def test_endpoint_inclusive_path_with_a_baseline():
    m = hand_quad()
    x = torch.tensor([[1.0, 1.0]])
    # from x' = (0.5, 0): z(α) = (1 + α, α); dq0/dz = (2(1 + α), 3); α ∈ {0, ⅓, ⅔, 1} → mean (3, 3)
    doi = LinearDoI(4, baseline=torch.tensor([0.5, 0.0]), method="endpoints")
    assert torch.allclose(influence(m, x, "0", ClassQoI(0), doi), torch.tensor([3.0, 3.0]))


# ----------------------------------------------------------------------------- saliency

def test_saliency_with_and_without_abs_equals_captum(data):
    m = cnn()
    assert torch.allclose(saliency(m, data, ClassQoI(3), abs=True),
                          Saliency(m).attribute(data, target=3))  # Captum's default abs=True
    assert torch.allclose(saliency(m, data, ClassQoI(3)), Saliency(m).attribute(data, target=3, abs=False))
    assert (saliency(m, data, ClassQoI(3)) < 0).any()

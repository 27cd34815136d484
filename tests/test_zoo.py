"""Issue 10: the engine on the torchvision zoo (random weights, 32×32 inputs).

For every conv / norm / activation / block layer of each architecture that runs once per forward
pass (e.g. a ResNet block's shared ReLU runs twice and is no slice), the many-layer pass gives the
influence of a point and a linear DoI, and it must equal a reference written from the definition: one
input and one DoI point at a time, a zero "probe" added to every slice's output, and ∂q/∂probe read
off plain autograd. In-place ReLUs after convs and norms (VGG, DenseNet, MobileNet) are part of it.
The engine must also leave no hooks, restore every submodule's mode and keep BN statistics.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.models.densenet import _DenseBlock, _DenseLayer, _Transition
from torchvision.models.efficientnet import MBConv
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from core.engine.distributions import LinearDoI, PointDoI
from core.engine.influence import influence
from core.engine.quantities import ClassQoI

CONV = (nn.Conv2d,)
NORM = (nn.BatchNorm2d, nn.LayerNorm, LayerNorm2d, nn.GroupNorm)
ACTIVATION = (nn.ReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU)
BLOCK = (BasicBlock, _DenseLayer, _DenseBlock, _Transition, InvertedResidual, MBConv, CNBlock,
         SqueezeExcitation, Conv2dNormActivation)
KINDS = CONV + NORM + ACTIVATION + BLOCK

SIZE, N, RESOLUTION, CLASS = 32, 2, 3, 3
ZOO = ["resnet18", "vgg11_bn", "densenet121", "mobilenet_v3_small", "efficientnet_b0",
       "convnext_tiny"]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    for m in model.modules():  # BN statistics away from the identity, so that the bias matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def sliceable(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Conv/norm/activation/block layers that run exactly once in a forward pass."""
    counts: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: counts.__setitem__(
        name, counts.get(name, 0) + 1)) for name, m in model.named_modules() if isinstance(m, KINDS)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return [name for name, c in counts.items() if c == 1]


def reference(model: nn.Module, x, layers: list[str], doi) -> dict[str, torch.Tensor]:
    """From the definition: ∂q/∂probe for a zero probe added at every slice, at every DoI point.

    The points are x's (input, point) pairs stacked in one batch (eval mode: rows are independent),
    then averaged per input with the DoI's weights.
    """
    modules = dict(model.named_modules())
    n = torch.arange(len(x)).repeat_interleave(doi.resolution)
    r = torch.arange(doi.resolution).repeat(len(x))
    points = doi.points(x[n], n, r)
    probes: dict[str, torch.Tensor] = {}

    def add_probe(out, name):
        probes[name] = torch.zeros_like(out, requires_grad=True)
        return out + probes[name]

    handles = [modules[name].register_forward_hook(lambda mod, a, o, name=name: add_probe(o, name))
               for name in layers]
    try:
        q = model(points)[:, CLASS]
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(q.sum(), [probes[name] for name in layers])
    w = doi.weights()
    w = torch.full((doi.resolution,), 1 / doi.resolution) if w is None else w.float()
    return {name: (g.view(len(x), doi.resolution, *g.shape[1:])
                   * w.view(1, -1, *([1] * (g.dim() - 1)))).sum(1)
            for name, g in zip(layers, grads, strict=True)}


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) or 1.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_many_layers_equal_the_definition(name):
    model = build(name)
    torch.manual_seed(1)
    x = torch.rand(N, 3, SIZE, SIZE)
    layers = sliceable(model, x)
    kinds = {type(model.get_submodule(layer)).__name__ for layer in layers}
    assert len(layers) >= 20 and kinds & {"Conv2d"} and kinds & {c.__name__ for c in NORM}
    assert kinds & {c.__name__ for c in BLOCK} or name == "vgg11_bn"
    model.train()
    model.get_submodule(layers[1]).eval()  # mixed modes are each restored
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {k: m.training for k, m in model.named_modules()}

    for doi in (PointDoI(), LinearDoI(RESOLUTION, method="gausslegendre")):
        ours = influence(model, x, layers=layers, qoi=ClassQoI(CLASS), doi=doi, per_input=True,
                         batch_size=N * doi.resolution)
        saved = {k: m.training for k, m in model.named_modules()}
        model.eval()
        ref = reference(model, x, layers, doi)
        for k, m in model.named_modules():
            m.training = saved[k]
        bad = [layer for layer in layers if not close(ours[layer], ref[layer])]
        assert not bad, f"{name} {doi!r}: {len(bad)} of {len(layers)} layers differ, e.g. {bad[:5]}"

        if isinstance(doi, PointDoI):
            point = ours

    # a slice alone: the single-layer path (a fresh leaf; an injected point at the slice)
    layer = layers[len(layers) // 2]
    alone = influence(model, x, layer, ClassQoI(CLASS), per_input=True, batch_size=N)
    assert close(alone, point[layer]), layer
    at_slice = influence(model, x, layer, ClassQoI(CLASS), LinearDoI(1, at="layer", method="endpoints"),
                         per_input=True, batch_size=N)
    assert close(at_slice, point[layer]), layer

    assert all_hooks(model) == 0
    assert {k: m.training for k, m in model.named_modules()} == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())

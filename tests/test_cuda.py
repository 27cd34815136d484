"""The CUDA path agrees with the CPU path (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.engine.distributions import GaussianDoI, LinearDoI, PointDoI
from core.engine.experts import experts, interpret
from core.engine.influence import influence
from core.engine.quantities import ClassQoI, ComparativeQoI

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 convolutions round to 10-bit mantissas; compare CPU and CUDA in true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


@pytest.mark.parametrize("doi", [PointDoI(), LinearDoI(16), LinearDoI(16, at="layer"),
                                 GaussianDoI(8, stdev=0.2)], ids=repr)
@pytest.mark.parametrize("layer", [None, "3"])
def test_cuda_equals_cpu(doi, layer):
    if layer is None and doi.at == "layer":
        pytest.skip("a path at the slice needs a slice")
    m = cnn()
    x = torch.rand(32, 1, 28, 28)
    cpu = influence(m, x, layer, ComparativeQoI(3, 8), doi, per_input=True, multiply=True)
    gpu = influence(m, x, layer, ComparativeQoI(3, 8), doi, per_input=True, multiply=True,
                    device="cuda")
    assert gpu.device.type == "cuda"
    assert next(m.parameters()).device.type == "cpu"  # the caller's model stays where it was
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4, rtol=1e-3)


def test_model_on_cuda_and_default_budget():
    m = cnn().cuda()
    x = torch.rand(64, 1, 28, 28, device="cuda")
    chi = influence(m, x, "3", ClassQoI(1), LinearDoI(50))  # chunk from free GPU memory
    ref = influence(m.cpu(), x.cpu(), "3", ClassQoI(1), LinearDoI(50))
    assert torch.allclose(chi.cpu(), ref, atol=1e-4, rtol=1e-3)


def test_experts_and_interpretation_on_cuda():
    m = cnn().cuda()
    x = torch.rand(16, 1, 28, 28, device="cuda")
    r = experts(m, x, "3", ClassQoI(2), k=3, bootstrap=10)
    assert len(r.experts) == 3
    assert interpret(m, x[:2], "3", r.units[0], resolution=8).shape == (2, 1, 28, 28)

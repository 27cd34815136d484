"""DecoyMNIST's network and the project's named architectures (``arch = "decoy-cnn"`` in a TOML).

Layers are named submodules: the influence engine addresses slices by ``named_modules()`` name
(``"conv1"``, ``"conv2"``, ``"fc1"``). ReLUs are never in-place (hooks read the conv outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.methods.training import load_state_into, load_weights_only

__all__ = ["ARCHITECTURES", "EXPERT_LAYERS", "DecoyCNN", "build_model", "load_checkpoint"]

EXPERT_LAYERS = ("conv1", "conv2", "fc1")


class DecoyCNN(nn.Module):
    """Two 5×5 conv blocks and two dense layers for 1×28×28 inputs in [0, 1].

    ``padding=2`` keeps the corners in view, so the network can (and does) learn the RRR corner
    decoy; with ``padding=0`` the 5×5 kernels barely see the corner patch (DESIGN §5).
    """

    expert_layers = EXPERT_LAYERS

    def __init__(self, padding: int = 2, channels: tuple[int, int] = (16, 32), hidden: int = 128,
                 n_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        c1, c2 = channels
        self.padding = padding
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side = ((image_size + 2 * padding - 4) // 2 + 2 * padding - 4) // 2
        if side <= 0:
            raise ValueError(f"padding={padding} leaves no spatial extent for {image_size}px input")
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {  # keys: priors.ARCH_NAMES
    "decoy-cnn": DecoyCNN,
    "decoy-cnn-unpadded": lambda **kw: DecoyCNN(**{"padding": 0, **kw}),
}


def build_model(arch: str = "decoy-cnn", **kwargs) -> nn.Module:
    """Instantiate a registered architecture; ``kwargs`` go to its constructor."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}") \
            from None
    return factory(**kwargs)


def load_checkpoint(path: str | Path, arch: str = "decoy-cnn", **kwargs) -> nn.Module:
    """Build ``arch`` (with ``kwargs``) and load the state dict at ``path``; the model is in eval mode.

    Loads with ``weights_only=True``. Raises a one-line ``ValueError`` when the file is missing or
    unreadable, is not a state dict, or does not fit the architecture.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist or is not a file")
    hint = "expected a state dict (model.state_dict()) saved with torch.save"
    obj = load_weights_only(path, where, hint)
    return load_state_into(build_model(arch, **kwargs), obj, where, f"architecture {arch!r}",
                           hint)

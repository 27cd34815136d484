"""The MTCNN O-Net (Zhang et al. 2016) as this project's own module, and the face detector case model.

The pretrained weights are the state dict ``facenet_pytorch/data/onet.pt`` that ships inside the
``facenet-pytorch`` wheel (MIT). This module only *reads that file* (``torch.load(...,
weights_only=True)``); it never imports the package (whose own dependencies pin an old torch). The
parameter names below match facenet-pytorch's ``ONet`` so its state dict loads unchanged.

Input convention (MTCNN's): 48×48 RGB, pixel values ``v`` in [0, 255] scaled as
``(v − 127.5) / 128``, i.e. ``(x − MEAN) / STD`` for ``x`` in [0, 1] with ``MEAN = 0.5`` and
``STD = 128 / 255`` per channel.

O-Net's own classification head orders its two outputs (non-face, face); :class:`FaceDetector`
returns them in the case's order, ``CLASS_NAMES = ("face", "non-face")``: class 0 is "face".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from core.cases.seam import SourceError

__all__ = [
    "CLASS_NAMES",
    "FACE",
    "INSTALL_HINT",
    "LAYERS",
    "MEAN",
    "NON_FACE",
    "STD",
    "FaceDetector",
    "ONet",
    "onet_weights_path",
    "pretrained_detector",
    "pretrained_state",
]

CLASS_NAMES = ("face", "non-face")
FACE, NON_FACE = 0, 1
MEAN = (0.5, 0.5, 0.5)
STD = (128 / 255, 128 / 255, 128 / 255)
INPUT_SIZE = 48
# The slices worth asking about: each conv's output (before its PReLU) and the dense layer's.
LAYERS = ("onet.conv1", "onet.conv2", "onet.conv3", "onet.conv4", "onet.dense5")
INSTALL_HINT = ("pip install --no-deps facenet-pytorch==2.6.0 (or `make run`, which installs it); "
                "the faces case reads only its onet.pt weights file")


class _ChannelsLastFlatten(nn.Module):
    """(N, C, H, W) → (N, W·H·C): the (W, H, C) flatten order O-Net's dense layer was trained on
    (the weights come from a TensorFlow/Caffe port; facenet-pytorch permutes (0, 3, 2, 1))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class ONet(nn.Module):
    """MTCNN's output network for 3×48×48 inputs, with facenet-pytorch's parameter names.

    ``forward`` returns the tuple ``(classification, box, landmarks)``: pre-softmax logits
    (N, 2) in O-Net's order (non-face, face), box regression (N, 4) and landmarks (N, 10): the five
    points' x coordinates then their y coordinates, each as a fraction of the input's width/height.
    Activations are PReLU modules (never in place), so hooks read every conv's output unchanged.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.flatten = _ChannelsLastFlatten()
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared 256-d representation (after ``prelu5``) every head reads."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        return self.prelu5(self.dense5(self.flatten(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.dense6_1(h), self.dense6_2(h), self.dense6_3(h)


class FaceDetector(nn.Module):
    """O-Net's face/non-face classifier as a plain classifier: ``forward`` returns ONLY the
    pre-softmax logits (N, 2) in the case's order ``CLASS_NAMES = ("face", "non-face")``.

    The O-Net is the submodule ``onet``, so layers are ``"onet.conv1"`` … ``"onet.conv4"``,
    ``"onet.dense5"`` (see ``LAYERS``). ``pretrained=True`` loads the wheel's weights.
    Inputs: (N, 3, 48, 48) scaled as in MTCNN (see the module docstring).
    """

    class_names = CLASS_NAMES
    expert_layers = LAYERS

    def __init__(self, pretrained: bool = False):
        super().__init__()
        self.onet = ONet()
        if pretrained:
            self.load_state_dict(pretrained_state())
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.onet(x)[0]
        return torch.stack((logits[:, 1], logits[:, 0]), dim=1)  # (face, non-face)

    @torch.no_grad()
    def landmarks(self, x: torch.Tensor) -> torch.Tensor:
        """O-Net's five landmarks (left eye, right eye, nose, left and right mouth corner) as
        (N, 5, 2) positions ``(x, y)`` = (column, row) in pixels of the input, continuous
        coordinates (pixel ``i`` covers [i, i + 1)): the head's fractions × width / height."""
        points = self.onet(x)[2]
        h, w = x.shape[-2:]
        return torch.stack((points[:, :5] * w, points[:, 5:] * h), dim=2)


def onet_weights_path() -> Path:
    """The path of ``onet.pt`` inside the installed facenet-pytorch wheel.

    Located with ``importlib.util.find_spec`` (which does not run the package). Raises a one-line
    :class:`~core.cases.seam.SourceError` naming the install command when the package or file is missing.
    """
    try:
        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        spec = None
    roots = [] if spec is None else list(spec.submodule_search_locations or [])
    for root in roots:
        path = Path(root) / "data" / "onet.pt"
        if path.is_file():
            return path
    if not roots:
        raise SourceError(f"the faces case needs the pretrained O-Net weights from facenet-pytorch, "
                          f"which is not installed: {INSTALL_HINT}")
    raise SourceError(f"facenet-pytorch is installed but has no data/onet.pt under {roots[0]}: "
                      f"reinstall it with {INSTALL_HINT}")


def pretrained_state() -> dict[str, torch.Tensor]:
    """:class:`FaceDetector`'s state dict (keys ``"onet.conv1.weight"`` …) from the wheel's
    ``onet.pt``, read with ``weights_only=True``. SourceError (one line) when missing/unreadable."""
    path = onet_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file: say which and how to fix it, in one line
        raise SourceError(f"{path} could not be read as a state dict ({type(exc).__name__}); "
                          f"reinstall: {INSTALL_HINT}") from exc
    if not isinstance(state, dict):
        raise SourceError(f"{path} is not a state dict; reinstall: {INSTALL_HINT}")
    return {f"onet.{k}": v for k, v in state.items()}


def pretrained_detector() -> FaceDetector:
    """A :class:`FaceDetector` with the pretrained O-Net weights, in eval mode on the CPU
    (a zero-argument factory for the case's models)."""
    return FaceDetector(pretrained=True)

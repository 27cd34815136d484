"""Device choice (CUDA when there is one, else CPU; always overridable) and a model's device and mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here; "
                         "use --device cpu or leave the device unset")
    return device


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Where the model's parameters (else buffers) live; ``default`` for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def build_threads(device) -> Iterator[None]:
    """A context for a build on ``device``. On the CPU: intra-op threads ``$CASEBOOK_THREADS``,
    default 1, and torch's deterministic algorithms (warn-only) for the build; both restored
    afterwards. On CUDA it changes nothing.

    The models are small: a second thread buys little, and on a shared machine torch's spinning
    workers make training many times slower (measured 1.7 s with one thread against 14.5 s with
    two on a busy 2-core box).
    """
    if str(device).startswith("cuda"):
        yield
        return
    try:
        n = max(1, int(os.environ.get("CASEBOOK_THREADS", "1")))
    except ValueError:
        n = 1
    before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    # as deterministic as torch allows: ops with a deterministic variant use it, the rest warn
    # (measured: a 1- vs a 2-thread build of decoy-mnist still moves 181 of its 220 numeric README
    # claims in their last digits, all within their tolerances; README.claims.json checks that)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(deterministic)

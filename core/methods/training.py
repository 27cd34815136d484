"""Training any ``nn.Module`` classifier: a seeded loop with progress callbacks, BatchNorm
recalibration, batched prediction and accuracy, weight digests, and checkpoint I/O
(``torch.load(weights_only=True)`` only). No architecture lives here: the project's named ones are
in :mod:`core.cases.decoy_mnist.net`, a user's come from their factory (:mod:`core.cases.factories`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.engine.devices import eval_mode, model_device, pick_device

__all__ = [
    "evaluate",
    "load_state_into",
    "load_weights_only",
    "predict_logits",
    "recalibrate_batchnorm",
    "save_checkpoint",
    "set_seed",
    "state_digest",
    "train_model",
]

ProgressFn = Callable[[int, int, dict], None]
ExtraLossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                       torch.Tensor]
ForwardFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor | None]]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); cuDNN made deterministic (cheap)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _check_xy(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        raise ValueError(f"y must be a tensor with {x.shape[0]} labels, "
                         f"got {getattr(y, 'shape', type(y).__name__)}")


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10,
                lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                device: str | torch.device | None = None, progress: ProgressFn | None = None,
                extra_loss: ExtraLossFn | None = None, forward: ForwardFn | None = None,
                weight_decay: float = 0.0, foreach: bool | None = None) -> dict:
    """Train ``model`` in place with Adam on cross-entropy (+ ``extra_loss``); return the history.

    ``progress(done_steps, total_steps, info)`` is called after every batch (``info`` has epoch,
    loss of that batch). ``extra_loss(model, xb, yb, logits, idx)`` is added to the mean
    cross-entropy, where ``idx`` (int64, on the device) are the batch's indices into ``x`` so the
    caller can fetch per-example data such as masks. ``forward(model, xb, yb, idx) -> (logits,
    extra)`` replaces the plain ``model(xb)`` when the extra loss needs the forward itself (a
    gradient penalty keeps the forward's graph for a double backward: one forward serves both
    losses); ``extra`` (None: nothing) is added to the cross-entropy. ``foreach`` is Adam's
    (None: torch's default; True: one vectorised update over all parameters, the same
    arithmetic). Shuffling uses a ``torch.Generator`` seeded
    with ``seed``; the global RNGs are also reseeded with ``set_seed(seed)`` (for any stochastic
    layer). The parameters' initial values are whatever ``model`` holds: call ``set_seed`` before
    building it for a reproducible run. The model ends in eval mode on ``device``.

    When the model has BatchNorm layers their running statistics are recomputed at the end from
    the final weights (:func:`recalibrate_batchnorm`, batches of ``batch_size`` over ``x``): the
    running averages kept during training mix statistics of earlier weights, and on a small set
    (few steps per epoch, a fast optimiser) they no longer describe the final model, so eval mode
    can fall to chance while train mode fits (a torchvision resnet18 on 108 images: 33% → 100%).

    Returns ``{"loss": [per epoch], "acc": [per epoch train acc, running], "seconds": float,
    "epochs", "steps", "device", "batchnorm_recalibrated": number of BatchNorm layers}``.
    """
    _check_xy(x, y)
    if epochs < 0 or batch_size <= 0:
        raise ValueError(f"need epochs >= 0 and batch_size > 0, got {epochs}, {batch_size}")
    dev = pick_device(device)
    set_seed(seed)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=foreach)
    gen = torch.Generator().manual_seed(seed)
    n = int(x.shape[0])
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs
    x_dev = x.to(dev)
    y_dev = y.to(dev).long()
    history: dict = {"loss": [], "acc": [], "seconds": 0.0, "epochs": epochs, "steps": total,
                     "device": str(dev)}
    t0 = time.perf_counter()
    done = 0
    model.train()
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                xb, yb = x_dev[idx], y_dev[idx]
                logits, extra = (model(xb), None) if forward is None else forward(
                    model, xb, yb, idx)
                loss = F.cross_entropy(logits, yb)
                if extra is not None:
                    loss = loss + extra
                if extra_loss is not None:
                    loss = loss + extra_loss(model, xb, yb, logits, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                batch_loss = float(loss.detach())
                loss_sum += batch_loss * len(idx)
                correct += int((logits.detach().argmax(1) == yb).sum())
                done += 1
                if progress is not None:
                    progress(done, total, {"epoch": epoch, "loss": batch_loss})
            history["loss"].append(loss_sum / max(n, 1))
            history["acc"].append(correct / max(n, 1))
        history["batchnorm_recalibrated"] = (
            recalibrate_batchnorm(model, x_dev, batch_size=batch_size) if epochs > 0 else 0)
    finally:
        model.eval()
        history["seconds"] = time.perf_counter() - t0
    return history


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 64,
                          device: str | torch.device | None = None) -> int:
    """Recompute every BatchNorm layer's running mean and variance from ``model``'s current weights.

    Runs ``x`` through the model in batches of ``batch_size`` with only the BatchNorm layers in
    train mode (dropout and the like stay in eval mode) and ``momentum=None``, so each layer's
    running statistics become the plain average of the batch statistics the final weights give
    (what train mode normalises with), not an exponential average over earlier weights. A last
    batch of one image joins the one before (train-mode BatchNorm needs two values per channel).
    Every module's mode and every layer's momentum are restored. Returns the number of layers
    recalibrated (0 when the model has none or ``x`` has fewer than two images: nothing changes).
    """
    _check_xy(x)
    bns = _batchnorms(model)
    n = int(x.shape[0])
    if not bns or n < 2 or batch_size <= 0:
        return 0
    dev = pick_device(device) if device is not None else model_device(model)
    starts = list(range(0, n, batch_size))
    if n - starts[-1] == 1 and len(starts) > 1:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [n], strict=True))
    modes = {m: m.training for m in model.modules()}
    momenta = [b.momentum for b in bns]
    try:
        model.eval()
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # cumulative average over the batches below
            b.train()
        for lo, hi in bounds:
            model(x[lo:hi].to(dev))
    finally:
        for b, momentum in zip(bns, momenta, strict=True):
            b.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return len(bns)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Logits for ``x`` in batches, in eval mode (the model's mode is restored); on the CPU."""
    _check_xy(x)
    dev = pick_device(device) if device is not None else model_device(model)
    with eval_mode(model):
        out = [model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, int(x.shape[0]),
                                                                         batch_size)]
    if not out:
        n_out = getattr(model, "fc2", None)
        return torch.zeros(0, getattr(n_out, "out_features", 0))
    return torch.cat(out)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512,
             device: str | torch.device | None = None) -> float:
    """Accuracy of ``model`` on ``(x, y)`` (no grad, eval mode; the model's mode is restored)."""
    _check_xy(x, y)
    if int(x.shape[0]) == 0:
        return float("nan")
    pred = predict_logits(model, x, batch_size=batch_size, device=device).argmax(1)
    return float((pred == y.cpu()).float().mean())


def state_digest(model: nn.Module) -> str:
    """sha256 hex over the state dict (sorted keys, dtype, shape, bytes): a cache key for weights."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Save ``model.state_dict()`` (on the CPU) to ``path`` atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _few(keys, k: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:k]) + (f" (+{len(keys) - k} more)" if len(keys) > k else "")


def load_weights_only(path: str | Path, where: str, hint: str, error: type = ValueError):
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers
    only, never code. Returns what the file holds; any failure is one line of ``error`` starting
    with ``where`` — pickled objects named by their class, or why torch.load could not read it —
    and ending with ``hint``."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise error(f"{where} holds pickled objects ({found.group(1)}), not a state dict of "
                        f"plain tensors; {hint}") from exc
        if isinstance(exc, pickle.UnpicklingError | EOFError | RuntimeError | OSError):
            reason = "not a torch.save file, or truncated / corrupt"
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            reason = f"{type(exc).__name__}: {lines[0][:120] if lines else 'no detail'}"
        raise error(f"{where} could not be read by torch.load ({reason}); {hint}") from exc


def load_state_into(model: nn.Module, obj, where: str, what: str, hint: str,
                    error: type = ValueError) -> nn.Module:
    """Load a checkpoint's contents ``obj`` into ``model`` and return it in eval mode.

    Accepts a plain state dict, ``{"state_dict": ...}`` or ``{"model": ...}``, and strips a
    ``module.`` prefix (DataParallel) when every key has it and the model's keys do not. One line
    of ``error`` (starting with ``where``, naming ``what`` it should match) when it is not a dict of
    tensors, when keys are missing or unexpected (a few of each), or shapes differ."""
    state = obj
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state:
        raise error(f"{where} holds a {type(state).__name__}, not a state dict; {hint}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or
           not isinstance(v, torch.Tensor)]
    if bad:
        raise error(f"{where} is a dict but not of tensors (e.g. {_few(bad)}); {hint}")
    expected = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(k.startswith("module.")
                                                               for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_few(unexpected)}"] if unexpected else [])
        raise error(f"{where} does not match {what}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise error(f"{where} does not match {what}: shape mismatch (checkpoint vs model): "
                    f"{_few(wrong, 3)}")
    model.load_state_dict(state)
    return model.eval()

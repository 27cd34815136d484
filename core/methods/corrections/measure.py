"""Measuring a model for the corrections table: accuracy on every evaluation set, region mass of
its Integrated Gradients maps, per-image correctness, the paired comparison of two models on the
same images (exact McNemar), and the share of the gap to the reference that a correction closes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.engine.influence import model_device
from core.methods.corrections.common import ig_maps
from core.methods.metrics import region_mass as per_image_mass
from core.methods.training import evaluate, predict_logits

__all__ = [
    "correct_on",
    "gap_closed",
    "measure",
    "paired_difference",
]


def measure(model: nn.Module, data, *, n_explain: int = 200, resolution: int = 16) -> dict:
    """The model's accuracy on every evaluation set of the data (``<set>_acc``; DecoyMNIST:
    ``decoy_test_acc``, ``clean_test_acc``, …) and on the validation split (``val_acc``), and,
    when the case has a region, the mean region mass (``region_mass`` and the case's alias,
    ``decoy_mass`` for DecoyMNIST) of the model's Integrated Gradients maps (label logit) on the
    first ``n_explain`` test images."""
    dev = model_device(model)
    out = {f"{name}_acc": float(evaluate(model, s.x, s.y))
           for name, s in getattr(data, "evaluation_sets", {}).items()}
    if not out:  # a bare object with test/val splits (tests)
        out["decoy_test_acc"] = float(evaluate(model, data.test.x, data.test.y))
        if getattr(data.test, "x_clean", None) is not None:
            out["clean_test_acc"] = float(evaluate(model, data.test.x_clean, data.test.y))
    out["val_acc"] = float(evaluate(model, data.val.x, data.val.y))
    if data.test.mask is None:
        return out
    n = min(n_explain, data.test.n)
    dm = float("nan")
    if n > 0:
        x = data.test.x[:n].to(dev)
        y = data.test.y[:n].to(dev)
        maps = ig_maps(model, x, y, resolution)
        mass = per_image_mass(maps[:, None], data.test.mask[:n].to(dev))
        ok = torch.isfinite(mass)
        dm = float(mass[ok].mean()) if ok.any() else float("nan")
    out["region_mass"] = dm
    alias = (getattr(data, "extra", None) or {}).get("region_alias")
    if alias:
        out[alias] = dm
    return out


def correct_on(model: nn.Module, split) -> Tensor:
    """Per image of ``split``: whether ``model``'s prediction is the label (bool (N,), CPU)."""
    if split.n == 0:
        return torch.zeros(0, dtype=torch.bool)
    return predict_logits(model, split.x).argmax(1) == split.y.cpu()


def paired_difference(after: Tensor, before: Tensor, alpha: float = 0.05) -> dict:
    """A paired comparison of two models' per-image correctness on the same images.

    Returns ``{"delta": acc_after − acc_before, "delta_se": its paired standard error
    √((b + c)/n² − (b − c)²/n³), "b": images only ``after`` gets right, "c": images only
    ``before`` gets right, "n", "p_value": two-sided exact McNemar (binomial on b of b + c at ½),
    "verdict": "better" / "worse" when p < ``alpha``, else "tie", "alpha"}``.
    """
    n = int(after.numel())
    b = int((after & ~before).sum())
    c = int((~after & before).sum())
    if n == 0:
        return {"delta": None, "delta_se": None, "b": 0, "c": 0, "n": 0, "p_value": None,
                "verdict": "tie", "alpha": alpha}
    delta = (b - c) / n
    se = math.sqrt(max((b + c) / n ** 2 - (b - c) ** 2 / n ** 3, 0.0))
    k, m = min(b, c), b + c
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    verdict = "tie" if p >= alpha else ("better" if delta > 0 else "worse")
    return {"delta": delta, "delta_se": se, "b": b, "c": c, "n": n, "p_value": p,
            "verdict": verdict, "alpha": alpha}


def gap_closed(acc: float, vanilla: float, clean: float) -> float | None:
    """(acc − vanilla) / (clean − vanilla); None when the clean reference does not beat vanilla
    (then there is no gap to close and the ratio means nothing)."""
    denom = clean - vanilla
    if not math.isfinite(denom) or denom < 1e-9:
        return None
    return (acc - vanilla) / denom


"""The correction methods by name: what each is called, what it uses to know where the shortcut
is (a pixel mask, a location prior, nothing), which are controls; :func:`correct` runs one and
:func:`build_corrected` rebuilds a corrected model's shell from its record for ``load_state_dict``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.engine.influence import get_layer, model_device
from core.methods.corrections.common import Correction, set_submodule
from core.methods.corrections.counterexamples import correct_counterexamples
from core.methods.corrections.finetune import correct_finetune
from core.methods.corrections.influence_penalty import correct_influence_penalty
from core.methods.corrections.pclarc import ConceptProjection, correct_pclarc
from core.methods.corrections.rrr import correct_rrr
from core.methods.corrections.suppression import UnitScale, correct_suppression

__all__ = [
    "CONTROLS",
    "CORRECTORS",
    "CorrectionMethod",
    "LABELS",
    "MASK_NOTES",
    "METHODS",
    "RECORDS",
    "USES",
    "USES_MASK",
    "USES_OF",
    "build_corrected",
    "correct",
]


@dataclass(frozen=True)
class CorrectionMethod:
    """One correction method as one record: its name, label, whether it needs the region's
    per-image masks (and why), what it uses to know where the shortcut is (``uses``: "pixel
    mask", "location prior" — a fixed guess of where the object is not, e.g. the image border —
    or "nothing"), and whether it is a control."""

    name: str
    label: str
    uses_mask: bool
    mask_note: str
    uses: str
    control: bool = False

    def __post_init__(self):
        if self.uses not in USES:
            raise ValueError(f"{self.name}: uses must be one of {USES}, got {self.uses!r}")


USES = ("pixel mask", "location prior", "nothing")


RECORDS: dict[str, CorrectionMethod] = {r.name: r for r in [
    CorrectionMethod("suppression", "Expert suppression", False,
                     "a location prior, no pixel mask: experts chosen by influence and by where "
                     "their interpretation falls (the image border, a prior on where the object "
                     "is not; DecoyMNIST: outside the central 20×20 digit box)", "location prior"),
    CorrectionMethod("pclarc", "P-ClArC", True,
                     "needs region-free twins of the training images to build the concept "
                     "direction; making them requires knowing where the region is, so it counts "
                     "as using the mask", "pixel mask"),
    CorrectionMethod("rrr", "RRR", True, "the exact per-image region mask in the penalty",
                     "pixel mask"),
    CorrectionMethod("influence_penalty", "Influence penalty", False,
                     "a location prior, no pixel mask: the penalised region is found from the "
                     "model's distributional influence on the image border (a prior on where the "
                     "object is not), the same region for every image", "location prior"),
    CorrectionMethod("counterexamples", "Counterexamples", True,
                     "the region of every training image (its pixels are randomised)",
                     "pixel mask"),
    CorrectionMethod("finetune", "Fine-tuning only (control)", False,
                     "nothing: the same fine-tuning as RRR with λ = 0 (a control, not a "
                     "correction)", "nothing", control=True),
]}

# Views of the records (kept for the pages and tests that read them by name).
METHODS = tuple(RECORDS)
CONTROLS = tuple(n for n, r in RECORDS.items() if r.control)
LABELS = {n: r.label for n, r in RECORDS.items()}
USES_MASK = {n: r.uses_mask for n, r in RECORDS.items()}
MASK_NOTES = {n: r.mask_note for n, r in RECORDS.items()}
USES_OF = {n: r.uses for n, r in RECORDS.items()}



CORRECTORS: dict[str, Callable[..., Correction]] = {
    "suppression": correct_suppression,
    "pclarc": correct_pclarc,
    "rrr": correct_rrr,
    "influence_penalty": correct_influence_penalty,
    "counterexamples": correct_counterexamples,
    "finetune": correct_finetune,
}


def correct(method: str, model: nn.Module, data, **options) -> Correction:
    """Run one correction by name (options: that method's keyword arguments)."""
    try:
        fn = CORRECTORS[method]
    except KeyError:
        raise ValueError(f"unknown correction {method!r}; valid: {', '.join(METHODS)}") from None
    return fn(model, data, **options)


def build_corrected(name: str, vanilla_model: nn.Module, record: dict | None) -> nn.Module:
    """An empty-shell model for correction ``name``, ready for ``load_state_dict``.

    Corrections that change only weights (suppression folded into the next layer, rrr,
    influence_penalty, counterexamples) are the vanilla architecture; P-ClArC wraps its layer in
    a :class:`ConceptProjection` (its ``v`` and ``z_bar`` come from the state dict), suppression
    that could not be folded in a :class:`UnitScale` (spec ``{"wrap": "scale", ...}``).
    """
    model = copy.deepcopy(vanilla_model)
    spec = (record or {}).get("spec")
    if spec and spec.get("wrap") == "projection":
        inner = get_layer(model, spec["layer"])
        dim = int(spec["dim"])
        set_submodule(model, spec["layer"],
                       ConceptProjection(inner, torch.ones(dim), torch.zeros(dim)))
    elif spec and spec.get("wrap") == "scale":
        inner = get_layer(model, spec["layer"])
        set_submodule(model, spec["layer"],
                       UnitScale(inner, spec["units"], spec["damping"]).to(model_device(model)))
    elif spec:
        raise ValueError(f"correction {name!r}: unknown model spec {spec!r}")
    return model


"""The seam every case plugs into: what a data adapter returns (DESIGN §9).

A case is a data adapter + named models + an optional region + an optional reference model.
Stages, pages and metrics read only this: class counts, image sizes, channels and the region's
name all come from a :class:`CaseData`, never from constants.

    data = adapter(config, base_dir)          # -> CaseData
    data.train.x        # (N, C, H, W) float32 in the model's input scale
    data.train.y        # (N,) int64 class indices into data.class_names
    data.train.mask     # (N, 1, H, W) bool region masks, or None (no region)
    data.train.x_clean  # the same images without the region, when the adapter can make them
    data.training_sets  # {"train": Split, ...}: what each model may be trained on (`train_on`)
    data.evaluation_sets  # {"test": Split, ...}: accuracy f"{name}_acc" per model in the report
    data.headline       # the evaluation set the headline accuracy and gap_closed use
    data.display(x)     # images in [0, 1] as (N, H, W) or (N, H, W, 3) NumPy, un-normalised
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["CaseData", "Split", "SourceError"]


class SourceError(ValueError):
    """Data or a model a case names cannot be used; the message is one line saying what to change."""


@dataclass(frozen=True, eq=False)
class Split:
    """Images ``x`` (N, C, H, W) float32, labels ``y`` (N,) int64, optional region ``mask``
    (N, 1, H, W) bool and optional ``x_clean`` (the same images with the region removed)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None = None
    x_clean: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def __len__(self) -> int:
        return self.n

    def subset(self, index) -> Split:
        """The rows ``index`` (a tensor of indices or a boolean mask) of every field."""
        pick = (lambda t: None if t is None else t[index])
        return Split(x=self.x[index], y=self.y[index], mask=pick(self.mask),
                     x_clean=pick(self.x_clean))


@dataclass(frozen=True, eq=False)
class CaseData:
    """What a data adapter gives: the splits, class names, region, display convention.

    ``training_sets`` always holds ``"train"`` (defaults to ``{"train": train}``);
    ``evaluation_sets`` defaults to ``{"val": val, "test": test}`` and ``headline`` to ``"test"``.
    ``mean``/``std`` (per channel) describe the normalisation the model expects: the display is
    ``x * std + mean`` clipped to [0, 1]. ``region_name`` is None when the case has no region;
    then no split carries a mask.
    """

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    source: str
    seed: int = 0
    region_name: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    training_sets: Mapping[str, Split] = field(default_factory=dict)
    evaluation_sets: Mapping[str, Split] = field(default_factory=dict)
    headline: str = "test"
    extra: Mapping[str, object] = field(default_factory=dict)  # adapter-specific facts (plain)

    def __post_init__(self):
        if not self.training_sets:
            object.__setattr__(self, "training_sets", {"train": self.train})
        if not self.evaluation_sets:
            object.__setattr__(self, "evaluation_sets", {"val": self.val, "test": self.test})
        if self.headline not in self.evaluation_sets:
            raise ValueError(f"headline {self.headline!r} is not an evaluation set "
                             f"({', '.join(self.evaluation_sets)})")
        if self.region_name is None and any(s.mask is not None for s in (self.train, self.val,
                                                                            self.test)):
            object.__setattr__(self, "region_name", "region")

    # ------------------------------------------------------------------ shape facts
    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.train.x.shape[-2]), int(self.train.x.shape[-1])

    @property
    def has_region(self) -> bool:
        return self.test.mask is not None

    @property
    def chance(self) -> float | None:
        """The region's mean share of the image on the test split (region mass of a uniform
        positive map); None without a region."""
        if self.test.mask is None or self.test.n == 0:
            return None
        return float(self.test.mask.double().mean())

    # ------------------------------------------------------------------ display
    def display(self, x) -> np.ndarray:
        """Images (N, C, H, W) or (C, H, W) in the model's scale → [0, 1] float32 NumPy,
        (N, H, W) for one channel, (N, H, W, 3) for three (un-normalised with ``mean``/``std``)."""
        t = torch.as_tensor(x).detach().cpu().float()
        single = t.dim() == 3
        if single:
            t = t[None]
        if self.std is not None:
            t = t * torch.tensor(self.std).view(1, -1, 1, 1)
        if self.mean is not None:
            t = t + torch.tensor(self.mean).view(1, -1, 1, 1)
        t = t.clamp(0, 1)
        out = t[:, 0].numpy() if t.shape[1] == 1 else t.permute(0, 2, 3, 1).numpy()
        return out[0] if single else out

    # ------------------------------------------------------------------ identity
    @functools.cached_property
    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.source}|{self.seed}|{'|'.join(self.class_names)}|{self.region_name}|"
                 f"{self.mean}|{self.std}|{self.headline}".encode())
        sets = {"train": self.train, "val": self.val, "test": self.test,
                **{f"train:{k}": v for k, v in self.training_sets.items()},
                **{f"eval:{k}": v for k, v in self.evaluation_sets.items()}}
        for name, split in sets.items():
            for fname in ("x", "y", "mask", "x_clean"):
                t = getattr(split, fname)
                if t is None:
                    h.update(f"|{name}.{fname}:none|".encode())
                    continue
                t = t.detach().cpu().contiguous()
                h.update(f"|{name}.{fname}:{t.dtype}:{tuple(t.shape)}|".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    def digest(self) -> str:
        """sha256 hex over every split's tensors and the case's facts: stable across runs."""
        return self._digest

    def describe(self) -> dict:
        """Plain facts for the report: source, sizes, classes, image shape, region."""
        return {"source": self.source, "n_train": self.train.n, "n_val": self.val.n,
                "n_test": self.test.n, "classes": list(self.class_names),
                "channels": self.channels, "size": list(self.size),
                "region": self.region_name, "headline": self.headline,
                "training_sets": list(self.training_sets),
                "evaluation_sets": list(self.evaluation_sets)}

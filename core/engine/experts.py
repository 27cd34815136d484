"""Experts: the units with the largest distributional influence, their stability and interpretation.

A unit is a channel of a convolutional slice (its spatial influence map reduced by "sum" or "max")
or a neuron of a flat slice. An expert is interpreted by the influence of that unit's activation on
the input over a linear path from a baseline, times (x − x'): an attribution map over the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from core.engine.distributions import Distribution, LinearDoI, PointDoI
from core.engine.influence import influence
from core.engine.quantities import Quantity, UnitQoI


def unit_scores(chi: Tensor, reduce: str = "sum") -> Tensor:
    """One score per unit from influence shaped like one example's slice (or (N, ...) per input).

    (C, H, W) → C channel scores (spatial map summed or maxed); (F,) → F neuron scores.
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', not {reduce!r}")
    return _reduce_units(chi.unsqueeze(0), reduce)[0]


def _reduce_units(per: Tensor, reduce: str) -> Tensor:
    """(N, C, ...) → (N, C)."""
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', not {reduce!r}")
    if per.dim() <= 2:
        return per
    flat = per.flatten(2)
    return flat.sum(2) if reduce == "sum" else flat.max(2).values


@dataclass
class Expert:
    unit: int
    score: float
    rank: int
    frequency: float | None = None  # share of bootstrap resamples with the unit in the top k
    ci_low: float | None = None  # bootstrap percentile interval of the score
    ci_high: float | None = None


@dataclass
class ExpertRanking:
    """The top-k experts of one layer for one quantity and distribution, with every unit's score."""

    layer: str
    quantity: str
    distribution: str
    reduce: str
    k: int
    experts: list[Expert]
    scores: Tensor  # (units,) every unit's score
    n_inputs: int
    bootstrap: int = 0

    @property
    def units(self) -> list[int]:
        return [e.unit for e in self.experts]

    def to_records(self) -> list[dict]:
        return [asdict(e) for e in self.experts]


def rank_units(scores: Tensor, k: int, by: str = "value") -> Tensor:
    """Indices of the k largest scores (``by="abs"``: largest magnitude), largest first."""
    if by not in ("value", "abs"):
        raise ValueError(f"by must be 'value' or 'abs', not {by!r}")
    key = scores.abs() if by == "abs" else scores
    k = min(int(k), len(scores))
    return torch.topk(key, k).indices


def _check_ranking(k: int, reduce: str, by: str) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', not {reduce!r}")
    if by not in ("value", "abs"):
        raise ValueError(f"by must be 'value' or 'abs', not {by!r}")


def _check_bootstrap(bootstrap, confidence) -> None:
    """A one-line ValueError for a bootstrap count or confidence out of bounds; returns None."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) \
            or not 0 <= bootstrap <= 100_000:
        raise ValueError("bootstrap must be an integer in 0–100000 (resamples; 0: none), "
                         f"got {bootstrap!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")


def experts(model: nn.Module, inputs: Tensor, layer: str, qoi: Quantity,
            doi: Distribution | None = None, *, k: int = 5, reduce: str = "sum", by: str = "value",
            bootstrap: int = 0, confidence: float = 0.9, seed: int = 0, **engine) -> ExpertRanking:
    """The top-``k`` units of ``layer`` by distributional influence on ``qoi`` over ``inputs``.

    Returns an :class:`ExpertRanking`: the experts (rank 1 first) and every unit's score.
    With ``bootstrap=B`` the inputs are resampled B times (seeded): each expert gets the share of
    resamples that keep it in the top k and a percentile interval of its score at ``confidence``.
    ``reduce`` ("sum" or "max") turns a channel's spatial influence map into its score.
    ``by="value"`` ranks by signed influence (units that raise the quantity); "abs" by magnitude.
    Extra keyword arguments go to :func:`core.engine.influence.influence`.
    """
    _check_ranking(k, reduce, by)
    _check_bootstrap(bootstrap, confidence)
    doi = PointDoI() if doi is None else doi
    per = influence(model, inputs, layer, qoi, doi, per_input=True, **engine)
    return _ranking(per, layer, qoi, doi, k=k, reduce=reduce, by=by, bootstrap=bootstrap,
                    confidence=confidence, seed=seed)


def experts_many(model: nn.Module, inputs: Tensor, layers: list[str], qoi: Quantity | list[Quantity],
                 doi: Distribution | None = None, *, k: int = 5, reduce: str = "sum",
                 by: str = "value", bootstrap: int = 0, confidence: float = 0.9, seed: int = 0,
                 **engine) -> dict[str, ExpertRanking] | list[dict[str, ExpertRanking]]:
    """:func:`experts` for several layers at once: ``{layer: ExpertRanking}``.

    Every ranking equals what a separate ``experts(model, inputs, layer, ...)`` call gives, but the
    influence of all layers comes from one forward and one backward pass per chunk (for a DoI at
    the input; a path at the slice still runs once per layer). With a list of quantities (e.g. one
    class each, on the same inputs), a list of such dicts, one per quantity, sharing the forward
    passes (one backward per quantity).
    """
    _check_ranking(k, reduce, by)
    _check_bootstrap(bootstrap, confidence)
    doi = PointDoI() if doi is None else doi
    listed = isinstance(qoi, list | tuple)
    qois = list(qoi) if listed else [qoi]
    per = influence(model, inputs, None, qois, doi, layers=list(layers), per_input=True, **engine)
    out = [{layer: _ranking(p[layer], layer, q, doi, k=k, reduce=reduce, by=by, bootstrap=bootstrap,
                            confidence=confidence, seed=seed) for layer in layers}
           for q, p in zip(qois, per, strict=True)]
    return out if listed else out[0]


def _ranking(per: Tensor, layer, qoi, doi, *, k, reduce, by, bootstrap, confidence, seed) -> ExpertRanking:
    # Reduce after averaging: "max" is not linear, so resample the per-input maps themselves.
    scores = _reduce_units(per.mean(0, keepdim=True), reduce)[0]
    top = rank_units(scores, k, by)
    result = ExpertRanking(layer=layer, quantity=repr(qoi), distribution=repr(doi), reduce=reduce,
                           k=len(top), experts=[], scores=scores.cpu(), n_inputs=len(per),
                           bootstrap=int(bootstrap))
    freq = low = high = None
    if bootstrap:
        boot = bootstrap_scores(per, reduce, bootstrap, seed)  # (B, units)
        key = boot.abs() if by == "abs" else boot
        in_top = torch.zeros_like(boot, dtype=torch.bool)
        in_top.scatter_(1, torch.topk(key, len(top), dim=1).indices, True)
        freq = in_top.float().mean(0)
        tail = (1 - confidence) / 2
        low = torch.quantile(boot, tail, dim=0)
        high = torch.quantile(boot, 1 - tail, dim=0)
    for rank, u in enumerate(top.tolist()):
        result.experts.append(Expert(
            unit=u, score=float(scores[u]), rank=rank + 1,
            frequency=None if freq is None else float(freq[u]),
            ci_low=None if low is None else float(low[u]),
            ci_high=None if high is None else float(high[u])))
    return result


def bootstrap_scores(per_input: Tensor, reduce: str, resamples: int, seed: int = 0) -> Tensor:
    """Unit scores of ``resamples`` bootstrap means of per-input influence: (resamples, units).

    All resamples at once: a (resamples, N) matrix of draw counts times the per-input maps.
    A "sum" score is linear, so the per-input unit scores are resampled instead of the maps.
    """
    n = len(per_input)
    g = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(n, (int(resamples), n), generator=g)
    weights = torch.zeros(int(resamples), n, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    weights /= n
    if reduce == "sum" or per_input.dim() <= 2:
        units = _reduce_units(per_input, "sum").double().cpu()
        return (weights @ units).float()
    means = weights @ per_input.flatten(1).double().cpu()
    return _reduce_units(means.view(-1, *per_input.shape[1:]), reduce).float()


def interpret(model: nn.Module, images: Tensor, layer: str, unit: int | tuple[int, ...], *,
              reduce: str = "sum", resolution: int = 50, baseline: Tensor | float | None = None,
              **engine) -> Tensor:
    """The expert's interpretation: attribution of the unit's activation to each input pixel.

    Influence at the input of ``UnitQoI(layer, unit)`` over a linear path from ``baseline`` (zeros
    by default) times (x − x'): Integrated Gradients of the unit. Shape (N, *input shape).
    """
    qoi = UnitQoI(layer, unit, reduce=reduce)
    return influence(model, images, None, qoi, LinearDoI(resolution, baseline=baseline),
                     per_input=True, multiply=True, **engine)


__all__ = ["Expert", "ExpertRanking", "experts", "experts_many", "unit_scores", "rank_units",
           "bootstrap_scores", "interpret"]

"""The shortcut rule: when an expert carries the shortcut, in numbers and in words.

An expert carries the shortcut when its region mass (the share of positive attribution its
interpretation puts on the case's region) exceeds its layer's threshold: the larger of a floor
(``factor`` × chance, chance being the region's share of the image) and a quantile of the region
mass of the reference model's experts in the same layer. Plain Python: no torch, so the report
can state the rule without loading a model.
"""

from __future__ import annotations

import math

__all__ = ["classes_of", "flag", "quantile", "rule_of", "shortcut_rule", "thresholds"]


def shortcut_rule(factor: float, quantile: float, *, chance: float, region: str,
                  reference: str | None) -> str:
    """The rule that flags an expert as carrying the shortcut, in words (it goes into the report),
    every share in percent (the pages' per-layer thresholds are in percent too)."""
    floor = (f"{factor:g} × chance ({chance:.2%}, the {region}'s share of the image), i.e. "
             f"{factor * chance:.1%}")
    base = (f"an expert carries the shortcut when its region mass — the share of positive "
            f"attribution its interpretation puts on the {region}, averaged over its class's test "
            "images — exceeds its layer's threshold: ")
    if quantile <= 0 or reference is None:
        return base + floor
    return base + (f"the larger of {floor}, and the {quantile:.0%} quantile of the region mass "
                   f"of the reference model's ({reference}) top experts in the same layer (a "
                   "model that does not use the region shows how much of it a unit picks up "
                   "anyway)")


def classes_of(section: dict, n_classes: int) -> list[int]:
    """The classes the stage ranks: ``[experts] classes``, else the first ten classes (all of
    them for ten or fewer)."""
    given = section.get("classes")
    return list(given) if given else list(range(min(n_classes, 10)))


def quantile(sorted_values: list[float], q: float) -> float:
    """The linear-interpolation quantile ``q`` in [0, 1] (NumPy's default) of an ascending
    list; NaN for an empty one. The shortcut rule's thresholds and the README's claims use it."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def thresholds(rows: list[dict], section: dict, chance: float | None,
               reference: str | None) -> dict[str, float] | None:
    """Per layer: the region mass above which an expert carries the shortcut (see
    :func:`shortcut_rule`): max(factor × chance, quantile q of the ``reference`` model's experts
    of that layer). None without a region (``chance`` None)."""
    if chance is None:
        return None
    e = section
    floor = e["shortcut_factor"] * chance
    q = e["shortcut_quantile"]
    out = {}
    for layer in e["layers"]:
        ref = sorted(r["region_mass"] for r in rows if r["model"] == reference
                     and r["layer"] == layer and r["region_mass"] is not None)
        out[layer] = max(floor, quantile(ref, q)) if q > 0 and ref else floor
    return out


def flag(row: dict, threshold: float | None) -> dict:
    """``row`` with ``threshold``, ``shortcut`` (its mean region mass above the threshold) and
    ``verdict``: "carries" or "does not" as ``shortcut`` says, but "undecided" when the mass's
    interval over the images (``mass_low`` … ``mass_high``, when the row has it) holds the
    threshold — a verdict on a knife edge is not a finding. Unchanged when the threshold is None
    (no region); verdict None without a mass."""
    if threshold is None:
        return dict(row)
    dm, lo, hi = row.get("region_mass"), row.get("mass_low"), row.get("mass_high")
    shortcut = bool(dm is not None and dm > threshold)
    if dm is None:
        verdict = None
    elif lo is not None and hi is not None and lo <= threshold < hi:
        verdict = "undecided"
    else:
        verdict = "carries" if shortcut else "does not"
    return {**row, "threshold": threshold, "shortcut": shortcut, "verdict": verdict}


def rule_of(section: dict, chance: float | None, region: str | None,
            reference: str | None) -> str | None:
    """The case's :func:`shortcut_rule` in words; None without a region."""
    if chance is None:
        return None
    return shortcut_rule(section["shortcut_factor"], section["shortcut_quantile"], chance=chance,
                         region=region or "region", reference=reference)

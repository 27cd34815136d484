"""Whether the report's models are worth explaining, and what a rule lost: plain-data warnings.

Computed from ``study.report()`` alone (never computes, never imports torch), so the command line,
every chapter and the HTML export say the same thing:

- a model at or near chance on its own training set, or on every validation set it was scored on
  (near chance on only some is what a shortcut model does on a set that breaks it): its explanations
  describe a model that has not learned the task (issue 22: a torchvision resnet18 reported 33.3%
  everywhere while its training loss was ≤ 0.006);
- a model whose train-mode and eval-mode accuracy on the training set differ widely (BatchNorm
  statistics or dropout: eval mode is what every stage explains) — when the report carries the
  train-mode figure (``models.<name>.train_mode_acc``);
- a shortcut rule without its false-alarm check: with no reference model (or a quantile of 0) the
  threshold is only ``factor × chance`` and nothing shows how much of the region a unit that does
  not use it picks up anyway (:func:`rule_caveat`).

Each warning is ``{"kind", "model", "set", "acc", "chance", "threshold", "text"}`` (``model`` and
``set`` None where they do not apply); ``text`` is one plain sentence built only from the numbers.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["GAP", "MARGIN", "annotate", "class_chance", "near_chance_threshold", "rule_caveat",
           "warnings"]

MARGIN = 0.10  # "near chance": within 10% of the way from chance to 100% …
Z = 2.0  # … or within two binomial standard errors of chance on the set's size
GAP = 0.20  # train-mode vs eval-mode accuracy on the training set: a wider gap is a warning


def class_chance(report: dict) -> float | None:
    """1 / the number of classes (from the report's case facts), or None when unknown."""
    classes = (report.get("case_facts") or {}).get("classes") or []
    return 1.0 / len(classes) if len(classes) >= 2 else None


def near_chance_threshold(chance: float, n: int | None = None) -> float:
    """The accuracy under which a set's accuracy counts as near ``chance``: ``chance`` plus the
    larger of ``MARGIN × (1 − chance)`` and ``Z`` binomial standard errors at ``n`` images."""
    margin = MARGIN * (1.0 - chance)
    if n:
        margin = max(margin, Z * math.sqrt(chance * (1.0 - chance) / n))
    return chance + margin


def _is_val(name: str) -> bool:
    parts = str(name).split("_")
    return "val" in parts or "validation" in parts


def _set_size(report: dict, set_name: str) -> int | None:
    data = report.get("data") or {}
    if set_name == "train":
        n = data.get("n_train")
    elif _is_val(set_name):
        n = data.get("n_val")
    else:
        n = data.get("n_test")
    return int(n) if isinstance(n, int | float) and n > 0 else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _checked_sets(row: dict) -> list[str]:
    """A model's own training set (``train_acc``) and every validation set it was scored on."""
    sets = [k[:-4] for k in row if k.endswith("_acc") and not k.endswith("_sd")]
    return [s for s in sets if s == "train" or _is_val(s)]


def warnings(report: dict) -> list[dict]:
    """Every warning about the report's models and rule (see the module docstring), in order:
    chance-level models (by model, training set first), train/eval gaps, then the rule's caveat."""
    out: list[dict] = []
    chance = class_chance(report)
    models = report.get("models") or {}
    n_classes = len((report.get("case_facts") or {}).get("classes") or [])
    if chance is not None:
        for name, row in models.items():
            low = []
            for set_name in _checked_sets(row):
                acc = row.get(f"{set_name}_acc")
                if not isinstance(acc, int | float) or not math.isfinite(acc):
                    continue
                n = _set_size(report, set_name)
                threshold = near_chance_threshold(chance, n)
                if acc < threshold:
                    low.append((set_name, float(acc), threshold, n))
            scored = [s for s in _checked_sets(row) if s != "train" and isinstance(
                row.get(f"{s}_acc"), int | float) and math.isfinite(row[f"{s}_acc"])]
            if sum(1 for s, *_ in low if s != "train") < len(scored):
                # at chance on some validation sets only: an evaluation set built to break a
                # shortcut (faces' watermarked non-faces) is where a shortcut model fails, which
                # is the finding, not an untrained model
                low = [entry for entry in low if entry[0] == "train"]
            for set_name, acc, threshold, n in low:
                where = ("its own training set" if set_name == "train"
                         else f"the validation set {set_name.replace('_', ' ')}")
                out.append({
                    "kind": "chance", "model": name, "set": set_name, "acc": acc,
                    "chance": chance, "threshold": threshold,
                    "text": (f"Model {name} is at or near chance on {where}: {_pct(acc)} with "
                             f"{n_classes} classes (chance {_pct(chance)}; near chance means under "
                             f"{_pct(threshold)}{f' at {n} images' if n else ''}). It has not "
                             "learned the task, so what the chapters say about its experts, maps "
                             "and corrections describes an untrained model: fix the model (its "
                             "training, its input scale, its normalisation layers) before reading "
                             "them.")})
    for name, row in models.items():
        train_mode, eval_mode = row.get("train_mode_acc"), row.get("train_acc")
        if isinstance(train_mode, int | float) and isinstance(eval_mode, int | float) and \
                abs(train_mode - eval_mode) > GAP:
            out.append({
                "kind": "train_eval_gap", "model": name, "set": "train", "acc": float(eval_mode),
                "chance": chance, "threshold": GAP,
                "text": (f"Model {name} scores {_pct(train_mode)} on its training set in train "
                         f"mode but {_pct(eval_mode)} in eval mode (a gap over {_pct(GAP)}): its "
                         "BatchNorm statistics or dropout change what it computes, and every "
                         "chapter explains the eval-mode model.")})
    caveat = rule_caveat(report)
    if caveat:
        out.append({"kind": "no_false_alarm_check", "model": None, "set": None, "acc": None,
                    "chance": (report.get("experts") or {}).get("chance"),
                    "threshold": (report.get("experts") or {}).get("shortcut_threshold"),
                    "text": caveat})
    return out


def rule_caveat(report: dict) -> str | None:
    """The sentence to state beside the shortcut rule when its false-alarm check is gone: no
    reference model (or ``shortcut_quantile`` 0), so the threshold is only ``factor × chance``.
    None when the rule has the check, or when the report has no shortcut rule (no region)."""
    e = report.get("experts") or {}
    if not e.get("shortcut_rule"):
        return None
    quantile = e.get("shortcut_quantile") or 0
    reference = report.get("reference")
    if reference and quantile > 0:
        return None
    factor, threshold = e.get("shortcut_factor"), e.get("shortcut_threshold")
    why = ("this case has no reference model" if not reference
           else "the case sets shortcut_quantile = 0")
    level = (f"{factor:g} × chance ({threshold:.3f})" if isinstance(factor, int | float) and
             isinstance(threshold, int | float) else "a multiple of chance")
    return (f"No false-alarm check: {why}, so an expert is flagged whenever its region mass "
            f"exceeds {level} — nothing shows how much of the region a unit that does not use it "
            "picks up anyway, and more experts may be flagged than with a reference (name one in "
            "the case, a model trained without the region, to restore the check).")


def annotate(report: dict) -> dict[str, Any]:
    """A shallow copy of ``report`` with ``"warnings"`` (:func:`warnings`) and, when the rule has
    lost its false-alarm check, ``experts.shortcut_rule_caveat`` (:func:`rule_caveat`)."""
    out = dict(report)
    out["warnings"] = warnings(report)
    caveat = rule_caveat(report)
    if caveat and isinstance(out.get("experts"), dict):
        out["experts"] = {**out["experts"], "shortcut_rule_caveat": caveat}
    return out

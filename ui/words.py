"""A case's words as a chapter shows them: class, model and region names (as :func:`inert` text),
accuracy columns, held-out sets, correction labels, and the one-line headlines of discovery and of
the shortcut rule's caveat. Every case-specific word comes from ``facts(study)``."""

from __future__ import annotations

from typing import Any

from . import readers
from .readers import report
from .text import inert, plain, set_label


def accuracy_columns(models: dict, f: dict | None = None) -> list[tuple[str, str]]:
    """(report key, column label) of every accuracy the report holds: training first, then the
    case's evaluation sets in its order (the headline one marked)."""
    f = f if f is not None else readers._LAST_FACTS
    keys: list[str] = []
    for m in models.values():
        keys += [k for k in m if k.endswith("_acc") and k not in keys]
    sets = [f"{s}_acc" for s in (f.get("evaluation_sets") or [])]
    train = [k for k in keys if k.startswith("train") and k not in sets]
    ordered = train + [k for k in sets if k in keys] + [k for k in keys if k not in train + sets]
    return [(k, set_label(k[:-4])) for k in ordered]


def correction_labels(study=None) -> dict[str, str]:
    """Model name → the correction's readable label, from the report's corrections rows."""
    rows = report(study).get("corrections") or []
    return {str(r.get("model") or r.get("method")): str(r.get("label") or r.get("method"))
            for r in rows if r.get("model") or r.get("method")}


def model_label(name: str, labels: dict[str, str] | None = None, facts: dict | None = None) -> str:
    """A model's name with its role in the case: the model under study, the reference, or a
    correction of the model under study (``labels``: correction name → readable label)."""
    f = facts if facts is not None else readers._LAST_FACTS
    subject, reference = f.get("subject"), f.get("reference")
    if name == subject:
        return f"{inert(name)} (under study)"
    if name == reference:
        return inert(name) if "reference" in str(name).lower() else f"{inert(name)} (reference)"
    if name in (f.get("models") or []):
        return inert(name)
    return (f"{inert((labels or {}).get(name, name))} (correction of "
            f"{inert(subject) if subject else 'the model under study'})")


def class_name(c: Any, facts: dict | None = None) -> str:
    """Class index → its name from the case (the index itself when the case names none), as
    :func:`inert` text (safe in Markdown and in plain widgets alike)."""
    f = facts if facts is not None else readers._LAST_FACTS
    names = f.get("classes") or []
    try:
        return inert(names[int(c)])
    except (IndexError, TypeError, ValueError):
        return inert(c)


def region_name(facts: dict | None = None) -> str | None:
    """The case's region name as :func:`inert` text, or None when the case has no region."""
    f = facts if facts is not None else readers._LAST_FACTS
    region = f.get("region")
    return None if region is None else inert(region)


def held_out_sets(facts: dict | None = None) -> list[str]:
    """The case's evaluation sets that are not validation sets, the headline first (what the
    narrative and the corrections compare; validation sets tune, they do not judge)."""
    f = facts if facts is not None else readers._LAST_FACTS
    sets = [str(x) for x in f.get("evaluation_sets") or []]

    def is_val(name: str) -> bool:
        parts = name.split("_")
        return "val" in parts or "validation" in parts

    head = f.get("headline")
    out = [x for x in sets if not is_val(x)] or sets
    return ([head] if head in sets else []) + [x for x in out if x != head]


def discovery_headline(study=None) -> str | None:
    """What the discovery stage found without masks, in one Markdown line for a chapter's top:
    the model under study's headline, its counts, and the controls flagged (the false-alarm rate);
    None when the stage is not built."""
    try:
        summary = report(study).get("discovery_summary") or {}
    except Exception:  # noqa: BLE001 — the chapter itself says what is missing or broken
        return None
    models = summary.get("models") or {}
    subject = summary.get("subject")
    if subject not in models:
        return None
    s = models[subject]
    alarms = summary.get("false_alarms") or {}
    others = alarms.get("models") or []
    text = (f"**Found without any mask** ({plain(subject)}): {plain(s.get('headline'))} — "
            f"{s.get('n_suspected', 0)} suspected of {s.get('n_candidates', 0)} candidates")
    if others:
        text += (f"; false alarms: {alarms.get('n_flagged', 0)} of {len(others)} other "
                 f"model{'s' if len(others) != 1 else ''} ({', '.join(map(plain, others))}) "
                 "have a suspect")
    return text + "."


def threshold_term(experts: dict | None, layer: str) -> dict | None:
    """Which term of the shortcut rule set ``layer``'s threshold, from the report's ``experts``
    (``shortcut_thresholds``, ``shortcut_threshold`` = the floor factor × chance,
    ``shortcut_factor``, ``shortcut_quantile``, ``chance``): ``{"threshold", "floor", "term":
    "floor" | "quantile", "text"}`` with every number in percent; None when the report has no
    threshold for the layer."""
    e = experts or {}
    t = (e.get("shortcut_thresholds") or {}).get(layer)
    floor, chance = e.get("shortcut_threshold"), e.get("chance")
    if t is None or floor is None or chance is None:
        return None
    factor, q = e.get("shortcut_factor"), e.get("shortcut_quantile") or 0
    floor_txt = f"{factor:g} × chance ({100 * chance:.1f}%) = {100 * floor:.1f}%"
    if float(t) > float(floor) + 1e-12:
        term = "quantile"
        text = (f"{layer}: {100 * t:.1f}%, set by the reference's {100 * q:.0f}% quantile "
                f"(above the floor {floor_txt})")
    else:
        term = "floor"
        text = f"{layer}: {100 * t:.1f}%, set by the floor {floor_txt}" + (
            f" (the reference's {100 * q:.0f}% quantile is lower)" if q else "")
    return {"threshold": float(t), "floor": float(floor), "term": term, "text": text}


def rule_caveat(study=None) -> str | None:
    """The sentence to show beside the shortcut rule when its false-alarm check is gone (no
    reference model), escaped for Markdown; None when the rule has it."""
    try:
        text = (report(study).get("experts") or {}).get("shortcut_rule_caveat")
    except Exception:  # noqa: BLE001
        return None
    return plain(text, limit=1000) if text else None


"""Build budgets: how much each stage computes, as one named preset.

``full`` (the default) builds every stage as the case's sections say. ``quick`` is for a first look
at a real model on the CPU: every stage keeps its methods and its questions but uses fewer images,
random draws, optimisation steps and seeds — the values each stage declares in its
``STAGE = Stage(..., quick={...})`` (``core/stages``). A value the case sets itself always wins:
the budget only fills what the case leaves to the defaults.

The preset comes from, first to last: the ``budget`` argument (``python -m core build --quick``),
``$CASEBOOK_BUDGET`` (the app and its background worker), the case's ``[budget] preset``, else
``full``. Quick results are keyed apart from full ones (their sections differ), so both can sit in
one cache, and every page and the report say which budget built what they show.
"""

from __future__ import annotations

import copy
import os

from core.casestudy.config import CaseError
from core.casestudy.registry import REGISTRY

PRESETS = ("full", "quick")


def preset_of(raw: dict, asked: str | None = None) -> str:
    """The budget preset for a case whose parsed TOML is ``raw`` (see the module docstring for
    the order); a one-line :class:`CaseError` for an unknown preset or a malformed ``[budget]``."""
    section = raw.get("budget", {})
    if not isinstance(section, dict) or set(section) - {"preset"}:
        raise CaseError("[budget] takes one key, preset = \"full\" or \"quick\"")
    for where, value in (("--budget", asked), ("$CASEBOOK_BUDGET", os.environ.get(
            "CASEBOOK_BUDGET") or None), ("[budget] preset", section.get("preset"))):
        if value is None:
            continue
        if value not in PRESETS:
            raise CaseError(f"{where} must be one of {', '.join(PRESETS)}, got {str(value)[:40]!r}")
        return value
    return "full"


def quick_values() -> dict[str, dict]:
    """Per config section, the values the quick budget sets (from the stages' declarations)."""
    return {s.sections[0]: dict(s.quick) for s in REGISTRY if s.quick and s.sections}


def apply(raw: dict, preset: str) -> tuple[dict, dict]:
    """``raw`` (a case's parsed TOML) with the budget's values filled in where the case sets none,
    and without its ``[budget]`` table; and what was filled, per section (``{}`` for ``full``).
    A nested table (e.g. ``[corrections.suppression]``) is filled key by key. ``raw`` is not
    changed."""
    out = {k: v for k, v in raw.items() if k != "budget"}
    applied: dict[str, dict] = {}
    if preset != "quick":
        return out, applied
    for section, values in quick_values().items():
        given = out.get(section, {})
        if not isinstance(given, dict):
            continue  # the section's own check says what is wrong with it
        merged, filled = dict(given), {}
        for key, value in values.items():
            if key not in given:
                merged[key] = filled[key] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(given[key], dict):
                inner = {k: copy.deepcopy(v) for k, v in value.items() if k not in given[key]}
                if inner:
                    merged[key] = {**inner, **given[key]}
                    filled[key] = inner
        if filled:
            out[section] = merged
            applied[section] = filled
    return out, applied

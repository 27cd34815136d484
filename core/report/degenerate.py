"""Results that cannot discriminate, named from the stages' own numbers (issues 18 and 22).

A test that cannot tell is not a negative finding: an essence test where every rule reaches its
target at k = 1 (the essence stage's rows carry ``degenerate`` themselves:
:func:`core.methods.essence.degenerate`), and a correction whose strength was chosen on a flat
validation grid — every strength scored the same validation accuracy within one image, so the
tuning saw no difference and picked the first value (e.g. RRR on the faces case's 20 validation
images). Pages, the findings box and the README say "cannot tell (…)" there, never "did not help"
or "not concentrated".

The corrections stage's report rows do not carry their grids (the payload's ``records`` do), so
:func:`annotate_corrections` adds the verdicts to a report from the payload; everything here is
plain data (no torch, no Streamlit).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CANNOT_TELL", "annotate_corrections", "cannot_tell", "corrections_cannot_tell",
           "essence_cannot_tell", "flat_grid", "study_report"]

CANNOT_TELL = "cannot tell"


def cannot_tell(reason: str) -> str:
    """The words a reader sees for a test that cannot discriminate: ``"cannot tell (<reason>)"``."""
    return f"{CANNOT_TELL} ({reason})"


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def flat_grid(grid: list[dict] | None, n_val: int | None) -> str | None:
    """Why a tuning grid could not choose a strength, or None when it could: ``grid`` is a list of
    ``{"val_acc", ...}`` (one entry per strength tried); it is flat when it tried at least two
    strengths and their validation accuracies all lie within one validation image (1 / ``n_val``;
    exactly equal when ``n_val`` is unknown). The reason is plain text, e.g. ``"flat validation
    grid: 4 strengths all at 55% on 20 validation images"``."""
    accs = [a for a in (_num((g or {}).get("val_acc")) for g in grid or []) if a is not None]
    if len(accs) < 2:
        return None
    lo, hi = min(accs), max(accs)
    step = 1.0 / n_val if n_val else 0.0
    if hi - lo > step + 1e-9:
        return None
    on = f" on {n_val} validation images" if n_val else " on the validation split"
    at = f"all at {100 * lo:.0f}%" if hi - lo < 1e-12 else \
        f"within one image of each other ({100 * lo:.0f}–{100 * hi:.0f}%)"
    return f"flat validation grid: {len(accs)} strengths {at}{on}, so the strength is arbitrary"


def corrections_cannot_tell(payload: dict | None, n_val: int | None) -> dict[str, str]:
    """``{method: reason}`` for every correction of the corrections payload whose seed-0 tuning
    grid (``payload["records"][method]["grid"]``) is flat (:func:`flat_grid`); {} when none is
    (or the payload has no records)."""
    records = (payload or {}).get("records") or {}
    out = {}
    for method, rec in records.items():
        why = flat_grid((rec or {}).get("grid"), n_val) if isinstance(rec, dict) else None
        if why:
            out[str(method)] = why
    return out


def annotate_corrections(report: dict, payload: dict | None) -> dict:
    """``report`` (``study.report()``) with ``corrections_cannot_tell`` ({method: reason}, see
    :func:`corrections_cannot_tell`, the validation split's size from ``report["data"]``) and
    each corrections row's ``cannot_tell`` (the reason, or absent); a new dict, the rows copied.
    Unchanged when the report has no corrections rows."""
    rows = report.get("corrections")
    if not rows:
        return report
    n_val = (report.get("data") or {}).get("n_val")
    flags = corrections_cannot_tell(payload, n_val if isinstance(n_val, int) else None)
    out = dict(report)
    out["corrections_cannot_tell"] = flags
    out["corrections"] = [{**r, "cannot_tell": flags[r.get("method")]}
                          if r.get("method") in flags else dict(r) for r in rows]
    return out


def essence_cannot_tell(rows: list[dict] | None) -> list[dict]:
    """The essence rows (stage rows or report rows) that cannot discriminate: those whose
    ``degenerate`` (set by the stage from its own numbers) holds a reason."""
    return [r for r in rows or [] if r.get("degenerate") and not r.get("error")]


def study_report(study) -> dict:
    """``study.report()`` with :func:`annotate_corrections` applied from the study's corrections
    payload (read from the cache when the stage is built; never computes; an unreadable payload
    gives no flags): what the report's pages, the README renderer and the HTML export render."""
    rep = study.report()
    if rep.get("corrections"):
        try:
            payload = study.artifact("corrections")
        except Exception:  # noqa: BLE001 — an unreadable payload: no flags, the report still reads
            payload = None
        rep = annotate_corrections(rep, payload)
    return rep

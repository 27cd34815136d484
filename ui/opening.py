"""A chapter's opening (:func:`chapter`: title, introduction, the model and budget warnings, the
gate for its stages), the findings box, and the "next" link at a chapter's end."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import streamlit as st

from .progress import require
from .readers import current, report
from .state import page_url
from .text import plain


def model_warnings(study=None) -> list[dict]:
    """Draw, at the top of a chapter, a warning for every model that is at or near chance on its
    own training or validation set or whose train- and eval-mode accuracy differ widely (from
    ``core.report.health``); return those warnings. Every chapter calls it under its title; it
    never stops a chapter (a report that cannot be read shows nothing here)."""
    try:
        found = [w for w in report(study).get("warnings") or []
                 if w.get("kind") in ("chance", "train_eval_gap")]
    except Exception:  # noqa: BLE001 — the chapter itself says what is missing or broken
        return []
    for w in found:
        st.warning(plain(w["text"], limit=1000), icon=":material/warning:")
    budget_note(study)
    return found


def budget_note(study=None) -> dict | None:
    """Under a chapter's title: say that the results come from the quick budget, and what it
    set (``core.casestudy.budget``); nothing for a full build. Returns the study's budget."""
    study = current(study)
    budget = getattr(study, "budget", None) or {}
    if budget.get("preset") != "quick":
        return budget or None
    applied = budget.get("applied") or {}
    settings = "; ".join(
        f"[{plain(section)}] " + ", ".join(f"{plain(k)} = {plain(json.dumps(v))}"
                                           for k, v in values.items())
        for section, values in applied.items()) or "nothing: the case sets every value itself"
    st.info("**Quick build**: every stage ran with fewer images, draws, steps and seeds than a "
            "full build (its methods and questions unchanged), so intervals are wider and some "
            "tests have less power. The budget set " + settings + ". A full build: "
            "`python -m core build CASE` without `--quick`.", icon=":material/speed:")
    return budget


def draw_findings(study=None) -> dict | None:
    """Draw the study's findings (``core.report.findings``) in a bordered box: one bullet per
    finding with a link to the chapter that shows it, then what the study cannot tell; return
    them (None when the report cannot be read)."""
    from urllib.parse import urlencode

    from core.report.findings import findings

    try:
        found = findings(report(study))
    except Exception:  # noqa: BLE001 — the chapters below say what is missing or broken
        return None
    if not found["items"] and not found["cannot_tell"]:
        return found
    with st.container(border=True):
        st.markdown("**Findings**")
        lines = []
        for item in found["items"]:
            link = item.get("link") or {}
            url = f"{page_url(link.get('page', ''))}?{urlencode(link.get('params') or {})}"
            lines.append(f"- {plain(item['text'], limit=1200)} [→ open]({url})")
        if lines:
            st.markdown("\n".join(lines))
        if found["cannot_tell"]:
            st.caption("What this study cannot tell: " + " ".join(
                plain(t, limit=600) for t in found["cannot_tell"]))
    return found


def next_chapter(path: str, label: str, why: str = "") -> None:
    """The "next" link at the end of a chapter."""
    st.divider()
    if why:
        st.caption(why)
    try:
        st.page_link(path, label=f"Next: {label}", icon=":material/arrow_forward:")
    except Exception:  # noqa: BLE001 - a chapter run on its own (no navigation): name it instead
        st.caption(f"Next: {label}")


def chapter(stages: Iterable[str] | str | None, title: str, intro: str | Callable[[], Any] | None = None,
            *, study=None, what: str = "This chapter", key: str | None = None,
            findings: bool = False, optional: bool = False):
    """Open a chapter and return its study: the title (drawn as given: pass :func:`inert` text for a
    case's string), the warnings every chapter carries (a model at or near chance, a quick budget),
    optionally the findings box, the introduction (Markdown, or a callable that draws it), and the
    gate for ``stages``: while one is missing the chapter says so (the background build's live
    progress, or an offer to build it here, ``key`` naming the button) and stops; ``stages`` None or
    empty: no gate. ``study`` defaults to the open study (``ui.current_study()``); with
    ``optional`` a chapter that reads no study (``study`` None: none could be opened) draws only
    its title and introduction."""
    if study is None and not optional:
        study = current(study)
    st.title(title)
    if study is not None:
        model_warnings(study)  # a model at chance is said before anything is read
        if findings:
            draw_findings(study)  # what the study found, each with a link to the chapter that shows it
    if callable(intro):
        intro()
    elif intro:
        st.markdown(intro)
    stages = [stages] if isinstance(stages, str) else list(stages or [])
    if stages and study is not None and not require(study, stages, what, key=key):
        st.stop()
    return study

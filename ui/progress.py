"""Building what is missing: in the page inside ``st.status`` with a progress bar
(``build_missing``, ``run_with_status``, ``compute_experts_for``), or behind the report in one
background worker per cache (``core.casestudy.worker``) whose live progress the sidebar and every
waiting chapter show (``progress_panel``); ``require`` is the gate a chapter passes before it draws."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import streamlit as st

from .readers import _experts_dict, _has_experts_for, current, invalidate, status
from .state import study_key
from .text import plain

# ----------------------------------------------------------------------------------------------
# Building what is missing


def missing(study, stages: Iterable[str]) -> list[str]:
    built = status(study)
    return [s for s in stages if not built.get(s, False)]


def build_missing(study, stages: Iterable[str], *, label: str | None = None) -> bool:
    """Build ``stages`` inside ``st.status`` with a progress bar; True when it worked.

    A failure shows the error message (no traceback); the rest of the app stays usable.
    """
    stages = list(stages)
    label = label or f"Building {', '.join(stages)} …"
    with st.status(label, expanded=True) as box:
        bar = st.progress(0.0, text="Starting …")
        line = st.empty()

        def progress(stage: str, done: int, total: int, message: str = "") -> None:
            frac = min(max(done / total, 0.0), 1.0) if total else 0.0
            bar.progress(frac, text=f"{stage}: {done}/{total}" if total else stage)
            if message:
                line.caption(str(message))

        try:
            study.build(stages=stages, progress=progress)
        except Exception as exc:  # noqa: BLE001 — any failure becomes a readable message
            invalidate(study)
            box.update(label=f"Could not build {', '.join(stages)}", state="error", expanded=True)
            st.error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False
        bar.progress(1.0, text="Done")
        box.update(label=f"Built {', '.join(stages)}", state="complete", expanded=False)
    invalidate(study)
    return True


def run_with_status(label: str, fn: Callable[..., Any], *, done: str | None = None,
                    with_progress: bool = False) -> tuple[bool, Any]:
    """Run ``fn()`` inside ``st.status`` with a progress bar; ``(True, value)`` or ``(False, None)``.

    With ``with_progress`` the function is called as ``fn(progress)`` where
    ``progress(done, total, message)`` moves the bar; otherwise the bar shows start and end. A
    failure shows its message, not a traceback.
    """
    with st.status(label, expanded=True) as box:
        bar = st.progress(0.0, text="Computing …")

        def progress(done_: int, total: int, message: str = "") -> None:
            bar.progress(min(1.0, done_ / max(total, 1)), text=message or "Computing …")

        try:
            value = fn(progress) if with_progress else fn()
        except Exception as exc:  # noqa: BLE001 — any failure becomes a readable message
            box.update(label=f"Failed: {label}", state="error", expanded=True)
            st.error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False, None
        bar.progress(1.0, text="Done")
        box.update(label=done or label, state="complete", expanded=False)
    return True, value


def compute_experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None,
                        images: str = "label") -> dict | None:
    """Compute (and cache on disk) experts for any quantity and distribution, inside ``st.status``."""
    study = current(study)
    ok, result = run_with_status(f"Computing the experts of {layer} for {model} …",
                                 lambda progress: study.experts_for(model, layer, qoi, doi,
                                                                    progress=progress,
                                                                    images=images),
                                 done=f"Computed the experts of {layer}", with_progress=True)
    _has_experts_for.clear()
    return _experts_dict(result) if ok else None


# ----------------------------------------------------------------------------------------------
# Building behind the report: one background worker per cache (core.casestudy.worker). The pages
# open at once, draw what is built, and poll the worker's progress file while it runs; when a
# stage lands, the whole page reruns and fills in. CASEBOOK_BACKGROUND=0 turns it off (the pages
# then offer an in-page build, as before).


def background_enabled() -> bool:
    return os.environ.get("CASEBOOK_BACKGROUND", "1") != "0"


def _worker_where(study) -> tuple[str, Any, str]:
    case, _, device = study_key(study)
    return case, study.cache.root, device


def background_state(study) -> dict | None:
    """The background build's state for ``study`` (``core.casestudy.worker.state``), or None when
    background builds are off or the cache has no readable worker record."""
    if not background_enabled():
        return None
    from core.casestudy import worker

    case, root, _ = _worker_where(study)
    try:
        return worker.state(case, root)
    except OSError:
        return None


def ensure_background_build(study, built: dict[str, bool] | None = None) -> dict | None:
    """Start (or join) the background build when stages of ``study`` are missing (``built``: its
    ``status()`` when the caller has just read it); returns the worker's state, or None when
    nothing is to be built here (all built, background builds off, or a read-only cache). A
    build that ended on an error, or whose missing stages failed or were skipped, is not
    restarted by itself (the chapter shows why and offers the build)."""
    if not background_enabled():
        return None
    todo = [s for s, done in (built or study.status()).items() if not done]
    if not todo:
        return None
    from core.casestudy import worker

    case, root, device = _worker_where(study)
    current = worker.state(case, root)
    if current["running"]:
        return current
    ended = current["finished"] and (current["error"] or all(
        (current["stages"].get(s) or {}).get("status") in ("failed", "skipped") for s in todo))
    if ended and not current["waiting_for"]:
        return current
    try:  # (waiting for another case's worker: start returns at once while that one runs)
        return worker.start(case, root, device=device)
    except OSError:  # a read-only (shipped) cache: nothing can be built here
        return None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "estimating the time left"
    if seconds < 60:
        return f"about {max(1, round(seconds))} s left in this stage"
    return f"about {round(seconds / 60)} min left in this stage"


def _draw_progress(state: dict, built: dict[str, bool], compact: bool) -> None:
    n_built, n_all = sum(map(bool, built.values())), len(built)
    if state.get("waiting_for"):
        st.caption(f"Waiting for the background build of {plain(state['waiting_for'])} "
                   "(one build per cache at a time).")
        return
    stage, done, total = state.get("stage"), state.get("done"), state.get("total")
    head = f"Building in the background · {n_built}/{n_all} stages built"
    if compact:
        st.caption(head)
    else:
        st.markdown(f"**{head}**")
    if stage and total:
        st.progress(min(max(done / total, 0.0), 1.0), text=f"{plain(stage)}: step {done}/{total}")
    elif stage:
        st.progress(0.0, text=plain(stage))
    rate = state.get("rate")
    bits = [f"{rate:.2g} steps/s" if rate else None, _eta(state.get("eta_s")) if stage else None,
            plain(state.get("message"), limit=80) if state.get("message") else None]
    st.caption(" · ".join(b for b in bits if b) or "starting …")


def progress_panel(study, *, compact: bool = True) -> dict | None:
    """Draw the background build's live progress (stage, step, rate, ETA) and keep it fresh: a
    fragment re-drawn every 2 s while the worker runs, which reruns the whole page when a stage
    lands so the chapter fills in without a reload. Returns the worker's state, or None when no
    background build concerns this study (all built, or background builds off)."""
    try:
        state = ensure_background_build(study)
    except Exception:  # noqa: BLE001 — an unreadable worker record must not take the page down
        return None
    if state is None:
        return None
    key = "bg-built-" + "|".join(map(str, study_key(study)))

    def panel() -> None:
        fresh = study.status()
        now = ensure_background_build(study, fresh) or {}
        built = tuple(sorted(k for k, v in fresh.items() if v))
        seen = st.session_state.get(key)
        st.session_state[key] = built
        if seen is not None and seen != built:
            invalidate(study)  # a stage landed: redraw the chapter with it
            st.rerun(scope="app")
        if now.get("running") or now.get("waiting_for"):
            _draw_progress(now, fresh, compact)
        elif now.get("error"):
            st.caption(f"The background build stopped: {plain(now['error'], limit=200)}")

    active = state.get("running") or state.get("waiting_for")
    if active:
        st.fragment(panel, run_every=2.0)()
    else:
        panel()
    return state


def require(study, stages: Iterable[str], what: str, *, key: str | None = None) -> bool:
    """True when ``stages`` are built; else say what is missing: while the background build runs,
    its live progress (the chapter fills in by itself when the stages land); otherwise an offer
    to build them here.

    After a successful build the script reruns, so the page draws the fresh results.
    """
    todo = missing(study, stages)
    if todo and all(study.status().get(s) for s in todo):
        invalidate(study)  # the background build landed them since the cached read
        todo = missing(study, stages)
    if not todo:
        return True
    bg = background_state(study)
    if bg and (bg.get("running") or bg.get("waiting_for")):
        st.info(f"{what} needs the stage(s) **{', '.join(todo)}**: they are being built in the "
                "background and this page fills in by itself when they land (the cache keeps "
                "them for every later visit).", icon=":material/hourglass_top:")
        progress_panel(study, compact=False)
        return False
    if bg and bg.get("error"):
        st.warning(f"The background build stopped: {plain(bg['error'], limit=300)}")
    st.info(f"{what} needs the stage(s) **{', '.join(todo)}**, not built yet for this case study. "
            "Building runs on this machine and is cached on disk for every later visit.")
    if st.button(f"Build {', '.join(todo)}", key=key or f"build-{'-'.join(todo)}", type="primary"):
        if build_missing(study, todo):
            st.rerun()
    return False



"""What the URL and the sidebar hold: deep links (``qp_get`` / ``qp_set``, ``choice``), the stages
that exist, the known cases, and the open case study (``open_study`` / ``current_study``, one
``st.cache_resource`` per case name, cache folder and device)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from .text import plain

DEFAULT_CASE = "decoy-mnist"


def _stages() -> tuple[str, ...]:
    """The pipeline's stages whose module exists (a stage another helper has not written yet is
    left out of the sidebar and the navigation)."""
    try:
        from core.casestudy.registry import REGISTRY, module_exists
    except ImportError:  # pragma: no cover - core ships the registry
        return ("data", "models", "experts", "representations", "corrections")
    return tuple(s.name for s in REGISTRY if s.delegated is None or module_exists(s.delegated))


STAGES = _stages()


# The first chapter's url_path (app.py): as the default page it is served at the app's root URL, and
# Streamlit answers its own path with "Page not found", so a link to it points at the root.
HOME_PAGE = "case-study"


def page_url(url_path: str) -> str:
    """The relative URL of the chapter whose ``url_path`` is given: the root (``./``) for the first
    chapter (:data:`HOME_PAGE`), else the path itself."""
    path = str(url_path or "").strip("/")
    return "./" if path in ("", HOME_PAGE) else path


def stage_exists(stage: str) -> bool:
    return stage in STAGES


# ----------------------------------------------------------------------------------------------
# Deep links


def qp_get(key: str, default: str | None = None) -> str | None:
    """The query parameter ``key`` as a string, or ``default``."""
    value = st.query_params.get(key)
    return default if value in (None, "") else str(value)


def qp_set(**values: Any) -> None:
    """Write query parameters (``None`` removes one); only changed values are sent to the browser."""
    for key, value in values.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


def _index_of(options: Sequence, wanted: str | None, default: Any = None) -> int:
    strs = [str(o) for o in options]
    for candidate in (wanted, None if default is None else str(default)):
        if candidate is not None and candidate in strs:
            return strs.index(candidate)
    return 0


def choice(label: str, options: Sequence, *, param: str, default: Any = None, container: Any = None,
           widget: str = "selectbox", format_func: Callable[[Any], str] = str, **kwargs) -> Any:
    """A selectbox (or ``widget="radio"``) whose default comes from the URL and whose value goes back.

    ``param`` names the query parameter (and, prefixed, the widget key). A URL value that is not one
    of ``options`` is ignored (the ``default``, else the first option, is used).
    """
    options = list(options)
    if not options:
        raise ValueError(f"no options for {label!r}")
    where = container if container is not None else st
    index = _index_of(options, qp_get(param), default)
    key = kwargs.pop("key", f"qp-{param}")
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]  # another case's value (a class, a model, a layer): start afresh
    if widget == "radio":
        value = where.radio(label, options, index=index, key=key, format_func=format_func, **kwargs)
    elif widget == "selectbox":
        value = where.selectbox(label, options, index=index, key=key, format_func=format_func, **kwargs)
    else:
        raise ValueError(f"widget must be 'selectbox' or 'radio', not {widget!r}")
    qp_set(**{param: value})
    return value


# ----------------------------------------------------------------------------------------------
# The open case study (the entrypoint's sidebar sets these; pages read them)


def available_devices() -> list[str]:
    import torch

    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


def list_cases() -> list[str]:
    """Names of every known case: the built-in ones and the TOMLs under ``$CASEBOOK_CASES``."""
    try:
        from core.casestudy import list_cases as _list

        return [str(c) for c in _list()]
    except Exception:  # noqa: BLE001 - a broken $CASEBOOK_CASES folder: offer the built-ins only
        try:
            from core.casestudy import builtin_cases

            return [str(c) for c in builtin_cases()]
        except Exception:  # noqa: BLE001
            return []


def default_case(cases: Sequence[str] | None = None) -> str:
    """``$CASEBOOK_CASE`` when it names a known case, else DecoyMNIST, else the first known case."""
    cases = list_cases() if cases is None else list(cases)
    for name in (os.environ.get("CASEBOOK_CASE"), DEFAULT_CASE):
        if name and (not cases or name in cases):
            return name
    return cases[0] if cases else DEFAULT_CASE


def asked_case() -> str | None:
    """The case the URL asks for (``?case=``), as given: a name, never opened as a path."""
    return qp_get("case")


def current_case() -> str:
    """The sidebar's case: a known case's name (an unknown ``?case=`` falls back to the default)."""
    cases = list_cases()
    for name in (st.session_state.get("qp-case"), qp_get("case")):
        if name and str(name) in cases:
            return str(name)
    return default_case(cases)


def current_device() -> str:
    device = st.session_state.get("qp-device") or qp_get("device")
    devices = available_devices()
    return device if device in devices else devices[0]


def current_model(study=None) -> str:
    """The model chosen in the sidebar: one of the case's models or a correction's name (default:
    the model under study)."""
    chosen = st.session_state.get("qp-model") or qp_get("model")
    if chosen:
        return str(chosen)
    # the case's own subject (no built-in case's model name as a fallback: issue 19)
    return str(sys.modules[__package__].facts(study)["subject"])


def _cache_dir() -> str | None:
    return os.environ.get("CASEBOOK_CACHE") or None


@st.cache_resource(show_spinner="Opening the case study …")
def _open_study(case: str, cache_dir: str | None, device: str):
    from core.casestudy import CaseStudy

    # A name from list_cases() only: a URL never makes the server read a path (issue 11).
    return CaseStudy.open(case, cache_dir=cache_dir, device=device, allow_path=False)


def study_key(study=None) -> tuple[str, str | None, str]:
    """The strings that identify the open study (what the cached readers are keyed on)."""
    if study is not None and getattr(study, "_casebook_key", None):
        return study._casebook_key
    return (current_case(), _cache_dir(), current_device())


def open_study(case: str | None = None, device: str | None = None):
    """The case study ``case`` (default: the sidebar's), opened once per process. Raises on failure
    (an unknown name is a CaseError; nothing is read for it)."""
    case = case or current_case()
    if case not in list_cases():
        from core.casestudy import CaseError

        raise CaseError(f"unknown case {case[:60]!r}")
    key = (case, _cache_dir(), device or current_device())
    study = _open_study(*key)
    try:
        study._casebook_key = key
    except AttributeError:  # a slotted object: fall back to the sidebar's key
        pass
    return study


def current_study():
    """The open case study; on a malformed case, a one-line readable error and the chapter stops."""
    try:
        return open_study()
    except Exception as exc:  # CaseError and friends: the reader sees the message, not a traceback
        st.error(f"Could not open the case study {plain(repr(current_case()))}: {plain(exc)}")
        st.stop()


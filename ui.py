"""Shared helpers for every page of the report (this module imports Streamlit; ``core`` never does).

What a page needs, in one place:

- ``current_study()``: the open :class:`core.casestudy.CaseStudy` (``st.cache_resource`` on the case
  name, cache folder and device; shared across sessions, so pages never mutate its models).
- Cached readers keyed on strings, never on tensors: ``report()``, ``status()``, ``artifact(stage)``,
  ``samples(split, n)``, ``experts(model, layer, cls)``, ``experts_for(model, layer, qoi, doi)``.
- ``build_missing(study, stages)``: run ``study.build`` inside ``st.status`` with a progress bar and a
  readable error; ``require(study, stages, what)`` offers that build when a page's results are missing.
- Downloads: ``download_csv``, ``download_json``, ``download_png`` (deferred: the bytes are made only
  when the reader clicks).
- Deep links: ``qp_get`` / ``qp_set`` and ``choice(...)``, a widget whose default is read from
  ``st.query_params`` and whose value is written back there, so a copied URL reopens the same view.
- The sidebar state the entrypoint owns: ``current_case()``, ``current_model()``, ``current_device()``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import streamlit as st

from core.casestudy import CHANCE as CHANCE_DECOY_MASS  # noqa: F401 (for the pages)

DEFAULT_CASE = "decoy-mnist"
STAGES = ("data", "models", "experts", "representations", "corrections")
BASE_MODELS = ("vanilla", "clean")

MODEL_LABELS = {"vanilla": "vanilla (trained with the decoy)", "clean": "clean (trained without it)"}

# ----------------------------------------------------------------------------------------------
# Navigation: always through app.py


def use_navigation() -> None:
    """Make sure this run goes through ``app.py`` (its ``st.navigation`` and shared sidebar).

    Streamlit treats an app beside a ``pages/`` folder as an old-style multipage app until the
    entrypoint has called ``st.navigation`` once in the process: a fresh server whose first visitor
    opens a deep link (``/influence?cls=3``), or an AppTest after ``switch_page``, would run the page
    script alone, without the sidebar. Here the process is switched to ``st.navigation`` mode and the
    run restarted, so the entrypoint runs and shows the same page. Called by the helpers every page
    uses (and when ``ui`` is first imported); a no-op outside a script run and once switched.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.runtime.scriptrunner import get_script_run_ctx
    except ImportError:  # a Streamlit without these internals: nothing to fix
        return
    if getattr(PagesManager, "uses_pages_directory", None) and get_script_run_ctx(suppress_warning=True):
        PagesManager.uses_pages_directory = False
        st.rerun()


use_navigation()

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
    use_navigation()
    options = list(options)
    if not options:
        raise ValueError(f"no options for {label!r}")
    where = container if container is not None else st
    index = _index_of(options, qp_get(param), default)
    key = kwargs.pop("key", f"qp-{param}")
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


def current_case() -> str:
    return str(st.session_state.get("qp-case") or qp_get("case") or os.environ.get("CASEBOOK_CASE")
               or DEFAULT_CASE)


def current_device() -> str:
    device = st.session_state.get("qp-device") or qp_get("device")
    devices = available_devices()
    return device if device in devices else devices[0]


def current_model() -> str:
    """The model chosen in the sidebar ("vanilla", "clean", or a correction's name)."""
    return str(st.session_state.get("qp-model") or qp_get("model") or "vanilla")


def _cache_dir() -> str | None:
    return os.environ.get("CASEBOOK_CACHE") or None


@st.cache_resource(show_spinner="Opening the case study …")
def _open_study(case: str, cache_dir: str | None, device: str):
    from core.casestudy import CaseStudy

    return CaseStudy.open(case, cache_dir=cache_dir, device=device)


def study_key(study=None) -> tuple[str, str | None, str]:
    """The strings that identify the open study (what the cached readers are keyed on)."""
    if study is not None and getattr(study, "_casebook_key", None):
        return study._casebook_key
    return (current_case(), _cache_dir(), current_device())


def open_study(case: str | None = None, device: str | None = None):
    """The case study ``case`` (default: the sidebar's), opened once per process. Raises on failure."""
    use_navigation()
    key = (case or current_case(), _cache_dir(), device or current_device())
    study = _open_study(*key)
    try:
        study._casebook_key = key
    except AttributeError:  # a slotted object: fall back to the sidebar's key
        pass
    return study


def current_study():
    """The open case study; on an unknown or malformed case, a readable error and the page stops."""
    use_navigation()
    try:
        return open_study()
    except Exception as exc:  # CaseError and friends: the reader sees the message, not a traceback
        st.error(f"Could not open the case study {current_case()!r}: {exc}")
        st.stop()


def list_cases() -> list[str]:
    """Names of the built-in case studies (the current one first if it is a path)."""
    try:
        from core.casestudy import list_cases as _list

        names = [c if isinstance(c, str) else getattr(c, "name", str(c)) for c in _list()]
    except Exception:  # casestudy not importable yet: offer the default only
        names = []
    current = current_case()
    if current not in names:
        names.insert(0, current)
    return names


# ----------------------------------------------------------------------------------------------
# Cached readers. The study object is passed underscored (not hashed); the key strings and the
# build stamp are what the caches are keyed on, so a build invalidates what it changed.


_GENERATION: dict[tuple, int] = {}


def _generation(key: tuple) -> int:
    return _GENERATION.get(key, 0)


@st.cache_data(show_spinner=False, ttl=10)
def _status(key: tuple, generation: int, _study) -> dict[str, bool]:
    return {str(k): bool(v) for k, v in _study.status().items()}


def status(study=None) -> dict[str, bool]:
    """``study.status()``: which stages are built (re-read at most every 10 s, and after each build)."""
    study = study or current_study()
    key = study_key(study)
    return _status(key, _generation(key), study)


def stamp(study=None) -> tuple:
    """What the cached readers are keyed on besides their arguments: the study key and what is built."""
    study = study or current_study()
    key = study_key(study)
    return key + (_generation(key),) + tuple(sorted(status(study).items()))


@st.cache_data(show_spinner=False)
def _report(stamp: tuple, _study) -> dict:
    return _study.report()


def report(study=None) -> dict:
    """``study.report()`` (the DESIGN §2 JSON of what is built), cached per build state."""
    study = study or current_study()
    return _report(stamp(study), study)


def _strip(value: Any, drop: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_strip(v, drop) for v in value]
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a tensor: pages get numpy
        return value.detach().cpu().numpy()
    return value


@st.cache_data(show_spinner=False)
def _artifact(stamp: tuple, stage: str, drop: tuple[str, ...], _study) -> dict | None:
    payload = _study.artifact(stage)
    return None if payload is None else _strip(payload, drop)


def artifact(stage: str, study=None, drop: Iterable[str] = ("models",)) -> dict | None:
    """``study.artifact(stage)`` with tensors as numpy and the keys in ``drop`` (state dicts) left out."""
    study = study or current_study()
    return _artifact(stamp(study), stage, tuple(drop), study)


@st.cache_data(show_spinner=False)
def _samples(stamp: tuple, split: str, n: int, _study) -> dict:
    return {k: np.asarray(v) for k, v in _study.samples(split=split, n=n).items()}


def samples(split: str = "test", n: int = 8, study=None) -> dict:
    study = study or current_study()
    return _samples(stamp(study), split, int(n), study)


def _experts_dict(result: dict) -> dict:
    out = dict(result)
    out["rows"] = [dict(r) for r in result.get("rows", [])]
    for k in ("scores", "images", "maps"):
        if k in out and out[k] is not None:
            out[k] = np.asarray(_strip(out[k], ()))
    return out


@st.cache_data(show_spinner=False)
def _experts(stamp: tuple, model: str, layer: str, cls: int, _study) -> dict:
    return _experts_dict(_study.experts(model, layer, cls))


def experts(model: str, layer: str, cls: int, study=None) -> dict:
    """The precomputed experts of ``layer`` for class ``cls`` of ``model`` (``study.experts``)."""
    study = study or current_study()
    return _experts(stamp(study), model, layer, int(cls), study)


@st.cache_data(show_spinner=False)
def _has_experts_for(stamp: tuple, model: str, layer: str, qoi: dict, doi: dict, _study) -> bool:
    return bool(_study.has_experts_for(model, layer, qoi, doi))


def has_experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None) -> bool:
    study = study or current_study()
    return _has_experts_for(stamp(study), model, layer, qoi, doi, study)


@st.cache_data(show_spinner=False)
def _experts_for(stamp: tuple, model: str, layer: str, qoi: dict, doi: dict, _study) -> dict:
    return _experts_dict(_study.experts_for(model, layer, qoi, doi))


def experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None) -> dict:
    """``study.experts_for`` (computes and caches on disk when missing: call it inside ``st.status``)."""
    study = study or current_study()
    return _experts_for(stamp(study), model, layer, qoi, doi, study)


@st.cache_data(show_spinner=False)
def _correction_models(stamp: tuple, _study) -> list[str]:
    payload = _study.artifact("corrections")
    return [str(k) for k in ((payload or {}).get("models") or {})]


def model_names(study=None) -> list[str]:
    """The models the report can show: vanilla, clean, and every correction that produced a model."""
    study = study or current_study()
    names = list(BASE_MODELS)
    if status(study).get("corrections"):
        names += [n for n in _correction_models(stamp(study), study) if n not in names]
    return names


def invalidate(study=None) -> None:
    """Forget what the cached readers hold for ``study`` (after a build changed what is on disk)."""
    key = study_key(study)
    _GENERATION[key] = _generation(key) + 1
    _status.clear()


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


def compute_experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None) -> dict | None:
    """Compute (and cache on disk) experts for any quantity and distribution, inside ``st.status``."""
    study = study or current_study()
    ok, result = run_with_status(f"Computing the experts of {layer} for {model} …",
                                 lambda progress: study.experts_for(model, layer, qoi, doi,
                                                                    progress=progress),
                                 done=f"Computed the experts of {layer}", with_progress=True)
    _has_experts_for.clear()
    return _experts_dict(result) if ok else None


def require(study, stages: Iterable[str], what: str, *, key: str | None = None) -> bool:
    """True when ``stages`` are built; else explain what is missing and offer to build it.

    After a successful build the script reruns, so the page draws the fresh results.
    """
    todo = missing(study, stages)
    if not todo:
        return True
    st.info(f"{what} needs the stage(s) **{', '.join(todo)}**, not built yet for this case study. "
            "Building runs on this machine and is cached on disk for every later visit.")
    if st.button(f"Build {', '.join(todo)}", key=key or f"build-{'-'.join(todo)}", type="primary"):
        if build_missing(study, todo):
            st.rerun()
    return False


# ----------------------------------------------------------------------------------------------
# Downloads (deferred: bytes are made when the reader clicks)


def _to_json(obj: Any) -> str:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.dumps(obj, indent=2, default=default)


def download_csv(df, file_name: str, label: str = "Download CSV", key: str | None = None, where=None):
    use_navigation()
    where = where if where is not None else st
    return where.download_button(label, data=lambda: df.to_csv(index=False).encode(), file_name=file_name,
                                 mime="text/csv", key=key or f"dl-{file_name}", on_click="ignore",
                                 icon=":material/download:")


def download_json(obj: Any, file_name: str, label: str = "Download JSON", key: str | None = None,
                  where=None):
    where = where if where is not None else st
    return where.download_button(label, data=lambda: _to_json(obj).encode(), file_name=file_name,
                                 mime="application/json", key=key or f"dl-{file_name}",
                                 on_click="ignore", icon=":material/download:")


def png_bytes(image) -> bytes:
    """PNG bytes of a uint8 RGB array (or a PIL image)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def download_png(make: Callable[[], Any] | Any, file_name: str, label: str = "Download PNG",
                 key: str | None = None, where=None):
    """``make`` is an RGB array / PIL image or a callable returning one (called on click)."""
    where = where if where is not None else st
    data = (lambda: png_bytes(make())) if callable(make) else png_bytes(make)
    return where.download_button(label, data=data, file_name=file_name, mime="image/png",
                                 key=key or f"dl-{file_name}", on_click="ignore",
                                 icon=":material/download:")


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 4, background: int = 255) -> np.ndarray:
    """Tile equally sized uint8 RGB images (a list of rows) into one RGB array with ``pad`` pixels."""
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        return np.full((1, 1, 3), background, np.uint8)
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = np.asarray(img, np.uint8)[..., :3] if img.ndim == 3 else img[..., None]
    return out


# ----------------------------------------------------------------------------------------------
# Formatting


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * float(x):.{digits}f}%"


def pp(x: float | None, digits: int = 1) -> str:
    """A difference of two shares in percentage points."""
    return "—" if x is None else f"{100 * float(x):+.{digits}f} pp"


def correction_labels(study=None) -> dict[str, str]:
    """Model name → the correction's readable label, from the report's corrections rows."""
    rows = report(study).get("corrections") or []
    return {str(r.get("model") or r.get("method")): str(r.get("label") or r.get("method"))
            for r in rows if r.get("model") or r.get("method")}


def model_label(name: str, labels: dict[str, str] | None = None) -> str:
    if name in MODEL_LABELS:
        return MODEL_LABELS[name]
    return f"{(labels or {}).get(name, name)} (correction of vanilla)"

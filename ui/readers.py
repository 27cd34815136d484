"""Cached readers of the open study, all made by one factory (:func:`cached_reader`): the study
object is passed underscored (not hashed); its key strings and the build stamp are what the caches
are keyed on, so a build invalidates what it changed. Tensors reach the pages as NumPy."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import streamlit as st

from .state import study_key

_GENERATION: dict[tuple, int] = {}


def _generation(key: tuple) -> int:
    return _GENERATION.get(key, 0)


def current(study=None):
    """``study``, or the open study (``ui.current_study()``, looked up on the package at call time so
    that a test's stand-in for it is the one every reader sees)."""
    return study or sys.modules[__package__].current_study()


class Reader:
    """A cached reader of the study (made by :func:`cached_reader`): ``reader(study, *args)`` returns
    ``read(study, *args)``, cached with ``st.cache_data`` on ``keyed(study)`` (by default the build
    stamp, :func:`stamp`) and the arguments (strings and small dicts; the study itself is not hashed).
    ``reader.clear()`` forgets every entry."""

    def __init__(self, name: str, read: Callable[..., Any], keyed: Callable[[Any], tuple],
                 **cache: Any) -> None:
        def cached(key: tuple, args: tuple, _study):
            return read(_study, *args)

        # Streamlit keys a cached function on its module, qualified name and source: functions made
        # by one factory share the last two, so each reader gets a name of its own.
        cached.__name__ = cached.__qualname__ = f"read_{name}"
        self.name, self.keyed = name, keyed
        self._cached = st.cache_data(show_spinner=False, **cache)(cached)

    def __call__(self, study, *args: Any) -> Any:
        return self._cached(self.keyed(study), args, study)

    def clear(self) -> None:
        self._cached.clear()


def cached_reader(name: str, read: Callable[..., Any], *, keyed: Callable[[Any], tuple] | None = None,
                  **cache: Any) -> Reader:
    """The one factory of the pages' cached readers: returns a :class:`Reader` of
    ``read(study, *args)`` named ``name`` (unique per reader), keyed on ``keyed(study)`` (default:
    :func:`stamp`, so a build invalidates it) and the arguments; ``cache`` goes to
    ``st.cache_data`` (``ttl``, ``max_entries``)."""
    return Reader(name, read, keyed or stamp, **cache)


def _status_key(study) -> tuple:
    key = study_key(study)
    return key + (_generation(key),)


_status = cached_reader("status", lambda s: {str(k): bool(v) for k, v in s.status().items()},
                        keyed=_status_key, ttl=10)


def status(study=None) -> dict[str, bool]:
    """``study.status()``: which stages are built (re-read at most every 10 s, and after each build)."""
    return _status(current(study))


def stamp(study=None) -> tuple:
    """What the cached readers are keyed on besides their arguments: the study key, its build
    generation and which stages are built."""
    study = current(study)
    return _status_key(study) + tuple(sorted(status(study).items()))


def _read_report(study) -> dict:
    from core.report.degenerate import study_report
    from core.report.health import annotate

    return annotate(study_report(study))  # + which corrections' tuning grid could not choose


_report = cached_reader("report", _read_report)


def report(study=None) -> dict:
    """``study.report()`` (the DESIGN §2 JSON of what is built), cached per build state, with
    ``core.report.health``'s ``warnings`` and the shortcut rule's caveat added, and which
    corrections' tuning could not choose (``core.report.degenerate.annotate_corrections``)."""
    return _report(current(study))


def _strip(value: Any, drop: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_strip(v, drop) for v in value]
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a tensor: pages get numpy
        return value.detach().cpu().numpy()
    return value


def _read_artifact(study, stage: str, drop: tuple[str, ...]) -> dict | None:
    payload = study.artifact(stage)
    return None if payload is None else _strip(payload, drop)


_artifact = cached_reader("artifact", _read_artifact)


def artifact(stage: str, study=None, drop: Iterable[str] = ("models",)) -> dict | None:
    """``study.artifact(stage)`` with tensors as numpy and the keys in ``drop`` (state dicts) left
    out; None when the stage is not built."""
    return _artifact(current(study), stage, tuple(drop))


_samples = cached_reader("samples", lambda s, split, n: {k: np.asarray(v) for k, v in
                                                         s.samples(split=split, n=n).items()})


def samples(split: str = "test", n: int = 8, study=None) -> dict:
    """``study.samples(split, n)`` with every value as a NumPy array."""
    return _samples(current(study), split, int(n))


def _experts_dict(result: dict) -> dict:
    out = dict(result)
    out["rows"] = [dict(r) for r in result.get("rows", [])]
    for k in ("scores", "images", "maps"):
        if k in out and out[k] is not None:
            out[k] = np.asarray(_strip(out[k], ()))
    return out


_experts = cached_reader("experts", lambda s, model, layer, cls: _experts_dict(s.experts(model, layer, cls)))


def experts(model: str, layer: str, cls: int, study=None) -> dict:
    """The precomputed experts of ``layer`` for class ``cls`` of ``model`` (``study.experts``)."""
    return _experts(current(study), model, layer, int(cls))


_has_experts_for = cached_reader(
    "has_experts_for",
    lambda s, model, layer, qoi, doi, images: bool(s.has_experts_for(model, layer, qoi, doi, images=images)))


def has_experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None,
                    images: str = "label") -> bool:
    """Whether experts for this quantity and distribution are on disk (``study.has_experts_for``)."""
    return _has_experts_for(current(study), model, layer, qoi, doi, images)


_experts_for = cached_reader(
    "experts_for",
    lambda s, model, layer, qoi, doi, images: _experts_dict(s.experts_for(model, layer, qoi, doi,
                                                                          images=images)))


def experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None,
                images: str = "label") -> dict:
    """``study.experts_for`` (computes and caches on disk when missing: call it inside ``st.status``);
    ``images`` "label" or "predicted": which test images the experts are interpreted on."""
    return _experts_for(current(study), model, layer, qoi, doi, images)


_correction_models = cached_reader(
    "correction_models",
    lambda s: [str(k) for k in ((s.artifact("corrections") or {}).get("models") or {})])


def invalidate(study=None) -> None:
    """Forget what the cached readers hold for ``study`` (after a build changed what is on disk)."""
    key = study_key(study)
    _GENERATION[key] = _generation(key) + 1
    _status.clear()


# ----------------------------------------------------------------------------------------------
# The case's facts (every case-specific word a chapter shows comes from here)


# The facts last read (what model_label, class_name, ... use when not given facts): updated in
# place, so every module that imported it sees the same dict.
_LAST_FACTS: dict = {}


def _fallback_facts(study) -> dict:
    """Facts of a study that cannot say them (a stand-in in tests, or data that cannot load)."""
    try:
        models = list((study.report() or {}).get("models") or {})
    except Exception:  # noqa: BLE001
        models = []
    cfg = getattr(study, "config", None)
    experts = getattr(cfg, "experts", None) or {}
    return {"classes": [], "region": None, "channels": 1, "size": None, "headline": None,
            "evaluation_sets": [], "training_sets": [], "chance": None, "region_alias": None,
            "subject": getattr(study, "subject", None) or (models[0] if models else None),
            "reference": getattr(study, "reference", None) or (models[1] if len(models) > 1 else None),
            "models": models, "layers": list(experts.get("layers") or []),
            "title": getattr(cfg, "title", None)}


def _read_facts(study) -> dict:
    try:
        out = dict(study.case_facts())
    except Exception:  # noqa: BLE001 - a stand-in study, or data that cannot be read right now
        out = _fallback_facts(study)
    out.setdefault("models", [])
    out.setdefault("layers", [])
    return out


_facts = cached_reader("facts", _read_facts)


def facts(study=None) -> dict:
    """``study.case_facts()``: classes, region, channels, size, headline, evaluation_sets,
    training_sets, chance, subject, reference, models, layers, title (cached per build state)."""
    out = _facts(current(study))
    _LAST_FACTS.clear()
    _LAST_FACTS.update(out)
    return out


def model_names(study=None) -> list[str]:
    """The models the report can show: the case's models, then every correction that produced one."""
    study = current(study)
    names = list(facts(study).get("models") or [])
    if status(study).get("corrections"):
        names += [n for n in _correction_models(study) if n not in names]
    return names

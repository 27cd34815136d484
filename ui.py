"""Shared helpers for every chapter of the report (this module imports Streamlit; ``core`` never does).

What a chapter needs, in one place:

- ``current_study()``: the open :class:`core.casestudy.CaseStudy` (``st.cache_resource`` on the case
  name, cache folder and device; shared across sessions, so chapters never mutate its models). A
  case is named, never a path: the app opens cases with ``allow_path=False``.
- ``facts(study)``: ``study.case_facts()`` (classes, region, channels, size, headline evaluation
  set, chance, subject, reference, models, layers); chapters read every case-specific word from it.
- Cached readers keyed on strings, never on tensors: ``report()``, ``status()``, ``artifact(stage)``,
  ``samples(split, n)``, ``experts(model, layer, cls)``, ``experts_for(model, layer, qoi, doi)``.
- ``build_missing(study, stages)``: run ``study.build`` inside ``st.status`` with a progress bar and a
  readable error; ``require(study, stages, what)`` offers that build when a chapter's results are
  missing.
- Pictures for any case: ``picture`` (grey or colour, enlarged to a readable size), ``tinted``
  (the region outlined), ``masked`` / ``overlay`` / ``heatmap`` (an interpretation over the image).
- Downloads: ``download_csv``, ``download_json``, ``download_png``, ``download_report`` (the HTML
  report; deferred: the bytes are made only when the reader clicks).
- Deep links: ``qp_get`` / ``qp_set`` and ``choice(...)``, a widget whose default is read from
  ``st.query_params`` and whose value is written back there, so a copied URL reopens the same view.
- The sidebar state the entrypoint owns: ``current_case()``, ``current_model()``, ``current_device()``.
- ``plain(text)``: text safe to show in a Markdown element (no links, no formatting, no paths).
"""

from __future__ import annotations

import io
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import streamlit as st

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


def stage_exists(stage: str) -> bool:
    return stage in STAGES


# ----------------------------------------------------------------------------------------------
# Plain text


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>$:~])")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/,;]+){2,}")


_WJ = "\u2060"  # WORD JOINER: invisible; between two characters it keeps them from forming markup
# what Markdown (GitHub-flavoured, as Streamlit draws it) turns into a live link or image even
# with its punctuation escaped: bare web addresses and e-mail addresses, found in the text after
# the escapes are resolved; and, for inert(), a ] that closes a link's text, an image's !, a <
_AUTOLINK = re.compile(r"(?i)(?<=www)(?=\.)|(?<=[@:])(?=\S)")
_INERT = re.compile(r"(?i)(?<=www)(?=\.)|(?<=[@:<$])(?=\S)|(?<=!)(?=\[)|(?<=\])(?=[(\[:])")


def _one_line(text: Any) -> str:
    """``text`` on one line, without Unicode format (Cf) or control (Cc) characters: a
    right-to-left override cannot reorder what follows it."""
    return "".join(ch for ch in " ".join(str(text).split())
                   if unicodedata.category(ch) not in ("Cf", "Cc"))


def plain(text: Any, limit: int = 300) -> str:
    """``text`` as one line that Markdown shows literally: no links (not even a bare web or e-mail
    address), images, emphasis, directives or LaTeX; no format or control characters; file paths
    shortened to their last part; at most ``limit`` characters. For a Markdown element (markdown,
    caption, title, alerts, metric, tab and expander labels)."""
    s = _one_line(text)
    s = _PATH.sub(lambda m: "…/" + re.split(r"[\\/]", m.group(0))[-1], s)
    if len(s) > limit:
        s = s[:limit - 1] + "…"
    return _AUTOLINK.sub(_WJ, _MD_SPECIAL.sub(r"\\\1", s))


def inert(text: Any) -> str:
    """``text`` as it reads, on one line and without format or control characters, with an
    invisible word joiner inside ``](``, ``][``, ``]:``, ``![`` and ``www.``, and after a ``<``,
    ``:``, ``@`` or ``$`` that a space does not follow (plain prose is left as it is):
    the same string in a Markdown element cannot become a link, an image, an address, HTML, a
    directive or math, and it reads unchanged where text is drawn as it is (selectbox options,
    table cells, chart labels). For a case's names in helpers that serve both (class and model
    names, the region's name)."""
    return _INERT.sub(_WJ, _one_line(text))


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
    try:
        return str(facts(study)["subject"])
    except Exception:  # noqa: BLE001 - no study open: the first model is the usual default
        return "vanilla"


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
    from core.report.health import annotate

    return annotate(_study.report())


def report(study=None) -> dict:
    """``study.report()`` (the DESIGN §2 JSON of what is built), cached per build state, with
    ``core.report.health``'s ``warnings`` and the shortcut rule's caveat added."""
    study = study or current_study()
    return _report(stamp(study), study)


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
    study = study or current_study()
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
            url = f"{link.get('page', '')}?{urlencode(link.get('params') or {})}"
            lines.append(f"- {plain(item['text'], limit=1200)} [→ open]({url})")
        if lines:
            st.markdown("\n".join(lines))
        if found["cannot_tell"]:
            st.caption("What this study cannot tell: " + " ".join(
                plain(t, limit=600) for t in found["cannot_tell"]))
    return found


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


def rule_caveat(study=None) -> str | None:
    """The sentence to show beside the shortcut rule when its false-alarm check is gone (no
    reference model), escaped for Markdown; None when the rule has it."""
    try:
        text = (report(study).get("experts") or {}).get("shortcut_rule_caveat")
    except Exception:  # noqa: BLE001
        return None
    return plain(text, limit=1000) if text else None


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
def _has_experts_for(stamp: tuple, model: str, layer: str, qoi: dict, doi: dict, images: str,
                     _study) -> bool:
    return bool(_study.has_experts_for(model, layer, qoi, doi, images=images))


def has_experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None,
                    images: str = "label") -> bool:
    study = study or current_study()
    return _has_experts_for(stamp(study), model, layer, qoi, doi, images, study)


@st.cache_data(show_spinner=False)
def _experts_for(stamp: tuple, model: str, layer: str, qoi: dict, doi: dict, images: str,
                 _study) -> dict:
    return _experts_dict(_study.experts_for(model, layer, qoi, doi, images=images))


def experts_for(model: str, layer: str, qoi: dict, doi: dict, study=None,
                images: str = "label") -> dict:
    """``study.experts_for`` (computes and caches on disk when missing: call it inside ``st.status``);
    ``images`` "label" or "predicted": which test images the experts are interpreted on."""
    study = study or current_study()
    return _experts_for(stamp(study), model, layer, qoi, doi, images, study)


@st.cache_data(show_spinner=False)
def _correction_models(stamp: tuple, _study) -> list[str]:
    payload = _study.artifact("corrections")
    return [str(k) for k in ((payload or {}).get("models") or {})]


def invalidate(study=None) -> None:
    """Forget what the cached readers hold for ``study`` (after a build changed what is on disk)."""
    key = study_key(study)
    _GENERATION[key] = _generation(key) + 1
    _status.clear()


# ----------------------------------------------------------------------------------------------
# The case's facts (every case-specific word a chapter shows comes from here)


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


@st.cache_data(show_spinner=False)
def _facts(stamp: tuple, _study) -> dict:
    try:
        out = dict(_study.case_facts())
    except Exception:  # noqa: BLE001 - a stand-in study, or data that cannot be read right now
        out = _fallback_facts(_study)
    out.setdefault("models", [])
    out.setdefault("layers", [])
    return out


def facts(study=None) -> dict:
    """``study.case_facts()``: classes, region, channels, size, headline, evaluation_sets,
    training_sets, chance, subject, reference, models, layers, title (cached per build state)."""
    global _LAST_FACTS
    study = study or current_study()
    out = _facts(stamp(study), study)
    _LAST_FACTS = out
    return out


def model_names(study=None) -> list[str]:
    """The models the report can show: the case's models, then every correction that produced one."""
    study = study or current_study()
    names = list(facts(study).get("models") or [])
    if status(study).get("corrections"):
        names += [n for n in _correction_models(stamp(study), study) if n not in names]
    return names


def accuracy_columns(models: dict, f: dict | None = None) -> list[tuple[str, str]]:
    """(report key, column label) of every accuracy the report holds: training first, then the
    case's evaluation sets in its order (the headline one marked)."""
    f = f if f is not None else _LAST_FACTS
    keys: list[str] = []
    for m in models.values():
        keys += [k for k in m if k.endswith("_acc") and k not in keys]
    sets = [f"{s}_acc" for s in (f.get("evaluation_sets") or [])]
    train = [k for k in keys if k.startswith("train") and k not in sets]
    ordered = train + [k for k in sets if k in keys] + [k for k in keys if k not in train + sets]
    return [(k, set_label(k[:-4])) for k in ordered]


# ----------------------------------------------------------------------------------------------
# Pictures for any case: grey (H, W) or colour (H, W, 3) images in [0, 1]


def scale_for(size: Sequence[int] | None, target: int = 128) -> int:
    """How many screen pixels per image pixel make an image about ``target`` pixels wide."""
    if not size:
        return 4
    return max(1, int(round(target / max(int(s) for s in size))))


def _rgb01(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) → (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size and np.nanmax(a) > 1.5:
        a = a / 255.0
    a = np.clip(np.nan_to_num(a), 0, 1)
    return np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]


def _enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    return rgb if scale <= 1 else rgb.repeat(scale, 0).repeat(scale, 1)


def picture(x, scale: int = 4) -> np.ndarray:
    """An image (H, W) or (H, W, 3) in [0, 1] (or 0–255) → enlarged uint8 RGB, shades kept."""
    return _enlarge((_rgb01(x) * 255).round().astype(np.uint8), int(scale))


def tinted(x, mask, scale: int = 4) -> np.ndarray:
    """The image with the region's pixels tinted red (visible on any background)."""
    rgb = _rgb01(x) * 255
    if mask is not None:
        m = np.asarray(mask, bool)
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([230.0, 40.0, 40.0])
    return _enlarge(rgb.round().astype(np.uint8), int(scale))


def outlined(x, mask, scale: int = 4, color: tuple[int, int, int] = (230, 40, 40)) -> np.ndarray:
    """The image enlarged by ``scale`` with the region's boundary drawn in ``color`` (the pixels of
    the region that touch a pixel outside it, after enlarging); the image itself is unchanged."""
    rgb = picture(x, scale)
    if mask is None:
        return rgb
    m = np.asarray(mask, bool)
    m = m.repeat(int(scale), 0).repeat(int(scale), 1)
    pad = np.pad(m, 1, constant_values=False)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = m & ~inner
    if int(scale) >= 4:  # a two-pixel line where the picture is large enough to carry it
        pe = np.pad(edge, 1, constant_values=False)
        edge = m & (pe[:-2, 1:-1] | pe[2:, 1:-1] | pe[1:-1, :-2] | pe[1:-1, 2:] | edge)
    out = rgb.copy()
    out[edge] = np.array(color, dtype=np.uint8)
    return out


def masked(x, attr, scale: int = 4, q: float = 95.0, dim: float = 0.25) -> np.ndarray:
    """The paper's view of an interpretation: the image kept where its attribution is above the
    ``q``-th percentile (softly blurred, tinted red), dimmed elsewhere; colour kept."""
    from core.methods import imaging

    m = imaging.percentile_mask(attr, q)[..., None]
    rgb = _rgb01(x) * (dim + (1 - dim) * m)
    rgb[..., 0] = np.clip(rgb[..., 0] + 0.6 * m[..., 0], 0, 1)
    return _enlarge((rgb * 255).round().astype(np.uint8), int(scale))


def heatmap(attr, scale: int = 4) -> np.ndarray:
    """Signed heatmap (red raises, blue lowers, white neutral), scaled to its largest magnitude."""
    from core.methods import imaging

    return imaging.heatmap(attr, scale=int(scale))


def overlay(x, attr, scale: int = 4, alpha: float = 0.55) -> np.ndarray:
    """The signed heatmap blended over the image (colour kept)."""
    from core.methods import imaging

    heat = imaging.heatmap(attr).astype(np.float64) / 255
    out = ((1 - alpha) * _rgb01(x) + alpha * heat) * 255
    return _enlarge(np.clip(out, 0, 255).round().astype(np.uint8), int(scale))


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
    study = study or current_study()
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


def report_html_bytes(study) -> bytes:
    """``core.report.html.html_report(study)`` as UTF-8 bytes; on failure, a page whose body is one
    escaped line saying why (the download never raises in the reader's face)."""
    import html

    try:
        from core.report.html import html_report

        return html_report(study).encode()
    except Exception as exc:  # noqa: BLE001 - any failure becomes one readable line
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        text = _PATH.sub(lambda m: "…/" + re.split(r"[\\/]", m.group(0))[-1], text)  # no server paths
        line = html.escape(text[:300])
        return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report not "
                f"available</title></head><body><p>Could not make the report: {line}</p></body></html>\n"
                ).encode()


def download_report(study, label: str = "Download the report (HTML)", key: str = "dl-report-html",
                    where=None):
    """The case's self-contained HTML report (tables, figures, provenance), made only on click, as
    ``<case>-report.html``."""
    where = where if where is not None else st
    case = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(getattr(study, "name", None) or current_case())) or "case"
    return where.download_button(label, data=lambda: report_html_bytes(study),
                                 file_name=f"{case}-report.html", mime="text/html", key=key,
                                 on_click="ignore", icon=":material/description:",
                                 help="One HTML file with every built table and figure (embedded) "
                                      "and the provenance; it opens offline.")


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


# Okabe & Ito's palette: told apart with the common colour-vision deficiencies.
PALETTE = ["#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]


def model_colors(names: Sequence[str], facts: dict | None = None) -> dict[str, str]:
    """One colour per model, the same on every page: the model under study vermillion, its
    reference blue, every other model (controls, corrections) the next colours in ``names``'s
    order."""
    facts = facts or {}
    first = [m for m in (facts.get("subject"), facts.get("reference")) if m]
    ordered = list(dict.fromkeys([*first, *[str(n) for n in names]]))
    if facts.get("subject") is None and facts.get("reference") is not None:
        ordered.insert(0, "\0")  # keep blue for the reference
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(ordered)}
    return {str(n): colors[str(n)] for n in names}


def heat_legend(width: int = 240, height: int = 12) -> np.ndarray:
    """The signed heatmap's colour ramp as an image (uint8 RGB, ``width`` × ``height``): blue at
    −max on the left, white at 0, red at +max on the right (core.methods.imaging.heatmap's colours)."""
    from core.methods import imaging

    ramp = np.linspace(-1.0, 1.0, int(width))[None, :].repeat(int(height), 0)
    ramp[0, 0], ramp[0, -1] = -1.0, 1.0  # the ramp's own max is 1: no rescaling
    return imaging.heatmap(ramp)


HEAT_SCALE_NOTE = ("Colour scale: blue lowers, white is 0, red raises; each tile is scaled to its own "
                   "largest |attribution| (full red = +max, full blue = −max of that tile).")


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], title: str,
                  footer: str = "", pad: int = 4) -> np.ndarray:
    """:func:`image_grid` with a title above, one label left of each row and a footer (the
    legend) below, drawn in Pillow's built-in font: a PNG that says what it shows on its own."""
    from PIL import Image, ImageDraw, ImageFont

    grid = image_grid(rows, pad=pad)
    font = ImageFont.load_default()
    line = 16
    labels = [_wrap(x, 10_000)[0] for x in row_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([int(measure.textlength(x, font=font)) for x in labels] or [0]) + 2 * pad
    footer_lines = _wrap(footer, max(40, (grid.shape[1] + label_w) // 7)) if footer else []
    title_lines = _wrap(title, max(40, (grid.shape[1] + label_w) // 7))
    h = grid.shape[0] + line * (len(title_lines) + len(footer_lines)) + 2 * pad
    w = grid.shape[1] + label_w
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    top = pad + line * len(title_lines)
    canvas.paste(Image.fromarray(grid), (label_w, top))
    draw = ImageDraw.Draw(canvas)
    ink = (31, 35, 40)
    for i, t in enumerate(title_lines):
        draw.text((pad, pad + i * line), t, fill=ink, font=font)
    if rows and len(rows[0]):
        row_h = rows[0][0].shape[0] + pad
        for i, t in enumerate(labels[:len(rows)]):
            draw.text((pad, top + pad + i * row_h + max(0, row_h // 2 - line // 2)), t, fill=ink,
                      font=font)
    for i, t in enumerate(footer_lines):
        draw.text((pad, top + grid.shape[0] + i * line), t, fill=ink, font=font)
    return np.asarray(canvas)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, with the few symbols the built-in font
    lacks spelled in ASCII."""
    import textwrap

    ascii_ = str(text).translate(str.maketrans({"−": "-", "→": ">", "≥": ">=", "≤": "<=", "·": "|"}))
    return textwrap.wrap(ascii_, width=width) or [""]


# ----------------------------------------------------------------------------------------------
# Formatting


def _missing(x: Any) -> bool:
    try:
        return x is None or not np.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if _missing(x) else f"{100 * float(x):.{digits}f}%"


def pp(x: float | None, digits: int = 1) -> str:
    """A difference of two shares in percentage points."""
    return "—" if _missing(x) else f"{100 * float(x):+.{digits}f} pp"


def correction_labels(study=None) -> dict[str, str]:
    """Model name → the correction's readable label, from the report's corrections rows."""
    rows = report(study).get("corrections") or []
    return {str(r.get("model") or r.get("method")): str(r.get("label") or r.get("method"))
            for r in rows if r.get("model") or r.get("method")}


def model_label(name: str, labels: dict[str, str] | None = None, facts: dict | None = None) -> str:
    """A model's name with its role in the case: the model under study, the reference, or a
    correction of the model under study (``labels``: correction name → readable label)."""
    f = facts if facts is not None else _LAST_FACTS
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
    f = facts if facts is not None else _LAST_FACTS
    names = f.get("classes") or []
    try:
        return inert(names[int(c)])
    except (IndexError, TypeError, ValueError):
        return inert(c)


def region_name(facts: dict | None = None) -> str | None:
    """The case's region name as :func:`inert` text, or None when the case has no region."""
    f = facts if facts is not None else _LAST_FACTS
    region = f.get("region")
    return None if region is None else inert(region)


def set_label(name: str) -> str:
    """An evaluation or training set's key as words: ``decoy_test`` → ``decoy test``."""
    return str(name).replace("_", " ")


def held_out_sets(facts: dict | None = None) -> list[str]:
    """The case's evaluation sets that are not validation sets, the headline first (what the
    narrative and the corrections compare; validation sets tune, they do not judge)."""
    f = facts if facts is not None else _LAST_FACTS
    sets = [str(x) for x in f.get("evaluation_sets") or []]

    def is_val(name: str) -> bool:
        parts = name.split("_")
        return "val" in parts or "validation" in parts

    head = f.get("headline")
    out = [x for x in sets if not is_val(x)] or sets
    return ([head] if head in sets else []) + [x for x in out if x != head]


def no_region_note(facts: dict | None = None) -> str:
    return ("This case names no region (no per-image mask of a suspected shortcut), so there are no "
            "localisation measures and no shortcut verdicts here; the influence views still show "
            "where each model looks.")


def next_chapter(path: str, label: str, why: str = "") -> None:
    """The "next" link at the end of a chapter."""
    st.divider()
    if why:
        st.caption(why)
    try:
        st.page_link(path, label=f"Next: {label}", icon=":material/arrow_forward:")
    except Exception:  # noqa: BLE001 - a chapter run on its own (no navigation): name it instead
        st.caption(f"Next: {label}")

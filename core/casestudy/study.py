"""The pipeline that builds one case study from its config, stage by stage, through the cache.

    study = CaseStudy.open("decoy-mnist")        # a known case by name, or a TOML path (CLI)
    study.build(progress=lambda stage, done, total, message: ...)
    study.report()                               # DESIGN §2 JSON of what is built (never computes)

Stages (``core.casestudy.registry``): ``data → models → experts → representations → corrections →
essence → detection``. Every stage reads only the case seam (``core.seam``): the data adapter's
:class:`~core.seam.CaseData`, the named models, the optional region and reference.

- **data**: the adapter's CaseData (deterministic, rebuilt in memory); the cache keeps its digest
  and sizes, which key everything downstream. A source that reads files keys on their
  fingerprint (paths, sizes, modification times), so replacing an image rebuilds.
- **models**: per seed s = 0 … N−1, every ``[models.<name>]`` in order: built by its factory,
  loaded from its checkpoint (``weights_only=True``) and/or trained on its ``train_on`` training
  set (starting from ``init``'s weights when given); with its accuracy on its own training set and
  on every evaluation set of the data (``<set>_acc``).
- **experts**: for every model, configured layer and class c: the top-k units by distributional
  influence on ``ClassQoI(c)`` over the class-c training images (the same images for every
  model), with bootstrap frequency and a percentile interval; each expert is interpreted
  (Integrated Gradients of the unit at the input, zero baseline) on the first ``n_images`` test
  images of class c. With a region, its ``region_mass`` is the mean share of positive
  attribution on the region, and an expert *carries the shortcut* when that exceeds its layer's
  threshold (:func:`shortcut_rule`); without a region neither exists.
- **representations**, **corrections**, **essence**, **detection**: ``build_stage(study,
  progress) -> dict`` of their module; skipped while the module does not exist.

Each stage's result is one cache entry whose key hashes the stage name, its code version, its
config sections, what it reads (data digest, model digests, upstream keys), the device and the
seed. The case's *name* is not part of any key. A build with everything cached imports no torch
when the case's model facts are cached and its delegated sections are empty.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.cache import Cache, key_of
from core.casestudy import facts as _facts
from core.casestudy.config import (
    CaseConfig,
    CaseError,
    parse_config,
    read_toml,
    resolve,
)
from core.casestudy.registry import BY_NAME, DELEGATED, STAGES, stage_code

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, str], None]
MAX_SEEDS = 64
# The test images a view's experts are interpreted on: by label or by the model's prediction.
IMAGES = ("label", "predicted")


def shortcut_rule(factor: float, quantile: float = 0.95, *, chance: float | None = 16 / 784,
                  region: str = "decoy patch", reference: str | None = "clean") -> str:
    """The rule that flags an expert as carrying the shortcut, in words (it goes into the report)."""
    chance = chance if chance is not None else float("nan")
    floor = f"{factor:g} × chance ({chance:.4f}, the {region}'s share of the image), i.e. " \
            f"{factor * chance:.3f}"
    base = (f"an expert carries the shortcut when its region mass — the share of positive "
            f"attribution its interpretation puts on the {region}, averaged over its class's test "
            "images — exceeds its layer's threshold: ")
    if quantile <= 0 or reference is None:
        return base + floor
    return base + (f"the larger of {floor} and the {quantile:.0%} quantile of the region mass of "
                   f"the reference model's ({reference}) top experts in the same layer (a model "
                   "that does not use the region shows how much of it a unit picks up anyway)")


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


def _device_type_guess() -> str:
    """The device type ``device=None`` resolves to, without importing torch when it is not
    imported yet (a warm build): CUDA when the NVIDIA driver is there and not hidden."""
    import sys

    if "torch" in sys.modules:
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    return "cuda" if os.path.exists("/dev/nvidiactl") and not hidden else "cpu"


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (NumPy's default) of an ascending list."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


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
    """Intra-op threads for a CPU build: ``$CASEBOOK_THREADS``, default 1, and torch's
    deterministic algorithms (warn-only) for the build; both restored afterwards.

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
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    # as deterministic as torch allows: ops with a deterministic variant use it, the rest warn
    # (measured: a 1- vs a 2-thread build of decoy-mnist still moves 181 of its 220 numeric README
    # claims in their last digits, all within their tolerances; README.claims.json checks that)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(deterministic)


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
    """One case study: its config, its cached stages, and the objects the report reads.

    The seam the stages read: :meth:`data` (a :class:`core.seam.CaseData`), :attr:`subject` (the
    model under study), :attr:`reference` (the model to compare against, or None),
    :attr:`model_names`, :meth:`model`, :attr:`device`, ``config.section(name)`` and
    :meth:`artifact`.
    """

    def __init__(self, config: CaseConfig, cache_dir: str | Path | None = None,
                 device: Any = None, seeds: int | None = None):
        self.config = config
        self.cache = Cache(cache_dir)
        self._device = None
        self._device_asked = device
        if device is not None and str(device) != "cpu":
            _ = self.device  # check now: asking for CUDA where there is none is a CaseError
        if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool)
                                  or not 1 <= seeds <= MAX_SEEDS):
            raise CaseError(f"seeds must be an integer in 1–{MAX_SEEDS}, got {seeds!r}")
        self.seeds = seeds
        self._lock = threading.RLock()
        self._data = None
        self._models: dict[tuple[str, int], Any] = {}
        self._payloads: dict[str, Any] = {}  # key → payload read or computed in this process
        self._predictions: dict[tuple[str, int, str], Any] = {}  # (model, seed, split) → classes
        self._facts: dict[str, dict] = {}
        self._facts_to_store: list[str] = []

    @classmethod
    def open(cls, case: str | Path, cache_dir: str | Path | None = None, device: Any = None,
             seeds: int | None = None, *, allow_path: bool = True) -> CaseStudy:
        """Open a known case by name (or, with ``allow_path``, a TOML file by path); validates the
        whole config — every section, the models' layers — before anything is trained or written.

        Opening writes nothing to the cache; the first :meth:`build` also stores the model facts
        validation needed, so the next open need not import torch.
        """
        path, name = resolve(case, allow_path=allow_path)
        raw = read_toml(path)
        config = parse_config(raw, path, name)
        study = cls(config, cache_dir=cache_dir, device=device, seeds=seeds)
        study._check_models()
        return study

    # ------------------------------------------------------------------------------ validation
    def _where(self) -> str:
        from core.casestudy.config import _where

        return _where(self.config.path)

    def model_facts(self, name: str | None = None) -> dict:
        """Layer names and kinds of model ``name`` (default: the subject), from the cache when
        stored there (no torch), else built on the meta device."""
        name = name or self.subject
        if name not in self._facts:
            spec = self.config.models[name]
            f = _facts.model_facts(spec, self.config.base_dir, self._where(), self.cache)
            if f.get("computed"):
                self._facts_to_store.append(name)
            self._facts[name] = f
        return self._facts[name]

    def _check_models(self) -> None:
        src = self._where()
        e = self.config.experts
        subject_facts = self.model_facts(self.subject)
        if not e.get("layers"):
            layers = _facts.default_layers(subject_facts)
            if not layers:
                raise CaseError(f"{src}: no convolution or dense layer found in model "
                                f"{self.subject!r}; name experts.layers")
            e["layers"] = layers
        for name in self.config.models:
            names = self.model_facts(name)["layers"]
            unknown = [x for x in e["layers"] if x not in names]
            if unknown:
                shown = ", ".join(names[:40]) + (" …" if len(names) > 40 else "")
                raise CaseError(f"{src}: unknown layer {unknown[0]!r} in experts.layers; model "
                                f"{name!r} has: {shown}")

    def _store_facts(self) -> None:
        """Keep the model facts this open computed (done by the first build, so that opening alone
        never writes to the cache)."""
        todo, self._facts_to_store = self._facts_to_store, []
        for name in todo:
            with contextlib.suppress(OSError, ValueError):
                _facts.store_facts(self.config.models[name], self.config.base_dir, self.cache,
                                   self._facts[name])

    # ------------------------------------------------------------------------------ the seam
    @property
    def device(self):
        """The ``torch.device`` stages compute on (resolved on first use: ``None`` → CUDA when
        available, else CPU)."""
        if self._device is None:
            from core.devices import pick_device

            try:
                self._device = pick_device(self._device_asked)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CaseError(str(exc).splitlines()[0]) from None
        return self._device

    def _device_type(self) -> str:
        """The device type in the cache keys, without importing torch where it can be avoided."""
        if self._device is not None:
            return self._device.type
        asked = self._device_asked
        if asked is None:
            return _device_type_guess()
        return str(asked).split(":")[0]

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

    @property
    def subject(self) -> str:
        """The model under study (the first of ``[models]``)."""
        return self.config.subject

    @property
    def reference(self) -> str | None:
        """The model to compare against, or None (then the pages show one model)."""
        return self.config.reference

    @property
    def model_names(self) -> list[str]:
        """The case's models in config order (corrected models are not among them)."""
        return self.config.model_names

    # ------------------------------------------------------------------------------- data
    def data(self):
        """The case's :class:`core.seam.CaseData` (deterministic; built once per study)."""
        with self._lock:
            if self._data is None:
                cfg = self.config
                adapter = cfg.adapter
                try:
                    module = importlib.import_module(adapter.module)
                except ImportError as exc:
                    raise CaseError(f"{self.name}: {adapter.module} cannot be imported: "
                                    f"{exc}") from None
                loader = getattr(module, adapter.loader)
                import inspect

                takes_region = len(inspect.signature(loader).parameters) >= 3
                try:
                    data = (loader(dict(cfg.dataset), cfg.region, cfg.base_dir) if takes_region
                            else loader(dict(cfg.dataset), cfg.base_dir))
                except ValueError as exc:  # SourceError, DataUnavailable and bad sizes
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise CaseError(f"{self.name}: {first}") from None
                if cfg.region and cfg.region.get("name") and data.region_name:
                    object.__setattr__(data, "region_name", cfg.region["name"])
                self._check_data(data)
                self._data = data
            return self._data

    def _check_data(self, data) -> None:
        e = self.config.experts
        n = data.n_classes
        bad = [c for c in (e.get("classes") or []) if c >= n]
        if bad:
            raise CaseError(f"{self.name}: experts.classes names class {bad[0]}, but the data "
                            f"has {n} classes (0–{n - 1})")
        shape = (data.channels, *data.size)
        for name, spec in self.config.models.items():
            width = _facts.n_outputs(spec, self.config.base_dir, self._where(), shape)
            if width is not None and width != n:
                raise CaseError(f"{self.name}: model {name!r} gives {width} outputs on a "
                                f"{'×'.join(map(str, shape))} input, but the data has {n} "
                                f"classes ({', '.join(data.class_names[:8])}"
                                f"{', …' if n > 8 else ''}); make them agree")
            if width is None:
                log.debug("model %s: output width not checked on the meta device", name)
            if spec.train_on is not None and spec.train_on not in data.training_sets:
                raise CaseError(f"{self.name}: models.{name}.train_on {spec.train_on!r} is not "
                                f"a training set of the data ({', '.join(data.training_sets)})")

    def expert_classes(self) -> list[int]:
        """The classes the experts stage ranks: ``[experts] classes``, else the first ten classes
        (all of them for ten or fewer). The config is never rewritten, so the stage's key is the
        same whether or not this process has loaded the data."""
        given = self.config.experts.get("classes")
        if given:
            return list(given)
        return list(range(min(self._n_classes(), 10)))

    def case_facts(self) -> dict:
        """What the pages need to know about the case without loading data or models:
        ``{"classes", "region", "channels", "size", "headline", "evaluation_sets",
        "training_sets", "chance", "subject", "reference", "models", "layers"}`` — from the
        data stage's meta line when built, else from the data."""
        info = self._known_data_facts()
        return {**info, "subject": self.subject, "reference": self.reference,
                "models": self.model_names, "layers": list(self.config.experts["layers"]),
                "title": self.config.title}

    @staticmethod
    def _data_facts(data) -> dict:
        return {"classes": list(data.class_names), "region": data.region_name,
                "channels": data.channels, "size": list(data.size), "headline": data.headline,
                "evaluation_sets": list(data.evaluation_sets),
                "training_sets": list(data.training_sets), "chance": data.chance,
                "region_alias": (data.extra or {}).get("region_alias")}

    def samples(self, split: str = "test", n: int | None = 8) -> dict:
        """The first ``n`` images of a split (all with ``n=None``) as NumPy arrays for display:
        ``{"x": (n, H, W) or (n, H, W, 3) in [0, 1], "x_clean": same or None, "mask": (n, H, W)
        bool or None, "y": (n,)}``."""
        if split not in ("train", "val", "test"):
            raise CaseError(f"split must be 'train', 'val' or 'test', got {split!r}")
        data = self.data()
        s = getattr(data, split)
        n = s.n if n is None else max(0, min(int(n), s.n))
        return {"x": data.display(s.x[:n]).astype("float32"),
                "x_clean": None if s.x_clean is None else
                data.display(s.x_clean[:n]).astype("float32"),
                "mask": None if s.mask is None else _np(s.mask[:n, 0]).astype(bool),
                "y": _np(s.y[:n]).astype("int64")}

    # ------------------------------------------------------------------------------- keys
    def _meta(self, key: str | None) -> dict | None:
        return None if key is None else self.cache.meta(key)

    def _data_key(self) -> str:
        cfg = self.config
        fingerprint = None
        module = cfg.adapter.module
        if cfg.dataset["source"] in ("folder", "tensors"):
            # a source that reads files keys on them: replacing an image must rebuild
            from core import sources

            try:
                fingerprint = sources.source_fingerprint(cfg.dataset, cfg.region, cfg.base_dir)
            except ValueError as exc:
                raise CaseError(f"{self.name}: {(str(exc).splitlines() or [''])[0]}") from None
        return key_of(stage="data", version=stage_code("data", (module,)),
                      config={"dataset": cfg.dataset, "region": cfg.region},
                      files=fingerprint)

    def _data_digest(self) -> str | None:
        if self._data is not None:
            return self._data.digest()
        meta = self._meta(self._data_key())
        return None if meta is None else meta.get("digest")

    def _checkpoint_digests(self) -> dict:
        out = {}
        for name, spec in self.config.models.items():
            if spec.checkpoint is None:
                continue
            if not os.path.lexists(spec.checkpoint):
                out[name] = "<missing>"
                continue
            try:  # a regular file within the size bound, or one line before a byte is read
                out[name] = _facts.checkpoint_digest(spec.checkpoint, f"model {name!r}: checkpoint")
            except ValueError as exc:
                raise CaseError(f"{self.name}: {(str(exc).splitlines() or [''])[0]}") from None
        return out

    def _models_key(self, seed: int) -> str | None:
        digest = self._data_digest()
        if digest is None:
            return None
        models = {n: s.plain() for n, s in self.config.models.items()}
        for m in models.values():  # the checkpoint's content, not where it lies
            if m["checkpoint"] is not None:
                m["checkpoint"] = "file"
        user = [s.factory for s in self.config.models.values() if s.factory]
        built_in = tuple(sorted({s.factory.split(":")[0] for s in self.config.models.values()
                                 if s.factory and s.factory.startswith("core.")}))
        return key_of(stage="models", version=stage_code("models", built_in),
                      config={"models": models, "facts": [_facts.facts_key(
                          s, self.config.base_dir) for s in self.config.models.values()
                          if s.factory] if user else None},
                      checkpoints=self._checkpoint_digests() or None,
                      data=digest, seed=int(seed), device=self._device_type())

    def _model_digests(self, seed: int = 0) -> dict | None:
        meta = self._meta(self._models_key(seed))
        return None if meta is None else meta.get("digests")

    def _experts_key(self) -> str | None:
        digest, models = self._data_digest(), self._model_digests(0)
        if digest is None or models is None:
            return None
        config = {k: v for k, v in self.config.experts.items() if k != "primary_layer"}
        return key_of(stage="experts", version=stage_code("experts", (self.config.adapter.module,)),
                      config=config,
                      data=digest, models=models, reference=self.reference, seed=0,
                      device=self._device_type())

    def _delegate(self, stage: str):
        """The stage's module when it defines ``build_stage``; else None (the stage is skipped)."""
        name = BY_NAME[stage].delegated
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if getattr(exc, "name", None) not in (name, "core"):
                log.warning("%s cannot be imported (%s); skipping the %s stage", name, exc, stage)
            return None
        return module if callable(getattr(module, "build_stage", None)) else None

    def _delegated_key(self, stage: str) -> str | None:
        from core.casestudy.registry import module_exists

        s = BY_NAME[stage]
        if not module_exists(s.delegated):
            return None
        experts = self._experts_key()
        if experts is None:
            return None
        # The stage may read every seed's models (study.seeds): key on all of them.
        seeds = self.seeds or 1
        models = {str(k): self._model_digests(k) for k in range(seeds)}
        return key_of(stage=stage, version=stage_code(stage),
                      config=self.config.section(stage), data=self._data_digest(),
                      models=models["0"], seeds=seeds,
                      seed_models=models if seeds > 1 else None, experts=experts,
                      subject=self.subject, reference=self.reference,
                      device=self._device_type())

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
    def built_seeds(self, limit: int = MAX_SEEDS) -> list[int]:
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
                keys = [self._models_key(s) for s in range(self.seeds or 1)]
                out[stage] = all(k is not None and self.cache.has(k) for k in keys)
            else:
                key = self._key(stage)
                out[stage] = key is not None and self.cache.has(key)
        return out

    def code_fingerprint(self) -> str:
        """A short hash of what the report's numbers follow from apart from floating point: every
        stage's code version and the case's whole config (no weights, no device). The README's
        generated blocks carry it, so a code or config change without regenerating them is
        caught exactly, while tiny float differences between machines are not."""
        cfg = self.config
        sections = {s: cfg.section(s) for s in ("dataset", "region", "experts", *DELEGATED)}
        models = {n: m.plain() for n, m in cfg.models.items()}
        for m in models.values():
            if m["checkpoint"]:
                m["checkpoint"] = Path(m["checkpoint"]).name
        code = {s: stage_code(s, (cfg.adapter.module,) if s == "data" else ())
                for s in STAGES if s not in DELEGATED or BY_NAME[s].delegated}
        return key_of(code=code, config=sections, models=models,
                      reference=cfg.reference)[:16]

    def is_built(self, stage: str) -> bool:
        """The one "is this view precomputed?" rule the pages ask: the stage's entry is in the
        cache (or was computed in this process)."""
        key = self._key(stage)
        return key is not None and (key in self._payloads or self.cache.has(key))

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
        """Build ``stages`` (default all) and whatever they read, through the cache.

        ``force`` recomputes the asked-for stages (not their upstream ones). ``seeds``: models for
        seeds 0 … seeds−1 (default: the study's ``seeds``, else 1); a given value becomes the
        study's ``seeds``. Returns, per stage, ``{"status": "cached" | "built" | "skipped" |
        "failed", "seconds": float, "message": str}``. A delegated stage that fails is reported
        as "failed" and the build goes on.
        """
        if isinstance(stages, str):
            stages = [s.strip() for s in stages.split(",") if s.strip()]
        wanted = list(STAGES) if not stages else list(stages)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise CaseError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
        if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool)
                                  or not 1 <= seeds <= MAX_SEEDS):
            raise CaseError(f"seeds must be an integer in 1–{MAX_SEEDS}, got {seeds!r}")
        if seeds is not None:
            self.seeds = seeds
        seeds = self.seeds or 1
        needed = set(wanted)
        changed = True
        while changed:  # close over what the stages read
            before = len(needed)
            for s in list(needed):
                needed |= set(BY_NAME[s].reads)
            changed = len(needed) != before
        results = {}
        with self._lock:
            clean = getattr(self.cache, "clean_orphans", None)
            if clean is not None and self.cache.root.is_dir():
                with contextlib.suppress(OSError):
                    clean()  # temp files a killed writer left behind
            for stage in STAGES:
                if stage not in needed:
                    continue
                t0 = time.perf_counter()
                p = _StageProgress(stage, progress)
                stage_force = force and stage in wanted
                try:
                    if stage == "data":
                        status = self._build_data(stage_force, p)
                        self._store_facts()  # the case is valid: keep what validating it took
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
                    message = f"{BY_NAME[stage].delegated} has no build_stage yet"
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

        if not force and (key in self._payloads or self.cache.has(key)):
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
        key = self._data_key()
        if force or not (key in self._payloads or self.cache.has(key)):
            self.data()  # bad data is a CaseError before anything is written

        def compute():
            p(0, 1, f"building the data ({self.config.dataset['source']})")
            t0 = time.perf_counter()
            data = self.data()
            digest = data.digest()
            info = {**data.describe(), "seed": data.seed, "digest": digest}
            facts = self._data_facts(data)
            prov = _provenance(time.perf_counter() - t0, "cpu")
            p(1, 1, "done")
            return ({**info, "provenance": prov},
                    {"stage": "data", "case": self.name, "digest": digest, "describe": info,
                     "facts": facts, "provenance": prov})

        return self._run_stage(key, compute, force, p)

    def _build_models(self, seeds, force: bool, p: _StageProgress) -> str:
        seeds = list(seeds)
        keys = {s: self._models_key(s) for s in seeds}
        todo = [s for s in seeds if force or not self.cache.has(keys[s])]
        if not todo:
            p(1, 1, "cached")
            return "cached"
        data = self.data()
        total = 0
        for spec in self.config.models.values():
            if spec.trained:
                t = spec.training
                total += -(-data.training_sets[spec.train_on].n // t["batch_size"]) * t["epochs"]
        total = max(total, 1) * len(todo)
        offset = [0]
        statuses = []
        for seed in todo:
            for name in self.model_names:
                self._models.pop((name, seed), None)

            def compute(seed=seed):
                return self._train_seed(seed, p, offset, total)

            # "cached" when another process trained it while this one waited on the key's lock
            statuses.append(self._run_stage(keys[seed], compute, force, p))
        p(total, total, "done")
        return "built" if "built" in statuses else "cached"

    def _fresh_model(self, name: str):
        return _facts.build(self.config.models[name], self.config.base_dir, self._where())

    def _load_checkpoint(self, name: str, model):
        from core.factories import load_weights

        spec = self.config.models[name]
        try:
            return load_weights(model, Path(spec.checkpoint), name)
        except ValueError as exc:
            raise CaseError(f"{self.name}: models.{name}: "
                            f"{(str(exc).splitlines() or [''])[0]}") from None

    def _train_seed(self, seed: int, p: _StageProgress, offset: list, total: int):
        from core.models import evaluate, set_seed, state_digest, train_model

        data = self.data()
        t0 = time.perf_counter()
        out, metrics, digests = {}, {}, {}
        built: dict[str, Any] = {}
        from core.casestudy.config import build_order

        for name in build_order(self.config.models):
            spec = self.config.models[name]
            set_seed(seed)
            model = self._fresh_model(name)
            if spec.checkpoint is not None:
                model = self._load_checkpoint(name, model)
            if spec.init is not None:
                model.load_state_dict(built[spec.init].state_dict())
            hist = None
            if spec.trained:
                train = data.training_sets[spec.train_on]
                t = spec.training
                base = offset[0]

                def step(done, _total, info, name=name, base=base, t=t):
                    p(base + done, total, f"seed {seed} {name}: epoch {info['epoch'] + 1}/"
                      f"{t['epochs']} loss {info['loss']:.3f}")

                hist = train_model(model, train.x, train.y, epochs=t["epochs"], lr=t["lr"],
                                   batch_size=t["batch_size"], seed=seed, device=self.device,
                                   progress=step, weight_decay=t["weight_decay"])
                offset[0] = base + hist["steps"]
                acc = {"train_acc": evaluate(model, train.x, train.y)}
            else:
                model = model.to(self.device)
                acc = {"train_acc": evaluate(model, data.train.x, data.train.y)}
            for set_name, split in data.evaluation_sets.items():
                acc[f"{set_name}_acc"] = evaluate(model, split.x, split.y)
            acc = {k: (None if v != v else round(float(v), 6)) for k, v in acc.items()}
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            digests[name] = state_digest(model)
            metrics[name] = {**acc, "train_seconds": round(hist["seconds"], 3) if hist else 0.0}
            out[name] = {"state_dict": state, "digest": digests[name], "metrics": metrics[name],
                         "history": {"loss": [float(v) for v in hist["loss"]] if hist else [],
                                     "acc": [float(v) for v in hist["acc"]] if hist else []}}
            built[name] = model.eval()
            self._models[(name, seed)] = built[name]
        order = list(self.config.models)  # the report lists them in config order
        out = {n: out[n] for n in order}
        metrics = {n: metrics[n] for n in order}
        digests = {n: digests[n] for n in order}
        prov = _provenance(time.perf_counter() - t0, self.device)
        payload = {"seed": seed, "models": out, "provenance": prov}
        meta = {"stage": "models", "case": self.name, "seed": seed, "digests": digests,
                "metrics": metrics, "provenance": prov}
        return payload, meta

    # ------------------------------------------------------------------------------ models
    def model(self, name: str | None = None, seed: int = 0):
        """A model in eval mode on the study's device: one of :attr:`model_names` (for
        ``seed``; default the subject) or a correction's name. Builds what is missing."""
        name = name or self.subject
        with self._lock:
            if (name, seed) in self._models:
                return self._models[(name, seed)]
            if name in self.config.models:
                key = self._models_key(seed)
                if key is None or not self.cache.has(key):
                    self._build_seed_models(seed)
                    if (name, seed) in self._models:
                        return self._models[(name, seed)]
                payload = self.artifact("models", seed)
                if payload is None:  # listed but unreadable: the cache moved it aside; rebuild
                    self._build_seed_models(seed)
                    if (name, seed) in self._models:
                        return self._models[(name, seed)]
                    payload = self.artifact("models", seed)
                if payload is None:
                    raise CaseError(f"{self.name}: the models of seed {seed} could not be built")
                model = self._from_state(payload["models"][name]["state_dict"], name)
            else:
                model = self._correction_model(name)
            self._models[(name, seed)] = model
            return model

    def _build_seed_models(self, seed: int) -> None:
        """Build the models of seeds 0 … ``seed`` on demand (a stage asked for seed ``seed``)
        without changing :attr:`seeds`: the keys of the stages built later in this process
        must be those a fresh process computes."""
        saved = self.seeds
        try:
            self.build(["models"], seeds=max(seed + 1, self.seeds or 1))
        finally:
            self.seeds = saved

    def _from_state(self, state: dict, name: str | None = None):
        model = self._fresh_model(name or self.subject)
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def _correction_model(self, name: str):
        payload = self.artifact("corrections")
        module = self._delegate("corrections")
        methods = getattr(module, "METHODS", None) if module is not None else None
        if payload is None and methods is not None and name not in methods:
            known = ", ".join([*self.model_names, *methods])
            raise CaseError(f"{self.name}: no model named {name!r}; available: {known}")
        if payload is None and module is not None:
            self.build(["corrections"])
            payload = self.artifact("corrections")
        models = (payload or {}).get("models") or {}
        if name not in models:
            known = ", ".join([*self.model_names, *models]) or "none"
            raise CaseError(f"{self.name}: no model named {name!r}; available: {known}")
        loader = getattr(module, "load_model", None) if module is not None else None
        if callable(loader):
            model = loader(self, name, models[name])
            return model.to(self.device).eval()
        return self._from_state(models[name])

    def _digest_of(self, name: str) -> str:
        if name in self.config.models:
            digests = self._model_digests(0)
            if digests is None:
                self.model(name)
                digests = self._model_digests(0)
            return digests[name]
        from core.models import state_digest

        return state_digest(self.model(name))

    # ----------------------------------------------------------------------------- experts
    def _class_images(self, c: int) -> tuple:
        """(DoI images: class-c training images, interpretation images: the first n_images test
        images of class c, their region masks or None, their test-split indices)."""
        data = self.data()
        m = self.config.experts["n_images"]
        train_x = data.train.x[data.train.y == c]
        idx = (data.test.y == c).nonzero().flatten()[:m]
        masks = None if data.test.mask is None else data.test.mask[idx]
        return train_x, data.test.x[idx], masks, idx

    def predictions(self, model: str, split: str = "test", seed: int = 0):
        """``model``'s predicted class (argmax of its logits) for every image of ``split``
        ("train", "val" or "test"): a (N,) long tensor on the CPU, from
        :func:`core.models.predict_logits` (batched, no gradients) under the model's lock;
        memoised per process (the weights are fixed for a name and seed)."""
        import torch

        from core.influence import model_lock
        from core.models import predict_logits

        if split not in ("train", "val", "test"):
            raise CaseError(f"split must be 'train', 'val' or 'test', got {split!r}")
        key = (model, seed, split)
        with self._lock:
            if key not in self._predictions:
                net, x = self.model(model, seed=seed), getattr(self.data(), split).x
                with model_lock(net):
                    logits = predict_logits(net, x)
                self._predictions[key] = (logits.argmax(1) if len(logits)
                                          else torch.zeros(0, dtype=torch.long))
            return self._predictions[key]

    def _interpretation_indices(self, model: str, classes: list[int], images: str):
        """Test-split indices of the images a view is interpreted on: for each class in
        ``classes`` (one, or a comparative pair a, b), its first ``n_images`` test images by
        label (``images="label"``) or by ``model``'s prediction (``"predicted"``), in that order."""
        import torch

        data = self.data()
        m = self.config.experts["n_images"]
        by = data.test.y if images == "label" else self.predictions(model)
        parts = [(by == c).nonzero().flatten()[:m] for c in classes]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def _rank_many(self, model, layers: list[str], qoi, doi, c: int) -> dict[str, dict]:
        """The rankings of every layer for ``qoi``/``doi`` over the class-c training images, from
        one forward and one backward pass per chunk (:func:`core.experts.experts_many`); the same
        dicts :func:`rank_experts` gives one layer at a time."""
        from core.experts import experts_many

        e = self.config.experts
        train_x = self._class_images(c)[0]
        if len(train_x) == 0:
            raise CaseError(f"{self.name}: class {c} has no training image")
        rankings = experts_many(model, train_x.to(self.device), list(layers), qoi, doi,
                                k=e["k"], reduce=e["reduce"], by=e["by"],
                                bootstrap=e["bootstrap"], confidence=e["confidence"], seed=0)
        return {layer: {"experts": r.to_records(), "scores": r.scores.detach().cpu(),
                        "quantity": r.quantity, "distribution": r.distribution}
                for layer, r in rankings.items()}

    def _rank_and_interpret(self, model, layer: str, qoi, doi, c: int,
                            progress: Callable[[int, int, str], None] | None = None,
                            ranking: dict | None = None, indices=None) -> dict:
        """Top-k experts of ``layer`` for ``qoi``/``doi`` over class-c training images, each
        interpreted on class-c test images (or on the test images ``indices``); tensors (CPU)
        and plain values only. With a region the rows carry ``region_mass``; the ``shortcut``
        flags are set by the caller."""
        import torch

        from core.experts import interpret
        from core.metrics import decoy_mass as region_mass

        e = self.config.experts
        train_x, images, masks, idx = self._class_images(c)
        if len(train_x) == 0:
            raise CaseError(f"{self.name}: class {c} has no training image")
        if indices is not None:
            test = self.data().test
            idx = indices
            images = test.x[idx]
            masks = None if test.mask is None else test.mask[idx]
        dev = self.device
        steps = 1 + int(e["k"])
        if ranking is None:
            if progress:
                progress(0, steps, f"ranking the units of {layer}")
            ranking = rank_experts(model, train_x.to(dev), layer, qoi, doi, k=e["k"],
                                   reduce=e["reduce"], by=e["by"], bootstrap=e["bootstrap"],
                                   confidence=e["confidence"], seed=0)
        maps = []
        for i, ex in enumerate(ranking["experts"]):
            if progress:
                progress(1 + i, steps, f"interpreting expert {ex['unit']} on {len(images)} images")
            if not len(images):  # e.g. no test image is predicted as the class
                maps.append(torch.zeros(0, *images.shape[2:]))
                continue
            a = interpret(model, images.to(dev), layer, ex["unit"], reduce=e["reduce"],
                          resolution=e["resolution"])
            maps.append(a.detach().cpu().sum(1).float())  # summed over channels
        maps = torch.stack(maps) if maps else torch.zeros(0, images.shape[0], *images.shape[2:])
        rows = []
        for i, ex in enumerate(ranking["experts"]):
            mass = None
            if masks is not None and len(images):
                dm = region_mass(maps[i], masks[:, 0]).double()
                ok = torch.isfinite(dm)
                mass = float(dm[ok].mean()) if ok.any() else None
            rows.append({**ex, **self._mass_fields(mass)})
        shown = torch.from_numpy(self.data().display(images)).float()  # [0, 1], for the pages
        return {"rows": rows, "scores": ranking["scores"].float().clone(),
                "images": shown,
                "masks": None if masks is None else masks[:, 0].clone(),
                "indices": idx.clone(), "maps": maps.clone(), "class": int(c),
                "quantity": ranking["quantity"], "distribution": ranking["distribution"]}

    def _known_data_facts(self) -> dict:
        """The data facts (:meth:`_data_facts`): from the data when this process has loaded it
        (no I/O: the experts stage asks once per expert row), else from the data stage's meta
        line, else by loading the data."""
        if self._data is None:
            facts = (self._meta(self._data_key()) or {}).get("facts")
            if facts is not None:
                return facts
        return self._data_facts(self.data())

    def _alias(self) -> str | None:
        return self._known_data_facts().get("region_alias")

    def _mass_fields(self, mass: float | None) -> dict:
        """``{"region_mass": m}`` and the case's alias of it (``decoy_mass`` for DecoyMNIST)."""
        out = {"region_mass": mass}
        alias = self._alias()
        if alias:
            out[alias] = mass
        return out

    def _chance(self) -> float | None:
        return self._known_data_facts().get("chance")

    def _thresholds(self, rows: list[dict]) -> dict[str, float] | None:
        """Per layer: the region mass above which an expert carries the shortcut (see
        :func:`shortcut_rule`): max(factor × chance, quantile q of the reference model's experts
        of that layer). None without a region."""
        chance = self._chance()
        if chance is None:
            return None
        e = self.config.experts
        floor = e["shortcut_factor"] * chance
        q = e["shortcut_quantile"]
        out = {}
        for layer in e["layers"]:
            ref = sorted(r["region_mass"] for r in rows if r["model"] == self.reference
                         and r["layer"] == layer and r["region_mass"] is not None)
            out[layer] = max(floor, _quantile(ref, q)) if q > 0 and ref else floor
        return out

    @staticmethod
    def _flag(row: dict, threshold: float | None) -> dict:
        if threshold is None:
            return dict(row)
        dm = row.get("region_mass")
        return {**row, "threshold": threshold, "shortcut": bool(dm is not None and dm > threshold)}

    def _build_experts(self, force: bool, p: _StageProgress) -> str:
        key = self._experts_key()
        if key is None:
            raise CaseError(f"{self.name}: the experts stage needs the models stage")

        def compute():
            from core.distributions import PointDoI
            from core.quantities import ClassQoI

            e = self.config.experts
            self.data()  # validated before anything is ranked
            t0 = time.perf_counter()
            models = {name: self.model(name) for name in self.model_names}
            classes = self.expert_classes()
            total = len(models) * len(e["layers"]) * len(classes)
            done = 0
            p(0, total, "ranking experts")
            results, rows = {}, []
            for mname, model in models.items():
                # every layer's ranking of a class from one pass (the engine's many-layer slice)
                ranked = {c: self._rank_many(model, e["layers"], ClassQoI(c), PointDoI(), c)
                          for c in classes}
                for layer in e["layers"]:
                    for c in classes:
                        r = self._rank_and_interpret(model, layer, ClassQoI(c), PointDoI(), c,
                                                     ranking=ranked[c][layer])
                        results[f"{mname}/{layer}/{c}"] = r
                        for row in r["rows"]:
                            rows.append({"model": mname, "class": int(c), "layer": layer,
                                         "unit": row["unit"], "rank": row["rank"],
                                         "influence": row["score"], "frequency": row["frequency"],
                                         "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                                         **{k: v for k, v in row.items() if k.endswith("_mass")}})
                        done += 1
                        p(done, total, f"{mname} {layer} class {c}")
            thresholds = self._thresholds(rows)
            th = thresholds or {}
            rows = [self._flag(r, th.get(r["layer"])) for r in rows]
            for name, r in results.items():
                layer = name.split("/")[1]
                r["threshold"] = th.get(layer)
                r["rows"] = [self._flag(x, th.get(layer)) for x in r["rows"]]
            checks = self._expert_checks(results)
            prov = _provenance(time.perf_counter() - t0, self.device)
            chance = self._chance()
            payload = {"rows": rows, "results": results, "layers": list(e["layers"]),
                       "checks": checks,
                       "classes": classes, "models": list(self.model_names),
                       "chance": chance, "thresholds": thresholds,
                       "shortcut_rule": self._rule(), "provenance": prov}
            # The report's rows ride in the meta line too: report() then needs no torch.load.
            return payload, {"stage": "experts", "case": self.name, "provenance": prov,
                             "rows": _plain(rows), "thresholds": thresholds,
                             "classes": classes, "checks": _plain(checks)}

        return self._run_stage(key, compute, force, p)

    def _expert_checks(self, results: dict) -> dict | None:
        """A case's own checks of every expert (``CaseData.extra["expert_checks"]``, a
        ``module:function`` of core taking ``(study, results)`` and returning plain JSON), e.g.
        the faces case's landmark mass; None when the case has none."""
        spec = (self.data().extra or {}).get("expert_checks")
        if not spec:
            return None
        module, _, fn = str(spec).partition(":")
        if not module.startswith("core."):
            raise CaseError(f"{self.name}: expert_checks must name a core module, got {spec!r}")
        return getattr(importlib.import_module(module), fn)(self, results)

    def _rule(self) -> str | None:
        chance = self._chance()
        if chance is None:
            return None
        e = self.config.experts
        facts = self.case_facts()
        return shortcut_rule(e["shortcut_factor"], e["shortcut_quantile"], chance=chance,
                             region=facts.get("region") or "region", reference=self.reference)

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
                raise TypeError(f"{BY_NAME[stage].delegated}.build_stage must return a dict "
                                "with a 'rows' list")
            prov = _provenance(time.perf_counter() - t0, self.device)
            try:
                rows = _plain(payload["rows"])
                json.dumps(rows, allow_nan=False)
            except (TypeError, ValueError):
                rows = None  # not plain JSON: the report reads them from the payload
            summary = None
            if isinstance(payload.get("report"), dict):
                summary = _plain(payload["report"])
            elif stage not in ("representations", "corrections"):
                # a stage whose payload is plain JSON reports all of it (curves, tables, seeds)
                try:
                    summary = _plain({k: v for k, v in payload.items() if k != "rows"})
                    json.dumps(summary, allow_nan=False)
                except (TypeError, ValueError):
                    summary = None
            return payload, {"stage": stage, "case": self.name, "provenance": prov, "rows": rows,
                             "report": summary}

        status = self._run_stage(key, compute, force, p)
        if stage == "corrections":  # corrected models may have changed
            for k in [k for k in self._models if k[0] not in self.config.models]:
                del self._models[k]
            for k in [k for k in self._predictions if k[0] not in self.config.models]:
                del self._predictions[k]
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

        ``{"rows": [{"unit", "score", "rank", "frequency", "ci_low", "ci_high", "region_mass",
        "threshold", "shortcut"}], "threshold", "scores": (units,), "images": (m, H, W) or
        (m, H, W, 3) test images in [0, 1] (un-normalised for display), "masks": (m, H, W)
        bool or None, "indices": (m,) test-split indices, "maps": (k, m, H, W)
        interpretations (summed over channels), "class",
        "quantity", "distribution"}`` with NumPy arrays. Without a region the rows carry
        ``region_mass`` None and no ``shortcut``/``threshold``.
        """
        e = self.config.experts
        if model in self.config.models and layer in e["layers"] and cls in self.expert_classes():
            with self._lock:
                payload = self.artifact("experts")
                if payload is None:  # missing, or listed but unreadable (moved aside): build
                    self.build(["experts"])
                    payload = self.artifact("experts")
                if payload is None:
                    raise CaseError(f"{self.name}: the experts stage could not be built")
            return self._as_numpy(payload["results"][f"{model}/{layer}/{int(cls)}"])
        return self.experts_for(model, layer, {"kind": "class", "class": int(cls)},
                                {"kind": "class-images"})

    def _n_classes(self) -> int:
        return len(self._known_data_facts()["classes"])

    def _spec(self, model: str, layer: str, qoi: dict, doi: dict):
        """Validate and normalise an experts_for request → (qoi, doi, class, Quantity, DoI)."""
        from core.distributions import LinearDoI, PointDoI
        from core.quantities import ClassQoI, ComparativeQoI

        if not isinstance(qoi, dict) or not isinstance(doi, dict):
            raise CaseError("qoi and doi are dicts, e.g. {'kind': 'class', 'class': 3} and "
                            "{'kind': 'class-images'}")
        n = self._n_classes()

        def klass(v, what):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise CaseError(f"{what} must be a class index 0–{n - 1}, got {v!r}")
            return int(v)

        kind = qoi.get("kind")
        if kind == "class":
            c = klass(qoi.get("class"), "qoi class")
            q, quantity = {"kind": "class", "class": c}, ClassQoI(c)
        elif kind == "comparative":
            a, b = klass(qoi.get("a"), "qoi a"), klass(qoi.get("b"), "qoi b")
            if a == b:
                raise CaseError("a comparative quantity needs two different classes")
            c, q, quantity = a, {"kind": "comparative", "a": a, "b": b}, ComparativeQoI(a, b)
        else:
            raise CaseError(f"qoi kind must be 'class' or 'comparative', got {kind!r}")
        c = klass(doi.get("class", c), "doi class")
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
            raise CaseError(f"model must be a name such as {self.subject!r}, got {model!r}")
        arch_of = model if model in self.config.models else self.subject
        names = self.model_facts(arch_of)["layers"]
        if layer not in names:
            raise CaseError(f"unknown layer {layer!r}; model {arch_of!r} has: "
                            f"{', '.join(names[:40])}")
        return q, d, c, quantity, dist

    def _experts_for_key(self, model: str, layer: str, q: dict, d: dict,
                         images: str = "label") -> str | None:
        digest = self._data_digest()
        if digest is None:
            return None
        if model in self.config.models:
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
        return key_of(stage="experts_for", version=stage_code("experts"), config=e,
                      data=digest, model=mdigest, layer=layer, qoi=q, doi=d, seed=0,
                      images=images, device=self._device_type())

    def _corrections_has(self, name: str) -> bool:
        payload = self.artifact("corrections")
        return bool(payload) and name in (payload.get("models") or {})

    def _in_stage(self, model: str, layer: str, q: dict, d: dict) -> bool:
        e = self.config.experts
        return (model in self.config.models and layer in e["layers"] and q["kind"] == "class"
                and d == {"kind": "class-images", "class": q["class"]}
                and q["class"] in self.expert_classes())

    @staticmethod
    def _images_kind(images: str) -> str:
        if images not in IMAGES:
            raise CaseError(f"images must be one of {', '.join(map(repr, IMAGES))}, got {images!r}")
        return images

    def has_experts_for(self, model: str, layer: str, qoi: dict, doi: dict,
                        images: str = "label") -> bool:
        """True when :meth:`experts_for` would answer from the cache (computes nothing)."""
        q, d, _, _, _ = self._spec(model, layer, qoi, doi)
        images = self._images_kind(images)
        if images == "label" and self._in_stage(model, layer, q, d):
            key = self._experts_key()
            if key is not None and (key in self._payloads or self.cache.has(key)):
                return True
        key = self._experts_for_key(model, layer, q, d, images)
        return key is not None and (key in self._payloads or self.cache.has(key))

    def experts_for(self, model: str, layer: str, qoi: dict, doi: dict,
                    progress: Callable[[int, int, str], None] | None = None,
                    images: str = "label") -> dict:
        """Experts for any quantity and distribution, computed and cached when missing.

        ``qoi``: ``{"kind": "class", "class": 3}`` or ``{"kind": "comparative", "a": 3, "b": 8}``
        (y_a − y_b). ``doi``: ``{"kind": "class-images"}`` (each image a point) or
        ``{"kind": "class-images-linear", "resolution": 20}`` (a linear path from a black image
        to each image); the images are the training images of the qoi's class (of ``a`` for
        a comparative quantity), or of ``doi["class"]`` when given.

        ``images`` says which test images each expert is interpreted on: ``"label"`` the first
        ``n_images`` test images labelled with the class (of ``doi["class"]`` when given), or
        ``"predicted"`` the first ``n_images`` the model *predicts* as that class (whatever their
        label: the images a shortcut fools are among them). A comparative quantity is interpreted
        on the images of both classes: ``n_images`` of ``a``, then ``n_images`` of ``b``.

        Same dict as :meth:`experts`, plus ``"labels"`` and ``"predictions"`` (the model's
        argmax) of the interpreted images, ``"images_by"`` (``images``) and
        ``"image_classes"`` (the class each image was chosen for). The experts stage's views
        (a class quantity over the class's images, label) are read from that stage.
        ``progress(done, total, message)`` is called while computing (not on a cache hit).
        """
        q, d, c, quantity, dist = self._spec(model, layer, qoi, doi)
        images = self._images_kind(images)
        shown = [q["a"], q["b"]] if q["kind"] == "comparative" else [c]
        if images == "label" and self._in_stage(model, layer, q, d):
            return self._annotated(self.experts(model, layer, q["class"]), model, shown, images)
        with self._lock:
            net = self.model(model)
            key = self._experts_for_key(model, layer, q, d, images)
            if key is None:
                raise CaseError(f"{self.name}: model {model!r} is not available")
            if key not in self._payloads:
                ranking = None
                if self._in_stage(model, layer, q, d):  # reuse the stage's ranking of the units
                    ranking = self._stage_ranking(model, layer, q["class"])
                indices = self._interpretation_indices(model, shown, images)

                def compute():
                    with _threads(self.device):
                        r = self._rank_and_interpret(net, layer, quantity, dist, c, progress,
                                                     ranking=ranking, indices=indices)
                    r.update({"model": model, "layer": layer, "qoi": q, "doi": d,
                              "images_by": images})
                    return r

                payload, _ = self.cache.get_or_compute(
                    key, compute, meta={"stage": "experts_for", "case": self.name,
                                        "model": model, "layer": layer})
                self._payloads[key] = payload
            view = self._as_numpy(self._flagged(self._payloads[key], layer))
            return self._annotated(view, model, shown, images)

    def _stage_ranking(self, model: str, layer: str, cls: int) -> dict:
        """The experts stage's ranking of ``layer`` for class ``cls`` (the rows' ranking fields,
        the scores), as :func:`rank_experts` gives it: reused to interpret on other images."""
        import torch

        r = self.experts(model, layer, cls)
        drop = ("threshold", "shortcut")
        rows = [{k: v for k, v in row.items() if k not in drop and not k.endswith("_mass")}
                for row in r["rows"]]
        return {"experts": rows, "scores": torch.as_tensor(r["scores"]),
                "quantity": r["quantity"], "distribution": r["distribution"]}

    def _annotated(self, view: dict, model: str, shown: list[int], images: str) -> dict:
        """``view`` with the labels and ``model``'s predictions of its interpreted test images,
        ``images_by`` and ``image_classes`` (NumPy)."""
        import numpy as np

        idx = np.asarray(view.get("indices", []), dtype=np.int64).ravel()
        test = self.data().test
        labels = test.y[idx].numpy().astype(np.int64)
        preds = self.predictions(model)[idx].numpy().astype(np.int64)
        by = labels if images == "label" else preds
        cls = np.array([c if c in shown else -1 for c in by.tolist()], dtype=np.int64)
        return {**view, "labels": labels, "predictions": preds, "images_by": images,
                "image_classes": cls}

    def _flagged(self, result: dict, layer: str) -> dict:
        """``result`` with shortcut flags: the layer's threshold from the experts stage when it is
        built and covers the layer, else the floor (factor × chance); unchanged without a
        region."""
        chance = self._chance()
        if chance is None:
            return {**result, "threshold": None}
        threshold = self.config.experts["shortcut_factor"] * chance
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
                               "description": self.config.description, "built": status,
                               "subject": self.subject, "reference": self.reference}
        prov: dict[str, Any] = {"torch": _torch_version(), "python": platform.python_version(),
                                "stages": {}, "seconds": {}}
        data_meta = self._meta(self._data_key())
        if data_meta is not None:
            rep["data"] = dict(data_meta.get("describe", {}))
            rep["data"]["config"] = dict(self.config.dataset)
            if data_meta.get("facts"):
                rep["case_facts"] = dict(data_meta["facts"])
            self._add_prov(prov, "data", data_meta.get("provenance"))
        seeds = self._seeds_to_report()
        metas = [self._meta(self._models_key(s)) for s in seeds]
        if metas and all(m is not None for m in metas):
            rep["models"] = self._aggregate(metas, self.model_names)
            rep["seeds"] = seeds
            rep["training"] = {n: s.plain() for n, s in self.config.models.items()}
            for m in rep["training"].values():
                if m.get("checkpoint"):
                    m["checkpoint"] = Path(m["checkpoint"]).name  # never a server path
            provs = [m.get("provenance") or {} for m in metas]
            self._add_prov(prov, "models", {**provs[0], "seconds": round(sum(
                float(pv.get("seconds", 0.0)) for pv in provs), 3), "seeds": len(provs)})
            prov["device"] = provs[0].get("device")
        if status["experts"]:
            meta = self._meta(self._experts_key()) or {}
            if meta.get("rows") is not None:
                e = self.config.experts
                chance = self._chance()
                rep["experts"] = {
                    "layer": e.get("primary_layer") or e["layers"][0],
                    "layers": list(e["layers"]),
                    "classes": list(meta.get("classes") or self.expert_classes()),
                    "k": e["k"], "reduce": e["reduce"],
                    "bootstrap": e["bootstrap"], "confidence": e["confidence"],
                    "n_images": e["n_images"], "resolution": e["resolution"],
                    "chance": chance, "shortcut_factor": e["shortcut_factor"],
                    "shortcut_quantile": e["shortcut_quantile"],
                    "shortcut_threshold": None if chance is None else
                    e["shortcut_factor"] * chance,
                    "shortcut_thresholds": dict(meta.get("thresholds") or {}),
                    "shortcut_rule": self._rule(),
                    "top": [dict(r) for r in meta["rows"]],
                    "summary": self._experts_summary(meta["rows"]),
                }
                if meta.get("checks"):
                    rep["experts"]["checks"] = meta["checks"]
                control = e.get("control")
                if control and chance is not None:
                    rep["experts"]["false_alarms"] = {
                        layer: {"model": control, "n": s["n"], "n_flagged": s["n_shortcut"],
                                "rate": s["n_shortcut"] / s["n"] if s["n"] else None}
                        for layer, s in rep["experts"]["summary"].get(control, {}).items()}
                self._add_prov(prov, "experts", meta.get("provenance"))
        for stage in DELEGATED:
            if status[stage]:
                meta = self._meta(self._key(stage)) or {}
                rows = meta.get("rows")
                if rows is None:
                    rows = (self.artifact(stage) or {}).get("rows")
                if rows is not None:
                    rep[stage] = [_plain(r) for r in rows]
                    if meta.get("report"):
                        rep[f"{stage}_summary"] = meta["report"]
                    self._add_prov(prov, stage, meta.get("provenance"))
        rep["provenance"] = prov
        return _plain(rep)

    @staticmethod
    def _add_prov(prov: dict, stage: str, info: dict | None) -> None:
        if info:
            prov["stages"][stage] = dict(info)
            prov["seconds"][stage] = info.get("seconds")

    @staticmethod
    def _aggregate(metas: list[dict], names: list[str]) -> dict:
        out = {}
        for name in names:
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
        """Per model and layer: how many top experts carry the shortcut, their mean region mass
        (and its alias); ``n_shortcut`` None without a region."""
        out: dict = {}
        for r in rows:
            s = out.setdefault(r["model"], {}).setdefault(r["layer"], {"n": 0, "n_shortcut": 0,
                                                                       "_dm": []})
            s["n"] += 1
            if "shortcut" in r:
                s["n_shortcut"] += int(bool(r["shortcut"]))
            else:
                s["n_shortcut"] = None
            if r.get("region_mass") is not None:
                s["_dm"].append(r["region_mass"])
            s["_alias"] = next((k for k in r if k.endswith("_mass") and k != "region_mass"), None)
        for layers in out.values():
            for s in layers.values():
                dm = s.pop("_dm")
                alias = s.pop("_alias")
                s["share_shortcut"] = (s["n_shortcut"] / s["n"] if s["n"] else 0.0) \
                    if s["n_shortcut"] is not None else None
                s["mean_region_mass"] = sum(dm) / len(dm) if dm else None
                if alias:
                    s[f"mean_{alias}"] = s["mean_region_mass"]
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



"""The pipeline that builds one case study from its config, stage by stage, through the cache.

    study = CaseStudy.open("decoy-mnist")        # a known case by name, or a TOML path (CLI)
    study.build(progress=lambda stage, done, total, message: ...)
    study.report()                               # DESIGN §2 JSON of what is built (never computes)

Stages (``core.casestudy.registry``): ``data → models → experts → representations → corrections →
essence → detection``. Every stage reads only the case seam (``core.cases.seam``): the data adapter's
:class:`~core.cases.seam.CaseData`, the named models, the optional region and reference.

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
- **discovery**, **representations**, **corrections**, **essence**, **detection**:
  ``build(ctx) -> dict`` of their module (``core.stages``), given a
  :class:`~core.stages.base.StageContext` (:meth:`CaseStudy.context`); skipped while the module
  does not exist.

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
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import core.casestudy.facts as _facts
import core.casestudy.summary as _summary
from core.casestudy.config import (
    CaseConfig,
    CaseError,
    parse_config,
    read_toml,
    resolve,
)
from core.casestudy.registry import BY_NAME, DELEGATED, STAGES, stage_code
from core.casestudy.summary import plain as _plain
from core.casestudy.views import IMAGES, ExpertViews  # noqa: F401 — IMAGES: the study's names
from core.methods import shortcut as _shortcut
from core.storage.cache import Cache, key_of

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, str], None]
MAX_SEEDS = 64


def _device_type_guess() -> str:
    """The device type ``device=None`` resolves to, without importing torch when it is not
    imported yet (a warm build): CUDA when the NVIDIA driver is there and not hidden."""
    import sys

    if "torch" in sys.modules:
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    return "cuda" if os.path.exists("/dev/nvidiactl") and not hidden else "cpu"


def _provenance(seconds: float, device: Any) -> dict:
    import torch

    return {"seconds": round(float(seconds), 3), "device": str(device),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _np(t):
    return t.detach().cpu().numpy()


class _StageProgress:
    """The progress callable a stage gets, ``(done, total, message)``; it tells the build's sink
    ``(stage, done, total, message)``."""

    def __init__(self, stage: str, sink: ProgressFn | None):
        self.stage, self.sink = stage, sink

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.sink is not None:
            self.sink(self.stage, int(done), int(total), str(message))




# --------------------------------------------------------------------------------- the study

class CaseStudy(ExpertViews):
    """One case study: its config, its cached stages, and the objects the report reads.

    The seam the stages read: :meth:`data` (a :class:`core.cases.seam.CaseData`), :attr:`subject` (the
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
        from core.casestudy.config import section_names

        # the layers the delegated sections name ([essence], [detection], …), on their models
        for where, kind, layer, models in section_names(
                self.config.sections, self.subject, self.reference, self.model_names):
            for name in models if kind == "layer" else ():
                names = self.model_facts(name)["layers"]
                if layer not in names:
                    shown = ", ".join(names[:40]) + (" …" if len(names) > 40 else "")
                    raise CaseError(f"{src}: unknown layer {layer!r} in {where}; model "
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
            from core.engine.devices import pick_device

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
        """The case's :class:`core.cases.seam.CaseData` (deterministic; built once per study)."""
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
        from core.casestudy.config import check_class_names

        e = self.config.experts
        n = data.n_classes
        check_class_names(data.class_names, self.name)
        h, w = data.size
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise CaseError(f"{self.name}: the images are {h}×{w} pixels; each side must be 8 to "
                            "4096 (set [dataset] size = [H, W] to resize them)")
        self._check_scale(data)
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

    def _check_scale(self, data) -> None:
        """A tensors case's float images must lie in [0, 1] before its mean/std (uint8 is divided
        by 255 on load): floats in 0–255 are a one-line :class:`CaseError`, not images that every
        model sees as saturated white."""
        if self.config.dataset.get("source") != "tensors":
            return
        import torch

        x = data.train.x
        if data.std is not None:
            x = x * torch.tensor(data.std, dtype=x.dtype).view(1, -1, 1, 1)
        if data.mean is not None:
            x = x + torch.tensor(data.mean, dtype=x.dtype).view(1, -1, 1, 1)
        lo, hi = float(x.min()), float(x.max())
        if lo < -0.01 or hi > 1.01:
            raise CaseError(f"{self.name}: the tensors file's x holds values in [{lo:.3g}, "
                            f"{hi:.3g}]; give float images in [0, 1] or uint8 in [0, 255] "
                            "(divide float 0–255 images by 255)")

    def expert_classes(self) -> list[int]:
        """The classes the experts stage ranks: ``[experts] classes``, else the first ten classes
        (all of them for ten or fewer). The config is never rewritten, so the stage's key is the
        same whether or not this process has loaded the data."""
        given = self.config.experts.get("classes")
        return list(given) if given else _shortcut.classes_of({}, self._n_classes())

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
            from core.cases import sources

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
        """The stage's module when it defines ``build(ctx)``; else None (the stage is skipped)."""
        name = BY_NAME[stage].delegated
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if getattr(exc, "name", None) not in (name, "core"):
                log.warning("%s cannot be imported (%s); skipping the %s stage", name, exc, stage)
            return None
        return module if callable(getattr(module, "build", None)) else None

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
                      # every stage's context carries [experts] whole: its primary layer too
                      experts_section=self.config.experts,
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
                    message = f"{BY_NAME[stage].delegated} has no build(ctx) yet"
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
            from core.engine.devices import build_threads

            with build_threads(self.device):
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
        from core.cases.factories import load_weights

        spec = self.config.models[name]
        try:
            return load_weights(model, Path(spec.checkpoint), name)
        except ValueError as exc:
            raise CaseError(f"{self.name}: models.{name}: "
                            f"{(str(exc).splitlines() or [''])[0]}") from None

    def _train_seed(self, seed: int, p: _StageProgress, offset: list, total: int):
        from core.methods.training import evaluate, set_seed, state_digest, train_model

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

    def context(self, stage: str, progress: Callable[[int, int, str], None] | None = None):
        """The :class:`~core.stages.base.StageContext` the pipeline hands ``stage``'s build: this
        case's data, models, facts and seeds, the stage's section, ``[experts]``, and the
        artifacts of the stages it reads (building them when missing)."""
        from core.stages.base import StageContext

        reads = BY_NAME[stage].reads

        def load_artifact(name: str):
            if not self.is_built(name):
                self.build([name])
            return self.artifact(name)

        return StageContext(
            stage=stage, data=self.data(), section=dict(self.config.section(stage) or {}),
            experts=dict(self.config.experts), subject=self.subject, reference=self.reference,
            model_names=tuple(self.model_names), seeds=int(self.seeds or 1), device=self.device,
            reads=tuple(reads), load_model=lambda n, seed: self.model(n, seed=seed),
            load_facts=self.model_facts, load_artifact=load_artifact,
            predict=lambda m, split, seed: self.predictions(m, split, seed),
            report_progress=progress or (lambda done, total, message="": None))

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
        if callable(loader):  # the stage's declared hook: rebuild the corrected model's shape
            model = loader(payload, name, self.model(self.subject))
            return model.to(self.device).eval()
        return self._from_state(models[name])

    def _digest_of(self, name: str) -> str:
        if name in self.config.models:
            digests = self._model_digests(0)
            if digests is None:
                self.model(name)
                digests = self._model_digests(0)
            return digests[name]
        from core.methods.training import state_digest

        return state_digest(self.model(name))

    # ----------------------------------------------------------------------------- experts
    def predictions(self, model: str, split: str = "test", seed: int = 0):
        """``model``'s predicted class (argmax of its logits) for every image of ``split``
        ("train", "val" or "test"): a (N,) long tensor on the CPU, from
        :func:`core.methods.training.predict_logits` (batched, no gradients) under the model's lock;
        memoised per process (the weights are fixed for a name and seed)."""
        import torch

        from core.engine.influence import model_lock
        from core.methods.training import predict_logits

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

    def _chance(self) -> float | None:
        return self._known_data_facts().get("chance")

    def _build_experts(self, force: bool, p: _StageProgress) -> str:
        key = self._experts_key()
        if key is None:
            raise CaseError(f"{self.name}: the experts stage needs the models stage")

        def compute():
            t0 = time.perf_counter()
            from core.stages import experts

            payload = experts.build(self.context("experts", p))
            payload.pop("seconds", None)
            prov = payload["provenance"] = _provenance(time.perf_counter() - t0, self.device)
            # The report's rows ride in the meta line too: report() then needs no torch.load.
            return payload, {"stage": "experts", "case": self.name, "provenance": prov,
                             "rows": _plain(payload["rows"]), "thresholds": payload["thresholds"],
                             "classes": payload["classes"], "checks": _plain(payload["checks"])}

        return self._run_stage(key, compute, force, p)

    def _rule(self) -> str | None:
        return _shortcut.rule_of(self.config.experts, self._chance(),
                                self.case_facts().get("region"), self.reference)

    def report(self) -> dict:
        """DESIGN §2 JSON of what is built; computes nothing (reads the cache: the entries' meta
        lines, which carry the report's numbers and rows, so no payload is unpickled). See
        :func:`core.casestudy.summary.report`."""
        return _summary.report(self)

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
            payload = module.build(self.context(stage, p))
            if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
                raise TypeError(f"{BY_NAME[stage].delegated}.build must return a dict "
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

    def _n_classes(self) -> int:
        return len(self._known_data_facts()["classes"])

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

"""The pipeline that builds one case study from its config, stage by stage, through the cache.

    study = CaseStudy.open("decoy-mnist")        # a known case by name, or a TOML path (CLI)
    study.build(progress=lambda stage, done, total, message: ...)
    study.report()                               # DESIGN §2 JSON of what is built (never computes)

Stages (``core.casestudy.registry``, each declared in its module under ``core/stages``): ``data →
models → experts → discovery → representations → corrections → essence → detection``. Every stage
reads only the case seam (``core.cases.seam``): the data adapter's
:class:`~core.cases.seam.CaseData`, the named models, the optional region and reference. The keys
are ``core.casestudy.keys`` (one function), the build loop ``core.casestudy.building``, the views
of experts on demand ``core.casestudy.views``, the report ``core.casestudy.summary``.

- **data**: the adapter's CaseData (deterministic, rebuilt in memory); the cache keeps its digest
  and sizes, which key everything downstream. A source that reads files keys on their
  bytes, so replacing an image rebuilds.
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

Each stage's result is one cache entry whose key follows from the stage's declaration: its code
version, its config sections, the digests of what it reads and its declared inputs (the device,
the seed, …). The case's *name* is not part of any key. A build with everything cached imports no
torch when the case's model facts are cached and its delegated sections are empty.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import core.casestudy.budget as _budget
import core.casestudy.facts as _facts
import core.casestudy.summary as _summary
from core.casestudy.building import MAX_SEEDS, StageBuilds
from core.casestudy.config import (
    CaseConfig,
    CaseError,
    _where,
    check_class_names,
    parse_config,
    read_toml,
    resolve,
    section_names,
)
from core.casestudy.keys import StageKeys
from core.casestudy.registry import stage_code
from core.casestudy.views import IMAGES, ExpertViews  # noqa: F401 — IMAGES: the study's names
from core.methods import shortcut as _shortcut
from core.storage.cache import Cache, key_of

log = logging.getLogger(__name__)



def _device_type_guess() -> str:
    """The device type ``device=None`` resolves to, without importing torch when it is not
    imported yet (a warm build): CUDA when the NVIDIA driver is there and not hidden."""
    if "torch" in sys.modules:
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    return "cuda" if os.path.exists("/dev/nvidiactl") and not hidden else "cpu"


def _np(t):
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------------- the study

class CaseStudy(StageBuilds, StageKeys, ExpertViews):
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
        # the build budget's preset and the values it filled in (CaseStudy.open sets them)
        self.budget: dict = {"preset": "full", "applied": {}}

    @classmethod
    def open(cls, case: str | Path, cache_dir: str | Path | None = None, device: Any = None,
             seeds: int | None = None, *, allow_path: bool = True,
             budget: str | None = None) -> CaseStudy:
        """Open a known case by name (or, with ``allow_path``, a TOML file by path); validates the
        whole config — every section, the models' layers — before anything is trained or written.
        ``budget`` ("full" or "quick"; default ``$CASEBOOK_BUDGET``, else the case's ``[budget]
        preset``, else full) fills in the quick budget's values (``core.casestudy.budget``);
        :attr:`budget` says which preset and what it set.

        Opening writes nothing to the cache; the first :meth:`build` also stores the model facts
        validation needed, so the next open need not import torch.
        """
        path, name = resolve(case, allow_path=allow_path)
        raw = read_toml(path)
        preset = _budget.preset_of(raw, budget)
        raw, applied = _budget.apply(raw, preset)
        config = parse_config(raw, path, name)
        study = cls(config, cache_dir=cache_dir, device=device, seeds=seeds)
        study.budget = {"preset": preset, "applied": applied}
        study._check_models()
        return study

    # ------------------------------------------------------------------------------ validation
    def _where(self) -> str:
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

    # ------------------------------------------------------------------------------ status
    def built_seeds(self, limit: int = MAX_SEEDS) -> list[int]:
        """Seeds 0, 1, … whose models are in the cache (stops at the first missing one)."""
        out = []
        for s in range(limit):
            key = self._key("models", s)
            if key is None or not self.cache.has(key):
                break
            out.append(s)
        return out

    def _seeds_to_report(self) -> list[int]:
        if self.seeds is not None:
            return list(range(self.seeds))
        return self.built_seeds() or [0]

    # ------------------------------------------------------------------------------- build
    # ------------------------------------------------------------------------------ models
    def model(self, name: str | None = None, seed: int = 0):
        """A model in eval mode on the study's device: one of :attr:`model_names` (for
        ``seed``; default the subject) or a correction's name. Builds what is missing."""
        name = name or self.subject
        with self._lock:
            if (name, seed) in self._models:
                return self._models[(name, seed)]
            if name in self.config.models:
                key = self._key("models", seed)
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
            facts = (self._meta(self._key("data")) or {}).get("facts")
            if facts is not None:
                return facts
        return self._data_facts(self.data())

    def _alias(self) -> str | None:
        return self._known_data_facts().get("region_alias")

    def _chance(self) -> float | None:
        return self._known_data_facts().get("chance")

    def _rule(self) -> str | None:
        return _shortcut.rule_of(self.config.experts, self._chance(),
                                self.case_facts().get("region"), self.reference)

    def report(self) -> dict:
        """DESIGN §2 JSON of what is built; computes nothing (reads the cache: the entries' meta
        lines, which carry the report's numbers and rows, so no payload is unpickled). See
        :func:`core.casestudy.summary.report`."""
        return _summary.report(self)

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

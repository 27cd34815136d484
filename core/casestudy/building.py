"""How a case study builds: the build loop over the registry's stages, through the cache.

``CaseStudy.build`` (this mixin) closes the asked-for stages over what they read, then builds each
in registry order: the data (the adapter's CaseData; its digest keys everything downstream), the
models (``core.stages.models.train_seed`` per seed), the experts and every delegated stage
(``build(ctx)`` of its module, given a :class:`~core.stages.base.StageContext`). Each result is
one cache entry under the stage's key (``core.casestudy.keys``), computed under the key's lock so
two processes never build the same entry; a delegated stage that fails is reported as "failed"
and the build goes on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import core.casestudy.facts as _facts
from core.casestudy.config import CaseError, build_order
from core.casestudy.registry import BY_NAME, DELEGATED, STAGES
from core.casestudy.summary import plain as _plain
from core.stages.base import StageContext

log = logging.getLogger("core.casestudy.study")

ProgressFn = Callable[[str, int, int, str], None]
MAX_SEEDS = 64


def _provenance(seconds: float, device: Any) -> dict:
    import torch

    return {"seconds": round(float(seconds), 3), "device": str(device),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class _StageProgress:
    """The progress callable a stage gets, ``(done, total, message)``; it tells the build's sink
    ``(stage, done, total, message)``."""

    def __init__(self, stage: str, sink: ProgressFn | None):
        self.stage, self.sink = stage, sink

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.sink is not None:
            self.sink(self.stage, int(done), int(total), str(message))


class StageBuilds:
    """The build of a :class:`~core.casestudy.study.CaseStudy` (a mixin: it uses the study's
    config, cache, data, models, keys and lock)."""

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
        key = self._key("data")
        if force or not (key in self._payloads or self.cache.has(key)):
            self.data()  # bad data is a CaseError before anything is written

        def compute():
            from core.stages import data as data_stage  # a stage module only when it builds

            p(0, 1, f"building the data ({self.config.dataset['source']})")
            t0 = time.perf_counter()
            data = self.data()
            facts = self._data_facts(data)
            entry = data_stage.entry(data, facts, self.name,
                                     _provenance(time.perf_counter() - t0, "cpu"))
            p(1, 1, "done")
            return entry

        return self._run_stage(key, compute, force, p)

    def _build_models(self, seeds, force: bool, p: _StageProgress) -> str:
        seeds = list(seeds)
        keys = {s: self._key("models", s) for s in seeds}
        todo = [s for s in seeds if force or not self.cache.has(keys[s])]
        if not todo:
            p(1, 1, "cached")
            return "cached"
        from core.stages import models as models_stage

        total = max(models_stage.steps(self.config.models, self.data()), 1) * len(todo)
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
        from core.stages import models as models_stage

        def make_model(name: str):
            model = self._fresh_model(name)
            if self.config.models[name].checkpoint is not None:
                model = self._load_checkpoint(name, model)
            return model

        payload, meta, built = models_stage.train_seed(
            self.data(), self.config.models, build_order(self.config.models), seed, self.device,
            make_model, p, offset, total)
        for name, model in built.items():
            self._models[(name, seed)] = model
        prov = payload["provenance"] = _provenance(meta.pop("seconds"), self.device)
        return payload, {**meta, "case": self.name, "provenance": prov}

    def _build_seed_models(self, seed: int) -> None:
        """Build the models of seeds 0 … ``seed`` on demand (a stage asked for seed ``seed``)
        without changing :attr:`seeds`: the keys of the stages built later in this process
        must be those a fresh process computes."""
        saved = self.seeds
        try:
            self.build(["models"], seeds=max(seed + 1, self.seeds or 1))
        finally:
            self.seeds = saved

    def context(self, stage: str, progress: Callable[[int, int, str], None] | None = None):
        """The :class:`~core.stages.base.StageContext` the pipeline hands ``stage``'s build: this
        case's data, models, facts and seeds, the stage's section, ``[experts]``, and the
        artifacts of the stages it reads (building them when missing)."""
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

    def _build_experts(self, force: bool, p: _StageProgress) -> str:
        key = self._key("experts")
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

    def _build_delegated(self, stage: str, force: bool, p: _StageProgress) -> str:
        key = self._key(stage)
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
            elif BY_NAME[stage].plain_payload:
                # a stage whose payload is plain JSON reports all of it (curves, tables, seeds)
                try:
                    summary = _plain({k: v for k, v in payload.items() if k != "rows"})
                    json.dumps(summary, allow_nan=False)
                except (TypeError, ValueError):
                    summary = None
            return payload, {"stage": stage, "case": self.name, "provenance": prov, "rows": rows,
                             "report": summary}

        status = self._run_stage(key, compute, force, p)
        if callable(getattr(module, "load_model", None)):  # the models it serves may have changed
            for k in [k for k in self._models if k[0] not in self.config.models]:
                del self._models[k]
            for k in [k for k in self._predictions if k[0] not in self.config.models]:
                del self._predictions[k]
        return status

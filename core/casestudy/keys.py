"""The one cache key function of the pipeline, and what reads keys: status, fingerprint, artifacts.

A stage's key follows from its declaration (:class:`core.stages.base.Stage`) and nothing else:

    key_of(stage, version = "<declared version>:<code hash>",
           config = {section: the case's section, less the declared omissions},
           reads  = {stage read: its digest (data: the data's digest; models: seed 0's state
                     digests; any other stage: its key)},
           inputs = {declared input: its value (see core.stages.base.INPUTS)})

so a stage rebuilds when, and only when, its code, one of its sections, a stage it reads or one
of its declared inputs changes. The case's name is in no key. A key is None while something it
reads is not built (its digest is unknown).
"""

from __future__ import annotations

import os
from pathlib import Path

import core.casestudy.facts as _facts
from core.casestudy.config import CaseError
from core.casestudy.registry import BY_NAME, DELEGATED, STAGES, module_exists, stage_code
from core.storage.cache import key_of

_MISSING = object()


class StageKeys:
    """The keys of a :class:`~core.casestudy.study.CaseStudy`'s stages and what is read by key
    (a mixin: it uses the study's ``config``, ``cache``, ``seeds``, ``subject``, ``reference``,
    ``_data``, ``_payloads`` and ``_device_type()``)."""

    # ------------------------------------------------------------------------------- keys
    def _key(self, stage: str, seed: int = 0) -> str | None:
        """The cache key of ``stage`` (for the models stage: of seed ``seed``'s entry), or None
        while a stage it reads is not built (or its module does not exist)."""
        s = BY_NAME.get(stage)
        if s is None:
            raise CaseError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if s.delegated and not module_exists(s.delegated):
            return None
        reads = {r: self._read_digest(r) for r in s.reads}
        inputs = {i: self._input(i, seed) for i in s.inputs
                  if i not in ("adapter", "factories")}  # those two are code: in the version
        if any(v is None for v in reads.values()) or _MISSING in inputs.values():
            return None
        config = {sec: self._keyed_section(stage, sec) for sec in s.sections}
        return key_of(stage=stage, version=self._stage_code(stage), config=config, reads=reads,
                      inputs=inputs)

    def _stage_code(self, stage: str) -> str:
        """The stage's code version, with the case's adapter and built-in factory modules when
        it declares them as inputs."""
        s, extra = BY_NAME[stage], []
        if "adapter" in s.inputs:
            extra.append(self.config.adapter.module)
        if "factories" in s.inputs:
            extra.extend(sorted({m.factory.split(":")[0] for m in self.config.models.values()
                                 if m.factory and m.factory.startswith("core.")}))
        return stage_code(stage, tuple(extra))

    def _keyed_section(self, stage: str, section: str):
        """``section`` of the config as it enters ``stage``'s key: the models as plain dicts
        (a checkpoint by its content, an input, not where it lies); the declared omissions out."""
        if section == "models":
            models = {n: m.plain() for n, m in self.config.models.items()}
            for m in models.values():
                if m["checkpoint"] is not None:
                    m["checkpoint"] = "file"
            return models
        value = self.config.section(section)
        omit = {o.split(".", 1)[1] for o in BY_NAME[stage].omit if o.startswith(section + ".")}
        if isinstance(value, dict) and omit:
            value = {k: v for k, v in value.items() if k not in omit}
        return value

    def _read_digest(self, stage: str):
        """What a reader of ``stage`` keys on: the data's digest or seed 0's model digests (None
        while not built), or the stage's own key."""
        if stage == "data":
            return self._data_digest()
        if stage == "models":
            return self._model_digests(0)
        return self._key(stage)

    def _input(self, name: str, seed: int):
        """The value of the declared input ``name`` (core.stages.base.INPUTS); ``_MISSING`` when
        it cannot be known yet (a seed's models not built)."""
        cfg = self.config
        if name == "files":
            if cfg.dataset["source"] not in ("folder", "tensors"):
                return None
            from core.cases import sources  # a source that reads files keys on their bytes

            try:
                return sources.source_fingerprint(cfg.dataset, cfg.region, cfg.base_dir)
            except ValueError as exc:
                raise CaseError(f"{self.name}: {(str(exc).splitlines() or [''])[0]}") from None
        if name == "factory_facts":
            facts = [_facts.facts_key(s, cfg.base_dir) for s in cfg.models.values() if s.factory]
            return facts or None
        if name == "checkpoints":
            return self._checkpoint_digests() or None
        if name == "seed":
            return int(seed)
        if name == "seeds":  # a stage that may read every seed's models keys on all of them
            n = int(self.seeds or 1)
            if n == 1:
                return {"n": 1}
            models = {str(k): self._model_digests(k) for k in range(n)}
            return _MISSING if None in models.values() else {"n": n, "models": models}
        if name == "roles":
            return {"subject": self.subject, "reference": self.reference}
        if name == "device":
            return self._device_type()
        raise CaseError(f"unknown stage input {name!r}")

    # ---------------------------------------------------------------------------- digests
    def _meta(self, key: str | None) -> dict | None:
        return None if key is None else self.cache.meta(key)

    def _data_digest(self) -> str | None:
        if self._data is not None:
            return self._data.digest()
        meta = self._meta(self._key("data"))
        return None if meta is None else meta.get("digest")

    def _model_digests(self, seed: int = 0) -> dict | None:
        meta = self._meta(self._key("models", seed))
        return None if meta is None else meta.get("digests")

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

    # ----------------------------------------------------------------------- read by key
    def status(self) -> dict[str, bool]:
        """Which stages are in the cache (computes nothing; reads entry headers and checksums).
        The models stage is built when every seed of :attr:`seeds` is."""
        out = {}
        for stage in STAGES:
            seeds = range(self.seeds or 1) if stage == "models" else (0,)
            keys = [self._key(stage, s) for s in seeds]
            out[stage] = all(k is not None and self.cache.has(k) for k in keys)
        return out

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
        code = {s: self._stage_code(s) for s in STAGES
                if not BY_NAME[s].delegated or module_exists(BY_NAME[s].delegated)}
        return key_of(code=code, config=sections, models=models,
                      reference=cfg.reference)[:16]

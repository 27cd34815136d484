"""The stage registry: every stage declares what it reads and which module runs it.

A stage's cache key follows from that declaration: its config sections, the keys (or digests) of
the stages it reads, the device, and the code version — the stage's version number and a hash of
the source of every ``core`` module its module imports, transitively (``core.storage.codehash``), so an
edit anywhere a stage reaches rebuilds it and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stage:
    """``name`` reads ``reads`` (earlier stages); ``modules`` compute it; ``sections`` of the config
    are in its key; a ``delegated`` stage is ``build(ctx)`` of that module, given a
    :class:`core.stages.base.StageContext` that holds what ``reads`` names and nothing more."""

    name: str
    reads: tuple[str, ...]
    modules: tuple[str, ...]
    sections: tuple[str, ...]
    version: int = 1
    delegated: str | None = None


REGISTRY: tuple[Stage, ...] = (
    # (core.casestudy's own modules are not listed: its package imports the whole pipeline, so
    # its hash would rebuild every stage on any edit; what they compute is keyed by the version)
    Stage("data", (), ("core.cases.seam",), ("dataset", "region"), 2),
    Stage("models", ("data",), ("core.methods.training", "core.cases.decoy_mnist.net",
                                "core.cases.factories", "core.engine.devices"),
          ("models", "training"), 2),
    Stage("experts", ("data", "models"), ("core.stages.experts",), ("experts",), 3),
    Stage("discovery", ("data", "models"), ("core.stages.discovery",), ("discovery",),
          delegated="core.stages.discovery"),
    Stage("representations", ("data", "models", "experts"), ("core.stages.representations",),
          ("representations",), delegated="core.stages.representations"),
    Stage("corrections", ("data", "models", "experts"), ("core.stages.corrections",),
          ("corrections",), delegated="core.stages.corrections"),
    Stage("essence", ("data", "models", "experts"), ("core.stages.essence",), ("essence",),
          delegated="core.stages.essence"),
    Stage("detection", ("data", "models"), ("core.stages.detection",), ("detection",),
          delegated="core.stages.detection"),
)
BY_NAME = {s.name: s for s in REGISTRY}
STAGES = tuple(s.name for s in REGISTRY)
DELEGATED = tuple(s.name for s in REGISTRY if s.delegated)


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def module_exists(name: str) -> bool:
    return _module_file(name) is not None


@functools.cache
def _fallback_hash(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in modules:
        path = _module_file(name)
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() if path is not None else b"<missing>")
    return h.hexdigest()[:16]


def code_version(modules: tuple[str, ...] | list[str]) -> str:
    """A short hash of the source of ``modules`` and every core module they import (transitively,
    including imports inside functions); computed without importing anything.

    Memoised for the life of the process: a running server keys its results by the code it
    loaded, not by files edited under it (a restarted process sees the edit and rebuilds)."""
    return _code_version(tuple(modules))


@functools.cache
def _code_version(modules: tuple[str, ...]) -> str:
    modules = tuple(m for m in modules if module_exists(m))
    try:
        from core.storage.codehash import code_hash
    except ImportError:  # pragma: no cover - the module ships with core
        return _fallback_hash(modules)
    return code_hash(modules)


def stage_code(stage: str, extra: tuple[str, ...] = ()) -> str:
    s = BY_NAME[stage]
    return f"{s.version}:{code_version((*s.modules, *extra))}"

"""The stage registry: the one list of stages, collected from their modules' declarations.

Every stage is a module under ``core/stages`` that owns its declaration, ``STAGE = Stage(...)``
(:class:`core.stages.base.Stage`: what it reads, its config sections, its other inputs, its
version). :data:`MODULES` lists the modules in build order; adding a stage is one module and one
line here. The declarations are read from the modules' source (literal arguments only), so listing
the stages imports none of them, nor torch.

A stage's cache key follows from its declaration (``core.casestudy.keys``): its config sections,
the digests of the stages it reads, its declared inputs and its code version — the declaration's
version and a hash of the source of every ``core`` module its module imports, transitively
(``core.storage.codehash``), so an edit anywhere a stage reaches rebuilds it and nothing else.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

from core.stages.base import Stage
from core.storage.codehash import code_hash

REPO = Path(__file__).resolve().parents[2]

# The stages in build order: a stage reads only stages above it.
MODULES = (
    "core.stages.data",
    "core.stages.models",
    "core.stages.experts",
    "core.stages.discovery",
    "core.stages.representations",
    "core.stages.corrections",
    "core.stages.essence",
    "core.stages.detection",
)


@dataclass(frozen=True)
class Registered:
    """A stage's declaration with where it lives: ``module`` (the stage's module), ``modules``
    (the module and its declared ``code``: whose source the stage's code version hashes) and
    ``delegated`` (the module's name when the stage is its ``build(ctx)``, else None)."""

    declaration: Stage
    module: str

    name = property(lambda self: self.declaration.name)
    reads = property(lambda self: self.declaration.reads)
    sections = property(lambda self: self.declaration.sections)
    inputs = property(lambda self: self.declaration.inputs)
    omit = property(lambda self: self.declaration.omit)
    version = property(lambda self: self.declaration.version)
    plain_payload = property(lambda self: self.declaration.plain_payload)
    quick = property(lambda self: self.declaration.quick)

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.module, *self.declaration.code)

    @property
    def delegated(self) -> str | None:
        return self.module if self.declaration.delegated else None


def declared(module: str) -> Stage:
    """The ``STAGE = Stage(...)`` declaration in ``module``'s source, read without importing it.
    Raises ValueError when the module has none or its arguments are not literals."""
    path = _module_file(module)
    if path is None:
        raise ValueError(f"{module}: no such module")
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "STAGE"
                and isinstance(node.value, ast.Call)):
            try:
                args = [ast.literal_eval(a) for a in node.value.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
            except ValueError:
                raise ValueError(f"{module}: STAGE = Stage(...) takes literal arguments only") \
                    from None
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            return Stage(*args, **kwargs)
    raise ValueError(f"{module}: no STAGE = Stage(...) declaration")


def _collect() -> tuple[Registered, ...]:
    out = tuple(Registered(declared(m), m) for m in MODULES)
    names = [s.name for s in out]
    for i, s in enumerate(out):
        late = [r for r in s.reads if r not in names[:i]]
        if late:
            raise ValueError(f"stage {s.name!r} reads {late[0]!r}, which is not built before it")
    return out


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def module_exists(name: str) -> bool:
    return _module_file(name) is not None


REGISTRY: tuple[Registered, ...] = _collect()
BY_NAME = {s.name: s for s in REGISTRY}
STAGES = tuple(s.name for s in REGISTRY)
DELEGATED = tuple(s.name for s in REGISTRY if s.delegated)


@functools.cache

def code_version(modules: tuple[str, ...] | list[str]) -> str:
    """A short hash of the source of ``modules`` and every core module they import (transitively,
    including imports inside functions); computed without importing anything.

    Memoised for the life of the process: a running server keys its results by the code it
    loaded, not by files edited under it (a restarted process sees the edit and rebuilds)."""
    return _code_version(tuple(modules))


@functools.cache
def _code_version(modules: tuple[str, ...]) -> str:
    modules = tuple(m for m in modules if module_exists(m))
    return code_hash(modules)


def stage_code(stage: str, extra: tuple[str, ...] = ()) -> str:
    """``"<version>:<code hash>"`` of ``stage``: its declared version and the hash of its modules'
    source and of ``extra`` modules (the case's adapter, built-in factories), transitively."""
    s = BY_NAME[stage]
    return f"{s.version}:{code_version((*s.modules, *extra))}"

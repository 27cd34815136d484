"""The tree shows the layers: no import circle in ``core``, no import from a lower layer to a higher
one, Streamlit nowhere in ``core``, and the old flat module names still import (to the same module)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from core.storage.codehash import ROOT, direct_imports

# A module may import its own layer and the ones below it (a smaller number), never above.
LAYERS = {"engine": 0, "methods": 1, "storage": 1, "cases": 2, "stages": 3, "queries": 3,
          "casestudy": 4, "report": 5, "__main__": 6}


def _modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    return {m: direct_imports(m) for m in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph.get(w, ())))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def test_every_core_module_has_a_layer():
    loose = [m for m in _modules() if m not in ("core",) and _layer(m) is None]
    assert loose == [], f"modules outside the layered tree: {loose}"


def test_no_import_circle_in_core():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_import():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in sorted(targets)
              if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert upward == []


def test_engine_imports_only_the_engine():
    for m, targets in _graph().items():
        if m.startswith("core.engine"):
            assert all(t == "core" or t.startswith("core.engine") for t in targets), (m, targets)


def test_core_never_imports_streamlit():
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "core").rglob("*.py")
            if "import streamlit" in p.read_text() or "from streamlit" in p.read_text()]
    assert hits == []


@pytest.mark.parametrize("old,new", [
    ("core.influence", "core.engine.influence"),
    ("core.quantities", "core.engine.quantities"),
    ("core.distributions", "core.engine.distributions"),
    ("core.metrics", "core.methods.metrics"),
    ("core.corrections", "core.stages.corrections"),
    ("core.cache", "core.storage.cache"),
])
def test_old_flat_names_are_the_same_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new  # the alias does not rename it


def test_old_models_name_holds_training_and_the_network():
    code = ("from core.models import DecoyCNN, train_model, build_model, load_checkpoint; "
            "from core.influence import influence; from core.quantities import ClassQoI; "
            "from core.distributions import LinearDoI; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(ROOT), capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_architecture_names_match_the_networks():
    from core.cases.decoy_mnist.net import ARCHITECTURES
    from core.cases.decoy_mnist.priors import ARCH_NAMES

    assert tuple(ARCHITECTURES) == ARCH_NAMES


def test_unknown_core_module_still_fails_to_import():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("core.no_such_module")

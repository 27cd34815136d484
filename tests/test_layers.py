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


# Packages a module may import inside a function when its own top level does not import them: they
# are heavy to import (seconds: torch and what sits on it) or optional for most callers.
HEAVY_PACKAGES = {"torch", "torchvision", "numpy", "PIL", "scipy", "sklearn", "skimage", "mlxtend",
                  "tqdm", "captum", "quantus"}


def _top_imports(path: Path) -> set[str]:
    """The modules ``path`` imports at its top level (inside ``if``/``try`` blocks too), by name."""
    import ast

    out = set()
    for node in ast.parse(path.read_text()).body:
        for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            out |= _names(n, path)
    return out


def _names(n, path: Path) -> set[str]:
    import ast

    if isinstance(n, ast.Import):
        return {a.name for a in n.names}
    if not isinstance(n, ast.ImportFrom):
        return set()
    base = n.module or ""
    if n.level:
        pkg = list(path.relative_to(ROOT).with_suffix("").parts)[: -n.level]
        base = ".".join([*pkg, base] if base else pkg)
    return {base} | {f"{base}.{a.name}" for a in n.names if _file(f"{base}.{a.name}")}


def _file(name: str) -> Path | None:
    p = ROOT.joinpath(*name.split("."))
    return next((f for f in (p.with_suffix(".py"), p / "__init__.py") if f.is_file()), None)


def _pulled(name: str, seen: set | None = None) -> set[str]:
    """The heavy packages importing ``name`` imports at import time (through core modules' top
    levels, parents included)."""
    seen = set() if seen is None else seen
    if name.split(".")[0] in HEAVY_PACKAGES:
        return {name.split(".")[0]}
    parts, out = name.split("."), set()
    for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # parents are imported too
        f = _file(m)
        if f is None or m in seen:
            continue
        seen.add(m)
        for t in _top_imports(f):
            out |= _pulled(t, seen)
    return out


def test_imports_inside_functions_only_for_a_heavy_dependency():
    """An import sits at the top of its module unless it is deferred for a reason CONTRIBUTING
    names: it brings in a heavy package (torch and what sits on it, scipy, scikit-learn, PIL …)
    that the module's top level does not, or it is a stage module that the pipeline imports only
    when it builds that stage."""
    import ast

    bad = []
    for m in _modules():
        path = _file(m)
        has = set().union(*(_pulled(t) for t in _top_imports(path)))
        for f in ast.walk(ast.parse(path.read_text())):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(f):
                names = _names(n, path)
                if not names:
                    continue
                target = max(names, key=len)
                package = target.split(".")[0]
                if package in HEAVY_PACKAGES and (package not in has or (
                        "." in target and target not in _top_imports(path))):
                    continue  # e.g. torch.distributed in a torch module: optional, loaded on use
                if target.startswith("core.") and _pulled(target) - has:
                    continue
                if target.startswith("core.stages.") and m.startswith("core.casestudy"):
                    continue
                bad.append(f"{m}:{n.lineno} imports {target}")
    assert bad == [], "imports inside functions without a heavy dependency:\n" + "\n".join(bad)


def test_no_function_in_core_over_80_lines():
    import ast

    long = [f"{_file(m).relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1})"
            for m in _modules() for f in ast.walk(ast.parse(_file(m).read_text()))
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > 80]
    assert long == []

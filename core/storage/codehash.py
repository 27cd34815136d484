"""Code versions from the source a module actually runs: its closure of ``core`` imports (DESIGN §9).

A stage's cache key names the code that computed it. Instead of a hand-kept list of modules, the
key follows the imports: :func:`module_closure` reads each module's source with :mod:`ast` (never
importing it) and follows every import of a ``core`` module, transitively; :func:`code_hash` is a
short sha256 of the names and code of that closure (its syntax trees: docstrings, comments and
layout do not count). Edit any module a stage imports, directly or
through another, and its hash changes; edit a module it does not import, and it stays.

What counts as an import of a ``core`` module (``core.x``), wherever it appears (also inside a
function, a class or an ``if TYPE_CHECKING:`` block):

- ``import core.x`` / ``import core.x.y as z``
- ``from core.x import y`` / ``from core import x`` (``core.x.y`` / ``core.x`` when they are modules)
- ``from . import x`` / ``from .x import y`` / ``from ..x import y`` (relative to the importing module)
- ``importlib.import_module("core.x")`` / ``__import__("core.x")`` with a literal name

Importing ``core.x.y`` runs ``core/__init__.py`` and ``core/x/__init__.py`` first, so a closure
holds the packages above each module too. Packages are ``core/x/__init__.py``; a package wins over a
``core/x.py`` beside it, as in Python. Imports of anything outside ``core`` are ignored, and so are
imports built from strings at run time (a case's ``factory = "module:callable"``).

Results are remembered per process and per file: a file is parsed and hashed again when its size,
mtime, ctime or inode changes, so edits are seen without a restart; ``fresh=True`` re-reads
everything (for an edit that keeps the size within one timestamp tick). This module imports no torch.
"""

from __future__ import annotations

import ast
import hashlib
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MAX_SOURCE_BYTES", "PACKAGE", "ROOT", "code_hash", "direct_imports", "local_closure",
           "module_closure", "normalised_source", "user_code_hash"]

PACKAGE = "core"
ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the core package

MAX_SOURCE_BYTES = 16 * 2**20  # a source file larger than this is not source (a FIFO, a device…)

_lock = threading.Lock()
_imports_memo: dict[Path, tuple[tuple, frozenset[str]]] = {}  # file → (identity, import candidates)
_digest_memo: dict[Path, tuple[tuple, str]] = {}  # file → (identity, sha256 of its bytes)


def _identity(path: Path) -> tuple:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"source {str(path)!r} is not a regular file (a FIFO, device or folder?)")
    if st.st_size > MAX_SOURCE_BYTES:
        raise ValueError(f"source {str(path)!r} is {st.st_size / 2**20:.0f} MB, over the "
                         f"{MAX_SOURCE_BYTES / 2**20:.0f} MB limit for a Python source file")
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _read_source(path: Path) -> bytes:
    """The bytes of a source file checked by :func:`_identity` (read no further than its bound, so
    a file swapped for a FIFO or device after the check cannot hang the read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"source {str(path)!r} is not a regular file")
        data = f.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise ValueError(f"source {str(path)!r} is over the {MAX_SOURCE_BYTES / 2**20:.0f} MB limit")
    return data


def _source_path(root: Path, package: str, name: str) -> Path | None:
    """The file of module ``name`` under ``root`` (package ``__init__.py`` first), or None."""
    parts = name.split(".")
    if parts[0] != package or not all(p.isidentifier() for p in parts):
        return None
    base = root.joinpath(*parts)
    init = base / "__init__.py"
    if init.is_file():
        return init
    if parts[-1] != "__init__" and base.with_name(parts[-1] + ".py").is_file():
        return base.with_name(parts[-1] + ".py")
    return None


def _parents(name: str) -> list[str]:
    """``"core.x.y"`` → ``["core", "core.x"]``: the packages Python runs before the module."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _import_candidates(name: str, path: Path) -> frozenset[str]:
    """Absolute names that module ``name`` (source ``path``) may import; some are not modules
    (``from core.x import function`` gives ``core.x.function``) and are dropped when resolved."""
    try:
        tree = ast.parse(_read_source(path), filename=str(path))
    except SyntaxError as exc:
        raise ValueError(f"cannot read the imports of {path}: {exc.msg} (line {exc.lineno})") from None
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # the package of `name`
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                if not base:
                    continue  # beyond the top-level package: Python raises, nothing to follow
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and not node.args[0].value.startswith("."):
                found.add(node.args[0].value)
    return frozenset(n for n in found if n)


def _imports(name: str, path: Path, fresh: bool) -> frozenset[str]:
    ident = _identity(path)
    with _lock:
        known = _imports_memo.get(path)
    if not fresh and known is not None and known[0] == ident:
        return known[1]
    found = _import_candidates(name, path)
    with _lock:
        _imports_memo[path] = (ident, found)
    return found


def _closure_paths(modules: Iterable[str], root: Path | None, package: str,
                   fresh: bool) -> dict[str, Path]:
    root = Path(root).resolve() if root is not None else ROOT
    if isinstance(modules, str):
        modules = [modules]
    todo: list[str] = []
    for name in modules:
        if _source_path(root, package, name) is None:
            raise ValueError(f"no module {name!r} of the {package!r} package under {root}")
        todo.append(name)
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _source_path(root, package, name)
        if path is None:
            continue  # a name imported from a module, not a module
        seen[name] = path
        for parent in _parents(name):
            if parent not in seen:
                todo.append(parent)
        for target in _imports(name, path, fresh):
            if (target == package or target.startswith(package + ".")) and target not in seen:
                todo.append(target)  # its parents join when it resolves
    return dict(sorted(seen.items()))


def module_closure(modules: Iterable[str], *, root: str | Path | None = None, package: str = PACKAGE,
                   fresh: bool = False) -> list[str]:
    """The sorted names of every module of ``package`` that ``modules`` import, transitively,
    including the given modules themselves and the packages above each one (their ``__init__``
    runs on import). ``root`` is the directory holding the package (default: this repository).
    ValueError when a given module does not exist or a module in the closure does not parse."""
    return list(_closure_paths(modules, root, package, fresh))


def direct_imports(name: str, *, root: str | Path | None = None, package: str = PACKAGE) -> set[str]:
    """The modules of ``package`` that module ``name`` imports itself (anywhere in its source; not
    the packages above them, not transitively): the edges of the import graph. ValueError when
    ``name`` is not a module of ``package`` under ``root`` (default: this repository)."""
    root = Path(root).resolve() if root is not None else ROOT
    path = _source_path(root, package, name)
    if path is None:
        raise ValueError(f"no module {name!r} of the {package!r} package under {root}")
    return {t for t in _imports(name, path, False)
            if t != name and (t == package or t.startswith(package + "."))
            and _source_path(root, package, t) is not None}


def normalised_source(source: bytes) -> bytes:
    """What of a module's ``source`` the hash reads: its syntax tree without docstrings, comments,
    blank lines or positions (``ast.dump``), so that editing a docstring or a comment, or
    reformatting, keeps every cache entry; any change to what runs changes it. The raw bytes when
    the source does not parse (the closure reports that error)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return ast.dump(tree, include_attributes=False).encode()


def _digest(path: Path, fresh: bool) -> str:
    ident = _identity(path)
    with _lock:
        known = _digest_memo.get(path)
    if not fresh and known is not None and known[0] == ident:
        return known[1]
    digest = hashlib.sha256(normalised_source(_read_source(path))).hexdigest()
    with _lock:
        _digest_memo[path] = (ident, digest)
    return digest


def code_hash(modules: Iterable[str], *, root: str | Path | None = None, package: str = PACKAGE,
              fresh: bool = False, length: int = 16) -> str:
    """A short hex sha256 (``length`` characters) of the closure of ``modules``: each module's name
    and the sha256 of its :func:`normalised_source` (docstrings and comments left out), in sorted
    name order. Equal for equal sources wherever the
    tree lives; it changes when any module in the closure changes, is added or goes away."""
    h = hashlib.sha256(b"casebook-code-hash 2\n")
    for name, path in _closure_paths(modules, root, package, fresh).items():
        h.update(f"{name}\0{_digest(path, fresh)}\n".encode())
    return h.hexdigest()[:length]



# ----------------------------------------------------------------------------------------------
# A case's own code: the factory module next to its TOML and what it imports from that folder


def _local_source(base_dir: Path, name: str) -> Path | None:
    """The file of module ``name`` (``nets`` or ``nets.layers``) inside ``base_dir`` as Python finds
    it with ``base_dir`` first on ``sys.path``: ``nets/__init__.py`` before ``nets.py`` for a
    package, else None."""
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    base = base_dir.joinpath(*parts)
    for cand in (base / "__init__.py", base.with_name(parts[-1] + ".py")):
        try:
            if cand.is_file():
                return cand
        except OSError:
            continue
    return None


def local_closure(module: str, base_dir: str | Path, *, fresh: bool = False) -> dict[str, Path]:
    """``{module name: file}`` of ``module`` (a dot-free factory module such as ``nets``, a single
    ``nets.py`` or a package ``nets/__init__.py``) and of every module it imports, transitively,
    that lives in ``base_dir`` (a sibling ``helper.py``, a submodule ``nets/layers.py``, a
    relative import), with the packages above each. Found with :mod:`ast`, never importing;
    imports of anything not in ``base_dir`` (torch, the standard library) are not followed.
    Empty when ``module`` is not in ``base_dir``. ValueError when a file in the closure does not
    parse, is not a regular file, or is larger than :data:`MAX_SOURCE_BYTES`."""
    base_dir = Path(base_dir)
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _local_source(base_dir, name)
        if path is None:
            continue  # not a module of this folder (a name imported from one, or a library)
        seen[name] = path
        todo.extend(p for p in _parents(name) if p not in seen)
        for target in _imports(name, path, fresh):
            for cand in (target, *_parents(target)):
                if cand not in seen:
                    todo.append(cand)
    return dict(sorted(seen.items()))


def user_code_hash(module: str, base_dir: str | Path, *, fresh: bool = False,
                   length: int = 16) -> str | None:
    """A short hex sha256 of :func:`local_closure` of ``module`` in ``base_dir`` (each module's
    name and the sha256 of its :func:`normalised_source`), or None when ``module`` is not a file
    of ``base_dir``. Editing the code of the factory module, of a helper it imports from the
    folder, or of any file of a factory package that is imported changes it (a docstring or a
    comment does not); ValueError as :func:`local_closure`."""
    files = local_closure(module, base_dir, fresh=fresh)
    if not files:
        return None
    h = hashlib.sha256(b"casebook-user-code 2\n")
    for name, path in files.items():
        h.update(f"{name}\0{_digest(path, fresh)}\n".encode())
    return h.hexdigest()[:length]

"""A user's models: ``[models.<name>]`` tables, factories found next to the TOML, state dicts.

    [models.vanilla]
    factory = "nets:FaceNet"        # module:callable returning an nn.Module
    kwargs = { n_classes = 2 }      # keyword arguments of the factory
    checkpoint = "vanilla.pt"       # a state dict (weights_only=True); without it the pipeline trains
    train_on = "train"              # a training set name (CaseData.training_sets)
    init = "other"                  # start from another model's weights (fine-tuning)
    training = { epochs = 5 }       # overrides of [training]: epochs, lr, batch_size, weight_decay

A module without a dot (``nets``) must lie next to the TOML (``base_dir/nets.py`` or
``base_dir/nets/__init__.py``); it is loaded under a private name (``casebook_user.<hash>.nets``),
so it never clobbers an importable ``nets`` from elsewhere, ``base_dir`` is not left on
``sys.path`` and the sibling modules it imports are not left in ``sys.modules``; it is never
looked up in the current directory or on ``PYTHONPATH``. A dotted module must be a known model
zoo (:data:`ZOO_MODULES`: ``torchvision.models`` and the project's
``core.cases`` (``core.models``, its old name, too)) or one named in
``$CASEBOOK_FACTORY_MODULES`` (comma-separated module names; a name allows its submodules); the
standard library is refused even when named there. A refused factory is never imported or called.
Every problem is a one-line :class:`core.cases.seam.SourceError`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from core.cases.seam import SourceError
from core.methods.training import load_state_into, load_weights_only
from core.storage import safeio
from core.storage.codehash import user_code_hash

__all__ = [
    "MAX_CHECKPOINT_BYTES",
    "MODEL_SCHEMA",
    "TRAINING_BOUNDS",
    "ZOO_MODULES",
    "allowed_modules",
    "check_checkpoint",
    "check_factory",
    "checkpoint_digest",
    "check_model",
    "check_name",
    "load_weights",
    "make_model",
    "model_facts",
]

# {key: (accepted types, default)}; factory is required.
MODEL_SCHEMA: dict[str, tuple] = {
    "factory": (str, None),
    "kwargs": (dict, {}),
    "checkpoint": (str, None),
    "train_on": (str, None),
    "init": (str, None),
    "training": (dict, {}),
}
# {key: (type, low, high, low inclusive)} for a model's ``training`` overrides.
TRAINING_BOUNDS: dict[str, tuple] = {
    "epochs": (int, 1, 1000, True),
    "lr": (float, 0.0, 10.0, False),
    "batch_size": (int, 1, 65536, True),
    "weight_decay": (float, 0.0, float("inf"), True),
}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FACTORY = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_PRIVATE = "casebook_user"
_LOCK = threading.Lock()
_LOADED: dict[tuple, object] = {}  # (file, hash of the module and its local imports) -> module

#: dotted modules a factory may come from without a setting (a name allows its submodules)
ZOO_MODULES = ("torchvision.models", "core.cases", "core.models")  # core.models: the old name
#: the environment variable naming more factory modules (comma-separated)
ZOO_SETTING = "CASEBOOK_FACTORY_MODULES"
#: a checkpoint larger than this is refused before it is read
MAX_CHECKPOINT_BYTES = 16 * 2**30  # the same as core.storage.safeio.MAX_CHECKPOINT_BYTES
_REFUSED_TOPS = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "__main__"}


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:150]}" if lines else type(exc).__name__


def check_name(name, where: str) -> str:
    """``name`` if it is 1–64 characters of ``[A-Za-z0-9_-]`` (a model or training-set name),
    else a one-line :class:`SourceError` prefixed with ``where``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SourceError(f"{where}: name {name!r} must be 1–64 characters of letters, digits, '_' "
                          "or '-'")
    return name


def check_model(section: dict, where: str) -> dict:
    """Validate a ``[models.<name>]`` table without importing anything; return it with defaults.

    Keys (``MODEL_SCHEMA``): ``factory`` (required, ``"module:callable"``), ``kwargs`` (table),
    ``checkpoint`` (path relative to the TOML), ``train_on`` and ``init`` (names, 1–64 characters
    of ``[A-Za-z0-9_-]``), ``training`` (table of ``epochs`` 1–1000, ``lr`` in (0, 10],
    ``batch_size`` 1–65536, ``weight_decay`` ≥ 0). A checkpoint model is loaded, not trained, so it
    takes none of ``init`` / ``train_on`` / ``training``. Whether ``train_on`` / ``init`` name an
    existing set / model is the caller's check (it knows the case). One-line :class:`SourceError`
    prefixed with ``where`` (e.g. ``"case.toml [models.vanilla]"``), naming the key.
    """
    if not isinstance(section, dict):
        raise SourceError(f"{where}: expected a table with factory = \"module:callable\"")
    for key in section:
        if key not in MODEL_SCHEMA:
            raise SourceError(f"{where}: unknown key {key!r}; valid keys: {', '.join(MODEL_SCHEMA)}")
    if "factory" not in section:
        raise SourceError(f"{where}: missing key 'factory' (\"module:callable\", e.g. "
                          "\"nets:SmallCNN\" or \"torchvision.models:resnet18\")")
    out: dict = {}
    for key, (kinds, default) in MODEL_SCHEMA.items():
        value = section.get(key, default)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            kind = "a table" if kinds is dict else "a string"
            raise SourceError(f"{where}: {key} must be {kind}, got {type(value).__name__}")
        out[key] = dict(value) if isinstance(value, dict) else value
    if not _FACTORY.match(out["factory"]):
        raise SourceError(f"{where}: factory = {out['factory']!r}; write \"module:callable\", e.g. "
                          "\"nets:SmallCNN\"")
    if out["checkpoint"] is not None and not out["checkpoint"].strip():
        raise SourceError(f"{where}: checkpoint is empty; give a path relative to the TOML file")
    for key in ("train_on", "init"):
        if out[key] is not None:
            check_name(out[key], f"{where} {key}")
    if out["checkpoint"] is not None:
        for key in ("init", "train_on", "training"):
            if out[key]:
                raise SourceError(f"{where}: {key} does not apply to a model loaded from checkpoint; "
                                  f"remove {key} or the checkpoint")
    training = out["training"]
    for key, value in training.items():
        if key not in TRAINING_BOUNDS:
            raise SourceError(f"{where}: unknown key {key!r} in training; valid keys: "
                              f"{', '.join(TRAINING_BOUNDS)}")
        kind, low, high, inclusive = TRAINING_BOUNDS[key]
        ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
        ok = ok_type and not isinstance(value, bool) and value == value and value <= high and \
            (value >= low if inclusive else value > low)
        if not ok:
            span = f"{'[' if inclusive else '('}{low:g}, {high:g}]"
            raise SourceError(f"{where}: training.{key} = {value!r}; give "
                              f"{'an integer' if kind is int else 'a number'} in {span}")
        training[key] = float(value) if kind is float else int(value)
    return out


# ----------------------------------------------------------------------------------------------
# Building


def allowed_modules() -> tuple[str, ...]:
    """The dotted modules a factory may name: :data:`ZOO_MODULES` and the names in
    ``$CASEBOOK_FACTORY_MODULES`` (comma-separated); each allows its submodules."""
    extra = [m.strip() for m in os.environ.get(ZOO_SETTING, "").split(",") if m.strip()]
    return tuple(dict.fromkeys([*ZOO_MODULES, *extra]))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def check_factory(factory: str, base_dir: Path) -> tuple[str, str, tuple[Path, bool] | None]:
    """``(module, attr, local file)`` of ``factory`` when the trust model allows it, checked
    before anything is imported: a dot-free module must be a file next to the TOML (``nets.py``
    or ``nets/__init__.py`` in ``base_dir``); a dotted one must lie under :func:`allowed_modules`;
    the standard library (``os:system``, ``subprocess:Popen``, ``shutil:rmtree``), ``builtins``
    and private attributes are refused. One-line :class:`SourceError` otherwise."""
    found = _FACTORY.match(factory) if isinstance(factory, str) else None
    if not found:
        raise SourceError(f"factory {factory!r}: write \"module:callable\", e.g. \"nets:SmallCNN\"")
    module, attr = found.groups()
    if any(part.startswith("_") for part in attr.split(".")):
        raise SourceError(f"factory {factory!r}: {attr!r} is private; name a public class or "
                          "function returning an nn.Module")
    top = module.split(".")[0]
    local = _local_file(module, Path(base_dir))
    if local is not None:
        return module, attr, local
    if top in _REFUSED_TOPS:
        raise SourceError(f"factory {factory!r} refused: {top!r} is the standard library, not a "
                          "model factory; put your factory in a .py file next to the TOML")
    if "." not in module:
        raise SourceError(f"factory {factory!r}: no module {module!r} next to the TOML file "
                          f"({module}.py or {module}/__init__.py in {str(base_dir)!r}); a dot-free "
                          "module is only taken from the case's folder")
    if not any(_under(module, m) for m in allowed_modules()):
        raise SourceError(f"factory {factory!r} refused: {module!r} is not the case's own module "
                          f"or a known model zoo ({', '.join(ZOO_MODULES)}); to trust it, add it "
                          f"to ${ZOO_SETTING} (comma-separated)")
    return module, attr, None


def _local_file(module: str, base_dir: Path) -> tuple[Path, bool] | None:
    if "." in module:
        return None
    single, package = base_dir / f"{module}.py", base_dir / module / "__init__.py"
    if package.is_file():  # a package wins over a module beside it, as in Python
        return package, True
    if single.is_file():
        return single, False
    return None


def _own_module(mod, base_dir: Path) -> bool:
    """Whether ``mod`` was loaded from a file inside ``base_dir`` (and is not the project's own
    ``core``, which a case folder above the repository could hold)."""
    file = getattr(mod, "__file__", None)
    if not file:
        return False
    try:
        path = Path(file).resolve()
        path.relative_to(base_dir)
    except (OSError, ValueError):
        return False
    try:
        path.relative_to(_CORE)
        return False
    except ValueError:
        return True


_CORE = Path(__file__).resolve().parents[1]


def _import_local(module: str, file: Path, package: bool, base_dir: Path, factory: str):
    try:  # the module and the helpers it imports from the folder: editing any reloads it
        key = (str(file.resolve()), user_code_hash(module, base_dir))
    except (OSError, ValueError):
        key = None  # e.g. a syntax error: not remembered; importing it says what is wrong
    with _LOCK:
        if key is not None and key in _LOADED:
            return _LOADED[key]
        resolved = base_dir.resolve()
        tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        name = f"{_PRIVATE}.h{tag}.{module}"
        spec = importlib.util.spec_from_file_location(
            name, file, submodule_search_locations=[str(file.parent)] if package else None)
        mod = importlib.util.module_from_spec(spec)
        for parent in (_PRIVATE, f"{_PRIVATE}.h{tag}"):  # so pickle can import the module by name
            if parent not in sys.modules:
                pkg = types.ModuleType(parent, "Private namespace of modules loaded from user cases.")
                pkg.__path__ = []
                sys.modules[parent] = pkg
        previous = sys.modules.get(name)
        # siblings this folder left in sys.modules (an earlier load, another case in the same
        # folder) are set aside, so that `from helper import Act` reads helper.py as it is now
        stale = {n: m for n, m in list(sys.modules.items())
                 if not n.startswith(_PRIVATE) and _own_module(m, resolved)}
        for n in stale:
            del sys.modules[n]
        before = set(sys.modules)
        sys.modules[name] = mod  # dataclasses and pickling look the module up by name
        added = str(base_dir) not in sys.path
        if added:  # so the module can import its siblings; removed right after
            sys.path.insert(0, str(base_dir))
        try:
            spec.loader.exec_module(mod)
        except BaseException as exc:
            if previous is not None:
                sys.modules[name] = previous
            else:
                sys.modules.pop(name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise SourceError(f"factory {factory!r}: module {module!r} ({file.name}) raised "
                                  "KeyboardInterrupt while importing") from None
            if isinstance(exc, SystemExit):
                raise SourceError(f"factory {factory!r}: module {module!r} ({file.name}) called "
                                  f"sys.exit({exc.code!r}) while importing") from None
            if not isinstance(exc, Exception):
                raise
            raise SourceError(f"factory {factory!r}: module {module!r} ({file.name}) does not import "
                              f"({_first_line(exc)})") from exc
        finally:
            if added:
                try:
                    sys.path.remove(str(base_dir))
                except ValueError:
                    pass
            for n in set(sys.modules) - before:  # the siblings it imported leave no trace
                if n != name and not n.startswith(_PRIVATE) and _own_module(sys.modules[n], resolved):
                    del sys.modules[n]
            for n, m in stale.items():
                sys.modules.setdefault(n, m)
        if key is not None:
            _LOADED[key] = mod
        return mod


def _resolve(factory: str, base_dir: Path):
    """The callable ``factory`` names (``"module:attr"``), once :func:`check_factory` allows it;
    one-line SourceError otherwise. A refused factory is never imported."""
    base_dir = Path(base_dir)
    module, attr, local = check_factory(factory, base_dir)
    if local is not None:
        mod = _import_local(module, *local, base_dir, factory)
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.split(".")[0] == exc.name.split(".")[0] and \
                    module.startswith(exc.name):
                raise SourceError(f"factory {factory!r}: no module {module!r} importable") from exc
            raise SourceError(f"factory {factory!r}: module {module!r} does not import "
                              f"({_first_line(exc)})") from exc
        except Exception as exc:
            raise SourceError(f"factory {factory!r}: module {module!r} does not import "
                              f"({_first_line(exc)})") from exc
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n)))
            shown = ", ".join(public[:8]) + (", ..." if len(public) > 8 else "")
            raise SourceError(f"factory {factory!r}: module {module!r} has no {attr!r} "
                              f"(callables there: {shown or 'none'})")
        obj = getattr(obj, part)
        if isinstance(obj, types.ModuleType) and obj is not mod:
            raise SourceError(f"factory {factory!r} refused: {attr!r} reaches into module "
                              f"{obj.__name__!r}; name a callable of {module!r} itself")
    origin = getattr(obj, "__module__", None) if isinstance(
        obj, type | types.FunctionType | types.BuiltinFunctionType) else None
    if isinstance(origin, str) and origin.split(".")[0] in _REFUSED_TOPS:
        raise SourceError(f"factory {factory!r} refused: {attr!r} is {origin}.{obj.__name__} from "
                          "the standard library, not a model factory")
    if not callable(obj):
        raise SourceError(f"factory {factory!r}: {attr!r} is a {type(obj).__name__}, not callable; "
                          "name a class or function returning an nn.Module")
    return obj


def _wants_weights(kwargs: dict) -> bool:
    return any(kwargs.get(k) not in (None, False) for k in ("weights", "pretrained", "weights_backbone"))


def _call(fn, factory: str, kwargs: dict) -> nn.Module:
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise SourceError(f"factory {factory!r}: kwargs {sorted(kwargs)} rejected "
                          f"({_first_line(exc)})") from exc
    except Exception as exc:
        if _wants_weights(kwargs):
            raise SourceError(f"factory {factory!r}: could not get the pretrained weights asked for "
                              f"by kwargs ({_first_line(exc)}); offline, drop weights= / pretrained="
                              " or put the file in $TORCH_HOME/hub/checkpoints") from exc
        raise SourceError(f"factory {factory!r} raised {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory {factory!r} returned a {type(model).__name__}, not an "
                          "nn.Module")
    return model


def make_model(factory: str, kwargs: dict | None, base_dir: Path) -> nn.Module:
    """Build the ``nn.Module`` that ``factory`` (``"module:callable"``) returns for ``kwargs``.

    A dot-free module is taken from ``base_dir`` first (see the module docstring); the loaded
    module is reused until its file changes. Parameters are whatever the factory draws from the
    global RNG: seed before calling for a reproducible model. torchvision architectures download
    nothing unless kwargs ask (``weights="DEFAULT"``); offline that is a one-line error.
    One-line :class:`SourceError`: bad factory string, module missing or failing to import (its
    exception's first line), callable missing / not callable, kwargs rejected, the factory
    raising, or returning something that is not an ``nn.Module``.
    """
    fn = _resolve(factory, Path(base_dir))
    return _call(fn, factory, dict(kwargs or {}))


def model_facts(factory: str, kwargs: dict | None, base_dir: Path,
                input_shape: tuple[int, int, int] | None = None) -> dict:
    """``{"layers": [named_modules() names, "" excluded], "n_outputs": int | None,
    "n_params": int}`` of the factory's model, built on the meta device (no weights allocated,
    the global RNG untouched) when the factory allows, else on the CPU with the RNG state restored.

    ``n_outputs``: the width of the output for one ``input_shape`` (C, H, W) input run on the meta
    device when given and possible, else the ``out_features`` of the last ``nn.Linear``-like
    module, else None. Raises what :func:`make_model` raises.
    """
    fn = _resolve(factory, Path(base_dir))
    kwargs = dict(kwargs or {})
    meta = True
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _call(fn, factory, kwargs)
        if any(not p.is_meta for p in model.parameters()):
            raise RuntimeError("not on meta")
    except Exception:
        meta = False
        with torch.random.fork_rng(devices=[]):
            model = _call(fn, factory, kwargs)
    n_outputs = None
    if input_shape is not None:
        try:
            with torch.no_grad():
                probe = torch.zeros((1, *input_shape), device="meta" if meta else "cpu")
                out = model.eval()(probe)
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                n_outputs = int(out.shape[1])
        except Exception:
            n_outputs = None
    if n_outputs is None:
        for _, m in model.named_modules():
            if isinstance(getattr(m, "out_features", None), int):
                n_outputs = int(m.out_features)
    return {"layers": [n for n, _ in model.named_modules() if n],
            "n_outputs": n_outputs,
            "n_params": int(sum(p.numel() for p in model.parameters()))}


# ----------------------------------------------------------------------------------------------
# Weights


def _few(keys, k: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:k]) + (f" (+{len(keys) - k} more)" if len(keys) > k else "")


def check_checkpoint(path: str | Path, where: str) -> os.stat_result:
    """The ``stat`` of checkpoint ``path`` once it is known to be a regular file (symlinks
    followed) of at most :data:`MAX_CHECKPOINT_BYTES`, before a byte is read: ``/dev/zero``, a
    FIFO or a symlink to either is a one-line :class:`SourceError` prefixed with ``where``, never
    a hang (:func:`core.storage.safeio.check_checkpoint`, which needs no torch)."""
    return safeio.check_checkpoint(path, where, SourceError)


def checkpoint_digest(path: str | Path, where: str = "checkpoint") -> str:
    """``"<size>:<sha256 hex[:24]>"`` of the checkpoint's bytes after :func:`check_checkpoint`
    (:func:`core.storage.safeio.checkpoint_digest`); one-line :class:`SourceError`."""
    return safeio.checkpoint_digest(path, where, SourceError)


def load_weights(model: nn.Module, path: Path, name: str) -> nn.Module:
    """Load the state dict at ``path`` into ``model`` (``torch.load(weights_only=True)``); return
    ``model`` in eval mode.

    Accepts a plain state dict, ``{"state_dict": ...}`` or ``{"model": ...}``, and strips a
    ``module.`` prefix (DataParallel) when every key has it and the model's keys do not. One-line
    :class:`SourceError` naming the model ``name`` and the file: missing / unreadable file, pickled
    objects (not a state dict; save ``torch.save(model.state_dict(), path)``), keys that do not
    match (a few missing / unexpected) or shape mismatches.
    """
    path = Path(path)
    where = f"model {name!r}: checkpoint {str(path)!r}"
    hint = "save one with torch.save(model.state_dict(), path)"
    if not path.is_file() and not path.exists():
        raise SourceError(f"{where} does not exist or is not a file (paths are relative to the TOML)")

    f, _ = safeio.open_checkpoint(path, where, SourceError)  # checked before a byte is read; torch reads it
    with f:
        obj = load_weights_only(f, where, hint, SourceError)
    return load_state_into(model, obj, where, "the factory's model", hint, SourceError)

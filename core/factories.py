"""A user's models: ``[models.<name>]`` tables, factories found next to the TOML, state dicts.

    [models.vanilla]
    factory = "nets:FaceNet"        # module:callable returning an nn.Module
    kwargs = { n_classes = 2 }      # keyword arguments of the factory
    checkpoint = "vanilla.pt"       # a state dict (weights_only=True); without it the pipeline trains
    train_on = "train"              # a training set name (CaseData.training_sets)
    init = "other"                  # start from another model's weights (fine-tuning)
    training = { epochs = 5 }       # overrides of [training]: epochs, lr, batch_size, weight_decay

A module without a dot (``nets``) is looked up next to the TOML first (``base_dir/nets.py`` or
``base_dir/nets/__init__.py``) and loaded under a private name (``casebook_user.<hash>.nets``), so
it never clobbers an importable ``nets`` from elsewhere and ``base_dir`` is not left on
``sys.path``; dotted modules (``torchvision.models``, ``core.models``) import normally. Every
problem is a one-line :class:`core.seam.SourceError`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import threading
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from core.seam import SourceError

__all__ = [
    "MODEL_SCHEMA",
    "TRAINING_BOUNDS",
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
_LOADED: dict[tuple, object] = {}  # (file, mtime_ns, size) -> module


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


def _local_file(module: str, base_dir: Path) -> tuple[Path, bool] | None:
    if "." in module:
        return None
    single, package = base_dir / f"{module}.py", base_dir / module / "__init__.py"
    if single.is_file():
        return single, False
    if package.is_file():
        return package, True
    return None


def _import_local(module: str, file: Path, package: bool, base_dir: Path, factory: str):
    st = file.stat()
    key = (str(file.resolve()), st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        tag = hashlib.sha256(str(base_dir.resolve()).encode()).hexdigest()[:12]
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
        _LOADED[key] = mod
        return mod


def _resolve(factory: str, base_dir: Path):
    """The callable ``factory`` names (``"module:attr"``); one-line SourceError otherwise."""
    found = _FACTORY.match(factory) if isinstance(factory, str) else None
    if not found:
        raise SourceError(f"factory {factory!r}: write \"module:callable\", e.g. \"nets:SmallCNN\"")
    module, attr = found.groups()
    base_dir = Path(base_dir)
    local = _local_file(module, base_dir)
    if local is not None:
        mod = _import_local(module, *local, base_dir, factory)
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.split(".")[0] == exc.name.split(".")[0] and \
                    module.startswith(exc.name):
                raise SourceError(f"factory {factory!r}: no module {module!r} next to the TOML file "
                                  f"({module}.py in {str(base_dir)!r}) or importable") from exc
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
    if not path.is_file():
        raise SourceError(f"{where} does not exist or is not a file (paths are relative to the TOML)")
    from core.models import load_state_into, load_weights_only

    obj = load_weights_only(path, where, hint, SourceError)
    return load_state_into(model, obj, where, "the factory's model", hint, SourceError)

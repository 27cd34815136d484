"""What validating a case needs from torch-land: a model's layer names, kinds and output width.

Computed on the meta device (no memory, no draw from the global RNG) and kept as a meta-only cache
entry, so that opening a case whose facts are cached imports no torch (most of a warm build's
time).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from pathlib import Path

from core.cases.decoy_mnist.priors import ARCH_NAMES
from core.casestudy.config import CaseError
from core.casestudy.registry import code_version
from core.storage.cache import Cache, key_of
from core.storage.codehash import user_code_hash
from core.storage.safeio import check_checkpoint, checkpoint_digest, open_checkpoint

__all__ = ["ARCH_NAMES", "FactsNotCached", "build", "check_checkpoint", "checkpoint_digest",
           "default_layers", "facts_key", "model_facts", "n_outputs", "no_user_code",
           "open_checkpoint", "store_facts", "user_code"]

_NO_CODE = "e3b0c44298fc1c14"  # sha256(b"")[:16]: no user code (kept so built-in keys stay put)


_NO_USER_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("no_user_code", default=False)


@contextlib.contextmanager
def no_user_code() -> Iterator[None]:
    """Within this block, :func:`model_facts` reads the model facts from the cache only and never
    imports or calls a case's factory: a case whose facts are not cached yet raises
    :class:`FactsNotCached` (for listing cases: ``python -m core list`` reads TOML and cached
    facts only)."""
    token = _NO_USER_CODE.set(True)
    try:
        yield
    finally:
        _NO_USER_CODE.reset(token)


class FactsNotCached(CaseError):
    """A case's model facts are not cached and :func:`no_user_code` forbids computing them (the
    case is not built yet); a one-line :class:`CaseError`."""


def user_code(factory: str | None, base_dir: Path) -> str:
    """A short hash of the case's own code behind ``factory`` (``"module:callable"``): the factory
    module found next to the TOML — a ``nets.py`` or a package ``nets/__init__.py`` — and every
    module of the case folder it imports, transitively (:func:`core.storage.codehash.user_code_hash`).
    A fixed value for a dotted (library) module or none found there (the key built-in cases
    always had: the hash of no bytes); a file that cannot be read as source
    (not a regular file, too large, not parsing) keys as ``"<unreadable: ...>"`` so the build
    reports the error instead of reusing an entry."""
    if not factory:
        return _NO_CODE
    module = factory.split(":", 1)[0]
    if "." in module:
        return _NO_CODE

    try:
        return user_code_hash(module, base_dir) or _NO_CODE
    except (OSError, ValueError) as exc:
        return f"<unreadable: {(str(exc).splitlines() or [''])[0][:120]}>"


def facts_key(spec, base_dir: Path) -> str:
    """The cache key of a model's facts: the factory (or architecture), its kwargs, the code of
    ``core.methods.training`` / ``core.cases.decoy_mnist.net`` / ``core.cases.factories`` and the
    case's own code behind the factory
    (:func:`user_code`). The models stage's key holds it, so editing a helper module the
    factory imports rebuilds the models."""
    code = code_version(("core.methods.training", "core.cases.decoy_mnist.net", "core.cases.factories"))
    return key_of(stage="facts", version=code,
                  arch=spec.arch, factory=spec.factory, kwargs=spec.kwargs,
                  user=user_code(spec.factory, Path(base_dir)) if spec.factory else _NO_CODE)


def model_facts(spec, base_dir: Path, src: str, cache: Cache | None = None) -> dict:
    """``{"layers": [named_modules names], "kinds": {name: class name}, "computed": bool}`` of
    a :class:`~core.casestudy.config.ModelSpec`; read from ``cache`` when stored there."""

    if cache is not None:
        meta = cache.meta(facts_key(spec, base_dir))
        if meta is not None and isinstance(meta.get("layers"), list):
            return {"layers": meta["layers"], "kinds": meta.get("kinds") or {}, "computed": False}
    if _NO_USER_CODE.get() and spec.factory:
        raise FactsNotCached(f"{src}: not built yet (model {spec.name!r}'s facts are not cached; "
                             "listing runs no factory: build the case once)")

    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        # a factory that loads its own weights copies them into meta tensors: a no-op, say nothing
        warnings.simplefilter("ignore", UserWarning)
        model = build(spec, base_dir, src)
    names = [(n, type(m).__name__) for n, m in model.named_modules() if n]
    return {"layers": [n for n, _ in names], "kinds": dict(names), "computed": True}


def store_facts(spec, base_dir: Path, cache: Cache, facts: dict) -> None:
    cache.put_meta(facts_key(spec, base_dir), {"stage": "facts", "layers": facts["layers"],
                                               "kinds": facts["kinds"]})


def build(spec, base_dir: Path, src: str):
    """A fresh (untrained) module for ``spec``: ``core.methods.training.build_model(arch, **kwargs)`` or the
    user's factory (``core.cases.factories.make_model``). One-line :class:`CaseError` on failure."""
    if spec.arch is not None:
        from core.cases.decoy_mnist.net import build_model

        try:
            return build_model(spec.arch, **spec.kwargs)
        except (TypeError, ValueError) as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise CaseError(f"{src}: model {spec.arch!r} cannot be built with kwargs "
                            f"{spec.kwargs}: {first}") from None
    from core.cases.factories import make_model

    try:
        return make_model(spec.factory, spec.kwargs, base_dir)
    except ValueError as exc:
        raise CaseError(f"{src}: models.{spec.name}: {(str(exc).splitlines() or [''])[0]}") \
            from None


def default_layers(facts: dict) -> list[str]:
    """Up to three layers to rank experts in when a case names none: the first and the last
    convolution and the last hidden dense layer (the one before the output)."""
    kinds = facts["kinds"]
    convs = [n for n in facts["layers"] if kinds.get(n, "").startswith("Conv")]
    dense = [n for n in facts["layers"] if kinds.get(n) == "Linear"]
    picked = [convs[0]] if convs else []
    if len(convs) > 1:
        picked.append(convs[-1])
    if len(dense) > 1:
        picked.append(dense[-2])
    if not picked and dense:
        picked.append(dense[-1])
    return list(dict.fromkeys(picked))


def n_outputs(spec, base_dir: Path, src: str, input_shape: tuple[int, ...]) -> int | None:
    """The width of the model's output on one input of ``input_shape`` (C, H, W), found by a
    forward pass on the meta device (no memory, no weights); when that pass fails (a shape that
    does not fit, or an op without a meta kernel) by a pass on a zero batch of two on the CPU in
    eval mode, the global RNG state kept. None when the output is not one (N, K) tensor. A model
    that cannot run on such an input at all (e.g. ``kwargs = { in_channels = 1 }`` for RGB data)
    is a one-line :class:`CaseError` naming the model and the shape, before anything trains."""
    import torch

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore", UserWarning)
            model = build(spec, base_dir, src)
            out = model(torch.empty(1, *input_shape))
    except CaseError:
        raise
    except Exception:  # noqa: BLE001 - e.g. an op without a meta kernel: try it for real
        out = _cpu_forward(spec, base_dir, src, input_shape)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[1])
    return None


def _cpu_forward(spec, base_dir: Path, src: str, input_shape: tuple[int, ...]):
    """The model's output on ``torch.zeros(2, *input_shape)`` on the CPU (eval mode, no gradient,
    the global RNG state restored afterwards); a one-line :class:`CaseError` when it raises."""
    import torch

    shown = "×".join(map(str, input_shape))
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", UserWarning)
            model = build(spec, base_dir, src)
            model.eval()
            return model(torch.zeros(2, *input_shape))
    except CaseError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward: any error is theirs, said once
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CaseError(f"{src}: model {spec.name!r} cannot run on the data's {shown} (C×H×W) "
                        f"images: {type(exc).__name__}: {first}") from None

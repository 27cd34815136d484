"""What validating a case needs from torch-land: a model's layer names, kinds and output width.

Computed on the meta device (no memory, no draw from the global RNG) and kept as a meta-only cache
entry, so that opening a case whose facts are cached imports no torch (most of a warm build's
time).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.cache import Cache, key_of

ARCH_NAMES = ("decoy-cnn", "decoy-cnn-unpadded")  # core.models.ARCHITECTURES, without torch


def _factory_file(factory: str, base_dir: Path) -> Path | None:
    module = factory.split(":", 1)[0]
    path = base_dir / (module.replace(".", "/") + ".py")
    return path if path.is_file() else None


def facts_key(spec, base_dir: Path) -> str:
    from core.casestudy.registry import code_version

    user = b""
    if spec.factory:
        f = _factory_file(spec.factory, base_dir)
        if f is not None:
            try:
                user = f.read_bytes()
            except OSError:
                user = b"<unreadable>"
    return key_of(stage="facts", version=code_version(("core.models", "core.factories")),
                  arch=spec.arch, factory=spec.factory, kwargs=spec.kwargs,
                  user=hashlib.sha256(user).hexdigest()[:16])


def model_facts(spec, base_dir: Path, src: str, cache: Cache | None = None) -> dict:
    """``{"layers": [named_modules names], "kinds": {name: class name}, "computed": bool}`` of
    a :class:`~core.casestudy.config.ModelSpec`; read from ``cache`` when stored there."""

    if cache is not None:
        meta = cache.meta(facts_key(spec, base_dir))
        if meta is not None and isinstance(meta.get("layers"), list):
            return {"layers": meta["layers"], "kinds": meta.get("kinds") or {}, "computed": False}
    import warnings

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
    """A fresh (untrained) module for ``spec``: ``core.models.build_model(arch, **kwargs)`` or the
    user's factory (``core.factories.make_model``). One-line :class:`CaseError` on failure."""
    from core.casestudy.config import CaseError

    if spec.arch is not None:
        from core.models import build_model

        try:
            return build_model(spec.arch, **spec.kwargs)
        except (TypeError, ValueError) as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise CaseError(f"{src}: model {spec.arch!r} cannot be built with kwargs "
                            f"{spec.kwargs}: {first}") from None
    from core.factories import make_model

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
    forward pass on the meta device (no memory, no weights); None when the forward pass cannot
    run there or the output is not one (N, K) tensor."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore", UserWarning)
            model = build(spec, base_dir, src)
            out = model(torch.empty(1, *input_shape))
    except Exception:  # e.g. an op without a meta kernel: the count is checked when it runs
        return None
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[1])
    return None

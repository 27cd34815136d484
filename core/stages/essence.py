"""Essence and causal checks of experts: interventions on a layer's units (issue 14).

Two claims of Leino et al. (2018) become measurements here:

- **Essence.** For two related classes A and B, rank the units of a layer by comparative influence
  (y_A − y_B, point DoI over the two classes' training images), keep only the top k units (every
  other unit set to its mean activation over those images, or to zero) and measure the binary
  accuracy of A vs B on held-out images of A and B, for k = 1, 2, 4, … up to the layer's width.
  Baselines in the same run: k random units (many seeded draws: median and interval), the bottom k
  units and the whole layer.
- **Causality.** Ablate (mean or zero) a class's top-k experts and measure the drop of that class's
  accuracy and mean logit, against k random units and against another class's top-k experts; for a
  case with a region, ablate the experts that carry the shortcut and measure the accuracy on the
  evaluation sets with and without the region.

Conventions. A *unit* is a channel of a convolutional output (N, C, H, W) or a neuron of a flat one
(N, F); the cut is the layer's output (for DecoyCNN ``conv1``: before its ReLU). "Set to fill"
replaces the whole unit: a channel's map by the fill's map for that channel (the *mean* fill is the
position-wise mean activation over the stated images), a neuron by a number. Every masked variant
is one forward pass over all its images: the slice z = h(x) is computed once and only the part of
the network after the layer (traced with torch.fx, checked against the model) runs on the masked
copies, many variants stacked in one batch; when the model cannot be traced, a forward hook masks
the layer's output of a stacked batch instead. Hooks live only inside ``with`` blocks.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from core.engine.devices import eval_mode, model_device
from core.engine.distributions import PointDoI
from core.engine.experts import unit_scores
from core.engine.influence import activations, get_layer, influence, model_lock
from core.engine.quantities import ClassQoI, ComparativeQoI
from core.stages.base import Stage, StageContext

STAGE = Stage("essence", reads=("data", "models", "experts"), sections=("essence", "experts"),
              inputs=("seeds", "roles", "device"),
              quick={"random_draws": 5, "n_rank": 64, "n_eval": 300})

try:  # the engine's torch.fx tail g (private): only a speed-up, every use is checked against the model
    from core.engine.influence import _tail
except ImportError:  # pragma: no cover
    def _tail(model: nn.Module, layer: str) -> None:
        return None

__all__ = [
    "DEFAULTS",
    "FILLS",
    "ablation",
    "ablation_table",
    "binary_accuracy",
    "build",
    "causal_check",
    "check_config",
    "class_scores",
    "comparative_scores",
    "confusion",
    "essence_curve",
    "keep_units",
    "k_grid",
    "masked_logits",
    "most_confused_pairs",
    "region_check",
    "smallest_k",
    "unit_fill",
]

FILLS = ("mean", "zero")
MEMORY_BUDGET = 256 * 2**20  # bytes of stacked activations per batch of masked variants


# --------------------------------------------------------------------------------------- masking

def _keep_mask(keep, width: int, device) -> Tensor:
    """A (width,) bool mask from a bool mask or a list of unit indices."""
    t = torch.as_tensor(keep, device=device)
    if t.dtype == torch.bool:
        if t.shape != (width,):
            raise ValueError(f"keep has shape {tuple(t.shape)}; the layer has {width} units")
        return t
    idx = t.long().flatten()
    if len(idx) and (idx.min() < 0 or idx.max() >= width):
        raise ValueError(f"units {idx.tolist()} out of range for a layer with {width} units")
    mask = torch.zeros(width, dtype=torch.bool, device=device)
    mask[idx] = True
    return mask


def _fill_like(fill: Tensor | float, z: Tensor) -> Tensor:
    """``fill`` shaped like one example of ``z`` (N, C, ...): a number, (C,) or (C, ...)."""
    one = z.shape[1:]
    f = torch.as_tensor(fill, dtype=z.dtype, device=z.device)
    if f.dim() == 1 and len(one) > 1 and f.shape[0] == one[0]:
        f = f.view(-1, *([1] * (len(one) - 1)))
    try:
        return torch.broadcast_to(f, one)
    except RuntimeError:
        raise ValueError(f"fill of shape {tuple(f.shape)} does not fit the layer's "
                         f"{tuple(one)} per example") from None


def _masked(z: Tensor, keeps: Tensor, fill: Tensor) -> Tensor:
    """(V·N, C, ...) from z (N, C, ...): variant v keeps units ``keeps[v]`` and fills the rest."""
    v, n = keeps.shape[0], z.shape[0]
    k = keeps.view(v, 1, keeps.shape[1], *([1] * (z.dim() - 2)))
    return torch.where(k, z.unsqueeze(0), fill.unsqueeze(0).unsqueeze(0)).reshape(v * n, *z.shape[1:])


class _MaskHook:
    """Forward hook: the layer's output of a stack of V variants × N images is masked per variant."""

    def __init__(self, keeps: Tensor, fill: Tensor | float):
        self.keeps, self.fill = keeps, fill

    def __call__(self, module, args, out):
        if not isinstance(out, Tensor):
            raise TypeError(f"the layer gives a {type(out).__name__}, not a tensor")
        v = self.keeps.shape[0]
        if out.shape[0] % v:
            raise ValueError(f"a batch of {out.shape[0]} does not split into {v} variants")
        if self.keeps.shape[1] != out.shape[1]:
            raise ValueError(f"keep has {self.keeps.shape[1]} units; the layer gives "
                             f"{out.shape[1]}")
        z = out.reshape(v, -1, *out.shape[1:])
        k = self.keeps.to(out.device).view(v, 1, out.shape[1], *([1] * (out.dim() - 2)))
        return torch.where(k, z, _fill_like(self.fill, out)).reshape(out.shape)


@contextmanager
def keep_units(model: nn.Module, layer: str, keep, fill: Tensor | float = 0.0) -> Iterator[nn.Module]:
    """Within the block, ``layer``'s output units not in ``keep`` are replaced by ``fill``.

    ``keep`` is a (units,) bool mask or a list of unit indices (channels of a conv output, neurons
    of a flat one); ``fill`` a number, a (units,) tensor or a tensor shaped like one example's
    output (e.g. :func:`unit_fill`). Yields the model; its hook is removed when the block ends,
    also when it raises. Example: ``with keep_units(m, "fc1", [3, 7], 0.0): m(x)``.
    """
    module = get_layer(model, layer)
    state: dict = {}

    def hook(m, args, out):
        if "mask" not in state:
            state["mask"] = _keep_mask(keep, out.shape[1], out.device)
        return _MaskHook(state["mask"][None], fill)(m, args, out)

    handle = module.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def _fill_name(fill) -> str | float:
    """How a fill is reported: its name, its number, or "custom" for a tensor."""
    if isinstance(fill, str):
        return fill
    if isinstance(fill, Tensor) and fill.numel() != 1:
        return "custom"
    return float(fill)


def _resolve_fill(model: nn.Module, layer: str, fill, fill_from: Tensor | None, z: Tensor) -> Tensor:
    """``fill`` for the slice ``z``: "mean" over ``fill_from`` when given, else over ``z``."""
    if isinstance(fill, str) and fill == "mean" and fill_from is not None:
        return unit_fill(model, layer, "mean", fill_from)
    return unit_fill(model, layer, fill, z=z)


def unit_fill(model: nn.Module, layer: str, fill: str | float | Tensor, x: Tensor | None = None,
              *, z: Tensor | None = None) -> Tensor:
    """The value the removed units take, shaped like one example's output of ``layer``.

    ``"mean"``: the mean activation over the images ``x`` (or the given slice ``z``), position by
    position; ``"zero"``: zeros; a number or tensor: broadcast to one example. On the model's device.
    """
    if z is None:
        if x is None:
            raise ValueError("unit_fill needs images x (or their slice z)")
        z = activations(model, x, layer)
    if isinstance(fill, str):
        if fill == "mean":
            return z.mean(0)
        if fill == "zero":
            return torch.zeros_like(z[0])
        raise ValueError(f"fill must be 'mean', 'zero', a number or a tensor, not {fill!r}")
    return _fill_like(fill, z).clone()


_PER_CHANNEL = (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.MaxPool1d,
                nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Identity, nn.Dropout, nn.Flatten,
                nn.BatchNorm1d, nn.BatchNorm2d)


class _Fold:
    """The part after a layer as: per-channel ops → a linear consumer (conv or dense) → the rest.

    A per-channel op acts on each unit alone, so on a masked slice it gives, unit by unit, either
    ops(z) or ops(fill); the consumer is linear, so its output is consumer(ops(fill)) plus the sum
    over kept units of that unit's own contribution. Those contributions are computed once per
    image; each masked variant is then a matrix product and the rest of the network, instead of
    the whole part after the layer (DecoyCNN conv1: conv2 is the costly step it skips).
    """

    def __init__(self, ops: nn.Module, consumer: nn.Module, rest: nn.Module):
        self.ops, self.consumer, self.rest = ops, consumer, rest

    @classmethod
    def plan(cls, model: nn.Module, layer: str) -> _Fold | None:
        children = list(model.named_children())
        names = [n for n, _ in children]
        if layer not in names:
            return None
        ops = []
        for name, m in children[names.index(layer) + 1:]:
            if isinstance(m, nn.Flatten) and m.start_dim != 1:
                return None
            if isinstance(m, _PER_CHANNEL):
                ops.append(m)
                continue
            ok = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                             and m.padding_mode == "zeros")
            rest = _tail(model, name) if ok else None
            return None if rest is None else cls(nn.Sequential(*ops), m, rest)
        return None

    def _contributions(self, delta: Tensor, width: int) -> Tensor:
        """Each unit's share of the consumer's output (without bias): (n, units, outputs flat)."""
        c = self.consumer
        n = delta.shape[0]
        if isinstance(c, nn.Linear):
            d = delta.reshape(n, width, -1)
            w = c.weight.reshape(c.out_features, width, -1)
            return torch.einsum("ncp,ocp->nco", d, w)
        w = c.weight.transpose(0, 1).reshape(width * c.out_channels, 1, *c.weight.shape[2:])
        out = torch.nn.functional.conv2d(delta, w, None, c.stride, c.padding, c.dilation, groups=width)
        return out.reshape(n, width, -1)

    def logits(self, z: Tensor, keeps: Tensor, fill: Tensor, budget: int) -> Tensor:
        width = z.shape[1]
        f = self.ops(fill[None])
        base = self.consumer(f)  # (1, *consumer output)
        shape = base.shape[1:]
        m = base[0].numel()
        per_image = max(1, width * m * 4)
        n_chunk = max(1, min(len(z), budget // 2 // per_image))
        v_chunk = max(1, min(len(keeps), budget // 2 // max(1, n_chunk * m * 4 * 4)))
        k = keeps.to(z.dtype)
        out = None
        for i in range(0, len(z), n_chunk):
            d = self._contributions(self.ops(z[i:i + n_chunk]) - f, width)
            nc = d.shape[0]
            d = d.permute(1, 0, 2).reshape(width, nc * m)
            b = base.reshape(1, m).expand(nc, m).reshape(1, nc * m)
            for j in range(0, len(keeps), v_chunk):
                kv = k[j:j + v_chunk]
                y = self.rest(torch.addmm(b, kv, d).view(len(kv) * nc, *shape))
                if out is None:
                    out = torch.empty(len(keeps), len(z), *y.shape[1:], dtype=torch.float32)
                out[j:j + len(kv), i:i + nc] = y.reshape(len(kv), nc, *y.shape[1:]).float().cpu()
        return out


class _Cut:
    """``model`` cut at ``layer``'s output: h once per image, then per masked variant either the
    folded consumer (:class:`_Fold`), the traced part after the layer, or a masking hook on a
    stacked batch, whichever is the fastest that agrees with the plain model."""

    def __init__(self, model: nn.Module, layer: str, memory_budget: int = MEMORY_BUDGET):
        self.model, self.layer = model, layer
        self.module = get_layer(model, layer)
        self.device = model_device(model)
        self.budget = int(memory_budget)
        self.tail: nn.Module | None | bool = False  # False: not decided yet
        self.fold: _Fold | None | bool = False
        self.path: str | None = None  # "fold", "tail" or "hook" once decided

    def slice(self, x: Tensor) -> Tensor:
        """z = h(x) at the layer's output (no graph, on the model's device)."""
        return activations(self.model, x, self.layer)

    def _decide(self, x: Tensor, z: Tensor, fill: Tensor) -> None:
        if self.tail is False:
            g = _tail(self.model, self.layer)
            if g is not None:
                try:
                    ok = torch.allclose(g(z[:2].clone()), self.model(x[:2].to(self.device)),
                                        rtol=1e-4, atol=1e-5)
                except Exception:
                    ok = False
                # the tail may start with an in-place op (a VGG's ReLU(inplace=True)): give it a
                # copy, so the slice z shared by every masked variant is never overwritten
                g = (lambda t, _g=g: _g(t.clone())) if ok else None
            self.tail = g
        if self.fold is False:
            fold = _Fold.plan(self.model, self.layer)
            if fold is not None:
                width = z.shape[1]
                gen = torch.Generator().manual_seed(0)
                keeps = torch.stack([torch.ones(width, dtype=torch.bool),
                                     torch.rand(width, generator=gen) < 0.5,
                                     torch.zeros(width, dtype=torch.bool)]).to(self.device)
                try:
                    want = self._plain(x[:4], z[:4], keeps, fill)
                    got = fold.logits(z[:4], keeps, fill, self.budget)
                    scale = float(want.abs().max()) + 1e-6
                    ok = got.shape == want.shape and bool(((got - want).abs() <= 1e-4 * scale + 1e-4).all())
                except Exception:
                    ok = False
                fold = fold if ok else None
            self.fold = fold
        self.path = "fold" if self.fold is not None else "tail" if self.tail is not None else "hook"

    def _plain(self, x: Tensor, z: Tensor, keeps: Tensor, fill: Tensor) -> Tensor:
        n = z.shape[0]
        per_variant = max(1, z[0].numel() * z.element_size() * n * 4)  # slice, copy, g's temporaries
        chunk = max(1, min(len(keeps), self.budget // per_variant))
        out = []
        for i in range(0, len(keeps), chunk):
            kv = keeps[i:i + chunk]
            if self.tail is not None:
                y = self.tail(_masked(z, kv, fill))
            else:
                handle = self.module.register_forward_hook(_MaskHook(kv, fill))
                try:
                    xs = x.to(self.device)
                    y = self.model(xs.repeat(len(kv), *([1] * (xs.dim() - 1))))
                finally:
                    handle.remove()
            out.append(y.reshape(len(kv), n, *y.shape[1:]).float().cpu())
        return torch.cat(out)

    def logits(self, x: Tensor, z: Tensor, keeps: Tensor, fill: Tensor) -> Tensor:
        """(V, N, outputs) on the CPU: the model's output on images ``x`` (slice ``z``) for each row
        of the (V, units) bool ``keeps``, units not kept set to ``fill``; variants in batches."""
        keeps = keeps.to(self.device)
        fill = _fill_like(fill, z)
        with model_lock(self.model), eval_mode(self.model), torch.no_grad():
            if self.path is None:
                self._decide(x, z, fill)
            if len(keeps) == 0:
                return torch.zeros(0, z.shape[0], 0)
            if self.path == "fold":
                return self.fold.logits(z, keeps, fill, self.budget)
            return self._plain(x, z, keeps, fill)


def masked_logits(model: nn.Module, layer: str, x: Tensor, keeps, fill: str | float | Tensor = "mean",
                  *, fill_from: Tensor | None = None) -> Tensor:
    """The model's outputs on ``x`` for each masked variant: shape (V, N, outputs), on the CPU.

    ``keeps`` is a (V, units) bool tensor (a (units,) mask or list of indices is one variant);
    every variant is one forward pass of the part after ``layer`` over all of ``x``. ``fill`` as in
    :func:`unit_fill`; "mean" is over ``fill_from`` (default ``x``).
    """
    cut = _Cut(model, layer)
    z = cut.slice(x)
    keeps = torch.as_tensor(keeps)
    if keeps.dtype != torch.bool or keeps.dim() == 1:
        keeps = _keep_mask(keeps, z.shape[1], "cpu")[None]
    f = _resolve_fill(model, layer, fill, fill_from, z)
    return cut.logits(x, z, keeps, f)


# ---------------------------------------------------------------------------------- measurements

def binary_accuracy(logits: Tensor, y: Tensor, a: int, b: int) -> Tensor:
    """Accuracy of A vs B = argmax over the two logits a and b (ties go to A) on images whose label
    is a or b. ``logits`` (..., N, outputs) → (...,) floats."""
    keep = (y == a) | (y == b)
    la, lb = logits[..., keep, a], logits[..., keep, b]
    pred_a = la >= lb
    return (pred_a == (y[keep] == a).to(la.device)).float().mean(-1)


def comparative_scores(model: nn.Module, layer: str, x: Tensor, a: int, b: int, *,
                       reduce: str = "sum") -> Tensor:
    """Every unit's comparative influence y_a − y_b at ``layer`` (point DoI over ``x``): (units,)."""
    chi = influence(model, x, layer, ComparativeQoI(a, b), PointDoI())
    return unit_scores(chi, reduce).detach().cpu()


def class_scores(model: nn.Module, layer: str, x: Tensor, c: int, *, reduce: str = "sum") -> Tensor:
    """Every unit's influence on class ``c``'s logit at ``layer`` (point DoI over ``x``): (units,)."""
    chi = influence(model, x, layer, ClassQoI(c), PointDoI())
    return unit_scores(chi, reduce).detach().cpu()


def k_grid(width: int, ks: Sequence[int] | None = None) -> list[int]:
    """The k values of a curve: ``ks`` clipped to 1..width, or 1, 2, 4, … and always ``width``."""
    if ks is None:
        out, k = [], 1
        while k < width:
            out.append(k)
            k *= 2
    else:
        out = [int(k) for k in ks if 1 <= int(k) < width]
    return sorted(set(out)) + [int(width)]


def _order(scores: Tensor, by: str) -> Tensor:
    """Units from highest to lowest score (``by="abs"``: magnitude), ties by unit index."""
    key = scores.abs() if by == "abs" else scores
    return torch.sort(key.double(), descending=True, stable=True).indices


def _interval(t: Tensor, confidence: float, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    tail = (1 - confidence) / 2
    t = t.double()
    return (t.median(dim).values if t.shape[dim] % 2 else t.quantile(0.5, dim=dim),
            t.quantile(tail, dim=dim), t.quantile(1 - tail, dim=dim))


def _seed_for(seed: int, *parts) -> int:
    """A per-measurement seed: ``seed`` mixed with a CRC of the parts (stable across runs)."""
    return int(seed) * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode()) % 1_000_003


def _random_keeps(width: int, k: int, draws: int, gen: torch.Generator) -> Tensor:
    """(draws, width) bool: each row keeps k units drawn without replacement."""
    idx = torch.argsort(torch.rand(draws, width, generator=gen), dim=1)[:, :k]
    keeps = torch.zeros(draws, width, dtype=torch.bool)
    keeps.scatter_(1, idx, True)
    return keeps


def essence_curve(model: nn.Module, layer: str, x_a: Tensor, x_b: Tensor, x_eval: Tensor,
                  y_eval: Tensor, a: int, b: int, *, ks: Sequence[int] | None = None,
                  fill: str | float = "mean", random_draws: int = 20, seed: int = 0,
                  by: str = "abs", reduce: str = "sum", confidence: float = 0.9,
                  scores: Tensor | None = None, _cut: _Cut | None = None,
                  _z_eval: Tensor | None = None) -> dict:
    """Binary accuracy of A vs B when ``layer`` keeps only k units, for each selection rule.

    Units are ranked by comparative influence y_a − y_b over the training images ``x_a`` ∪ ``x_b``
    (``scores`` skips that step), by magnitude (``by="abs"``: evidence for A or for B) or signed
    value. The others are set to ``fill`` ("mean": their mean activation over ``x_a`` ∪ ``x_b``;
    "zero"; a number). Accuracy is measured on the images of ``x_eval`` labelled a or b.

    Returns a plain dict: ``ks``, ``width``, ``full`` (the whole layer), ``top``, ``bottom`` (lists
    over ks), ``random`` = {"median", "low", "high", "mean"} over ``random_draws`` seeded draws of
    k units (interval at ``confidence``), ``ranking`` (units, best first), ``scores`` (every unit's
    comparative influence), and the settings (``seed``, ``fill``, ``by``, ``n_eval``, ``n_rank``).
    At k = width every rule is the whole layer. The random draws depend only on ``seed`` and the
    k grid, so curves with different fills share them.
    """
    if by not in ("abs", "value"):
        raise ValueError(f"by must be 'abs' or 'value', not {by!r}")
    if int(random_draws) < 1:
        raise ValueError(f"random_draws must be at least 1, not {random_draws}")
    y_eval = torch.as_tensor(y_eval).cpu()
    sel = (y_eval == a) | (y_eval == b)
    if not bool((y_eval == a).any()) or not bool((y_eval == b).any()):
        raise ValueError(f"the held-out images need both class {a} and class {b}")
    x_rank = torch.cat([x_a, x_b])
    cut = _cut or _Cut(model, layer)
    xe = x_eval[sel]
    ye = y_eval[sel]
    z = _z_eval[sel.to(_z_eval.device)] if _z_eval is not None else cut.slice(xe)
    width = int(z.shape[1])
    if scores is None:
        scores = comparative_scores(model, layer, x_rank, a, b, reduce=reduce)
    scores = scores.detach().cpu()
    if len(scores) != width:
        raise ValueError(f"{len(scores)} scores for a layer with {width} units")
    order = _order(scores, by)
    f = _resolve_fill(model, layer, fill, x_rank, z)
    grid = k_grid(width, ks)
    gen = torch.Generator().manual_seed(int(seed))
    keeps, index = [torch.ones(1, width, dtype=torch.bool)], []
    draws = int(random_draws)
    for k in grid[:-1]:
        top = torch.zeros(1, width, dtype=torch.bool)
        top[0, order[:k]] = True
        bottom = torch.zeros(1, width, dtype=torch.bool)
        bottom[0, order[width - k:]] = True
        keeps += [top, bottom, _random_keeps(width, k, draws, gen)]
        index.append(k)
    acc = binary_accuracy(cut.logits(xe, z, torch.cat(keeps), f), ye, a, b)
    full = float(acc[0])
    top, bottom, med, low, high, mean = [], [], [], [], [], []
    pos = 1
    for _ in index:
        top.append(float(acc[pos]))
        bottom.append(float(acc[pos + 1]))
        r = acc[pos + 2:pos + 2 + draws]
        m, lo, hi = _interval(r, confidence)
        med.append(float(m))
        low.append(float(lo))
        high.append(float(hi))
        mean.append(float(r.mean()))
        pos += 2 + draws
    for lst in (top, bottom, med, low, high, mean):
        lst.append(full)
    return {"layer": layer, "a": int(a), "b": int(b), "fill": _fill_name(fill),
            "by": by, "reduce": reduce, "ks": grid, "width": width, "full": full, "top": top,
            "bottom": bottom, "random": {"median": med, "low": low, "high": high, "mean": mean},
            "random_draws": draws, "confidence": float(confidence), "seed": int(seed),
            "ranking": order.tolist(), "scores": [float(s) for s in scores],
            "n_eval": int(sel.sum()), "n_rank": int(len(x_rank))}


def smallest_k(curve: dict, share: float = 0.95) -> dict:
    """The smallest k whose accuracy reaches ``share`` × the whole layer's, per rule.

    Returns {"target": share × full, "top": k, "bottom": k, "random": k (of the median draw),
    "random_high": k (of the interval's upper end)}; a rule that never reaches it gets None (cannot
    happen when the curve ends at the layer's width, where every rule is the whole layer).
    """
    target = float(share) * float(curve["full"])

    def first(values):
        for k, v in zip(curve["ks"], values, strict=True):
            if v >= target - 1e-12:
                return int(k)
        return None

    return {"target": target, "top": first(curve["top"]), "bottom": first(curve["bottom"]),
            "random": first(curve["random"]["median"]), "random_high": first(curve["random"]["high"])}


def confusion(model: nn.Module, x: Tensor, y: Tensor, n_classes: int | None = None,
              *, batch_size: int = 512) -> Tensor:
    """The confusion matrix (n_classes, n_classes) int64: rows true class, columns prediction."""
    dev = model_device(model)
    with model_lock(model), eval_mode(model), torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu()
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0).long()
    y = torch.as_tensor(y).cpu().long()
    n = int(n_classes or max(int(y.max()) + 1 if len(y) else 0, int(pred.max()) + 1 if len(pred) else 0))
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return cm


def most_confused_pairs(model: nn.Module | None, x: Tensor | None, y: Tensor | None, n: int, *,
                        n_classes: int | None = None, matrix: Tensor | None = None) -> list[dict]:
    """The ``n`` class pairs the model confuses most (from ``matrix`` or the model on ``x``, ``y``).

    A pair's count is C[a, b] + C[b, a]; pairs with no confusion are left out. ``a`` is the class
    whose images go to the other more often (ties: the smaller index). Returns
    [{"a", "b", "confusions", "a_as_b", "b_as_a"}] most confused first (ties by class index).
    """
    cm = matrix if matrix is not None else confusion(model, x, y, n_classes)
    cm = torch.as_tensor(cm).long()
    pairs = []
    for i in range(cm.shape[0]):
        for j in range(i + 1, cm.shape[0]):
            ij, ji = int(cm[i, j]), int(cm[j, i])
            if ij + ji > 0:
                a, b = (i, j) if ij >= ji else (j, i)
                pairs.append({"a": a, "b": b, "confusions": ij + ji, "a_as_b": max(ij, ji),
                              "b_as_a": min(ij, ji)})
    pairs.sort(key=lambda p: (-p["confusions"], min(p["a"], p["b"]), max(p["a"], p["b"])))
    return pairs[:max(0, int(n))]


def _class_stats(logits: Tensor, y: Tensor, c: int, correct: Tensor | None = None) -> dict:
    """Per variant of ``logits`` (V, N, outputs): class ``c``'s accuracy and mean logit on its own
    images and the accuracy on the other images, each a (V,) float64 tensor or None (no images).
    ``correct`` (V, N) may be passed when already computed."""
    own = y == c
    if correct is None:
        correct = (logits.argmax(-1) == y).double()
    idx, rest = own.nonzero().flatten(), (~own).nonzero().flatten()
    return {"n": len(idx),
            "acc": correct.index_select(1, idx).mean(1) if len(idx) else None,
            "logit": logits[:, :, c].index_select(1, idx).double().mean(1) if len(idx) else None,
            "others_acc": correct.index_select(1, rest).mean(1) if len(rest) else None}


def _effects(stats: dict, i: int, base: int = 0) -> dict:
    """Variant ``i`` against variant ``base`` (the intact layer) as plain numbers; drops are
    before − after."""
    out = {"n": stats["n"]}
    for key, name in (("acc", "acc"), ("logit", "logit"), ("others_acc", "others_acc")):
        t = stats[key]
        before = None if t is None else float(t[base])
        after = None if t is None else float(t[i])
        out.update({f"{name}_before": before, f"{name}_after": after,
                    f"{name}_drop": None if t is None else before - after})
    return out


def _class_effects(logits: Tensor, base: Tensor, y: Tensor, c: int) -> dict:
    """Class ``c``'s accuracy and mean logit on its images before (``base``, (N, outputs)) and after
    (``logits``), and the accuracy on the other images: :func:`_effects` of the two."""
    return _effects(_class_stats(torch.stack([base, logits]), y, c), 1)


def ablation(model: nn.Module, layer: str, units: Sequence[int], x: Tensor, y: Tensor, cls: int, *,
             fill: str | float = "mean", fill_from: Tensor | None = None) -> dict:
    """Remove ``units`` of ``layer`` (set to ``fill``) and measure class ``cls`` on ``x``, ``y``.

    "mean" fills with the units' mean activation over ``fill_from`` (default ``x``: all classes).
    Returns {"units", "fill", "n", "acc_before", "acc_after", "acc_drop", "logit_before",
    "logit_after", "logit_drop", "others_acc_before", "others_acc_after", "others_acc_drop"}:
    accuracy and mean logit of class ``cls`` on its own images, accuracy on the other images;
    drops are before − after. One forward of the part after the layer for each of the two variants.
    """
    cut = _Cut(model, layer)
    z = cut.slice(x)
    f = _resolve_fill(model, layer, fill, fill_from, z)
    keep = ~_keep_mask(list(units), z.shape[1], "cpu")
    lg = cut.logits(x, z, torch.stack([torch.ones_like(keep), keep]), f)
    y = torch.as_tensor(y).cpu()
    return {"units": [int(u) for u in units], "fill": _fill_name(fill),
            **_class_effects(lg[1], lg[0], y, int(cls))}


def ablation_table(model: nn.Module, layer: str, x: Tensor, y: Tensor, class_units: dict, *,
                   fill: str | float = "mean", fill_from: Tensor | None = None,
                   other: dict | None = None, random_draws: int = 100, seed: int = 0,
                   confidence: float = 0.9, _cut: _Cut | None = None, _z: Tensor | None = None
                   ) -> list[dict]:
    """For each class c of ``class_units`` ({c: its top-k units}): ablate them, k random units
    (``random_draws`` seeded draws) and the top-k units of ``other[c]`` (another class), all in one
    batch of variants over ``x`` (every class's images at once; random draws of the same k are
    shared by the classes).

    Returns one plain row per class: {"class", "k", "units", "fill", "experts": effects,
    "random": {"acc_drop", "logit_drop", "others_acc_drop"} each {"median","low","high"},
    "other_class", "other_units", "other": effects or None, "overlap" (units shared with the other
    class), "share_random_at_least" (share of random draws whose logit drop ≥ the experts'),
    "beats_random" (the experts' logit drop is above the random interval and their accuracy drop
    at least the random median), "seed"}. Effects are as in :func:`ablation`.
    """
    cut = _cut or _Cut(model, layer)
    z = _z if _z is not None else cut.slice(x)
    width = int(z.shape[1])
    y = torch.as_tensor(y).cpu()
    f = _resolve_fill(model, layer, fill, fill_from, z)
    classes = [int(c) for c in class_units]
    masks = {c: ~_keep_mask(list(class_units[c]), width, "cpu") for c in classes}
    keeps = [torch.ones(1, width, dtype=torch.bool)] + [masks[c][None] for c in classes]
    draws = int(random_draws)
    rand_at: dict[int, int] = {}
    for k in sorted({len(class_units[c]) for c in classes}):
        gen = torch.Generator().manual_seed(_seed_for(seed, layer, "random", k))
        rand_at[k] = sum(len(t) for t in keeps)
        keeps.append(~_random_keeps(width, k, draws, gen))
    lg = cut.logits(x, z, torch.cat(keeps), f)
    correct = (lg.argmax(-1) == y).double()
    rows = []
    for i, c in enumerate(classes):
        units = [int(u) for u in class_units[c]]
        stats = _class_stats(lg, y, c, correct)
        exp = _effects(stats, 1 + i)
        start = rand_at[len(units)]
        rdrop = {}
        rsum = {}
        for key in ("acc", "logit", "others_acc"):
            t = stats[key]
            rdrop[key] = None if t is None else t[0] - t[start:start + draws]
            if t is None:
                rsum[f"{key}_drop"] = None
            else:
                m, lo, hi = _interval(rdrop[key], confidence)
                rsum[f"{key}_drop"] = {"median": float(m), "low": float(lo), "high": float(hi)}
        oc = None if other is None else other.get(c)
        oth = None
        if oc is not None and int(oc) in masks:
            oth = _effects(stats, 1 + classes.index(int(oc)))
        share = None
        if exp["logit_drop"] is not None:
            share = float((rdrop["logit"] >= exp["logit_drop"] - 1e-12).double().mean())
        beats = None
        if exp["logit_drop"] is not None and rsum["logit_drop"] is not None:
            beats = bool(exp["logit_drop"] > rsum["logit_drop"]["high"]
                         and exp["acc_drop"] >= rsum["acc_drop"]["median"])
        rows.append({"layer": layer, "class": c, "k": len(units), "units": units,
                     "fill": _fill_name(fill), "experts": exp,
                     "random": rsum, "random_draws": draws, "confidence": float(confidence),
                     "other_class": None if oc is None else int(oc),
                     "other_units": None if oc is None or int(oc) not in masks
                     else [int(u) for u in class_units[int(oc)]],
                     "other": oth,
                     "overlap": None if oc is None or int(oc) not in masks
                     else len(set(units) & {int(u) for u in class_units[int(oc)]}),
                     "share_random_at_least": share, "beats_random": beats,
                     "seed": _seed_for(seed, layer, "random", len(units))})
    return rows


def causal_check(model: nn.Module, layer: str, x: Tensor, y: Tensor, cls: int, units: Sequence[int], *,
                 other_units: Sequence[int] | None = None, fill: str | float = "mean",
                 fill_from: Tensor | None = None, random_draws: int = 100, seed: int = 0,
                 confidence: float = 0.9) -> dict:
    """Ablate class ``cls``'s experts ``units`` against k random units and (optionally) another
    class's ``other_units``: one row of :func:`ablation_table` (``other_class`` is -1 when given)."""
    class_units = {int(cls): list(units)}
    other = None
    if other_units is not None:
        class_units[-1] = list(other_units)
        other = {int(cls): -1}
    rows = ablation_table(model, layer, x, y, class_units, fill=fill, fill_from=fill_from, other=other,
                          random_draws=random_draws, seed=seed, confidence=confidence)
    return rows[0]


def region_check(model: nn.Module, layer: str, units: Sequence[int], eval_sets: dict, *,
                 fill: str | float = "mean", fill_from: Tensor | None = None, random_draws: int = 20,
                 seed: int = 0, confidence: float = 0.9, _cut: _Cut | None = None,
                 _slices: dict | None = None) -> dict:
    """Ablate ``units`` (e.g. the experts that carry a shortcut) and measure every evaluation set.

    ``eval_sets`` is {name: (x, y, has_region)}. Returns {"layer", "units", "fill", "sets": [{"name",
    "region": bool, "n", "acc_before", "acc_after", "acc_drop", "random_acc_drop": {"median", "low",
    "high"}}], "region_drop", "clean_drop" (mean accuracy drop over the sets with / without the
    region; None when there are none), "region_minus_clean", "region_moves_more" (|region drop| >
    |clean drop|: the ablation changes the region-dependent accuracy more), "random_draws", "seed"}.
    Drops are before − after: a negative drop is a gain (removing a misleading shortcut can help).
    """
    units = [int(u) for u in units]
    cut = _cut or _Cut(model, layer)
    sets = []
    f = None
    for name, (x, y, has_region) in eval_sets.items():
        if _slices is not None and name in _slices:
            z = _slices[name]
        else:
            z = cut.slice(x)
            if _slices is not None:
                _slices[name] = z
        width = int(z.shape[1])
        if f is None:
            f = _resolve_fill(model, layer, fill, fill_from, z)
        gen = torch.Generator().manual_seed(_seed_for(seed, layer, "region", len(units)))
        keeps = torch.cat([torch.ones(1, width, dtype=torch.bool),
                           ~_keep_mask(units, width, "cpu")[None],
                           ~_random_keeps(width, len(units), int(random_draws), gen)])
        lg = cut.logits(x, z, keeps, f)
        y = torch.as_tensor(y).cpu()
        acc = (lg.argmax(-1) == y).double().mean(-1)
        m, lo, hi = _interval(acc[0] - acc[2:], confidence)
        sets.append({"name": str(name), "region": bool(has_region), "n": int(len(y)),
                     "acc_before": float(acc[0]), "acc_after": float(acc[1]),
                     "acc_drop": float(acc[0] - acc[1]),
                     "random_acc_drop": {"median": float(m), "low": float(lo), "high": float(hi)}})

    def mean(rs):
        return sum(r["acc_drop"] for r in rs) / len(rs) if rs else None

    rd, cd = mean([s for s in sets if s["region"]]), mean([s for s in sets if not s["region"]])
    return {"layer": layer, "units": units, "fill": _fill_name(fill),
            "sets": sets, "region_drop": rd, "clean_drop": cd,
            "region_minus_clean": None if rd is None or cd is None else rd - cd,
            "region_moves_more": None if rd is None or cd is None else abs(rd) > abs(cd),
            "random_draws": int(random_draws), "seed": _seed_for(seed, layer, "region", len(units))}


# ------------------------------------------------------------------------------------- the stage


DEFAULTS: dict = {
    "pairs": [],  # extra [a, b] class pairs the case names (indices or class names), e.g. [[4, 9], [3, 8]]
    "n_confused": 2,  # plus the subject model's most-confused pairs on the validation split
    "layers": None,  # None: the experts stage's layers
    "models": None,  # None: the model under study only
    "ks": None,  # None: 1, 2, 4, … and always the layer's width
    "fills": ["mean", "zero"],  # what the removed units are set to (both: two variants)
    "by": "abs",  # essence ranking: |A − B| influence ("abs") or signed A − B ("value")
    "reduce": "sum",  # a channel's score: its spatial influence map summed ("sum") or "max"
    "random_draws": 20,  # seeded draws of k random units per k (curves, ablations, region check)
    "confidence": 0.9,  # of the random draws' interval
    "share": 0.95,  # smallest k reaching this share of the whole layer's binary accuracy
    "seed": 0,
    "n_eval": None,  # held-out images (the first n of the evaluation set); None: all
    "n_rank": 200,  # training images per class for the rankings and the mean fill
    "top_k": None,  # experts ablated per class; None: the experts stage's k (its own experts)
    "eval_set": None,  # None: the case's headline evaluation set
    "region": True,  # ablate the shortcut-carrying experts when the case has a region
}

_BOUNDS = {"n_confused": (0, 100), "random_draws": (1, 1000), "n_rank": (1, 100_000),
           "seed": (0, 2**31 - 1)}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(section: dict | None, where: str = "essence") -> dict:
    """The ``[essence]`` section over :data:`DEFAULTS`; a one-line ``ValueError`` naming ``where``
    for an unknown key or a bad value. Returns a new dict with every key of :data:`DEFAULTS`."""
    sec = dict(section or {})
    unknown = sorted(set(sec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    out = {**{k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}, **sec}

    def bad(key, what):
        raise ValueError(f"{where}.{key} must be {what}, got {out[key]!r}")

    for key, (lo, hi) in _BOUNDS.items():
        if not _int(out[key]) or not lo <= out[key] <= hi:
            bad(key, f"an integer in {lo}..{hi}")
    if out["top_k"] is not None and (not _int(out["top_k"]) or not 1 <= out["top_k"] <= 1000):
        bad("top_k", "an integer in 1..1000 (or absent: the experts stage's k)")
    if out["n_eval"] is not None and (not _int(out["n_eval"]) or out["n_eval"] < 2):
        bad("n_eval", "an integer ≥ 2 (or absent: all images)")
    for key in ("confidence", "share"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1 \
                or (key == "confidence" and v == 1):
            bad(key, "a number in (0, 1)" if key == "confidence" else "a number in (0, 1]")
        out[key] = float(v)
    if out["by"] not in ("abs", "value"):
        bad("by", "'abs' or 'value'")
    if out["reduce"] not in ("sum", "max"):
        bad("reduce", "'sum' or 'max'")
    if not isinstance(out["region"], bool):
        bad("region", "true or false")
    fills = out["fills"]
    if not isinstance(fills, list) or not fills or any(f not in FILLS for f in fills) \
            or len(set(fills)) != len(fills):
        bad("fills", f"a non-empty list of distinct values from {list(FILLS)}")
    for key in ("layers", "models"):
        v = out[key]
        if v is not None and (not isinstance(v, list) or not v
                              or any(not isinstance(x, str) or not x for x in v)):
            bad(key, "a non-empty list of names (or absent)")
    ks = out["ks"]
    if ks is not None:
        if not isinstance(ks, list) or not ks or any(not _int(k) or not 1 <= k <= 100_000 for k in ks):
            bad("ks", "a non-empty list of integers in 1..100000 (or absent: powers of 2)")
        out["ks"] = sorted(set(ks))
    if out["eval_set"] is not None and (not isinstance(out["eval_set"], str) or not out["eval_set"]):
        bad("eval_set", "the name of an evaluation set (or absent: the headline set)")
    pairs = out["pairs"]
    if not isinstance(pairs, list):
        bad("pairs", "a list of [a, b] class pairs")
    for p in pairs:
        if not isinstance(p, list | tuple) or len(p) != 2 \
                or any(not (_int(c) and c >= 0) and not (isinstance(c, str) and c) for c in p) \
                or p[0] == p[1]:
            raise ValueError(f"{where}.pairs must hold [a, b] pairs of two different classes "
                             f"(indices ≥ 0 or names), got {p!r}")
    out["pairs"] = [list(p) for p in pairs]
    return out


def _class_names(data, y: Tensor) -> list[str]:
    names = getattr(data, "class_names", None)
    if names:
        return [str(n) for n in names]
    return [str(i) for i in range(int(y.max()) + 1)]


def _class_index(c, names: list[str], where: str) -> int:
    if _int(c):
        if not 0 <= c < len(names):
            raise ValueError(f"{where}: class {c} is out of range (0..{len(names) - 1})")
        return int(c)
    if c in names:
        return names.index(c)
    raise ValueError(f"{where}: unknown class {c!r}; classes: {', '.join(names)}")


def _eval_split(data, name: str | None):
    sets = getattr(data, "evaluation_sets", None)
    if sets:
        name = name or getattr(data, "headline", None) or next(iter(sets))
        if name not in sets:
            raise ValueError(f"essence.eval_set {name!r} is not an evaluation set "
                             f"({', '.join(sets)})")
        return name, sets[name]
    if name not in (None, "test"):
        raise ValueError(f"essence.eval_set {name!r}: this case has only the test split")
    return "test", data.test


def _has_region(split) -> bool:
    """A split shows the region when it has masks and its images differ from the clean copies."""
    mask = getattr(split, "mask", None)
    if mask is None or not bool(mask.any()):
        return False
    clean = getattr(split, "x_clean", None)
    return clean is None or not torch.equal(clean, split.x)


def _region_sets(data, n_eval: int | None) -> dict:
    """{name: (x, y, shows the region)} for the region check; clean copies added when no set is
    without the region."""
    sets = dict(getattr(data, "evaluation_sets", None) or {"test": data.test})
    out = {}
    for name, s in sets.items():
        n = s.n if n_eval is None else min(s.n, n_eval)
        out[str(name)] = (s.x[:n], s.y[:n], _has_region(s))
    if all(r for _, _, r in out.values()):
        for name, s in sets.items():
            if getattr(s, "x_clean", None) is not None:
                n = s.n if n_eval is None else min(s.n, n_eval)
                out[f"{name}_clean"] = (s.x_clean[:n], s.y[:n], False)
    return out


def _stratified(x: Tensor, y: Tensor, per_class: int, classes) -> tuple[Tensor, Tensor]:
    idx = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in classes])
    idx = idx.sort().values
    return x[idx], y[idx]


def _partner(cm: Tensor, c: int) -> int:
    """The class most confused with ``c`` (either way); the next class when there is none."""
    both = (cm[c] + cm[:, c]).clone()
    both[c] = -1
    if int(both.max()) <= 0:
        return (c + 1) % cm.shape[0]
    return int(both.argmax())


def _experts_rows(ctx: StageContext) -> list[dict]:
    payload = ctx.artifact("experts")
    rows = payload.get("rows") if isinstance(payload, dict) else None
    return [dict(r) for r in rows] if isinstance(rows, list) else []


def _essence_pairs(cfg: dict, names: list[str], cm: Tensor, y_eval: Tensor,
                   eval_name: str) -> tuple[list[dict], list[dict]]:
    """``(pairs, skipped)``: the class pairs to measure — the case's ``pairs`` first, then the
    ``n_confused`` most confused pairs of the confusion matrix ``cm`` (each unordered pair once)
    — as ``{"a", "b", "source": "case" | "confused", "confusions", "a_name", "b_name"}``; a pair
    with no held-out image of one of its classes in ``y_eval`` goes to ``skipped`` with a
    ``"skipped"`` reason instead."""
    pairs, seen = [], set()
    for p in cfg["pairs"]:
        a, b = (_class_index(c, names, "essence.pairs") for c in p)
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            pairs.append({"a": a, "b": b, "source": "case", "confusions": int(cm[a, b] + cm[b, a])})
    for p in most_confused_pairs(None, None, None, len(seen) + cfg["n_confused"], matrix=cm):
        if len([q for q in pairs if q["source"] == "confused"]) >= cfg["n_confused"]:
            break
        if frozenset((p["a"], p["b"])) not in seen:
            seen.add(frozenset((p["a"], p["b"])))
            pairs.append({"a": p["a"], "b": p["b"], "source": "confused", "confusions": p["confusions"]})
    for p in pairs:
        p.update(a_name=names[p["a"]], b_name=names[p["b"]])
        missing = [names[c] for c in (p["a"], p["b"]) if not bool((y_eval == c).any())]
        if missing:
            p["skipped"] = f"no held-out images of {', '.join(missing)} in {eval_name}"
    skipped = [p for p in pairs if "skipped" in p]
    return [p for p in pairs if "skipped" not in p], skipped


class _Run:
    """What every (model, layer) of one essence build shares: the settings, the evaluation
    images, the pairs, the experts stage's rows, the region sets, the results so far and the
    progress count."""

    def __init__(self, ctx: StageContext, cfg: dict, **shared):
        self.ctx, self.cfg, self.data = ctx, cfg, ctx.data
        self.__dict__.update(shared)
        self.curves, self.rows, self.ablations, self.regions, self.summary = [], [], [], [], []
        self.done, self.total = 0, 0

    def tick(self, msg: str) -> None:
        self.done += 1
        self.ctx.progress(self.done, self.total, msg)

    def measure(self, mname: str, model: nn.Module, layer: str) -> None:
        """Every measurement of ``model`` at ``layer``, in the order that fixes the random draws:
        the essence curves of every pair, then per fill the expert ablations and the region
        check."""
        cfg = self.cfg
        cut = _Cut(model, layer)
        z_eval = cut.slice(self.x_eval)
        # ablation fills: "mean" over n_rank training images per class
        fills = {f: unit_fill(model, layer, f, self.x_fill) if f == "mean"
                 else unit_fill(model, layer, f, z=z_eval) for f in cfg["fills"]}
        region_slices: dict = {}  # filled by region_check, reused across the fills
        for p in self.pairs:
            self.pair_curves(mname, model, layer, p, cut, z_eval)
        class_units, source = self.class_experts(mname, model, layer)
        other = {c: _partner(self.cm, c) for c in self.classes}
        other = {c: o for c, o in other.items() if o in class_units}
        for fill in cfg["fills"]:
            self.ablate(mname, model, layer, fill, fills, class_units, source, other, cut, z_eval)
            self.tick(f"{mname} {layer}: ablations ({fill})")
            if self.do_region:
                rc = self.region(mname, model, layer, fill, fills, cut, region_slices)
                rc["model"] = mname
                self.regions.append(rc)
                self.tick(f"{mname} {layer}: region check ({fill})")

    def pair_curves(self, mname: str, model: nn.Module, layer: str, p: dict, cut: _Cut,
                    z_eval: Tensor) -> None:
        """The essence curve of pair ``p`` for every fill (units ranked once, by comparative
        influence over ``n_rank`` training images per class), each with its summary row."""
        cfg, data, eval_name = self.cfg, self.data, self.eval_name
        a, b = p["a"], p["b"]
        xa = data.train.x[data.train.y == a][:cfg["n_rank"]]
        xb = data.train.x[data.train.y == b][:cfg["n_rank"]]
        scores = comparative_scores(model, layer, torch.cat([xa, xb]), a, b, reduce=cfg["reduce"])
        pseed = _seed_for(self.seed, mname, layer, a, b)
        for fill in cfg["fills"]:
            c = essence_curve(model, layer, xa, xb, self.x_eval, self.y_eval, a, b, ks=cfg["ks"],
                              fill=fill, random_draws=self.draws, seed=pseed, by=cfg["by"],
                              reduce=cfg["reduce"], confidence=self.conf, scores=scores, _cut=cut,
                              _z_eval=z_eval)
            c.update(model=mname, a_name=p["a_name"], b_name=p["b_name"], pair_source=p["source"],
                     eval_set=eval_name)
            self.curves.append(c)
            sk = smallest_k(c, cfg["share"])
            self.rows.append({"model": mname, "layer": layer, "a": a, "b": b, "a_name": p["a_name"],
                              "b_name": p["b_name"], "pair_source": p["source"], "fill": fill,
                              "width": c["width"], "full_acc": c["full"], "share": cfg["share"],
                              "k_top": sk["top"], "k_random": sk["random"], "k_bottom": sk["bottom"],
                              "k_random_high": sk["random_high"], "top1_acc": c["top"][0],
                              "random1_acc": c["random"]["median"][0], "n_eval": c["n_eval"],
                              "seed": pseed, "eval_set": eval_name})
            self.tick(f"{mname} {layer}: {p['a_name']} vs {p['b_name']} ({fill})")

    def class_experts(self, mname: str, model: nn.Module, layer: str) -> tuple[dict, dict]:
        """``(class_units, source)``: each class's top-k expert units at ``layer`` — the experts
        stage's when it ranked k of them ("experts stage"), else ranked here by class influence
        over ``n_rank`` training images of the class ("computed")."""
        cfg, data, experts_cfg, top_k = self.cfg, self.data, self.experts_cfg, self.top_k
        own = {c: sorted((r for r in self.erows if r.get("model") == mname and r.get("layer") == layer
                          and int(r.get("class", -1)) == c), key=lambda r: r.get("rank", 0))
               for c in self.classes}
        class_units, source = {}, {}
        for c in self.classes:
            if len(own[c]) >= top_k:
                class_units[c] = [int(r["unit"]) for r in own[c][:top_k]]
                source[c] = "experts stage"
            else:
                xc = data.train.x[data.train.y == c][:cfg["n_rank"]]
                s = class_scores(model, layer, xc, c, reduce=experts_cfg.get("reduce", cfg["reduce"]))
                by = experts_cfg.get("by", "value")
                class_units[c] = _order(s, by)[:min(top_k, len(s))].tolist()
                source[c] = "computed"
        return class_units, source

    def ablate(self, mname: str, model: nn.Module, layer: str, fill: str, fills: dict,
               class_units: dict, source: dict, other: dict, cut: _Cut, z_eval: Tensor) -> None:
        """The :func:`ablation_table` of every class's experts with ``fill`` (against random
        units and the most-confused class's experts), and the (model, layer, fill) summary."""
        names, eval_name, rows = self.names, self.eval_name, self.rows
        table = ablation_table(model, layer, self.x_eval, self.y_eval, class_units, fill=fills[fill],
                               other=other, random_draws=self.draws, seed=_seed_for(self.seed, mname),
                               confidence=self.conf, _cut=cut, _z=z_eval)
        for r in table:
            r.update(model=mname, class_name=names[r["class"]], ranking_source=source[r["class"]],
                     fill=fill, eval_set=eval_name)
        self.ablations += table
        beats = [r["beats_random"] for r in table if r["beats_random"] is not None]
        mine = [r for r in rows if r["model"] == mname and r["layer"] == layer and r["fill"] == fill]
        self.summary.append({"model": mname, "layer": layer, "fill": fill, "n_classes": len(table),
                             "classes_beating_random": int(sum(beats)),
                             "experts_beat_random": bool(beats) and sum(beats) > len(beats) / 2,
                             "mean_acc_drop": _mean([r["experts"]["acc_drop"] for r in table]),
                             "mean_random_acc_drop": _mean([r["random"]["acc_drop"]["median"]
                                                            for r in table if r["random"]["acc_drop"]]),
                             "pairs": len(mine),
                             "k_top": [r["k_top"] for r in mine],
                             "k_random": [r["k_random"] for r in mine]})

    def region(self, mname: str, model: nn.Module, layer: str, fill: str, fills: dict, cut: _Cut,
               region_slices: dict) -> dict:
        """The :func:`region_check` of the layer's experts that the experts stage flags as
        shortcut carriers (each unit once, by rank then class), or an empty entry with a note
        when there are none."""
        draws = self.draws
        units = []
        for r in sorted((r for r in self.erows if r.get("model") == mname and r.get("layer") == layer
                         and r.get("shortcut")), key=lambda r: (r.get("rank", 0), r["class"])):
            if int(r["unit"]) not in units:
                units.append(int(r["unit"]))
        if units:
            rc = region_check(model, layer, units, self.region_sets, fill=fills[fill],
                              random_draws=draws, seed=_seed_for(self.seed, mname),
                              confidence=self.conf, _cut=cut, _slices=region_slices)
            rc["fill"] = fill
            return rc
        return {"layer": layer, "units": [], "fill": fill, "sets": [], "region_drop": None,
                "clean_drop": None, "region_minus_clean": None, "region_moves_more": None,
                "random_draws": draws,
                "seed": None, "note": "no expert of this layer carries the shortcut"}


def build(ctx: StageContext) -> dict:
    """Essence curves, expert ablations and the region check for the case's models and layers.

    Reads its section (:func:`check_config`), the data, the models and the experts stage's rows. For
    each model (default: the subject) and layer (default: the experts layers): for each pair (the
    case's ``pairs`` + the subject's ``n_confused`` most confused pairs on the validation split) and
    fill, an :func:`essence_curve` on the held-out images of the two classes (rankings and mean fill
    over ``n_rank`` training images per class); for each fill, an :func:`ablation_table` of every
    class's top-k experts (the experts stage's when it has k of them, else ranked here by class
    influence over the class's training images) against random units and the most-confused class's
    experts, on the evaluation set; with a region, a :func:`region_check` of the experts the experts
    stage flags as shortcut carriers.

    Returns plain JSON only: {"rows": one summary per (model, pair, layer, fill) with the smallest
    k per rule, "curves", "ablation", "region", "summary" (per model, layer, fill), "pairs",
    "seeds", "config", "provenance"}.
    """
    t0 = time.perf_counter()
    cfg = check_config(ctx.section, "essence")
    data = ctx.data
    names = _class_names(data, data.train.y)
    n_classes = len(names)
    subject = ctx.subject
    models = cfg["models"] or [subject]
    experts_cfg = dict(ctx.experts)
    layers = cfg["layers"] or list(experts_cfg.get("layers") or [])
    if not layers:
        raise ValueError("essence: no layers (set essence.layers or experts.layers)")
    classes = [int(c) for c in experts_cfg.get("classes") or range(n_classes)]
    top_k = int(cfg["top_k"] or experts_cfg.get("k") or 5)
    eval_name, ev = _eval_split(data, cfg["eval_set"])
    n = ev.n if cfg["n_eval"] is None else min(ev.n, cfg["n_eval"])
    x_eval, y_eval = ev.x[:n], ev.y[:n].long().cpu()
    x_fill, _ = _stratified(data.train.x, data.train.y, cfg["n_rank"], range(n_classes))
    draws, seed, conf = cfg["random_draws"], cfg["seed"], cfg["confidence"]

    # Pairs: the case's, then the subject's most confused (on the validation split).
    pick = data.val if data.val.n else ev  # no validation split: the evaluation set itself
    cm = confusion(ctx.model(subject), pick.x, pick.y, n_classes)
    pairs, skipped = _essence_pairs(cfg, names, cm, y_eval, eval_name)

    erows = _experts_rows(ctx)
    region_sets = _region_sets(data, cfg["n_eval"]) if cfg["region"] else {}
    do_region = bool(region_sets) and any(r for _, _, r in region_sets.values())
    run = _Run(ctx, cfg, names=names, classes=classes, top_k=top_k, experts_cfg=experts_cfg,
               eval_name=eval_name, x_eval=x_eval, y_eval=y_eval, x_fill=x_fill, draws=draws,
               seed=seed, conf=conf, cm=cm, pairs=pairs, erows=erows, region_sets=region_sets,
               do_region=do_region)
    run.total = len(models) * len(layers) * (len(pairs) * len(cfg["fills"]) + len(cfg["fills"])
                                             * (2 if do_region else 1))
    ctx.progress(0, run.total, "essence: ranking units")
    for mname in models:
        model = ctx.model(mname)
        for layer in layers:
            run.measure(mname, model, layer)
    seconds = time.perf_counter() - t0
    return {"rows": run.rows, "curves": run.curves, "ablation": run.ablations, "region": run.regions,
            "summary": run.summary,
            "pairs": pairs, "skipped_pairs": skipped, "confusion": cm.tolist(),
            "seeds": {"seed": seed, "random_draws": draws,
                      "rule": "torch.Generator(CPU) seeded per measurement: seed·1000003 + "
                              "crc32(model/layer/a/b or model/layer/kind/k) mod 1000003; "
                              "each curve and ablation row records its own"},
            "config": {**cfg, "layers": layers, "models": models, "eval_set": eval_name, "top_k": top_k,
                       "n_eval": int(n), "classes": classes},
            "provenance": {"seconds": round(seconds, 3), "device": str(model_device(ctx.model(subject)))}}


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None

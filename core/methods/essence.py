"""Essence and causal checks of experts, as measurements on any model (issue 14; used by
``core.stages.essence``, runnable without a case: plain tensors and a model).

Two claims of Leino et al. (2018) become measurements here:

- **Essence** (:func:`essence_curve`, :func:`smallest_k`). For two related classes A and B, rank
  the units of a layer by comparative influence (y_A − y_B, point DoI over the two classes'
  images), keep only the top k units (every other unit set to its mean activation over those
  images, or to zero) and measure the binary accuracy of A vs B on held-out images of A and B,
  for k = 1, 2, 4, … up to the layer's width. Baselines in the same run: k random units (many
  seeded draws: median and interval), the bottom k units and the whole layer.
  :func:`degenerate` names an essence result that cannot discriminate.
- **Causality** (:func:`ablation`, :func:`ablation_table`, :func:`causal_check`,
  :func:`region_check`). Ablate (mean or zero) a class's top-k experts and measure the drop of that
  class's accuracy and mean logit, against k random units and against another class's top-k
  experts; for a case with a region, ablate the experts that carry the shortcut and measure the
  accuracy on the evaluation sets with and without the region.

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

import math
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

try:  # the engine's torch.fx tail g (private): only a speed-up, every use is checked against the model
    from core.engine.influence import _tail
except ImportError:  # pragma: no cover
    def _tail(model: nn.Module, layer: str) -> None:
        return None

__all__ = [
    "FILLS",
    "ablation",
    "ablation_table",
    "binary_accuracy",
    "causal_check",
    "class_scores",
    "comparative_scores",
    "confusion",
    "degenerate",
    "essence_curve",
    "keep_units",
    "k_grid",
    "masked_logits",
    "most_confused_pairs",
    "near_chance",
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


# ------------------------------------------------------------------------------------ degenerate

NEAR_CHANCE_MARGIN = 0.10  # as core.report.health: within 10% of the way from chance to 100% …
NEAR_CHANCE_Z = 2.0  # … or within two binomial standard errors of chance on the images


def near_chance(acc: float, n: int | None, chance: float = 0.5) -> bool:
    """Whether accuracy ``acc`` on ``n`` images is at or near ``chance`` (binary A vs B: 0.5): under
    ``chance`` + the larger of 10% of the way to 1 and two binomial standard errors at ``n``
    (the rule of ``core.report.health`` for a model at chance)."""
    margin = NEAR_CHANCE_MARGIN * (1.0 - chance)
    if n:
        margin = max(margin, NEAR_CHANCE_Z * math.sqrt(chance * (1.0 - chance) / n))
    return acc < chance + margin


def degenerate(row: dict) -> str | None:
    """Why an essence result cannot discriminate, or None when it can. ``row`` is a summary row of
    :func:`smallest_k` figures (``k_top``, ``k_random``, ``k_bottom``: the smallest k per rule,
    ``full_acc``: the whole layer's binary accuracy, ``n_eval``: its images). Degenerate when every
    rule reaches the target at k = 1 (one unit of any kind suffices: "k = 1 for every rule"), or
    when the whole layer's accuracy is near chance (:func:`near_chance`; then any k reaches a
    target that is a share of it). Returns the reasons joined by "; " (plain text)."""
    reasons = []
    if all(row.get(k) == 1 for k in ("k_top", "k_random", "k_bottom")):
        reasons.append("k = 1 for every rule")
    full, n = row.get("full_acc"), row.get("n_eval")
    if isinstance(full, int | float) and math.isfinite(full) and near_chance(float(full), n):
        reasons.append(f"the whole layer's binary accuracy {100 * full:.0f}% on {n} images is "
                       "near chance (50%)")
    return "; ".join(reasons) or None

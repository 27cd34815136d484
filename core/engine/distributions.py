"""Distributions of interest (DoI).

The inputs handed to :func:`core.engine.influence.influence` are the empirical distribution (e.g. every
training image of class 3). A DoI acts on each of them, giving ``resolution`` points per input,
either in input space (``at="input"``) or at the slice (``at="layer"``).

Each point is produced from ``(z, n, r)``: the input (or its slice activation) ``z``, the input's
index ``n`` in the batch handed to ``influence`` and the point's index ``r`` in ``0..resolution-1``.
Points are therefore the same however the engine chunks its work. For a model with several inputs
the engine hands ``z`` as a tuple (one tensor per input the DoI acts on) and expects a tuple back.

Points are weighted: :meth:`Distribution.weights` gives one weight per point index (they sum to 1);
``None`` means equal weights (a plain mean), which every DoI here uses except the trapezoid and
Gauss–Legendre quadratures of :class:`LinearDoI`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

QUADRATURES = ("riemann_middle", "riemann_left", "riemann_right", "riemann_trapezoid",
               "gausslegendre", "endpoints")


class Distribution:
    """Base class: ``resolution`` points per input, in input space or at the slice (``at``)."""

    resolution: int = 1
    at: str = "input"

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        """Points for pairs (input n, point r): ``z`` holds the k selected inputs, shape (k, ...)."""
        raise NotImplementedError

    def baseline(self, z: Tensor, n: Tensor | None = None) -> Tensor | None:
        """The reference z' of the attribution multiplier (z − z'), or None when there is none.

        None (the default, for the point and Gaussian DoIs) means z' = 0 *at the slice*: the
        multiplier is h(x) itself, as in Captum's ``LayerGradientXActivation``. A path DoI returns
        its baseline (in the DoI's own space); at an internal slice the engine maps an input-space
        baseline x' through h, giving h(x) − h(x').
        """
        return None

    def weights(self) -> Tensor | None:
        """One weight per point index (float64, summing to 1), or None for equal weights."""
        return None

    def _check_at(self, at: str) -> str:
        if at not in ("input", "layer"):
            raise ValueError(f"at must be 'input' or 'layer', not {at!r}")
        return at


class PointDoI(Distribution):
    """The input itself: influence is the plain gradient at the slice."""

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        return z

    def __repr__(self) -> str:
        return "PointDoI()"


def _quadrature(method: str, resolution: int) -> tuple[Tensor, Tensor | None]:
    """(α, weights) for ``resolution`` points on [0, 1], float64; weights None when equal."""
    r = torch.arange(resolution, dtype=torch.float64)
    if method == "riemann_middle":
        return (r + 0.5) / resolution, None
    if method == "riemann_left":
        return r / resolution, None
    if method == "riemann_right":
        return (r + 1) / resolution, None
    if method == "endpoints":
        return (torch.ones(1, dtype=torch.float64) if resolution == 1 else r / (resolution - 1)), None
    if method == "riemann_trapezoid":
        w = torch.full((resolution,), 1.0 / (resolution - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (resolution - 1)
        return r / (resolution - 1), w
    nodes, weights = _gauss_legendre(resolution)
    return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)


@functools.lru_cache(maxsize=64)
def _gauss_legendre(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy's Gauss–Legendre nodes and weights on [−1, 1], remembered per resolution (computing
    them takes about a second at R = 500); read-only, so the cached arrays cannot be changed."""
    nodes, weights = np.polynomial.legendre.leggauss(resolution)
    nodes.flags.writeable = weights.flags.writeable = False
    return nodes, weights


class LinearDoI(Distribution):
    """The straight path z' + α(z − z') from a baseline z' to each input z.

    Args:
        resolution: R, the number of points per input.
        baseline: z'. None (default) means zeros. A number, or a tensor shaped like one example
            (anything that broadcasts to it), is shared by every input; a tensor with the batch
            dimension, (N, ...) as many rows as ``inputs``, gives each input its own; a callable
            ``baseline(z) -> tensor`` gets the selected inputs (k, ...) and returns theirs (it must
            be deterministic). For a model with several inputs, a tuple with one such entry per
            input the DoI acts on.
        at: "input" interpolates the input (h runs once per point); "layer" interpolates the
            slice activation (h runs once per input, g once per point).
        method: the quadrature of α ∈ [0, 1]. "riemann_middle" (default: α_i = (i + ½)/R, equal
            weights), "riemann_left" (i/R), "riemann_right" ((i + 1)/R), "riemann_trapezoid"
            (i/(R − 1), halved end weights; R ≥ 2), "gausslegendre" (Gauss–Legendre nodes and
            weights), "endpoints" (TruLens-Explain's ``LinearDoi``: i/(R − 1), both ends included,
            equal weights; R = 1 is the point itself). The names are Captum's ``method=`` values.
        baseline_at: with ``at="layer"``, where ``baseline`` lives. "layer" (default): it is an
            activation and None means a zero activation. "input": it is an input x' (None:
            zeros) and the slice baseline is h(x'), Captum's ``LayerIntegratedGradients``
            convention. With ``at="input"`` only "input" makes sense.

    Weights sum to 1 for every method, so influence stays an expectation over the path (Captum's
    "riemann_trapezoid" step sizes sum to 1 − 1/R instead: its result is ours × (R − 1)/R).
    """

    def __init__(self, resolution: int = 50, baseline: Tensor | float | Callable | tuple | None = None,
                 at: str = "input", *, method: str = "riemann_middle", baseline_at: str | None = None):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be at least 1, not {resolution}")
        if method not in QUADRATURES:
            raise ValueError(f"method must be one of {', '.join(QUADRATURES)}; not {method!r}")
        if method == "riemann_trapezoid" and int(resolution) < 2:
            raise ValueError("the trapezoid rule needs resolution of at least 2")
        self.resolution = int(resolution)
        self._baseline = baseline
        self.at = self._check_at(at)
        self.method = method
        if baseline_at is None:
            baseline_at = "layer" if self.at == "layer" else "input"
        if baseline_at not in ("input", "layer") or (self.at == "input" and baseline_at == "layer"):
            raise ValueError(f"baseline_at must be 'input' or, with at='layer', 'layer'; "
                             f"not {baseline_at!r}")
        self.baseline_at = baseline_at
        self._alpha, self._weights = _quadrature(method, self.resolution)

    def alphas(self, r: Tensor) -> Tensor:
        """α of point indices ``r`` (float64): how far along the path from z' to z."""
        if self.method == "riemann_middle":  # computed as before, bit for bit
            return (r.to(torch.float64) + 0.5) / self.resolution
        return self._alpha.to(r.device)[r]

    def weights(self) -> Tensor | None:
        return None if self._weights is None else self._weights.clone()

    def _one_baseline(self, spec, z: Tensor, n: Tensor | None) -> Tensor:
        where = "input" if self.baseline_at == "input" else "slice"
        if spec is None:
            return torch.zeros_like(z)
        if callable(spec) and not isinstance(spec, Tensor):
            b = spec(z)
            if not isinstance(b, Tensor) or b.shape != z.shape:
                got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"the baseline callable must return a tensor shaped like its "
                                 f"argument {tuple(z.shape)}, not {got}")
            return b.to(z.device, z.dtype)
        b = torch.as_tensor(spec, dtype=z.dtype, device=z.device)
        if b.dim() == z.dim() and b.dim() > 0 and b.shape[0] != 1:  # one baseline per input
            if n is None:
                raise ValueError("a per-example baseline (one row per input) needs the inputs' "
                                 "indices; pass n to baseline()")
            if b.shape[1:] != z.shape[1:]:
                raise ValueError(f"per-example baseline rows of shape {tuple(b.shape[1:])} do not "
                                 f"match the {where} shape {tuple(z.shape[1:])}")
            if int(n.max()) >= len(b):
                raise ValueError(f"the per-example baseline has {len(b)} rows but input "
                                 f"{int(n.max())} was asked for: give one row per input")
            return b[n.to(b.device)]
        try:
            return torch.broadcast_to(b, z.shape)
        except RuntimeError:
            raise ValueError(f"LinearDoI baseline of shape {tuple(b.shape)} does not match "
                             f"the {where} shape {tuple(z.shape[1:])}") from None

    def baseline(self, z, n: Tensor | None = None):
        """z' for the selected inputs ``z`` (indices ``n`` in the batch): zeros when None.

        ``z`` may be a tuple (several inputs): then a tuple back, one baseline per entry.
        """
        if isinstance(z, tuple):
            specs = self._baseline if isinstance(self._baseline, tuple) else (self._baseline,) * len(z)
            if len(specs) != len(z):
                raise ValueError(f"the baseline tuple has {len(specs)} entries for {len(z)} inputs")
            return tuple(self._one_baseline(s, zi, n) for s, zi in zip(specs, z, strict=True))
        if isinstance(self._baseline, tuple):
            raise ValueError("a tuple of baselines needs a model with as many inputs")
        return self._one_baseline(self._baseline, z, n)

    def path_points(self, z, base, r: Tensor):
        """base + α_r (z − base), for tensors or tuples of tensors."""
        if isinstance(z, tuple):
            return tuple(self.path_points(zi, bi, r) for zi, bi in zip(z, base, strict=True))
        alpha = self.alphas(r).to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        return base + alpha * (z - base)

    def points(self, z, n: Tensor, r: Tensor):
        return self.path_points(z, self.baseline(z, n), r)

    def __repr__(self) -> str:
        base = "zeros" if self._baseline is None else "custom"
        extra = "" if self.method == "riemann_middle" else f", method={self.method!r}"
        if self.at == "layer" and self.baseline_at == "input":
            extra += ", baseline_at='input'"
        return f"LinearDoI(resolution={self.resolution}, baseline={base}, at={self.at!r}{extra})"


class GaussianDoI(Distribution):
    """z + σ·ε with ε ~ N(0, I): SmoothGrad's distribution, seeded.

    The noise of input n is drawn from a generator seeded with (seed, n), so results do not depend
    on how the work is chunked. With several inputs, input j > 0 of the model draws from its own
    stream (seed, n, j); input 0 draws exactly what a one-input model would.
    """

    def __init__(self, resolution: int = 50, stdev: float = 0.15, seed: int = 0,
                 at: str = "input"):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be at least 1, not {resolution}")
        if stdev < 0:
            raise ValueError(f"stdev must be non-negative, not {stdev}")
        self.resolution, self.stdev, self.seed = int(resolution), float(stdev), int(seed)
        self.at = self._check_at(at)

    def noise(self, shape: tuple[int, ...], n: int, part: int = 0) -> Tensor:
        """All ``resolution`` noise draws for input ``n``, shape (resolution, *shape), on CPU."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(n) + 7_919 * int(part))
        return torch.randn((self.resolution, *shape), generator=g)

    def _points(self, z: Tensor, n: Tensor, r: Tensor, part: int) -> Tensor:
        eps = torch.empty_like(z, device="cpu")
        for m in torch.unique(n).tolist():
            sel = (n == m).nonzero().flatten().cpu()
            eps[sel] = self.noise(tuple(z.shape[1:]), m, part)[r.cpu()[sel]].to(eps.dtype)
        return z + self.stdev * eps.to(z.device)

    def points(self, z, n: Tensor, r: Tensor):
        if isinstance(z, tuple):
            return tuple(self._points(zi, n, r, j) for j, zi in enumerate(z))
        return self._points(z, n, r, 0)

    def __repr__(self) -> str:
        return (f"GaussianDoI(resolution={self.resolution}, stdev={self.stdev}, "
                f"seed={self.seed}, at={self.at!r})")


__all__ = ["Distribution", "PointDoI", "LinearDoI", "GaussianDoI", "QUADRATURES"]

"""Distributions of interest (DoI).

The inputs handed to :func:`core.influence.influence` are the empirical distribution (e.g. every
training image of class 3). A DoI acts on each of them, giving ``resolution`` points per input,
either in input space (``at="input"``) or at the slice (``at="layer"``).

Each point is produced from ``(z, n, r)``: the input (or its slice activation) ``z``, the input's
index ``n`` in the batch handed to ``influence`` and the point's index ``r`` in ``0..resolution-1``.
Points are therefore the same however the engine chunks its work.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Distribution:
    resolution: int = 1
    at: str = "input"

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        """Points for pairs (input n, point r): ``z`` holds the k selected inputs, shape (k, ...)."""
        raise NotImplementedError

    def baseline(self, z: Tensor) -> Tensor:
        """The reference z' of the attribution multiplier (z − z'); zeros unless a path says so."""
        return torch.zeros_like(z)

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


class LinearDoI(Distribution):
    """The straight path z' + α(z − z') at the Riemann midpoints α_i = (i + ½)/R.

    ``baseline`` None means zeros; otherwise a tensor broadcastable to one example (input-shaped
    for ``at="input"``, activation-shaped for ``at="layer"``). With ``at="layer"`` the slice
    activation is interpolated, so h runs once per input and g once per point.
    """

    def __init__(self, resolution: int = 50, baseline: Tensor | float | None = None,
                 at: str = "input"):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be at least 1, not {resolution}")
        self.resolution = int(resolution)
        self._baseline = baseline
        self.at = self._check_at(at)

    def alphas(self, r: Tensor) -> Tensor:
        return (r.to(torch.float64) + 0.5) / self.resolution

    def baseline(self, z: Tensor) -> Tensor:
        if self._baseline is None:
            return torch.zeros_like(z)
        b = torch.as_tensor(self._baseline, dtype=z.dtype, device=z.device)
        try:
            return torch.broadcast_to(b, z.shape)
        except RuntimeError:
            raise ValueError(f"LinearDoI baseline of shape {tuple(b.shape)} does not match "
                             f"the {self.at} shape {tuple(z.shape[1:])}") from None

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        b = self.baseline(z)
        alpha = self.alphas(r).to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        return b + alpha * (z - b)

    def __repr__(self) -> str:
        base = "zeros" if self._baseline is None else "custom"
        return f"LinearDoI(resolution={self.resolution}, baseline={base}, at={self.at!r})"


class GaussianDoI(Distribution):
    """z + σ·ε with ε ~ N(0, I): SmoothGrad's distribution, seeded.

    The noise of input n is drawn from a generator seeded with (seed, n), so results do not depend
    on how the work is chunked.
    """

    def __init__(self, resolution: int = 50, stdev: float = 0.15, seed: int = 0,
                 at: str = "input"):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be at least 1, not {resolution}")
        if stdev < 0:
            raise ValueError(f"stdev must be non-negative, not {stdev}")
        self.resolution, self.stdev, self.seed = int(resolution), float(stdev), int(seed)
        self.at = self._check_at(at)

    def noise(self, shape: tuple[int, ...], n: int) -> Tensor:
        """All ``resolution`` noise draws for input ``n``, shape (resolution, *shape), on CPU."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(n))
        return torch.randn((self.resolution, *shape), generator=g)

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        eps = torch.empty_like(z, device="cpu")
        for m in torch.unique(n).tolist():
            sel = (n == m).nonzero().flatten().cpu()
            eps[sel] = self.noise(tuple(z.shape[1:]), m)[r.cpu()[sel]].to(eps.dtype)
        return z + self.stdev * eps.to(z.device)

    def __repr__(self) -> str:
        return (f"GaussianDoI(resolution={self.resolution}, stdev={self.stdev}, "
                f"seed={self.seed}, at={self.at!r})")


__all__ = ["Distribution", "PointDoI", "LinearDoI", "GaussianDoI"]

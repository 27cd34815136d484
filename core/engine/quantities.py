"""Quantities of interest (QoI): one scalar per example, read off g's output.

A quantity maps the network's output (the logits, shape ``(N, classes)``) to a tensor of shape
``(N,)``. A :class:`UnitQoI` instead reads an internal layer's activation: it names that layer as
its ``source`` and the engine hands it that activation (and stops the forward pass there).
"""

from __future__ import annotations

from torch import Tensor


class Quantity:
    """Base class. ``source`` is ``None`` for the model output, else a ``named_modules()`` name.

    ``element`` picks what the quantity reads when the model (or the source layer) returns a tuple,
    list or dict: an index or key (None, the default: the output is a tensor).
    """

    source: str | None = None
    element: int | str | None = None

    def select(self, output):
        """The tensor this quantity reads from ``output`` (its ``element`` of a tuple/list/dict)."""
        if self.element is not None:
            try:
                output = output[self.element]
            except (IndexError, KeyError, TypeError):
                kind = type(output).__name__
                raise ValueError(f"{self!r} reads element {self.element!r}, which the "
                                 f"{kind} output does not have") from None
        if not isinstance(output, Tensor):
            what = f"a {type(output).__name__}" + (f" of {len(output)}" if hasattr(output, "__len__") else "")
            raise ValueError(f"the output {self!r} reads is {what}, not a tensor; name the element, "
                             f"e.g. {type(self).__name__}(..., element=0)")
        return output

    def _suffix(self) -> str:
        return "" if self.element is None else f", element={self.element!r}"

    def __call__(self, output: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, output: Tensor) -> None:
        """Raise a one-line ``ValueError`` when the quantity does not fit ``output``'s shape."""

    def _check_class(self, output: Tensor, c: int, what: str = "class") -> None:
        if output.dim() != 2:
            raise ValueError(f"{self!r} expects (N, classes) outputs, the model gave "
                             f"shape {tuple(output.shape)}")
        n = output.shape[1]
        if not -n <= c < n:
            raise ValueError(f"{what} index {c} is out of range: the model has {n} outputs "
                             f"(use 0..{n - 1})")


class ClassQoI(Quantity):
    """The logit y_c of class ``c``."""

    def __init__(self, c: int, element: int | str | None = None):
        self.c = int(c)
        self.element = element

    def __call__(self, output: Tensor) -> Tensor:
        return output[:, self.c]

    def check(self, output: Tensor) -> None:
        self._check_class(output, self.c)

    def __repr__(self) -> str:
        return f"ClassQoI({self.c}{self._suffix()})"


class ComparativeQoI(Quantity):
    """y_a − y_b: "why class a and not class b"."""

    def __init__(self, a: int, b: int, element: int | str | None = None):
        self.a, self.b = int(a), int(b)
        self.element = element

    def __call__(self, output: Tensor) -> Tensor:
        return output[:, self.a] - output[:, self.b]

    def check(self, output: Tensor) -> None:
        self._check_class(output, self.a)
        self._check_class(output, self.b)

    def __repr__(self) -> str:
        return f"ComparativeQoI({self.a}, {self.b}{self._suffix()})"


class MaxClassQoI(Quantity):
    """The largest logit of each example (the predicted class's logit)."""

    def __init__(self, element: int | str | None = None):
        self.element = element

    def __call__(self, output: Tensor) -> Tensor:
        return output.max(dim=1).values

    def check(self, output: Tensor) -> None:
        self._check_class(output, 0)

    def __repr__(self) -> str:
        return f"MaxClassQoI({self._suffix()[2:]})"


class UnitQoI(Quantity):
    """The activation of one unit of an internal layer: used to interpret an expert.

    ``unit`` is a channel index for a (N, C, H, W) activation (its spatial map reduced by
    ``reduce``: "sum" or "max"), a neuron index for (N, F), or a full index tuple into one
    example's activation (e.g. ``(channel, row, col)``).
    """

    def __init__(self, layer: str, unit: int | tuple[int, ...], reduce: str = "sum",
                 element: int | str | None = None):
        if reduce not in ("sum", "max", "mean"):
            raise ValueError(f"reduce must be 'sum', 'max' or 'mean', not {reduce!r}")
        self.source = layer
        self.unit = unit
        self.reduce = reduce
        self.element = element

    def __call__(self, activation: Tensor) -> Tensor:
        if isinstance(self.unit, tuple):
            return activation[(slice(None), *self.unit)]
        a = activation[:, self.unit]
        if a.dim() == 1:
            return a
        a = a.flatten(1)
        if self.reduce == "sum":
            return a.sum(1)
        if self.reduce == "mean":
            return a.mean(1)
        return a.max(1).values

    def check(self, activation: Tensor) -> None:
        shape = tuple(activation.shape[1:])
        index = self.unit if isinstance(self.unit, tuple) else (self.unit,)
        if len(index) > len(shape) or any(not -s <= i < s for i, s in zip(index, shape, strict=False)):
            raise ValueError(f"unit {self.unit} is out of range for layer {self.source!r} whose "
                             f"activation has shape {shape} per example")

    def __repr__(self) -> str:
        return f"UnitQoI({self.source!r}, {self.unit}, reduce={self.reduce!r}{self._suffix()})"


def as_quantity(qoi: Quantity | int) -> Quantity:
    """Accept a bare class index as shorthand for ``ClassQoI``."""
    if isinstance(qoi, Quantity):
        return qoi
    if isinstance(qoi, int) and not isinstance(qoi, bool):
        return ClassQoI(qoi)
    raise TypeError(f"qoi must be a Quantity (e.g. ClassQoI(3)) or a class index, not {qoi!r}")


__all__ = ["Quantity", "ClassQoI", "ComparativeQoI", "MaxClassQoI", "UnitQoI", "as_quantity"]

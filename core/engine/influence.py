"""The influence engine: distributional influence at a slice of a network.

The network f is cut at a layer into f = g ∘ h; z = h(x) is the slice. For a quantity of interest q
and a distribution of interest P,

    χ(f, P) = E_{x∼P} [ ∂q(g(z)) / ∂z  at z = h(x) ]                          (influence space)

and multiplying by (z − z') gives attribution space (Integrated Gradients at the input with a
linear DoI). One function, :func:`influence`, serves every representation the report compares; it
also takes several slices at once (``layers=[...]``) and then gives every slice's influence from one
forward and one backward pass per chunk when the DoI acts on the input.

Mechanics: hooks exist only inside ``with`` blocks; h runs without building a graph when no
gradient has to flow through it (the first slice reached becomes a fresh leaf, and gradients are
switched on from there); what a hook hands on downstream is a copy of the slice, so in-place
operations after it (``ReLU(inplace=True)``, ``out += identity``) leave the engine's tensors alone;
the engine switches gradients on for its own work (also under ``torch.no_grad()`` or
``torch.inference_mode()``) and restores the caller's mode; the (inputs × DoI points) work is
chunked to a memory budget, and can be sharded over ``torch.distributed`` ranks; concurrent calls on
one shared model are serialised by a per-model lock, and hooks only act on the thread that
installed them.
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.engine.devices import eval_mode, model_device
from core.engine.distributions import Distribution, PointDoI
from core.engine.quantities import Quantity, as_quantity

CPU_MEMORY_BUDGET = 512 * 2**20  # bytes of activations per chunk on the CPU
CUDA_MEMORY_FRACTION = 0.4  # share of free GPU memory a chunk may use


class LayerNotFound(ValueError):
    """A layer name that is not in ``model.named_modules()``."""


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early once the needed tensors are captured."""

    def __init__(self, value):
        super().__init__("forward stopped by the influence engine")
        self.value = value


@dataclass(frozen=True)
class Slice:
    """Where the network is cut: ``layer`` (a ``named_modules()`` name; None: the input), at its
    ``cut`` ("output", the default, or "input"), and the ``element`` read there when the layer
    gives (or takes) a tuple, list or dict (an index or key; None: the output is one tensor, or the
    layer's first positional input). Hashable: usable as a key of :func:`influence`'s results."""

    layer: str | None = None
    cut: str = "output"
    element: int | str | None = None


# --------------------------------------------------------------------------- layers and models

def layer_names(model: nn.Module) -> list[str]:
    """Every addressable layer: the non-empty names of ``model.named_modules()``."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; an unknown name lists the valid ones."""
    modules = dict(model.named_modules())
    if not isinstance(name, str) or not name or name not in modules:
        names = layer_names(model)
        shown = ", ".join(names[:40]) + (" …" if len(names) > 40 else "")
        raise LayerNotFound(f"unknown layer {name!r}; valid layers are: {shown} "
                            "(or layer=None for the input)")
    return modules[name]


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises engine calls on one model (shared across app sessions)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


# --------------------------------------------------------------------------- slices and hooks

class _Spec:
    """A resolved slice: the key the caller used, the module, the cut and the element."""

    def __init__(self, key, sl: Slice, module: nn.Module | None):
        self.key, self.layer, self.cut, self.element = key, sl.layer, sl.cut, sl.element
        self.module = module

    @property
    def where(self) -> str:
        return "the input" if self.layer is None else f"layer {self.layer!r}"


def _as_slice(item, cut: str, element) -> Slice:
    if isinstance(item, Slice):
        sl = item
    elif item is None or isinstance(item, str):
        sl = Slice(item, cut, element)
    else:
        raise TypeError(f"a layer is a named_modules() name, None or a Slice, not {item!r}")
    if sl.cut not in ("output", "input"):
        raise ValueError(f"cut must be 'output' or 'input', not {sl.cut!r}")
    return sl


def _pick(value, element, spec: _Spec):
    """The tensor at the slice: ``value`` itself, or its ``element``."""
    if spec.cut == "input":
        element = 0 if element is None else element
    t = value
    if element is not None:
        try:
            t = value[element]
        except (IndexError, KeyError, TypeError):
            raise ValueError(f"{spec.where} {spec.cut} has no element {element!r} "
                             f"(it is a {type(value).__name__})") from None
    if not isinstance(t, Tensor):
        size = f" of {len(t)}" if isinstance(t, tuple | list | dict) else ""
        raise ValueError(f"{spec.where} gives a {type(t).__name__}{size} at its {spec.cut}, not a "
                         f"tensor; choose an element, e.g. Slice({spec.layer!r}, element=0)")
    return t


def _replace(value, element, new: Tensor, cut: str):
    """``value`` with the slice tensor replaced by ``new``."""
    if cut == "input":
        element = 0 if element is None else element
    if element is None:
        return new
    if isinstance(value, tuple):
        items = list(value)
        items[element] = new
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        items = list(value)
        items[element] = new
        return items
    out = copy.copy(value)
    out[element] = new
    return out


class _SliceHook:
    """Acts on one slice tensor during a forward pass.

    mode "capture": record it (no graph); once every hook of the pass has captured, stop the
    forward. "grad": the slice gradients are taken at: the first one reached becomes a fresh leaf
    and switches gradients on for the rest of the pass (so h builds no graph); later ones are
    recorded as they are. "inject": replace it by a given leaf (a DoI point at the slice).
    Downstream always gets a copy, so in-place operations after the slice leave it alone.
    """

    def __init__(self, spec: _Spec, mode: str, group: list | None = None, inject: Tensor | None = None):
        self.spec, self.mode, self.inject = spec, mode, inject
        self.group = group if group is not None else [self]
        self.owner = threading.get_ident()
        self.z: Tensor | None = None
        self.fired = False

    def act(self, value):
        if threading.get_ident() != self.owner:
            return None
        t = _pick(value, self.spec.element, self.spec)
        if self.fired:
            raise ValueError(f"{self.spec.where} runs more than once in one forward pass; "
                             "influence needs a layer that is used once")
        self.fired = True
        if self.mode == "capture":
            self.z = t.detach()
            if all(h.fired for h in self.group):
                raise _Stop(None)
            return _replace(value, self.spec.element, t.detach().clone(), self.spec.cut)
        if self.mode == "inject":
            if self.inject.shape != t.shape:
                raise ValueError(f"the slice point has shape {tuple(self.inject.shape)} but "
                                 f"{self.spec.where} gives {tuple(t.shape)}")
            self.z = self.inject
        elif not torch.is_grad_enabled() or not t.requires_grad:
            self.z = t.detach().requires_grad_(True)
        else:
            self.z = t
        torch.set_grad_enabled(True)
        return _replace(value, self.spec.element, self.z.clone(), self.spec.cut)


class _SourceHook:
    """Captures the activation a unit quantity reads, and stops the forward pass there."""

    def __init__(self):
        self.owner = threading.get_ident()

    def __call__(self, module, args, output):
        if threading.get_ident() == self.owner:
            raise _Stop(output)


@contextmanager
def _hooked(hooks: Sequence[_SliceHook], source_module: nn.Module | None) -> Iterator[None]:
    handles = []
    try:
        for hook in hooks:
            if hook.spec.cut == "output":
                handles.append(hook.spec.module.register_forward_hook(
                    lambda m, a, out, hook=hook: hook.act(out)))
            else:
                handles.append(hook.spec.module.register_forward_pre_hook(
                    lambda m, args, hook=hook: hook.act(args)))
        if source_module is not None:
            handles.append(source_module.register_forward_hook(_SourceHook()))
        yield
    finally:
        for h in handles:
            h.remove()


def _run(fn: Callable[[], object], *, grad: bool):
    """Run a forward pass; a :class:`_Stop` raised by a hook returns the captured value instead.

    With ``grad=False`` the pass starts without autograd: a slice hook switches it on at the
    slice. The grad mode from before is restored either way.
    """
    previous = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(grad)
        return fn()
    except _Stop as stop:
        return stop.value
    finally:
        torch.set_grad_enabled(previous)


class _Forward:
    """Calls the model on a batch of its inputs plus the fixed extra arguments."""

    def __init__(self, model: nn.Module, args: tuple = (), kwargs: dict | None = None):
        self.model, self.args, self.kwargs = model, tuple(args), dict(kwargs or {})

    def __call__(self, parts: Sequence[Tensor]):
        return self.model(*parts, *self.args, **self.kwargs)


def _capture(forward: _Forward, parts: Sequence[Tensor], specs: Sequence[_Spec],
             chunk: int = 1024) -> list[Tensor]:
    """h(x) at every slice of ``specs`` without a graph, chunked; each pass stops at the last."""
    out: list[list[Tensor]] = [[] for _ in specs]
    for i in range(0, len(parts[0]), chunk):
        group: list[_SliceHook] = []
        group.extend(_SliceHook(s, "capture", group) for s in specs)
        with _hooked(group, None):
            batch = [p[i:i + chunk] for p in parts]
            _run(lambda batch=batch: forward(batch), grad=False)
        for j, hook in enumerate(group):
            if hook.z is None:
                raise ValueError(f"{hook.spec.where} did not run in the forward pass")
            out[j].append(hook.z)
    return [torch.cat(o) for o in out]


def activations(model: nn.Module, inputs: Tensor, layer: str | Slice, *, cut: str = "output",
                chunk: int = 1024) -> Tensor:
    """The slice z = h(x) of ``inputs`` at ``layer``: a tensor (N, *slice shape).

    Eval mode, no graph, on the model's device; ``layer`` may be a :class:`Slice`.
    """
    sl = _as_slice(layer, cut, None)
    spec = _Spec(layer, sl, get_layer(model, sl.layer))
    with model_lock(model), eval_mode(model), torch.no_grad():
        return _capture(_Forward(model), [inputs.to(model_device(model))], [spec], chunk)[0]


# --------------------------------------------------------------------------- g as its own module

class _TracerWithLeaf(torch.fx.Tracer):
    def __init__(self, leaf: str):
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.leaf or super().is_leaf_module(m, qualname)


_TAILS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _tail(model: nn.Module, layer: str) -> nn.Module | None:
    """g, the part of the network after ``layer``'s output, as a module taking z; or None.

    Built with torch.fx (sharing the model's parameters). None when the model cannot be traced or
    when values flow around the layer (then it is no cut of the network), in which case the engine
    falls back to running h again under no_grad.
    """
    cache = _TAILS.setdefault(model, {})
    if layer in cache:
        return cache[layer]
    g = None
    try:
        graph = _TracerWithLeaf(layer).trace(model)
        new = torch.fx.Graph()
        env: dict = {}
        z = new.placeholder("z")
        inputs = []
        for node in graph.nodes:
            if node.op == "call_module" and node.target == layer:
                if any(v is z for v in env.values()):
                    raise ValueError("layer used twice")
                env[node] = z
            elif node.op == "placeholder":
                env[node] = new.placeholder(f"in_{node.name}")
                inputs.append(env[node])
            else:
                env[node] = new.node_copy(node, lambda n: env[n])
        tail = torch.fx.GraphModule(model, new)
        tail.graph.eliminate_dead_code()
        if any(z is v for v in env.values()) and not any(p.users for p in inputs):
            for p in inputs:
                tail.graph.erase_node(p)
            tail.recompile()
            g = tail
    except Exception:  # untraceable models fall back to the slower, always-correct path
        g = None
    cache[layer] = g
    return g


# --------------------------------------------------------------------------- the engine

def _chunk_size(forward: _Forward, parts1: list[Tensor], points: int, device: torch.device,
                memory_budget: int | None) -> int:
    """How many (input, point) pairs fit the memory budget, from one probing forward pass."""
    sizes = []

    def count(m, a, out):
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(count) for m in forward.model.modules()]
    try:
        with torch.no_grad():
            forward(parts1)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    per_point = sum(p.numel() * p.element_size() for p in parts1) + 3 * sum(sizes)
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = int(free * CUDA_MEMORY_FRACTION)
        else:
            memory_budget = CPU_MEMORY_BUDGET
    return max(1, min(points, memory_budget // max(per_point, 1)))


def _takes_index(method) -> bool:
    try:
        return len(inspect.signature(method).parameters) >= 2
    except (TypeError, ValueError):
        return False


def influence(model: nn.Module, inputs: Tensor | tuple[Tensor, ...], layer: str | Slice | None = None,
              qoi: Quantity | int | Sequence[Quantity] = None, doi: Distribution | None = None, *,
              layers: Sequence[str | Slice | None] | None = None,
              per_input: bool = False, multiply: bool = False, cut: str = "output",
              element: int | str | None = None, doi_on: Sequence[int] | None = None,
              forward_args: tuple = (), forward_kwargs: dict | None = None,
              device: str | torch.device | None = None, batch_size: int | None = None,
              memory_budget: int | None = None,
              progress: Callable[[int, int], None] | None = None,
              distributed: bool = False):
    """Distributional influence of the slice ``layer`` on ``qoi`` over ``doi`` applied to ``inputs``.

    Returns a tensor shaped like one example's slice (the mean over all inputs and DoI points of
    ∂q/∂z), or (N, *slice shape) with ``per_input=True``. With ``layers=[...]`` it returns a dict
    ``{item: that tensor}`` for every item, computed together (one forward and one backward per
    chunk for a DoI at the input; one pass per slice for a DoI at the slice). For a model with
    several inputs and ``layer=None``, a tuple: one influence per input the DoI acts on. With a
    list of quantities, a list of such results, one per quantity, from the same forward passes (one
    backward per quantity).

    Args:
        model: a PyTorch module; evaluated in eval mode (each submodule's mode restored after);
            no gradient is accumulated into its parameters.
        inputs: (N, ...) floating-point tensor: the empirical distribution of interest; or a tuple
            of (N, ...) tensors for a model with several inputs, called as ``model(*inputs, ...)``.
            NaN or Inf values are refused.
        layer: a ``model.named_modules()`` name, a :class:`Slice`, or None for the input itself.
        qoi: a :class:`~core.engine.quantities.Quantity` (or a class index). Its ``element`` picks the
            entry of a model output that is a tuple or dict. A list of quantities (reading the
            same source) shares each chunk's forward pass.
        doi: a :class:`~core.engine.distributions.Distribution` acting on each input (default a point).
        layers: several slices (names, None or :class:`Slice`) instead of ``layer``.
        per_input: return (N, *slice shape), each input's mean over its own DoI points, instead
            of the mean over everything (shaped like one example's slice).
        multiply: attribution space: × (z − z') with z = h(x). z' is the DoI's baseline at the
            slice: zeros for a point or Gaussian DoI (Captum's ``LayerGradientXActivation`` with
            ``multiply_by_inputs=True``); h(x') for a path at the input from x'; for a path at the
            slice, its ``baseline_at`` decides (a given activation, default zeros, or h(x')).
        cut: "output" (default) or "input" of ``layer`` (for names; a Slice carries its own).
        element: the element of a layer output that is a tuple/list/dict (for names).
        doi_on: with several inputs, the indices of those the DoI acts on (default: every
            floating-point input); the others are passed through unchanged for every point.
        forward_args, forward_kwargs: extra arguments for every call, ``model(*inputs,
            *forward_args, **forward_kwargs)``, not batched and not differentiated.
        device: where to compute; default the model's own device. Another device computes on a
            copy of the model, leaving the caller's model where it is.
        batch_size: (input, point) pairs per chunk; default from ``memory_budget`` (bytes; on
            CUDA a share of free memory). A CUDA out-of-memory halves the chunk and retries.
        progress: called as ``progress(done, total)`` in (input, point) pairs.
        distributed: shard the (input, point) pairs over the ranks of the initialised
            ``torch.distributed`` process group and all-reduce the sums: every rank passes the same
            inputs and gets the full result (launch with ``torchrun``).
    """
    listed, qois = _check_quantities(qoi)
    doi = _check_distribution(doi, cut)
    several, parts, doi_on = _check_inputs(inputs, doi_on)
    items = _slice_items(layer, layers)
    slices = [_as_slice(item, cut, element) for item in items]
    if distributed:
        _check_distributed()

    home = model_device(model)
    dev = home if device is None else torch.device(device)
    if dev != home:  # compute on a copy; its layers are the ones to hook
        model = copy.deepcopy(model).to(dev)
    specs, source = _resolve(model, items, slices, qois[0])
    common = dict(per_input=per_input, multiply=multiply, batch_size=batch_size,
                  memory_budget=memory_budget, distributed=distributed)
    per_qoi = _compute(model, parts, several, doi_on, items, specs, qois, source, doi, dev,
                       (forward_args, forward_kwargs), progress, common)
    out = [r if layers is not None else r[items[0]] for r in per_qoi]
    return out if listed else out[0]


def _check_quantities(qoi) -> tuple[bool, list[Quantity]]:
    """``(listed, qois)``: whether ``qoi`` was a list or tuple, and its quantities (a bare class
    index becomes a ``ClassQoI``). Every quantity must read the same source (the output or one
    layer), since they share the forward passes."""
    if qoi is None:
        raise ValueError("qoi is required, e.g. qoi=ClassQoI(3)")
    listed = isinstance(qoi, list | tuple)
    qois = [as_quantity(q) for q in qoi] if listed else [as_quantity(qoi)]
    if not qois:
        raise ValueError("qoi is an empty list: name at least one quantity")
    if len({q.source for q in qois}) > 1:
        raise ValueError(f"the quantities read different layers {sorted({str(q.source) for q in qois})}; "
                         "pass quantities that read the same output or layer")
    return listed, qois


def _check_distribution(doi, cut: str) -> Distribution:
    """The distribution of interest (a point when None), after checking it and ``cut``."""
    doi = PointDoI() if doi is None else doi
    if not isinstance(doi, Distribution):
        raise TypeError(f"doi must be a Distribution (e.g. PointDoI()), not {doi!r}")
    if cut not in ("output", "input"):
        raise ValueError(f"cut must be 'output' or 'input', not {cut!r}")
    return doi


def _check_inputs(inputs, doi_on) -> tuple[bool, list[Tensor], list[int]]:
    """``(several, parts, doi_on)``: whether the model takes several inputs, the input tensors as a
    list (one for a single input), and the indices of those the distribution acts on (default
    every floating-point input; for one input, that input even when it is not floating point, so
    the dtype error below names it). Those must be floating point and finite."""
    several = isinstance(inputs, tuple | list)
    parts = list(inputs) if several else [inputs]
    if not parts:
        raise ValueError("inputs is empty: pass at least one tensor")
    for p in parts:
        if not isinstance(p, Tensor):
            raise TypeError(f"inputs must be torch.Tensors, not {type(p).__name__}")
        if p.dim() == 0 or len(p) == 0:
            raise ValueError("inputs is empty: pass at least one example, shaped (N, ...)")
        if len(p) != len(parts[0]):
            raise ValueError(f"the inputs have different numbers of examples: "
                             f"{[len(q) for q in parts]}")
    if doi_on is None:
        doi_on = [j for j, p in enumerate(parts) if p.is_floating_point()]
        if not several and not doi_on:
            doi_on = [0]
    doi_on = [int(j) for j in doi_on]
    if not doi_on or any(not 0 <= j < len(parts) for j in doi_on):
        raise ValueError(f"doi_on must name inputs among 0..{len(parts) - 1}, not {doi_on}")
    for j in doi_on:
        if not parts[j].is_floating_point():
            raise ValueError(f"inputs must be floating point (got {parts[j].dtype}); "
                             "scale images to floats, e.g. x.float() / 255")
        if not bool(torch.isfinite(parts[j]).all()):
            raise ValueError("inputs contain NaN or Inf: influence needs finite inputs")
    return several, parts, doi_on


def _slice_items(layer, layers) -> list:
    """The slices asked for, as given (names, None for the input, or :class:`Slice`): ``layers``
    when given (non-empty, no repeats, and not together with ``layer``), else ``[layer]``."""
    if layers is None:
        return [layer]
    if layer is not None:
        raise ValueError("pass either layer or layers, not both")
    items = list(layers)
    if not items:
        raise ValueError("layers is empty: name at least one layer (None for the input)")
    if len(set(items)) != len(items):
        raise ValueError(f"layers has repeated entries: {items}")
    return items


def _check_distributed() -> None:
    """Refuse ``distributed=True`` without an initialised ``torch.distributed`` process group."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process "
                         "group (launch with torchrun and call init_process_group)")


def _resolve(model: nn.Module, items: list, slices: list[Slice], qoi: Quantity):
    """``(specs, source)``: one :class:`_Spec` per slice item with its module in ``model`` (None
    for the input), and the module the quantity reads (None for the model's output). A slice may
    not be the very layer the quantity reads."""
    specs = [_Spec(item, sl, None if sl.layer is None else get_layer(model, sl.layer))
             for item, sl in zip(items, slices, strict=True)]
    source = None if qoi.source is None else get_layer(model, qoi.source)
    for s in specs:
        if s.module is not None and s.module is source:
            raise ValueError(f"the quantity reads layer {qoi.source!r} itself; slice at an "
                             "earlier layer or at the input (layer=None)")
    return specs, source


def _compute(model, parts, several, doi_on, items, specs, qois, source, doi, dev, extra, progress,
             common) -> list[dict]:
    """The influence of every slice on every quantity: one ``{item: result}`` dict per quantity.

    Runs under the model's lock, in eval mode, with gradients on. The inputs are detached (an
    inference tensor is cloned) and moved to ``dev``; ``extra`` is ``(forward_args,
    forward_kwargs)``. A path at the slice with several slices runs one engine per slice (each
    interpolates its own activation), with ``progress`` counted over all of them; otherwise one
    engine computes every slice from the same passes.
    """
    with model_lock(model), eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        xs = []
        for p in parts:
            p = p.detach()
            if p.is_inference():
                p = p.clone()
            xs.append(p.to(dev))
        forward = _Forward(model, *extra)
        if doi.at == "layer" and len(specs) > 1:  # a path at the slice: one pass per slice
            results = {}
            one = len(xs[0]) * doi.resolution
            for i, s in enumerate(specs):
                report = None if progress is None else (
                    lambda d, t, off=i * one: progress(off + d, one * len(specs)))
                engine = _Engine(forward, xs, several, doi_on, [s], qois, source, doi, dev)
                for i_q, got in enumerate(engine.run(progress=report, **common)):
                    results.setdefault(i_q, {})[s.key] = got[0]
            return [results[i] for i in range(len(qois))]
        engine = _Engine(forward, xs, several, doi_on, specs, qois, source, doi, dev)
        return [dict(zip(items, got, strict=True))
                for got in engine.run(progress=progress, **common)]


class _Engine:
    """One influence computation: the slices ``specs``, the quantity, the DoI, the inputs."""

    def __init__(self, forward: _Forward, xs, several, doi_on, specs, qois, source_module, doi, device):
        self.forward, self.xs, self.several, self.doi_on = forward, xs, several, doi_on
        self.specs, self.qois, self.source_module, self.doi = specs, qois, source_module, doi
        self.qoi = qois[0]
        self.device = device
        self.checked = set()
        self.n_inputs = len(xs[0])
        self.internal = [s for s in specs if s.layer is not None]
        self.tail = None
        self.z = self.zb = None
        # a path at the slice acts on the input when the slice is the input
        self.at = "layer" if doi.at == "layer" and self.internal else "input"
        if self.at == "layer":
            (spec,) = specs
            plain = (not several and not forward.args and not forward.kwargs
                     and spec.cut == "output" and spec.element is None)
            self.tail = _tail(forward.model, spec.layer) if plain else None
            self.z = self.slice_values(xs, [spec])[0]  # h(x), once per input
            if getattr(doi, "baseline_at", "layer") == "input":  # z' = h(x'), Captum's LayerIG
                self.zb = self.slice_values(self._with_doi_parts(xs, self._input_baseline()), [spec])[0]
            if self.tail is not None and not self._tail_agrees():
                self.tail = None

    # ------------------------------------------------------------------ helpers
    def _tail_agrees(self) -> bool:
        """g(h(x)) must equal f(x): guards the traced tail against models fx misreads."""
        try:
            with torch.no_grad():
                return torch.allclose(self.tail(self.z[:1]), self.forward([x[:1] for x in self.xs]),
                                      rtol=1e-4, atol=1e-5)
        except Exception:
            return False

    def _doi_parts(self, xs):
        sel = tuple(xs[j] for j in self.doi_on)
        return sel if self.several else sel[0]

    def _with_doi_parts(self, xs, new):
        new = new if self.several else (new,)
        out = list(xs)
        for j, t in zip(self.doi_on, new, strict=True):
            out[j] = t
        return out

    def _baseline(self, z, n: Tensor):
        if _takes_index(self.doi.baseline):
            return self.doi.baseline(z, n)
        return self.doi.baseline(z)

    def _input_baseline(self):
        """x' of every input (the DoI's baseline in input space), zeros when it has none."""
        x = self._doi_parts(self.xs)
        b = self._baseline(x, torch.arange(self.n_inputs, device=self.device))
        if b is None:
            b = tuple(torch.zeros_like(t) for t in x) if self.several else torch.zeros_like(x)
        return b

    def slice_values(self, xs, specs) -> list[Tensor]:
        """h(x) at ``specs`` without a graph, chunked (the DoI parts themselves for the input)."""
        internal = [s for s in specs if s.layer is not None]
        got = self._guard(lambda: _capture(self.forward, xs, internal)) if internal else []
        it = iter(got)
        return [self._doi_parts(xs) if s.layer is None else next(it) for s in specs]

    def _guard(self, fn):
        """Turn the model's own shape errors into a message about the inputs."""
        try:
            return fn()
        except RuntimeError as err:
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            shapes = ", ".join(str(tuple(x.shape[1:])) for x in self.xs)
            raise ValueError(f"the model could not run on inputs shaped {shapes} per example: "
                             f"{first}") from err

    def _quantity(self, qoi: Quantity, out) -> Tensor:
        out = qoi.select(out)
        if id(qoi) not in self.checked:
            qoi.check(out)
            self.checked.add(id(qoi))
        q = qoi(out)
        if q.dim() != 1:
            raise ValueError(f"{qoi!r} gave shape {tuple(q.shape)}; a quantity gives one "
                             "scalar per example")
        return q

    # ------------------------------------------------------------------ gradients
    def gradients(self, n: Tensor, r: Tensor) -> list[Tensor]:
        """∂q/∂z at the DoI points of the pairs (n, r), one (len(n), *slice shape) per target.

        Targets: for each quantity in turn, every slice in order; the input slice of a model with
        several inputs counts once per input the DoI acts on.
        """
        doi = self.doi
        xs = [x[n] for x in self.xs]
        hooks: list[_SliceHook] = []
        if self.at == "layer":
            (spec,) = self.specs
            if self.zb is not None:
                points = doi.path_points(self.z[n], self.zb[n], r)
            else:
                points = doi.points(self.z[n], n, r)
            leaf = points.detach().requires_grad_(True)
            if self.tail is not None:
                with _hooked([], self.source_module):
                    out = _run(lambda: self.tail(leaf.clone()), grad=True)  # a copy: in-place ops
            else:
                hooks = [_SliceHook(spec, "inject", inject=leaf)]
                with _hooked(hooks, self.source_module):
                    out = self._guard(lambda: _run(lambda: self.forward(xs), grad=False))
                if hooks[0].z is None:
                    self._not_reached(spec)
            leaves = [[leaf]]
        else:
            pts = doi.points(self._doi_parts(xs), n, r)
            pts = tuple(p.detach() for p in (pts if self.several else (pts,)))
            at_input = any(s.layer is None for s in self.specs)
            if at_input:
                pts = tuple(p.requires_grad_(True) for p in pts)
            call = self._with_doi_parts(xs, pts if self.several else pts[0])
            group: list[_SliceHook] = []
            group.extend(_SliceHook(s, "grad", group) for s in self.internal)
            hooks = group
            with _hooked(group, self.source_module):
                out = self._guard(lambda: _run(lambda: self.forward(call), grad=at_input))
            by_spec = iter(group)
            leaves = []
            for s in self.specs:
                if s.layer is None:
                    leaves.append(list(pts))
                else:
                    hook = next(by_spec)
                    if hook.z is None:
                        self._not_reached(s)
                    leaves.append([hook.z])
        flat = [t for group in leaves for t in group]
        owners = [s for s, group in zip(self.specs, leaves, strict=True) for _ in group]
        result = []
        for i, qoi in enumerate(self.qois):
            q = self._quantity(qoi, out)
            if not q.requires_grad:
                raise ValueError(f"{qoi!r} does not depend on {self.specs[0].where}")
            grads = torch.autograd.grad(q.sum(), flat, allow_unused=True,
                                        retain_graph=i < len(self.qois) - 1)
            for g, s in zip(grads, owners, strict=True):
                if g is None:
                    raise ValueError(f"{qoi!r} does not depend on {s.where}: "
                                     "the output does not use it")
            result.extend(g.detach() for g in grads)
        return result

    def _not_reached(self, spec: _Spec):
        if self.source_module is not None:
            raise ValueError(f"the quantity {self.qoi!r} was read before {spec.where} ran; slice "
                             "at a layer upstream of the quantity")
        raise ValueError(f"{spec.where} did not run in the forward pass")

    # ------------------------------------------------------------------ attribution multiplier
    def multipliers(self) -> list[Tensor]:
        """(z − z') per input and target, z = h(x), z' the DoI's baseline at the slice."""
        if self.at == "layer":
            if self.zb is not None:
                return [self.z - self.zb]
            b = self._baseline(self.z, torch.arange(self.n_inputs, device=self.device))
            return [self.z if b is None else self.z - b]
        z = self.slice_values(self.xs, self.specs)
        base = self._baseline(self._doi_parts(self.xs), torch.arange(self.n_inputs, device=self.device))
        if base is None:  # no baseline: z' = 0 at every slice
            zb = [None] * len(z)
        else:
            zb = self.slice_values(self._with_doi_parts(self.xs, base), self.specs)
        out = []
        for s, zi, bi in zip(self.specs, z, zb, strict=True):
            if s.layer is None and self.several:
                out.extend(zi if bi is None else [a - b for a, b in zip(zi, bi, strict=True)])
            else:
                out.append(zi if bi is None else zi - bi)
        return out

    # ------------------------------------------------------------------ the loop
    def run(self, *, per_input, multiply, batch_size, memory_budget, progress,
            distributed=False) -> list:
        """Every target's influence: one row per quantity, one entry per slice (a tuple, one per
        DoI input, for the input slice of a model with several inputs).

        Each entry is the mean of ∂q/∂z over inputs and DoI points (shaped like one example's
        slice), (N, *slice shape) with ``per_input``, × (z − z') with ``multiply``. With
        ``distributed`` this rank does its share of the (input, point) pairs and the sums are
        all-reduced.
        """
        total = self.n_inputs * self.doi.resolution
        weights = self._point_weights()
        lo, hi = 0, total
        if distributed:
            import torch.distributed as dist
            rank, world = dist.get_rank(), dist.get_world_size()
            lo, hi = total * rank // world, total * (rank + 1) // world
        if batch_size is None:
            batch_size = self._guard(lambda: _chunk_size(self.forward, [x[:1] for x in self.xs], total,
                                                         self.device, memory_budget))
        keep = per_input or multiply
        acc = self._accumulate(lo, hi, int(batch_size), weights, keep, progress)
        if distributed:
            acc = self._all_reduce(acc, keep)
        results = self._finish(acc, weights, keep, per_input=per_input, multiply=multiply)
        return self._arrange(results)

    def _point_weights(self) -> Tensor | None:
        """The DoI's quadrature weights on the engine's device (one per point), or None for equal
        weights (then sums are divided by the number of points instead)."""
        weights = self.doi.weights()
        if weights is not None:
            weights = weights.to(self.device)
            if len(weights) != self.doi.resolution:
                raise ValueError(f"{self.doi!r} gives {len(weights)} weights for "
                                 f"{self.doi.resolution} points")
        return weights

    def _zeros_like_targets(self, grads: list[Tensor], keep: bool) -> list[Tensor]:
        """One zero accumulator per target: (N, *slice shape) when ``keep``, else the slice shape."""
        return [torch.zeros((self.n_inputs, *g.shape[1:]) if keep else g.shape[1:], dtype=g.dtype,
                            device=g.device) for g in grads]

    def _accumulate(self, lo: int, hi: int, batch_size: int, weights, keep: bool,
                    progress) -> list[Tensor] | None:
        """The (weighted) sums of the gradients over the (input, point) pairs ``lo`` … ``hi`` − 1
        (pair k is input k // R, point k % R), per input when ``keep``; None when there are none.

        Chunks hold ``batch_size`` pairs, rounded down to whole inputs when larger than R so each
        input's points sum in one reshape; a CUDA out-of-memory halves the chunk and retries it.
        """
        resolution = self.doi.resolution
        chunk = max(1, batch_size)
        if chunk > resolution:  # whole inputs per chunk: each input's points sum in one reshape
            chunk -= chunk % resolution
        acc: list[Tensor] | None = None
        done = lo
        while done < hi:
            k = torch.arange(done, min(done + chunk, hi), device=self.device)
            n, r = k // resolution, k % resolution
            try:
                grads = self.gradients(n, r)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk //= 2
                torch.cuda.empty_cache()
                continue
            if acc is None:
                acc = self._zeros_like_targets(grads, keep)
            for a, g in zip(acc, grads, strict=True):
                if weights is not None:
                    g = g * weights[r].to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
                if keep and done % resolution == 0 and len(k) % resolution == 0:
                    first = done // resolution
                    a[first:first + len(k) // resolution] += g.view(-1, resolution,
                                                                    *g.shape[1:]).sum(1)
                elif keep:
                    a.index_add_(0, n, g)
                else:
                    a += g.sum(0)
            done += len(k)
            if progress is not None:
                progress(done - lo, hi - lo)
        return acc

    def _all_reduce(self, acc: list[Tensor] | None, keep: bool) -> list[Tensor]:
        """The sums of every rank, in place on ``acc``; a rank that had no pairs contributes zeros
        shaped from one pair's gradients."""
        import torch.distributed as dist
        if acc is None:  # this rank had no pairs: learn the shapes from one pair's gradients
            zero = torch.zeros(1, dtype=torch.long, device=self.device)
            acc = self._zeros_like_targets(self.gradients(zero, zero), keep)
        for a in acc:
            dist.all_reduce(a, op=dist.ReduceOp.SUM)
        return acc

    def _finish(self, acc: list[Tensor], weights, keep: bool, *, per_input: bool,
                multiply: bool) -> list[Tensor]:
        """The sums turned into expectations over the DoI points (÷ R for equal weights; weights
        already sum to 1) and over inputs, × (z − z') with ``multiply``, one per target (quantity
        by quantity, then slice); each must be finite."""
        resolution, total = self.doi.resolution, self.n_inputs * self.doi.resolution
        results = []
        mults = self.multipliers() * len(self.qois) if multiply else [None] * len(acc)
        for a, m in zip(acc, mults, strict=True):
            if keep:
                result = a / resolution if weights is None else a
                if multiply:
                    result = result * m
                if not per_input:
                    result = result.mean(0)
            else:
                result = a / total if weights is None else a / self.n_inputs
            results.append(result)
        owners = [(s, qoi) for qoi in self.qois for s in self.specs
                  for _ in range(len(self.doi_on) if (s.layer is None and self.several) else 1)]
        for res, (s, qoi) in zip(results, owners, strict=True):
            if not torch.isfinite(res).all():
                raise FloatingPointError(f"influence at {s.where} for {qoi!r} is not finite "
                                         "(NaN or Inf): check the model's output and the inputs' scale")
        return results

    def _arrange(self, results: list[Tensor]) -> list:
        """The flat per-target ``results`` as rows per quantity of entries per slice; the input
        slice of a model with several inputs is a tuple over the DoI inputs."""
        out, it = [], iter(results)
        for _ in self.qois:
            row = []
            for s in self.specs:
                if s.layer is None and self.several:
                    row.append(tuple(next(it) for _ in self.doi_on))
                else:
                    row.append(next(it))
            out.append(row)
        return out


def saliency(model: nn.Module, inputs: Tensor, qoi: Quantity | int, *, abs: bool = False,
             **engine) -> Tensor:
    """Saliency: the gradient of ``qoi`` at each input, shape (N, *input shape).

    ``abs=False`` (the default, the project's signed saliency) keeps the sign; ``abs=True`` takes
    magnitudes, Captum's ``Saliency.attribute`` default. Extra keyword arguments go to
    :func:`influence` (layer None, point DoI, per input).
    """
    chi = influence(model, inputs, None, qoi, PointDoI(), per_input=True, **engine)
    if isinstance(chi, tuple):
        return tuple(c.abs() for c in chi) if abs else chi
    return chi.abs() if abs else chi


__all__ = ["influence", "saliency", "activations", "layer_names", "get_layer", "LayerNotFound",
           "model_lock", "eval_mode", "model_device", "Slice"]

"""The influence engine: distributional influence at a slice of a network.

The network f is cut at a layer into f = g ∘ h; z = h(x) is the slice. For a quantity of interest q
and a distribution of interest P,

    χ(f, P) = E_{x∼P} [ ∂q(g(z)) / ∂z  at z = h(x) ]                          (influence space)

and multiplying by (z − z') gives attribution space (Integrated Gradients at the input with a
linear DoI). One function, :func:`influence`, serves every representation the report compares.

Mechanics: hooks exist only inside ``with`` blocks; h runs without building a graph when no
gradient has to flow through it (the slice activation becomes a fresh leaf); the (inputs × DoI
points) work is chunked to a memory budget; concurrent calls on one shared model are serialised by
a per-model lock, and hooks only act on the thread that installed them.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .devices import eval_mode, model_device
from .distributions import Distribution, PointDoI
from .quantities import Quantity, as_quantity

CPU_MEMORY_BUDGET = 512 * 2**20  # bytes of activations per chunk on the CPU
CUDA_MEMORY_FRACTION = 0.4  # share of free GPU memory a chunk may use


class LayerNotFound(ValueError):
    """A layer name that is not in ``model.named_modules()``."""


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early once the needed tensor is captured."""

    def __init__(self, value: Tensor):
        super().__init__("forward stopped by the influence engine")
        self.value = value


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


# --------------------------------------------------------------------------- hooks

class _SliceHook:
    """Acts on the slice tensor (a layer's output, or its first input) during a forward pass.

    mode "capture": record it and stop the forward; "leaf": detach it into a fresh leaf that
    requires grad and switch gradients on for the rest of the pass (so h builds no graph);
    "inject": replace it by a given leaf (a DoI point at the slice).
    """

    def __init__(self, mode: str, layer: str, inject: Tensor | None = None):
        self.mode, self.layer, self.inject = mode, layer, inject
        self.owner = threading.get_ident()
        self.z: Tensor | None = None

    def act(self, value):
        if threading.get_ident() != self.owner:
            return None
        if not isinstance(value, Tensor):
            raise TypeError(f"layer {self.layer!r} gives a {type(value).__name__}, not a tensor; "
                            "choose a layer whose output is a single tensor")
        if self.z is not None:
            raise ValueError(f"layer {self.layer!r} runs more than once in one forward pass; "
                             "influence needs a layer that is used once")
        if self.mode == "capture":
            self.z = value
            raise _Stop(value)
        if self.mode == "leaf":
            self.z = value.detach().requires_grad_(True)
        else:
            if self.inject.shape != value.shape:
                raise ValueError(f"the slice point has shape {tuple(self.inject.shape)} but layer "
                                 f"{self.layer!r} gives {tuple(value.shape)}")
            self.z = self.inject
        torch.set_grad_enabled(True)
        return self.z


class _SourceHook:
    """Captures the activation a unit quantity reads, and stops the forward pass there."""

    def __init__(self):
        self.owner = threading.get_ident()

    def __call__(self, module, args, output):
        if threading.get_ident() == self.owner:
            raise _Stop(output)


@contextmanager
def _hooked(slice_module: nn.Module | None, cut: str, slice_hook: _SliceHook | None,
            source_module: nn.Module | None) -> Iterator[None]:
    handles = []
    try:
        if slice_hook is not None:
            if cut == "output":
                handles.append(slice_module.register_forward_hook(
                    lambda m, a, out: slice_hook.act(out)))
            else:
                def pre(m, args):
                    new = slice_hook.act(args[0])
                    return None if new is None else (new, *args[1:])
                handles.append(slice_module.register_forward_pre_hook(pre))
        if source_module is not None:
            handles.append(source_module.register_forward_hook(_SourceHook()))
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, x: Tensor, *, grad: bool) -> Tensor:
    """Forward ``x``; a :class:`_Stop` raised by a hook returns the captured tensor instead.

    With ``grad=False`` the pass starts without autograd: a slice hook switches it on at the
    slice. The caller's grad mode is restored either way.
    """
    previous = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(grad)
        return model(x)
    except _Stop as stop:
        return stop.value
    finally:
        torch.set_grad_enabled(previous)


def _capture(model: nn.Module, x: Tensor, layer: str, module: nn.Module, cut: str,
             chunk: int = 1024) -> Tensor:
    """h(x) at ``module`` without a graph, chunked; each forward pass stops at the layer."""
    parts = []
    for i in range(0, len(x), chunk):
        hook = _SliceHook("capture", layer)
        with _hooked(module, cut, hook, None):
            _run(model, x[i:i + chunk], grad=False)
        if hook.z is None:
            raise ValueError(f"layer {layer!r} did not run in the forward pass")
        parts.append(hook.z.detach())
    return torch.cat(parts)


def activations(model: nn.Module, inputs: Tensor, layer: str, *, cut: str = "output",
                chunk: int = 1024) -> Tensor:
    """The slice z = h(x) of ``inputs`` at ``layer`` (eval mode, no graph, on the model's device)."""
    module = get_layer(model, layer)
    with model_lock(model), eval_mode(model):
        return _capture(model, inputs.to(model_device(model)), layer, module, cut, chunk)


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

def _chunk_size(model: nn.Module, x1: Tensor, points: int, device: torch.device,
                memory_budget: int | None) -> int:
    """How many (input, point) pairs fit the memory budget, from one probing forward pass."""
    sizes = []

    def count(m, a, out):
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x1)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    per_point = x1.numel() * x1.element_size() + 3 * sum(sizes)  # activations, grads, temporaries
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = int(free * CUDA_MEMORY_FRACTION)
        else:
            memory_budget = CPU_MEMORY_BUDGET
    return max(1, min(points, memory_budget // max(per_point, 1)))


def influence(model: nn.Module, inputs: Tensor, layer: str | None = None,
              qoi: Quantity | int = None, doi: Distribution | None = None, *,
              per_input: bool = False, multiply: bool = False, cut: str = "output",
              device: str | torch.device | None = None, batch_size: int | None = None,
              memory_budget: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Distributional influence of the slice ``layer`` on ``qoi`` over ``doi`` applied to ``inputs``.

    Args:
        model: a PyTorch module; evaluated in eval mode (each submodule's mode restored after).
        inputs: (N, ...) floating-point tensor: the empirical distribution of interest.
        layer: a ``model.named_modules()`` name, or None for the input itself.
        qoi: a :class:`~core.quantities.Quantity` (or a class index).
        doi: a :class:`~core.distributions.Distribution` acting on each input (default a point).
        per_input: return (N, *slice shape), each input's mean over its own DoI points, instead
            of the mean over everything (shaped like one example's slice).
        multiply: attribution space: × (z − z') with z = h(x) and z' the DoI's baseline at the
            slice (h(baseline) for a path at the input, zeros for a point or Gaussian DoI).
        cut: "output" (default) or "input" of ``layer``.
        device: where to compute; default the model's own device. Another device computes on a
            copy of the model, leaving the caller's model where it is.
        batch_size: (input, point) pairs per chunk; default from ``memory_budget`` (bytes; on
            CUDA a share of free memory). A CUDA out-of-memory halves the chunk and retries.
        progress: called as ``progress(done, total)`` in (input, point) pairs.
    """
    if qoi is None:
        raise ValueError("qoi is required, e.g. qoi=ClassQoI(3)")
    qoi = as_quantity(qoi)
    doi = PointDoI() if doi is None else doi
    if not isinstance(doi, Distribution):
        raise TypeError(f"doi must be a Distribution (e.g. PointDoI()), not {doi!r}")
    if cut not in ("output", "input"):
        raise ValueError(f"cut must be 'output' or 'input', not {cut!r}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, not {type(inputs).__name__}")
    if inputs.dim() == 0 or len(inputs) == 0:
        raise ValueError("inputs is empty: pass at least one example, shaped (N, ...)")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point (got {inputs.dtype}); "
                         "scale images to floats, e.g. x.float() / 255")
    slice_module = None if layer is None else get_layer(model, layer)
    source_module = None if qoi.source is None else get_layer(model, qoi.source)
    if slice_module is not None and slice_module is source_module:
        raise ValueError(f"the quantity reads layer {qoi.source!r} itself; slice at an earlier "
                         "layer or at the input (layer=None)")

    home = model_device(model)
    dev = home if device is None else torch.device(device)
    if dev != home:  # compute on a copy; its layers are the ones to hook
        model = copy.deepcopy(model).to(dev)
        slice_module = None if layer is None else get_layer(model, layer)
        source_module = None if qoi.source is None else get_layer(model, qoi.source)
    with model_lock(model), eval_mode(model):
        engine = _Engine(model, inputs.detach().to(dev), layer, slice_module, cut, qoi,
                         source_module, doi, dev)
        return engine.run(per_input=per_input, multiply=multiply, batch_size=batch_size,
                          memory_budget=memory_budget, progress=progress)


class _Engine:
    def __init__(self, model, x, layer, slice_module, cut, qoi, source_module, doi, device):
        self.model, self.x, self.layer, self.slice_module = model, x, layer, slice_module
        self.cut, self.qoi, self.source_module, self.doi = cut, qoi, source_module, doi
        self.device = device
        self.checked = False
        at_layer = slice_module is not None and doi.at == "layer"
        self.tail = _tail(model, layer) if at_layer and cut == "output" else None
        self.z = self.slice_values(x) if at_layer else None  # h(x), once per input
        if self.tail is not None and not self._tail_agrees():
            self.tail = None

    def _tail_agrees(self) -> bool:
        """g(h(x)) must equal f(x): guards the traced tail against models fx misreads."""
        try:
            with torch.no_grad():
                return torch.allclose(self.tail(self.z[:1]), self.model(self.x[:1]),
                                      rtol=1e-4, atol=1e-5)
        except Exception:
            return False

    # h(x) without a graph, chunked
    def slice_values(self, x: Tensor) -> Tensor:
        if self.slice_module is None:
            return x
        return self._guard(lambda: _capture(self.model, x, self.layer, self.slice_module, self.cut))

    def _guard(self, fn):
        """Turn the model's own shape errors into a message about the inputs."""
        try:
            return fn()
        except RuntimeError as err:
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"the model could not run on inputs shaped "
                             f"{tuple(self.x.shape[1:])} per example: {first}") from err

    def _quantity(self, out: Tensor) -> Tensor:
        if not self.checked:
            self.qoi.check(out)
            self.checked = True
        q = self.qoi(out)
        if q.dim() != 1:
            raise ValueError(f"{self.qoi!r} gave shape {tuple(q.shape)}; a quantity gives one "
                             "scalar per example")
        return q

    def gradients(self, n: Tensor, r: Tensor) -> Tensor:
        """∂q/∂z at the DoI points of the pairs (n, r): shape (len(n), *slice shape)."""
        doi = self.doi
        if self.slice_module is None:
            leaf = doi.points(self.x[n], n, r).detach().requires_grad_(True)
            with _hooked(None, self.cut, None, self.source_module):
                out = self._guard(lambda: _run(self.model, leaf, grad=True))
        elif doi.at == "input":
            points = doi.points(self.x[n], n, r).detach()
            hook = _SliceHook("leaf", self.layer)
            with _hooked(self.slice_module, self.cut, hook, self.source_module):
                out = self._guard(lambda: _run(self.model, points, grad=False))
            leaf = hook.z
        else:
            leaf = doi.points(self.z[n], n, r).detach().requires_grad_(True)
            if self.tail is not None:
                with _hooked(None, self.cut, None, self.source_module):
                    out = _run(self.tail, leaf, grad=True)
            else:
                hook = _SliceHook("inject", self.layer, inject=leaf)
                with _hooked(self.slice_module, self.cut, hook, self.source_module):
                    out = self._guard(lambda: _run(self.model, self.x[n], grad=False))
        if leaf is None:
            raise ValueError(f"the quantity {self.qoi!r} was read before layer {self.layer!r} "
                             "ran; slice at a layer upstream of the quantity")
        q = self._quantity(out)
        if not q.requires_grad:
            raise ValueError(f"{self.qoi!r} does not depend on layer {self.layer!r}")
        (g,) = torch.autograd.grad(q.sum(), leaf)
        return g.detach()

    def multiplier(self, chunk: int = 1024) -> Tensor:
        """(z − z') per input, z = h(x)."""
        if self.z is not None:  # path at the slice
            return self.z - self.doi.baseline(self.z)
        parts = []
        for i in range(0, len(self.x), chunk):
            x = self.x[i:i + chunk]
            parts.append(self.slice_values(x) - self.slice_values(self.doi.baseline(x)))
        return torch.cat(parts)

    def run(self, *, per_input, multiply, batch_size, memory_budget, progress) -> Tensor:
        n_inputs, resolution = len(self.x), self.doi.resolution
        total = n_inputs * resolution
        if batch_size is None:
            batch_size = self._guard(lambda: _chunk_size(self.model, self.x[:1], total,
                                                         self.device, memory_budget))
        chunk = max(1, int(batch_size))
        if chunk > resolution:  # whole inputs per chunk: each input's points sum in one reshape
            chunk -= chunk % resolution
        keep = per_input or multiply
        acc = None
        done = 0
        while done < total:
            k = torch.arange(done, min(done + chunk, total), device=self.device)
            n, r = k // resolution, k % resolution
            try:
                g = self.gradients(n, r)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk //= 2
                torch.cuda.empty_cache()
                continue
            if acc is None:
                shape = (n_inputs, *g.shape[1:]) if keep else g.shape[1:]
                acc = torch.zeros(shape, dtype=g.dtype, device=g.device)
            if keep and done % resolution == 0 and len(k) % resolution == 0:
                first = done // resolution
                acc[first:first + len(k) // resolution] += g.view(-1, resolution,
                                                                  *g.shape[1:]).sum(1)
            elif keep:
                acc.index_add_(0, n, g)
            else:
                acc += g.sum(0)
            done += len(k)
            if progress is not None:
                progress(done, total)
        if keep:
            result = acc / resolution
            if multiply:
                result = result * self.multiplier()
            if not per_input:
                result = result.mean(0)
        else:
            result = acc / total
        if not torch.isfinite(result).all():
            where = "the input" if self.layer is None else f"layer {self.layer!r}"
            raise FloatingPointError(f"influence at {where} for {self.qoi!r} is not finite "
                                     "(NaN or Inf): check the model's output and the inputs' scale")
        return result


__all__ = ["influence", "activations", "layer_names", "get_layer", "LayerNotFound", "model_lock", "eval_mode",
           "model_device"]

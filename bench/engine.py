"""Benchmark: our influence vs Captum's InternalInfluence and vs the limit, measured in one run.

Quantity: distributional influence at the DecoyMNIST CNN's internal conv layer ``conv2`` for a class
logit, linear DoI with R = 50 midpoints from a zero baseline, 128 real MNIST inputs (per input).

* ours (at="input"): the contract's LinearDoI at the input; h runs without a graph.
* ours (at="layer"): the path interpolates the slice itself, so h runs once per input.
* Captum: ``InternalInfluence(model, model.conv2).attribute(..., method="riemann_middle")``.
* limit: the least work for the at="input" quantity: one forward pass of h (no graph) plus g with
  backward to the slice over the same 6,400 points, in the same chunks, and nothing else.

Real-size workload (``--workload real``): the experts job on ResNet-50 and VGG16 (torchvision,
random weights) at 224×224: several layers × a few classes over 32 images with a linear DoI
(R = 8 midpoints from zeros), influence per input at every layer for every class.

* ours: one ``influence(model, x, layers=[...], qoi=[ClassQoI(c) for c in classes], ...)`` call:
  one forward pass per chunk (h without a graph up to the first slice) and one backward per class.
* ours, one call per class: the same with one quantity per call (what ``experts_many`` does per class).
* Captum: ``InternalInfluence(model, layer).attribute(x, target=c, n_steps=R,
  method="riemann_middle", internal_batch_size=chunk)`` for every layer and class.
* limit: the least work for the job: per chunk one forward (no graph up to the first slice, one copy
  per slice because in-place ReLUs follow the convs) and one backward per class, written by hand.

Times: the best of ``--repeats`` rounds in which the methods take turns (after a one-chunk warm-up
of each), so that no method pays for first-touch page faults the others skip. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` per method; on the CPU the peak resident set size a fresh
process adds while it runs the method once (sampled every 5 ms).

Usage: python bench/engine.py [--device cuda] [--repeats 5]
       python bench/engine.py --workload real [--models resnet50,vgg16] [--images 32] [--size 224]
                              [--resolution 8] [--classes 3] [--chunk 16] [--device cuda]
       python bench/engine.py --workload scale --models vgg16 --images 10000 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captum.attr import InternalInfluence  # noqa: E402

from core.cases.decoy_mnist.data import decoy_mnist  # noqa: E402
from core.cases.decoy_mnist.net import build_model  # noqa: E402
from core.engine.distributions import LinearDoI  # noqa: E402
from core.engine.influence import influence  # noqa: E402
from core.engine.quantities import ClassQoI  # noqa: E402

R, N, LAYER, CLASS = 50, 128, "conv2", 3


def limit(model, x, chunk):
    """h (no graph) then g with backward to the slice, over the same points and chunks."""
    h = lambda t: model.conv2(model.pool1(model.relu1(model.conv1(t))))  # noqa: E731

    def g(z):
        t = model.pool2(model.relu2(z))
        return model.fc2(model.relu3(model.fc1(model.flatten(t))))

    alphas = (torch.arange(R, dtype=torch.float32, device=x.device) + 0.5) / R
    points = (alphas.view(1, R, 1, 1, 1) * x.unsqueeze(1)).reshape(-1, *x.shape[1:])
    total = torch.zeros(len(x), *h(x[:1]).shape[1:], device=x.device)
    idx = torch.arange(len(points), device=x.device) // R
    for i in range(0, len(points), chunk):
        with torch.no_grad():
            z = h(points[i:i + chunk])
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad(g(z)[:, CLASS].sum(), z)
        total.index_add_(0, idx[i:i + chunk], grad)
    return total / R


def timed(fn, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["mnist", "real", "scale"], default="mnist")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (mnist), 2 (real)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="points per chunk for every method (default 1600 mnist, 16 real, 64 scale)")
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--images", type=int, default=None, help="default 32 (real), 10000 (scale)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--resolution", type=int, default=8)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-memory", action="store_true",
                    help="real workload on the CPU: skip the per-method peak memory (fresh processes)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.workload == "real":
        return real(args, device)
    if args.workload == "scale":
        return scale(args, device)
    args.repeats = args.repeats or 5
    args.chunk = args.chunk or 1600

    torch.manual_seed(0)
    model = build_model("decoy-cnn").to(device).eval()
    x = decoy_mnist(seed=0).test.x[:N].to(device)
    qoi, chunk = ClassQoI(CLASS), args.chunk

    runs = {
        "ours, at=input": lambda: influence(model, x, LAYER, qoi, LinearDoI(R), per_input=True,
                                             batch_size=chunk),
        "ours, at=layer": lambda: influence(model, x, LAYER, qoi, LinearDoI(R, at="layer"),
                                             per_input=True, batch_size=chunk),
        "captum InternalInfluence": lambda: InternalInfluence(model, model.conv2).attribute(
            x, target=CLASS, n_steps=R, method="riemann_middle", internal_batch_size=chunk),
        "limit (h no-grad + g fwd/bwd)": lambda: limit(model, x, chunk),
    }
    for fn in runs.values():  # warm-up: allocator, kernels, fx trace
        fn()
    results = {name: timed(fn, args.repeats, device) for name, fn in runs.items()}

    ref = results["captum InternalInfluence"][1]
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor() or platform.machine()
    print(f"device: {device} ({where}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"quantity: influence at {LAYER!r} for class {CLASS}, LinearDoI R={R}, {N} inputs, "
          f"chunk {chunk} points, median of {args.repeats}")
    print(f"{'method':32s} {'seconds':>9s} {'max |diff| vs captum':>22s}")
    for name, (sec, out) in results.items():
        diff = (out - ref).abs().max().item() if "layer" not in name else float("nan")
        print(f"{name:32s} {sec:9.4f} {diff:22.2e}")
    t = {k: v[0] for k, v in results.items()}
    captum, at_input, at_layer = (t["captum InternalInfluence"], t["ours, at=input"],
                                  t["ours, at=layer"])
    print(f"speed-up vs Captum, at=input: {captum / at_input:.2f}x")
    print(f"speed-up vs Captum, at=layer: {captum / at_layer:.2f}x "
          "(a different DoI: the path runs at the slice)")
    print(f"ours at=input / limit: {at_input / t['limit (h no-grad + g fwd/bwd)']:.3f}")


# --------------------------------------------------------------------------- the real-size workload

REAL_LAYERS = {"resnet50": ["layer2", "layer3", "layer4"],
               "vgg16": ["features.14", "features.21", "features.28"]}


def where(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn, device):
    """(seconds, peak bytes above the start, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - base, out
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
    return seconds, max(peak[0], _rss()) - base, out


def real_limit(model, x, layers, classes, resolution, chunk):
    """The least work: per chunk one forward (no graph before the first slice) + one backward per class."""
    modules = [model.get_submodule(name) for name in layers]
    alphas = (torch.arange(resolution, dtype=torch.float32, device=x.device) + 0.5) / resolution
    total = len(x) * resolution
    acc = None
    captured: list = []

    def hook(m, a, out):
        if not torch.is_grad_enabled():
            out = out.detach().requires_grad_(True)
            torch.set_grad_enabled(True)
        captured.append(out)
        return out.clone()

    for i in range(0, total, chunk):
        k = torch.arange(i, min(i + chunk, total), device=x.device)
        n, r = k // resolution, k % resolution
        points = alphas[r].view(-1, 1, 1, 1) * x[n]
        captured.clear()
        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            with torch.no_grad():
                logits = model(points)
        finally:
            for h in handles:
                h.remove()
        if acc is None:
            acc = [[torch.zeros(len(x), *z.shape[1:], device=x.device) for z in captured] for _ in classes]
        for ci, c in enumerate(classes):
            grads = torch.autograd.grad(logits[:, c].sum(), captured, retain_graph=ci < len(classes) - 1)
            for a, g in zip(acc[ci], grads, strict=True):
                a.index_add_(0, n, g)
    return [{name: a / resolution for name, a in zip(layers, row, strict=True)} for row in acc]


def real_methods(model, layers, classes, R, chunk) -> dict:
    """The four ways to do the job, each a function of the images."""
    from captum.attr import InternalInfluence

    qois = [ClassQoI(c) for c in classes]

    def ours(x):
        return influence(model, x, layers=layers, qoi=qois, doi=LinearDoI(R), per_input=True,
                         batch_size=chunk)

    def ours_per_class(x):
        return [influence(model, x, layers=layers, qoi=q, doi=LinearDoI(R), per_input=True,
                          batch_size=chunk) for q in qois]

    def captum(x):
        return [{layer: InternalInfluence(model, model.get_submodule(layer)).attribute(
            x, target=c, n_steps=R, method="riemann_middle", internal_batch_size=chunk)
            for layer in layers} for c in classes]

    return {"ours (layers x classes, one call)": ours, "ours (one call per class)": ours_per_class,
            "captum InternalInfluence per layer+class": captum,
            "limit (by hand)": lambda x: real_limit(model, x, layers, classes, R, chunk)}


def _setup(name, n_images, size, device):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).to(device).eval()
    return model, torch.rand(n_images, 3, size, size, device=device)


def _memory_child(name, label, n_images, size, classes, R, chunk, threads, queue):
    """In a fresh process: the peak resident memory one method adds while it runs."""
    torch.set_num_threads(threads)
    model, x = _setup(name, n_images, size, torch.device("cpu"))
    fn = real_methods(model, REAL_LAYERS[name], classes, R, chunk)[label]
    queue.put(measured(lambda: fn(x), torch.device("cpu"))[1])


def real(args, device):
    import multiprocessing

    repeats, chunk = args.repeats or 2, args.chunk or 16
    n_images, R, size = args.images or 32, args.resolution, args.size
    classes = list(range(args.classes))
    print(f"device: {device} ({where(device)}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"job: influence per input at 3 layers x {len(classes)} classes, LinearDoI R={R} from zeros, "
          f"{n_images} images {size}x{size}, chunk {chunk} points; best of {repeats} rounds, the methods "
          "taking turns in each round")
    for name in args.models.split(","):
        model, x = _setup(name, n_images, size, device)
        layers = REAL_LAYERS[name]
        runs = real_methods(model, layers, classes, R, chunk)
        warm = x[:max(1, min(len(x), chunk // R))]
        for fn in runs.values():  # warm-up on one chunk: allocator, kernels
            fn(warm)
        times: dict[str, list] = {label: [] for label in runs}
        peaks: dict[str, int] = dict.fromkeys(runs, 0)
        outs = {}
        for _ in range(repeats):
            for label, fn in runs.items():
                sec, peak, outs[label] = measured(lambda fn=fn, x=x: fn(x), device)
                times[label].append(sec)
                peaks[label] = max(peaks[label], peak)
        if device.type == "cpu" and not args.no_memory:  # in-process RSS deltas mislead: fresh processes
            ctx = multiprocessing.get_context("spawn")
            for label in runs:
                queue = ctx.Queue()
                child = ctx.Process(target=_memory_child, args=(name, label, n_images, size, classes, R,
                                                                chunk, torch.get_num_threads(), queue))
                child.start()
                peaks[label] = queue.get()
                child.join()
        ref = outs["captum InternalInfluence per layer+class"]
        print(f"\n{name}: layers {layers}")
        print(f"{'method':42s} {'seconds':>9s} {'peak MiB':>9s} {'max rel |diff| vs captum':>25s}")
        for label in runs:
            out = outs[label]
            diff = max(float((out[ci][layer] - ref[ci][layer]).abs().max()
                             / ref[ci][layer].abs().max().clamp_min(1e-30))
                       for ci in range(len(classes)) for layer in layers)
            print(f"{label:42s} {min(times[label]):9.2f} {peaks[label] / 2**20:9.0f} {diff:25.2e}")
        t = {k: min(v) for k, v in times.items()}
        cap, one, per, lim = (t["captum InternalInfluence per layer+class"],
                              t["ours (layers x classes, one call)"], t["ours (one call per class)"],
                              t["limit (by hand)"])
        print(f"speed-up vs Captum: {cap / one:.2f}x (one call), {cap / per:.2f}x (one call per class)")
        print(f"ours / limit: {one / lim:.3f}", flush=True)


def scale(args, device):
    """VGG16 at 224² over many images on one card: the experts job's influence, chunked, no OOM."""
    n_images, R = args.images or 10_000, args.resolution
    name = args.models.split(",")[-1]
    model, x = _setup(name, n_images, args.size, device)
    layers = REAL_LAYERS[name]
    qois = [ClassQoI(c) for c in range(args.classes)]
    print(f"device: {device} ({where(device)}), torch {torch.__version__}")
    print(f"scale: {name} {n_images} images {args.size}x{args.size}, layers {layers}, "
          f"{len(qois)} classes, LinearDoI R={R}, mean influence (chunk from free memory)")
    done = [0]

    def progress(d, total):
        if d * 10 // total > done[0]:
            done[0] = d * 10 // total
            print(f"  {d}/{total} pairs", flush=True)

    sec, peak, out = measured(lambda: influence(model, x, layers=layers, qoi=qois, doi=LinearDoI(R),
                                                batch_size=args.chunk, progress=progress), device)
    print(f"seconds {sec:.1f}, peak {peak / 2**30:.2f} GiB above the inputs, "
          f"{n_images * R / sec:.0f} points/s; finite: "
          f"{all(bool(torch.isfinite(v).all()) for o in out for v in o.values())}")


if __name__ == "__main__":
    main()

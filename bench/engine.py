"""Benchmark: our influence vs Captum's InternalInfluence and vs the limit, measured in one run.

Quantity: distributional influence at the DecoyMNIST CNN's internal conv layer ``conv2`` for a class
logit, linear DoI with R = 50 midpoints from a zero baseline, 128 real MNIST inputs (per input).

* ours (at="input"): the contract's LinearDoI at the input; h runs without a graph.
* ours (at="layer"): the path interpolates the slice itself, so h runs once per input.
* Captum: ``InternalInfluence(model, model.conv2).attribute(..., method="riemann_middle")``.
* limit: the least work for the at="input" quantity: one forward pass of h (no graph) plus g with
  backward to the slice over the same 6,400 points, in the same chunks, and nothing else.

Usage: python bench/engine.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captum.attr import InternalInfluence  # noqa: E402

from core.data import decoy_mnist  # noqa: E402
from core.distributions import LinearDoI  # noqa: E402
from core.influence import influence  # noqa: E402
from core.models import build_model  # noqa: E402
from core.quantities import ClassQoI  # noqa: E402

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
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1600, help="points per chunk for ours and the limit")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

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

if __name__ == "__main__":
    main()

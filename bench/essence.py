"""Time the essence stage (core.stages.essence.build) on the default case's sizes, on the CPU.

DecoyMNIST (3,600 training, 1,000 test images), DecoyCNN trained like the default case, layers
conv1 / conv2 / fc1, 10 classes. The experts stage's rows are stood in for: each class's top-k
units by class influence, and as "shortcut" carriers the units whose activation moves most when the
decoy patch is removed (a cheap proxy for the experts stage's region-mass flag; the real pipeline
uses that flag). Prints the seconds per step, the total and the smallest k per pair and layer.

    .venv/bin/python -m bench.essence [--epochs 10] [--checkpoint /tmp/decoy-cnn.pt] [--draws 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import core.stages.essence as E
from core.cases.decoy_mnist.data import decoy_mnist
from core.cases.decoy_mnist.net import DecoyCNN
from core.engine.influence import activations
from core.methods.training import set_seed, train_model
from core.stages.base import StageContext


def proxy_rows(model, data, layers, k: int, n: int = 200) -> list[dict]:
    """Top-k units per class and layer by class influence; "shortcut" = the unit's activation moves
    (mean |h(decoy) − h(clean)| over test images) more than 3× the layer's median unit."""
    rows = []
    for layer in layers:
        za = activations(model, data.test.x[:n], layer)
        zc = activations(model, data.test.x_clean[:n], layer)
        move = (za - zc).abs().flatten(2).sum(2).mean(0) if za.dim() > 2 else (za - zc).abs().mean(0)
        carrier = move > 3 * move.median()
        for c in range(10):
            s = E.class_scores(model, layer, data.train.x[data.train.y == c][:n], c)
            for r, u in enumerate(torch.topk(s, k).indices.tolist()):
                rows.append({"model": "vanilla", "class": c, "layer": layer, "unit": u, "rank": r + 1,
                             "influence": float(s[u]), "shortcut": bool(carrier[u])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--checkpoint", default="/tmp/casebook-bench-decoy-cnn.pt")
    p.add_argument("--draws", type=int, default=E.DEFAULTS["random_draws"])
    p.add_argument("--json", default=None, help="write the payload here")
    args = p.parse_args()
    torch.set_num_threads(2)
    data = decoy_mnist()
    set_seed(0)
    model = DecoyCNN()
    ckpt = Path(args.checkpoint)
    if ckpt.is_file():
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        t = time.perf_counter()
        train_model(model, data.train.x, data.train.y, epochs=args.epochs, seed=0, device="cpu")
        print(f"trained {args.epochs} epochs in {time.perf_counter() - t:.1f}s")
        torch.save(model.state_dict(), ckpt)
    model.eval()
    layers = ["conv1", "conv2", "fc1"]
    t = time.perf_counter()
    rows = proxy_rows(model, data, layers, 5)
    print(f"proxy experts rows in {time.perf_counter() - t:.1f}s "
          f"({sum(r['shortcut'] for r in rows)} shortcut flags)")
    section = {"pairs": [[4, 9], [3, 8]], "random_draws": args.draws}
    experts = {"layers": layers, "k": 5, "classes": list(range(10))}
    last = [time.perf_counter()]

    def progress(done, total, msg):
        now = time.perf_counter()
        print(f"  {done:>3}/{total} {now - last[0]:6.2f}s  {msg}")
        last[0] = now

    def reference() -> float:  # the machine's speed now: a plain forward of the 1,000 test images
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(3):
                model(data.test.x)
            return (time.perf_counter() - t) / 3

    ref_before = reference()
    t = time.perf_counter()
    out = E.build(StageContext.standalone("essence", data, {"vanilla": model}, section=section,
                                          experts=experts, artifacts={"experts": {"rows": rows}},
                                          progress=progress))
    total = time.perf_counter() - t
    print(f"reference forward of 1000 test images: {ref_before:.3f}s before, {reference():.3f}s after "
          f"(machine load shows here)")
    print(f"essence stage: {total:.1f}s on {torch.get_num_threads()} CPU threads "
          f"({len(out['curves'])} curves, {len(out['ablation'])} ablation rows, "
          f"{len(out['region'])} region checks, {args.draws} random draws)")
    for r in out["rows"]:
        print(f"  {r['layer']:>5} {r['a_name']} vs {r['b_name']} ({r['pair_source']}, {r['fill']}): "
              f"full {r['full_acc']:.3f}  smallest k top {r['k_top']}  random {r['k_random']}  "
              f"bottom {r['k_bottom']}  (width {r['width']})")
    for s in out["summary"]:
        print(f"  {s['layer']:>5} {s['fill']}: experts beat random for {s['classes_beating_random']}/"
              f"{s['n_classes']} classes; mean acc drop {s['mean_acc_drop']:.3f} vs random "
              f"{s['mean_random_acc_drop']:.3f}")
    for r in out["region"]:
        if r["units"]:
            print(f"  {r['layer']:>5} {r['fill']}: shortcut units {r['units']}: region drop "
                  f"{r['region_drop']:.3f}, clean drop {r['clean_drop']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()

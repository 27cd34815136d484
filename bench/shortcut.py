"""Measure the DecoyMNIST shortcut: a vanilla CNN (decoy train set) against a clean reference.

    .venv/bin/python bench/shortcut.py [--epochs 10] [--lr 1e-3] [--padding 2] [--seed 0]

Prints train / decoy-test / clean-test accuracy and training seconds for both models. The vanilla
model has learned the shortcut when its decoy-test accuracy is clearly below the clean reference's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.cases.decoy_mnist.data import decoy_mnist  # noqa: E402
from core.cases.decoy_mnist.net import build_model  # noqa: E402
from core.methods.training import evaluate, set_seed, train_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--padding", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    data = decoy_mnist(seed=args.seed)
    print(f"data {data.describe()} built in {time.perf_counter() - t:.2f}s; "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for name, x_train in (("vanilla", data.train.x), ("clean", data.train.x_clean)):
        set_seed(args.seed)
        model = build_model("decoy-cnn", padding=args.padding)
        hist = train_model(model, x_train, data.train.y, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, device="cpu")
        rows.append((name,
                     evaluate(model, x_train, data.train.y),
                     evaluate(model, data.val.x, data.val.y),
                     evaluate(model, data.test.x, data.test.y),
                     evaluate(model, data.test.x_clean, data.test.y),
                     hist["seconds"]))
    print(f"padding={args.padding} epochs={args.epochs} lr={args.lr} batch={args.batch_size}")
    print(f"{'model':8} {'train':>7} {'val':>7} {'decoy-test':>11} {'clean-test':>11} {'seconds':>8}")
    for name, tr, va, dt, ct, s in rows:
        print(f"{name:8} {tr:7.3f} {va:7.3f} {dt:11.3f} {ct:11.3f} {s:8.1f}")
    van, cln = rows
    print(f"shortcut gap (clean ref decoy-test − vanilla decoy-test): {cln[3] - van[3]:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

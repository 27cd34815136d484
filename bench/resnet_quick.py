"""A user's ResNet in a quick build: torchvision ``resnet18`` by name on 600 images of two classes.

    .venv/bin/python bench/resnet_quick.py [--size 160] [--epochs 2] [--full] [--keep DIR]

The case the issue measured, written into a temporary folder: 600 PNG images of two classes at
``--size`` (train 200, val 40, test 60 per class; a disc or a square on noise) with a corner mark
whose colour follows the class in 90% of the training and validation images and is random in test,
the marks' masks in a mirrored folder, and a TOML that names ``torchvision.models:resnet18``
(``num_classes = 2``, trained by the pipeline for ``--epochs``) with expert layers ``layer2`` and
``layer3``. Runs ``python -m core build case.toml --quick`` in an empty cache (``--full``: the full
budget instead) and prints each stage's seconds beside the estimate the build printed before it
started (and their ratio), the total wall and CPU seconds, the model's accuracies, and the load
average (the machine is shared: wall time depends on the neighbours).
Nothing is downloaded: the weights are torchvision's random initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.casestudy.estimate import parse_estimate  # noqa: E402  (no torch: a text parser)

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 200, "val": 40, "test": 60}
CLASSES = ("disc", "square")
MARKS = ((230, 40, 40), (40, 80, 230))
LINK = 0.9


def write_images(root: Path, size: int, seed: int = 0) -> int:
    """Write the images and masks under ``root/images`` and ``root/masks``; return their count."""
    rng = np.random.default_rng(seed)
    mark = max(size // 8, 4)
    yy, xx = np.mgrid[:size, :size]
    n = 0
    for split, per_class in PER_CLASS.items():
        for label, kind in enumerate(CLASSES):
            for sub in ("images", "masks"):
                (root / sub / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.normal(90, 20, size=(size, size, 3))
                cy, cx = rng.integers(size // 3, size - size // 3, size=2)
                r = int(rng.integers(size // 6, size // 4))
                shape = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if kind == "disc" else \
                    (abs(yy - cy) <= r * 0.8) & (abs(xx - cx) <= r * 0.8)
                img[shape] = rng.normal(200, 15, size=3)
                linked = split != "test" and rng.random() < LINK
                colour = label if linked else int(rng.integers(len(CLASSES)))
                top, left = (int(rng.integers(2)) * (size - mark) for _ in range(2))
                mask = np.zeros((size, size), dtype=np.uint8)
                mask[top:top + mark, left:left + mark] = 255
                img[mask > 0] = MARKS[colour]
                name = f"{i:03d}.png"
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    root / "images" / split / kind / name)
                Image.fromarray(mask).save(root / "masks" / split / kind / name)
                n += 1
    return n


def case_toml(size: int, epochs: int) -> str:
    return f'''title = "A user's resnet18 (bench)"
[dataset]
source = "folder"
root = "images"
classes = {json.dumps(list(CLASSES))}
size = [{size}, {size}]
channels = 3

[region]
masks = "masks"
name = "mark"

[models.vanilla]
factory = "torchvision.models:resnet18"
kwargs = {{ num_classes = 2 }}

[training]
epochs = {epochs}
lr = 0.001
batch_size = 32

[experts]
layers = ["layer2", "layer3"]
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="the full budget instead of --quick")
    ap.add_argument("--keep", default=None, help="write the case and cache here (kept)")
    args = ap.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="casebook-resnet-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        n = write_images(root, args.size)
        (root / "case.toml").write_text(case_toml(args.size, args.epochs))
        print(f"wrote {n} images at {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s")
        cache = root / "cache"
        env = {**os.environ, "CASEBOOK_CACHE": str(cache), "CASEBOOK_BACKGROUND": "0"}
        budget = [] if args.full else ["--quick"]
        cmd = [sys.executable, "-m", "core", "build", str(root / "case.toml"), *budget,
               "--cache", str(cache)]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode not in (0, 1):
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        rep = subprocess.run([sys.executable, "-m", "core", "report", str(root / "case.toml"),
                              *budget, "--json", "--cache", str(cache)], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
        report = json.loads(rep.stdout)
        seconds = report.get("provenance", {}).get("seconds", {})
        guess = parse_estimate(proc.stdout)
        print(f"{'stage':16} {'seconds':>8} {'estimate':>9} {'est/real':>9}")
        for stage, s in seconds.items():
            g = guess.get(stage)
            ratio = f"{g / s:9.2f}" if g is not None and s else f"{'—':>9}"
            print(f"{stage:16} {s:8.1f} {g if g is not None else float('nan'):9.1f} {ratio}")
        if guess.get("total"):
            real = sum(v for v in seconds.values() if v)
            print(f"{'total':16} {real:8.1f} {guess['total']:9.1f} {guess['total'] / real:9.2f}"
                  "  (estimate: printed by build before it started, from its timed probe)")
        print(f"build CPU time {cpu:.0f} s (all threads)")
        print(f"build exit {proc.returncode}; wall {wall:.0f} s ({wall / 60:.1f} min, "
              f"{'full' if args.full else 'quick'} budget); load average {load0:.1f} → "
              f"{os.getloadavg()[0]:.1f}")
        for name, m in (report.get("models") or {}).items():
            accs = {k: v for k, v in m.items() if k.endswith("acc") or k.startswith("acc")}
            print(f"model {name}: {json.dumps(accs)[:300]}")
        for w in report.get("warnings") or []:
            print("warning:", w.get("text", w) if isinstance(w, dict) else w)
        missing = [s for s, ok in (report.get("built") or {}).items() if not ok]
        if missing or proc.returncode:
            print("not built:", missing, proc.stderr.strip().splitlines()[-3:])
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

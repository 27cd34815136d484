"""The detection stage's patch attack: leaving settled images early against every step, in one run.

    .venv/bin/python bench/detection.py [--case decoy-mnist] [--n 512] [--cache DIR]

Attacks the first ``n`` test images of the case's model under study twice with the stage's
settings (patch side, steps, step size): :func:`core.stages.detection.patch_attack` (an image
whose patch reached a fixed point or a two-cycle leaves the batch) and a plain loop of every
step; prints both wall times, their ratio, the share of (image, step) pairs evaluated and the
largest difference between the two attacked batches. Needs the case's models built.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _every_step(model, x, target, *, size, steps, seed, bounds, step_size, batch_size=256):
    import torch
    import torch.nn.functional as F

    from core.stages.detection import _bounds, patch_masks
    lo, hi = _bounds(bounds, x)
    masks = patch_masks(len(x), size, tuple(x.shape[-2:]), seed)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for i in range(0, len(x), batch_size):
        xb, m = x[i:i + batch_size], masks[i:i + batch_size].expand_as(x[i:i + batch_size])
        patch = lo + noise[i:i + batch_size] * (hi - lo)
        for _ in range(steps):
            patch = patch.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(torch.where(m, patch, xb)), target[i:i + batch_size],
                                       reduction="sum")
                (grad,) = torch.autograd.grad(loss, patch)
            patch = torch.maximum(torch.minimum(patch.detach() - step_size * grad.sign(), hi), lo)
        out.append(torch.where(m, patch, xb))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decoy-mnist")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    import torch

    from core.casestudy import CaseStudy
    from core.stages.detection import _targets, check_config, input_bounds, patch_attack
    torch.set_num_threads(1)
    study = CaseStudy.open(args.case, cache_dir=args.cache)
    data = study.data()
    model = study.model(study.subject).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = check_config(None)
    h, w = data.size
    size = max(1, round(min(h, w) / 4))
    bounds = input_bounds(data)
    x, y = data.test.x[:args.n].float(), data.test.y[:args.n]
    target = _targets(y, data.n_classes, 1)
    lo, hi = (torch.as_tensor(b) for b in bounds)
    step_size = float((hi - lo).max()) / 16
    t0 = time.perf_counter()
    stats: dict = {}
    fast, _ = patch_attack(model, x, target, size=size, steps=cfg["steps"], seed=1, bounds=bounds,
                           stats=stats)
    t1 = time.perf_counter()
    full = _every_step(model, x, target, size=size, steps=cfg["steps"], seed=1, bounds=bounds,
                       step_size=step_size)
    t2 = time.perf_counter()
    print(f"case {args.case}, {len(x)} images, {cfg['steps']} steps, patch {size}×{size}")
    print(f"leaving settled images  {t1 - t0:7.1f} s  ({stats['image_steps']} of {stats['full']} "
          f"image-steps, {stats['image_steps'] / stats['full']:.0%})")
    print(f"every step              {t2 - t1:7.1f} s")
    print(f"ratio                   {(t2 - t1) / (t1 - t0):7.2f}×   largest difference "
          f"{float((fast - full).abs().max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

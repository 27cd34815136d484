"""The detection stage's time: the patch attack's early exit, and the whole stage step by step.

    .venv/bin/python bench/detection.py [--case decoy-mnist] [--n 512] [--cache DIR]
    .venv/bin/python bench/detection.py --stage [--case faces] [--set '{"views": 1}'] [--cache DIR]

Without ``--stage``: attacks the first ``n`` test images of the case's model under study twice
with the stage's settings (patch side, steps, step size): :func:`core.methods.detection.patch_attack`
(an image whose patch reached a fixed point or a two-cycle leaves the batch) and a plain loop of
every step; prints both wall times, their ratio, the share of (image, step) pairs evaluated and
the largest difference between the two attacked batches.

With ``--stage``: runs the detection stage (:func:`core.stages.detection.build`) on the case's
``[detection]`` section (``--set`` overrides keys as JSON, e.g. the earlier one-view design
``{"views": 1, "patch_sizes": null}``), outside the cache, and prints each step's wall and CPU
seconds (CPU seconds are the fairer figure on a shared machine), the evaluation design and every
detector's AUC with its interval, per attack. Needs the case's models built (or frozen ones).

Measured (faces, pretrained O-Net, the stage run standalone as ``--stage`` does, 2 shared cores at
load 4–10, so CPU seconds): the one-view design (50 clean vs 43 attacked) 222 s CPU / 475 s wall;
the four-view design (200 clean views, 400 attacks, two adaptive attacks) 799 s CPU / 2,248 s
wall — held-out attack 24 → 175 s for 8× the attempts, scoring 22 → 86 s, the influence-adaptive
attack and its scoring 54 → 224 s (8× the attempts; one forward pass per step for the loss and the
penalty), the new Mahalanobis-adaptive attack 184 s; fitting unchanged (≈ 120 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _every_step(model, x, target, *, size, steps, seed, bounds, step_size, batch_size=256):
    import torch
    import torch.nn.functional as F

    from core.methods.detection import _bounds, patch_masks
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


def attack_bench(study, n: int) -> None:
    """The early exit against every step (see the module docstring)."""
    import torch

    from core.methods.detection import attack_targets, patch_attack
    from core.stages.detection import check_config, input_bounds
    data = study.data()
    model = study.model(study.subject).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = check_config(None)
    h, w = data.size
    size = max(1, round(min(h, w) / 4))
    bounds = input_bounds(data)
    x, y = data.test.x[:n].float(), data.test.y[:n]
    target = attack_targets(y, data.n_classes, 1)
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
    print(f"case {study.config.name}, {len(x)} images, {cfg['steps']} steps, patch {size}×{size}")
    print(f"leaving settled images  {t1 - t0:7.1f} s  ({stats['image_steps']} of {stats['full']} "
          f"image-steps, {stats['image_steps'] / stats['full']:.0%})")
    print(f"every step              {t2 - t1:7.1f} s")
    print(f"ratio                   {(t2 - t1) / (t1 - t0):7.2f}×   largest difference "
          f"{float((fast - full).abs().max()):.2e}")


def stage_bench(study, overrides: dict) -> None:
    """The whole stage, step by step (see the module docstring)."""
    import torch

    from core.stages.base import StageContext
    from core.stages.detection import build
    section = {**study.config.section("detection"), **overrides}
    section = {k: v for k, v in section.items() if v is not None}
    data = study.data()
    name = section.get("model") or study.subject
    marks = [(time.perf_counter(), time.process_time())]

    def progress(done, total, msg):
        now = (time.perf_counter(), time.process_time())
        print(f"[{done}/{total}] {now[0] - marks[-1][0]:7.1f} s wall {now[1] - marks[-1][1]:7.1f} s "
              f"CPU  then: {msg}", flush=True)
        marks.append(now)

    ctx = StageContext.standalone("detection", data, {name: study.model(name)}, section=section,
                                  experts=dict(study.config.experts), device=torch.device("cpu"),
                                  progress=progress)
    out = build(ctx)
    wall, cpu = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    print(f"stage: {wall:.1f} s wall, {cpu:.1f} s CPU ({torch.get_num_threads()} threads)")
    print("design:", json.dumps(out["evaluation"]))
    for title, rows, ranking in [("patch attack", out["rows"], out["ranking"])] + [
            (a["name"], a["rows"], a["ranking"]) for a in out["adaptive_attacks"]]:
        print(f"{title}: {ranking.get('verdict', 'no successful attack')}")
        for r in rows:
            print(f"  {r['detector']:22s} AUC {r['auc']:.3f} ({r['auc_low']:.3f}–{r['auc_high']:.3f})"
                  f"  TPR@5% {r['tpr_at_5']:.2f}  rank {r['rank']}  n {r['n_clean']}/{r['n_attacked']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decoy-mnist")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--stage", action="store_true", help="time the whole stage, step by step")
    ap.add_argument("--set", default="{}", help="JSON overrides of the [detection] section")
    args = ap.parse_args(argv)
    import torch

    from core.casestudy import CaseStudy
    torch.set_num_threads(1)
    study = CaseStudy.open(args.case, cache_dir=args.cache)
    if args.stage:
        stage_bench(study, json.loads(args.set))
    else:
        attack_bench(study, args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

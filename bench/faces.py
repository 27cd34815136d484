"""Measure the faces case: pretrained O-Net AUC, the watermark shortcut after fine-tuning, and the
attack detectors (``python -m bench.faces [--detect '{...}']``). Prints JSON; never run in tests.

Measured once (2-core shared CPU, default [dataset], seed 0):
- pretrained O-Net: AUC 1.0 and accuracy 1.0 on all 200 images and on the 50 test images;
- 3 epochs Adam 1e-3 on the 520 training rows: watermarked model 0.96 clean test, 0.52 with the
  watermark on test non-faces only (1 of 25 watermarked non-faces right), 0.78 on a random half;
  the reference (same fine-tuning on the clean copies) 1.00 on all three;
- detection on the pretrained O-Net (``{"model": "pretrained", "train_set": "clean",
  "eval_set": "clean_test", "layer": "onet.dense5", "expert_layer": "onet.conv4"}``), 12×12
  patches, 80 steps: success 0.72 on faces, 1.00 on non-faces; on 50 clean / 43 attacked held-out
  images AUC (TPR at 5% FPR): influence_combined 1.000 (1.00), influence_max_z 1.000 (1.00),
  influence_naive 0.901 (0.53), expert_concentration 0.635 (0.42), max_softmax 0.344 (0.00),
  mahalanobis 1.000 (1.00), mahalanobis_layers 1.000 (1.00); masking the experts' 12×12 window
  returned 67% of attacked images to the truth (clean images all stayed right).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from core.cases.faces.adapter import faces_data
from core.cases.faces.onet import FACE, pretrained_detector
from core.methods.training import evaluate, predict_logits, train_model


def auc(scores_pos, scores_neg) -> float:
    """Rank AUC of positives over negatives (ties count half)."""
    p = np.asarray(scores_pos)[:, None]
    n = np.asarray(scores_neg)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def measure_shortcut(dataset: dict, epochs: int = 3, lr: float = 1e-3, batch_size: int = 64) -> dict:
    """Pretrained, watermarked and reference models' accuracies on every evaluation set."""
    data = faces_data(dataset)
    out = {"n_train": data.train.n, "watermarked_rows": data.extra["train_watermarked"]}
    base = pretrained_detector()
    logits = predict_logits(base, data.evaluation_sets["clean_test"].x)
    y = data.evaluation_sets["clean_test"].y
    s = (logits[:, 0] - logits[:, 1]).numpy()
    out["pretrained_clean_test_auc"] = auc(s[y.numpy() == FACE], s[y.numpy() != FACE])
    models = {"pretrained": base}
    for name, set_name in (("watermarked", "train"), ("reference", "clean")):
        m = copy.deepcopy(base)
        split = data.training_sets[set_name]
        t0 = time.perf_counter()
        train_model(m, split.x, split.y, epochs=epochs, lr=lr, batch_size=batch_size, seed=0,
                    device="cpu")
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        models[name] = m
    for name, m in models.items():
        out[name] = {k: round(evaluate(m, v.x, v.y), 3) for k, v in data.evaluation_sets.items()}
    return out




def measure_detection(section: dict, dataset: dict | None = None) -> dict:
    """Run the detection stage on the pretrained O-Net with a stand-in context (no cache)."""
    from core.stages.base import StageContext
    from core.stages.detection import build

    data = faces_data(dataset or {})
    model = pretrained_detector()
    layers = ["onet.conv1", "onet.conv2", "onet.conv3", "onet.conv4", "onet.dense5"]
    ctx = StageContext.standalone(
        "detection", data, {"pretrained": model}, section=section, experts={"layers": layers},
        device=torch.device("cpu"), progress=lambda d, t, m: print(f"[{d}/{t}] {m}", flush=True))
    t0 = time.perf_counter()
    out = build(ctx)
    return {"seconds": round(time.perf_counter() - t0, 1), "rows": out["rows"],
            "features": out["features"], "attack": out["attack"], "masking": out["masking"],
            "adaptive": out["adaptive"], "fit": out["fit"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="{}", help="JSON [dataset] overrides")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--detect", default=None, help="JSON [detection] table: run the detection stage")
    args = ap.parse_args()
    if args.detect is not None:
        print(json.dumps(measure_detection(json.loads(args.detect), json.loads(args.dataset)),
                         indent=1))
    else:
        print(json.dumps(measure_shortcut(json.loads(args.dataset), args.epochs, args.lr), indent=1))

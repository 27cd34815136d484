"""What the faces case checks about every expert besides the region: how much of its
interpretation falls on the eyes, nose and mouth that O-Net's own landmark head finds, against
chance (issue 12, narrative 1). Called by the experts stage through ``CaseData.extra``."""

from __future__ import annotations

import torch

from .adapter import landmark_mass

RADIUS = 4.0  # pixels of the 48×48 input around each landmark


def expert_landmarks(ctx, results: dict) -> dict:
    """Per expert of the experts stage: the share of its interpretation's positive attribution
    within ``RADIUS`` px of the landmarks (all five, eyes, nose, mouth) on its images, and the
    disks' share of the image (what a uniform map scores). The landmarks come from the model the
    expert belongs to (``model.landmarks``), on the same test images. ``ctx`` is the experts
    stage's :class:`core.stages.base.StageContext`.

    Returns ``{"radius", "rows": [{"model", "layer", "class", "unit", "part", "mass", "chance",
    "ratio"}]}`` (plain JSON; ``ratio`` = mass / chance)."""
    data = ctx.data
    rows = []
    for name, r in results.items():
        model_name, layer, cls = name.split("/")
        model = ctx.model(model_name)
        if not hasattr(model, "landmarks") or len(r["indices"]) == 0:
            continue
        x = data.test.x[r["indices"]].to(ctx.device)
        with torch.no_grad():
            marks = model.landmarks(x).cpu()
        for i, ex in enumerate(r["rows"]):
            parts = landmark_mass(r["maps"][i], marks, RADIUS)
            for part, v in parts.items():
                mass, chance = float(v["mass"].mean()), float(v["chance"].mean())
                rows.append({"model": model_name, "layer": layer, "class": int(cls),
                             "unit": int(ex["unit"]), "part": part, "mass": mass,
                             "chance": chance, "ratio": mass / chance if chance > 0 else None})
    return {"radius": RADIUS, "rows": rows}

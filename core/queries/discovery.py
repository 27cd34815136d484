"""Discovery's masks on disk: what ``python -m core discover`` writes, on a built case.

:func:`discover_to_folder` reads the built ``discovery`` stage (or runs discovery on one model when
it is not built) and writes, per top candidate, a PNG mask per image at the image's path relative
to the data root (:func:`image_relpaths`), so that ``[region] masks = "<out>/<candidate>"`` feeds
the discovered region to every other stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.cases import sources
from core.methods.discovery import public_row, region_masks, write_masks
from core.stages.discovery import SPLITS, check_config, layer_of, run

__all__ = ["discover_to_folder", "image_relpaths"]


def image_relpaths(study) -> dict[str, list[str]]:
    """Each image's path relative to the data root, per split (``train``, ``val``, ``test``), in
    the split's row order: a folder source's own files (``test/cat/17.png`` with split folders,
    ``cat/17.png`` without); any other source ``<split>/<index>.png`` (index: the row in the
    split)."""
    data = study.data()
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if study.config.dataset.get("source") == "folder":
        try:
            return _folder_relpaths(study)
        except Exception:  # the listing could not be reproduced: fall back to indices
            pass
    return {s: [f"{s}/{i}.png" for i in range(sp.n)] for s, sp in splits.items()}


def _folder_relpaths(study) -> dict[str, list[str]]:
    """Reproduce the folder adapter's listing and split on the file indices (its own functions,
    run on an index tensor instead of the images), so row i of a split is file ``files[idx[i]]``."""
    dataset = sources.check_dataset({**study.config.dataset, "source": "folder"}, "[dataset]")
    listing = sources._list_folder(dataset, Path(study.config.base_dir))
    root, files = listing["root"], listing["files"]
    n = len(files)
    index = torch.arange(n)
    y = torch.tensor([label for _, label, _ in files], dtype=torch.int64)
    tags = None
    if listing["layout"] == "split":
        tags = np.asarray([sources.SPLIT_NAMES.index(part) for part, _, _ in files], dtype=np.int64)
    train, val, test = sources._make_splits(index, y, None, tags, dataset["split"],
                                            listing["classes"])
    rel = [Path(p).relative_to(root).as_posix() for _, _, p in files]
    out = {name: [rel[int(i)] for i in split.x] for name, split in
           (("train", train), ("val", val), ("test", test))}
    data = study.data()
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if len(out[name]) != split.n:
            raise ValueError("the folder listing does not match the data")
    return out


def discover_to_folder(study, out_dir: str | Path, model_name: str | None = None, top: int = 3,
                       progress=None) -> list[dict]:
    """Discovery on one model, written to ``out_dir``: ``candidates.json`` (the ranked list, every
    :data:`CONTRACT` field) and, for the top ``top`` candidates, ``<masks>/<relative path>.png``
    masks (255 = region) for every image of every split where the candidate is present; a
    missing file means no region on that image. Returns the list written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = model_name or study.subject
    candidates = _cached_candidates(study, name)
    if candidates is None:
        cfg = check_config(study.config.section("discovery") or {}, "config")
        candidates = run(study.model(name), name, study.data(), layer_of(study.config.experts, cfg),
                         cfg, progress)["candidates"]
    data = study.data()
    model = study.model(name)
    rel = image_relpaths(study)
    rows = []
    for row in candidates[:max(0, int(top))]:
        folder = out_dir / row["masks"]
        written = 0
        for split in SPLITS:
            x = getattr(data, split).x
            if len(x) == 0:
                continue
            masks, present = region_masks(model, x, row)
            written += write_masks(folder, masks, present, rel[split])
        pub = public_row(row)
        pub["n_mask_files"] = written
        rows.append(pub)
    (out_dir / "candidates.json").write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    return rows


def _cached_candidates(study, name: str) -> list[dict] | None:
    """The built stage's ranked candidates of model ``name`` with the rules their masks need, or
    None when the stage is not built for it (or its entry predates the stored rules)."""
    if not study.is_built("discovery"):
        return None
    payload = study.artifact("discovery") or {}
    rules = payload.get("rules") or {}
    if name not in ((payload.get("report") or {}).get("models") or {}):
        return None
    out = []
    for r in payload.get("rows") or []:
        if r.get("model") != name or r.get("kind") != "candidate":
            continue
        rule = rules.get(f"{name}/{r.get('rank')}")
        if rule is None:
            return None
        out.append({**r, "_rule": rule})
    return out

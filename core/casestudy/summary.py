"""The case study's report: DESIGN §2 JSON of what is built, read from the cache's meta lines.

:func:`report` computes nothing and unpickles no payload: each stage's meta line carries its
report rows; the models' metrics are aggregated over the seeds built (mean, sample SD, per seed).
"""

from __future__ import annotations

import importlib.util
import math
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from core.casestudy.registry import DELEGATED

__all__ = ["plain", "report"]


def report(study) -> dict:
    """DESIGN §2 JSON of what is built for ``study`` (a :class:`CaseStudy`); computes nothing
    (reads the cache: the entries' meta lines, which carry the report's numbers and rows, so no
    payload is unpickled). NaN and infinities are None; tensors are lists."""
    status = study.status()
    rep: dict[str, Any] = {"case": study.name, "title": study.config.title,
                           "description": study.config.description, "built": status,
                           "subject": study.subject, "reference": study.reference,
                           # which build budget's sections these results follow from
                           "budget": getattr(study, "budget", None) or {"preset": "full",
                                                                         "applied": {}}}
    prov: dict[str, Any] = {"torch": _torch_version(), "python": platform.python_version(),
                            "stages": {}, "seconds": {}}
    data_meta = study._meta(study._key("data"))
    if data_meta is not None:
        rep["data"] = dict(data_meta.get("describe", {}))
        rep["data"]["config"] = dict(study.config.dataset)
        if data_meta.get("facts"):
            rep["case_facts"] = dict(data_meta["facts"])
        _add_prov(prov, "data", data_meta.get("provenance"))
    seeds = study._seeds_to_report()
    metas = [study._meta(study._key("models", s)) for s in seeds]
    if metas and all(m is not None for m in metas):
        rep["models"] = _aggregate(metas, study.model_names)
        rep["seeds"] = seeds
        rep["training"] = {n: s.plain() for n, s in study.config.models.items()}
        for m in rep["training"].values():
            if m.get("checkpoint"):
                m["checkpoint"] = Path(m["checkpoint"]).name  # never a server path
        provs = [m.get("provenance") or {} for m in metas]
        _add_prov(prov, "models", {**provs[0], "seconds": round(sum(
            float(pv.get("seconds", 0.0)) for pv in provs), 3), "seeds": len(provs)})
        prov["device"] = provs[0].get("device")
    if status["experts"]:
        meta = study._meta(study._key("experts")) or {}
        if meta.get("rows") is not None:
            e = study.config.experts
            chance = study._chance()
            rep["experts"] = {
                "layer": e.get("primary_layer") or e["layers"][0],
                "layers": list(e["layers"]),
                "classes": list(meta.get("classes") or study.expert_classes()),
                "k": e["k"], "reduce": e["reduce"],
                "bootstrap": e["bootstrap"], "confidence": e["confidence"],
                "n_images": e["n_images"], "resolution": e["resolution"],
                "chance": chance, "shortcut_factor": e["shortcut_factor"],
                "shortcut_quantile": e["shortcut_quantile"],
                "shortcut_threshold": None if chance is None else
                e["shortcut_factor"] * chance,
                "shortcut_thresholds": dict(meta.get("thresholds") or {}),
                "shortcut_rule": study._rule(),
                "top": [dict(r) for r in meta["rows"]],
                "summary": _experts_summary(meta["rows"]),
            }
            if meta.get("checks"):
                rep["experts"]["checks"] = meta["checks"]
            control = e.get("control")
            if control and chance is not None:
                rep["experts"]["false_alarms"] = {
                    layer: {"model": control, "n": s["n"], "n_flagged": s["n_shortcut"],
                            "rate": s["n_shortcut"] / s["n"] if s["n"] else None}
                    for layer, s in rep["experts"]["summary"].get(control, {}).items()}
            _add_prov(prov, "experts", meta.get("provenance"))
    for stage in DELEGATED:
        if status[stage]:
            meta = study._meta(study._key(stage)) or {}
            rows = meta.get("rows")
            if rows is None:
                rows = (study.artifact(stage) or {}).get("rows")
            if rows is not None:
                rep[stage] = [plain(r) for r in rows]
                if meta.get("report"):
                    rep[f"{stage}_summary"] = meta["report"]
                _add_prov(prov, stage, meta.get("provenance"))
    rep["provenance"] = prov
    return plain(rep)


def _add_prov(prov: dict, stage: str, info: dict | None) -> None:
    if info:
        prov["stages"][stage] = dict(info)
        prov["seconds"][stage] = info.get("seconds")


def _aggregate(metas: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        per = [m["metrics"][name] for m in metas]
        row: dict[str, Any] = {}
        for metric in per[0]:
            vals = [p[metric] for p in per]
            if any(v is None for v in vals):
                row[metric] = None
                continue
            row[metric] = sum(vals) / len(vals)
            row[f"{metric}_sd"] = _sd(vals)
            row[f"{metric}_per_seed"] = vals
        row["n_seeds"] = len(per)
        row["digest"] = metas[0]["digests"][name]
        out[name] = row
    return out


def _experts_summary(rows: list[dict]) -> dict:
    """Per model and layer: how many top experts carry the shortcut (``n_shortcut``, by the mean
    region mass) and how many of all are undecided (``n_undecided``: their mass's interval over
    the images holds the threshold), their mean region mass (and its alias); ``n_shortcut`` and
    ``n_undecided`` None without a region."""
    out: dict = {}
    for r in rows:
        s = out.setdefault(r["model"], {}).setdefault(r["layer"], {"n": 0, "n_shortcut": 0,
                                                                   "_dm": []})
        s["n"] += 1
        if "shortcut" in r:
            s["n_shortcut"] += int(bool(r["shortcut"]))
            s["n_undecided"] = s.get("n_undecided", 0) + int(r.get("verdict") == "undecided")
        else:
            s["n_shortcut"] = s["n_undecided"] = None
        if r.get("region_mass") is not None:
            s["_dm"].append(r["region_mass"])
        s["_alias"] = next((k for k in r if k.endswith("_mass") and k != "region_mass"), None)
    for layers in out.values():
        for s in layers.values():
            dm = s.pop("_dm")
            alias = s.pop("_alias")
            s["share_shortcut"] = (s["n_shortcut"] / s["n"] if s["n"] else 0.0) \
                if s["n_shortcut"] is not None else None
            s["mean_region_mass"] = sum(dm) / len(dm) if dm else None
            if alias:
                s[f"mean_{alias}"] = s["mean_region_mass"]
    return out


def _sd(values: list[float]) -> float:
    """Sample standard deviation (n − 1); 0.0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _torch_version() -> str:
    """torch's version without importing it (when it is not imported yet)."""
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)

    spec = importlib.util.find_spec("torch")  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:  # torch/version.py holds the full version, with its local tag (e.g. +cu130)
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if found:
            return found.group(1)
    import torch

    return str(torch.__version__)


def plain(value: Any) -> Any:
    """JSON-safe copy: tensors/arrays → lists, NaN/inf → None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return value

"""The essence stage: essence curves, expert ablations and the region check of a case's models
(issue 14). The measurements live in :mod:`core.methods.essence` (re-exported here for the
importers of this module); this module owns the stage's declaration, its ``[essence]`` section
(:data:`DEFAULTS`, :func:`check_config`) and the orchestration (:func:`build`: which models,
layers, class pairs, fills and images, in the order that fixes the random draws).

Every summary row carries ``degenerate``: None, or why the essence test cannot discriminate on it
(:func:`core.methods.essence.degenerate`: every rule reaches the target at k = 1, or the whole
layer's binary accuracy is near chance on the evaluation images) — a reader says "cannot tell",
never "not concentrated", there.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from core.engine.devices import model_device
from core.methods.essence import (
    FILLS,
    _Cut,
    _order,
    _seed_for,
    ablation,
    ablation_table,
    binary_accuracy,
    causal_check,
    class_scores,
    comparative_scores,
    confusion,
    degenerate,
    essence_curve,
    k_grid,
    keep_units,
    masked_logits,
    most_confused_pairs,
    region_check,
    smallest_k,
    unit_fill,
)
from core.stages.base import Stage, StageContext

STAGE = Stage("essence", reads=("data", "models", "experts"), sections=("essence", "experts"),
              inputs=("seeds", "roles", "device"),
              quick={"random_draws": 5, "n_rank": 64, "n_eval": 300})

__all__ = [
    "DEFAULTS",
    "FILLS",
    "ablation",
    "ablation_table",
    "binary_accuracy",
    "build",
    "causal_check",
    "check_config",
    "class_scores",
    "comparative_scores",
    "confusion",
    "degenerate",
    "essence_curve",
    "keep_units",
    "k_grid",
    "masked_logits",
    "most_confused_pairs",
    "region_check",
    "smallest_k",
    "unit_fill",
]

# ------------------------------------------------------------------------------------- the stage


DEFAULTS: dict = {
    "pairs": [],  # extra [a, b] class pairs the case names (indices or class names), e.g. [[4, 9], [3, 8]]
    "n_confused": 2,  # plus the subject model's most-confused pairs on the validation split
    "layers": None,  # None: the experts stage's layers
    "models": None,  # None: the model under study only
    "ks": None,  # None: 1, 2, 4, … and always the layer's width
    "fills": ["mean", "zero"],  # what the removed units are set to (both: two variants)
    "by": "abs",  # essence ranking: |A − B| influence ("abs") or signed A − B ("value")
    "reduce": "sum",  # a channel's score: its spatial influence map summed ("sum") or "max"
    "random_draws": 20,  # seeded draws of k random units per k (curves, ablations, region check)
    "confidence": 0.9,  # of the random draws' interval
    "share": 0.95,  # smallest k reaching this share of the whole layer's binary accuracy
    "seed": 0,
    "n_eval": None,  # held-out images (the first n of the evaluation set); None: all
    "n_rank": 200,  # training images per class for the rankings and the mean fill
    "top_k": None,  # experts ablated per class; None: the experts stage's k (its own experts)
    "eval_set": None,  # None: the case's headline evaluation set
    "region": True,  # ablate the shortcut-carrying experts when the case has a region
}

_BOUNDS = {"n_confused": (0, 100), "random_draws": (1, 1000), "n_rank": (1, 100_000),
           "seed": (0, 2**31 - 1)}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(section: dict | None, where: str = "essence") -> dict:
    """The ``[essence]`` section over :data:`DEFAULTS`; a one-line ``ValueError`` naming ``where``
    for an unknown key or a bad value. Returns a new dict with every key of :data:`DEFAULTS`."""
    sec = dict(section or {})
    unknown = sorted(set(sec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    out = {**{k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}, **sec}

    def bad(key, what):
        raise ValueError(f"{where}.{key} must be {what}, got {out[key]!r}")

    for key, (lo, hi) in _BOUNDS.items():
        if not _int(out[key]) or not lo <= out[key] <= hi:
            bad(key, f"an integer in {lo}..{hi}")
    if out["top_k"] is not None and (not _int(out["top_k"]) or not 1 <= out["top_k"] <= 1000):
        bad("top_k", "an integer in 1..1000 (or absent: the experts stage's k)")
    if out["n_eval"] is not None and (not _int(out["n_eval"]) or out["n_eval"] < 2):
        bad("n_eval", "an integer ≥ 2 (or absent: all images)")
    for key in ("confidence", "share"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1 \
                or (key == "confidence" and v == 1):
            bad(key, "a number in (0, 1)" if key == "confidence" else "a number in (0, 1]")
        out[key] = float(v)
    if out["by"] not in ("abs", "value"):
        bad("by", "'abs' or 'value'")
    if out["reduce"] not in ("sum", "max"):
        bad("reduce", "'sum' or 'max'")
    if not isinstance(out["region"], bool):
        bad("region", "true or false")
    fills = out["fills"]
    if not isinstance(fills, list) or not fills or any(f not in FILLS for f in fills) \
            or len(set(fills)) != len(fills):
        bad("fills", f"a non-empty list of distinct values from {list(FILLS)}")
    for key in ("layers", "models"):
        v = out[key]
        if v is not None and (not isinstance(v, list) or not v
                              or any(not isinstance(x, str) or not x for x in v)):
            bad(key, "a non-empty list of names (or absent)")
    ks = out["ks"]
    if ks is not None:
        if not isinstance(ks, list) or not ks or any(not _int(k) or not 1 <= k <= 100_000 for k in ks):
            bad("ks", "a non-empty list of integers in 1..100000 (or absent: powers of 2)")
        out["ks"] = sorted(set(ks))
    if out["eval_set"] is not None and (not isinstance(out["eval_set"], str) or not out["eval_set"]):
        bad("eval_set", "the name of an evaluation set (or absent: the headline set)")
    pairs = out["pairs"]
    if not isinstance(pairs, list):
        bad("pairs", "a list of [a, b] class pairs")
    for p in pairs:
        if not isinstance(p, list | tuple) or len(p) != 2 \
                or any(not (_int(c) and c >= 0) and not (isinstance(c, str) and c) for c in p) \
                or p[0] == p[1]:
            raise ValueError(f"{where}.pairs must hold [a, b] pairs of two different classes "
                             f"(indices ≥ 0 or names), got {p!r}")
    out["pairs"] = [list(p) for p in pairs]
    return out


def _class_names(data, y: Tensor) -> list[str]:
    names = getattr(data, "class_names", None)
    if names:
        return [str(n) for n in names]
    return [str(i) for i in range(int(y.max()) + 1)]


def _class_index(c, names: list[str], where: str) -> int:
    if _int(c):
        if not 0 <= c < len(names):
            raise ValueError(f"{where}: class {c} is out of range (0..{len(names) - 1})")
        return int(c)
    if c in names:
        return names.index(c)
    raise ValueError(f"{where}: unknown class {c!r}; classes: {', '.join(names)}")


def _eval_split(data, name: str | None):
    sets = getattr(data, "evaluation_sets", None)
    if sets:
        name = name or getattr(data, "headline", None) or next(iter(sets))
        if name not in sets:
            raise ValueError(f"essence.eval_set {name!r} is not an evaluation set "
                             f"({', '.join(sets)})")
        return name, sets[name]
    if name not in (None, "test"):
        raise ValueError(f"essence.eval_set {name!r}: this case has only the test split")
    return "test", data.test


def _has_region(split) -> bool:
    """A split shows the region when it has masks and its images differ from the clean copies."""
    mask = getattr(split, "mask", None)
    if mask is None or not bool(mask.any()):
        return False
    clean = getattr(split, "x_clean", None)
    return clean is None or not torch.equal(clean, split.x)


def _region_sets(data, n_eval: int | None) -> dict:
    """{name: (x, y, shows the region)} for the region check; clean copies added when no set is
    without the region."""
    sets = dict(getattr(data, "evaluation_sets", None) or {"test": data.test})
    out = {}
    for name, s in sets.items():
        n = s.n if n_eval is None else min(s.n, n_eval)
        out[str(name)] = (s.x[:n], s.y[:n], _has_region(s))
    if all(r for _, _, r in out.values()):
        for name, s in sets.items():
            if getattr(s, "x_clean", None) is not None:
                n = s.n if n_eval is None else min(s.n, n_eval)
                out[f"{name}_clean"] = (s.x_clean[:n], s.y[:n], False)
    return out


def _stratified(x: Tensor, y: Tensor, per_class: int, classes) -> tuple[Tensor, Tensor]:
    idx = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in classes])
    idx = idx.sort().values
    return x[idx], y[idx]


def _partner(cm: Tensor, c: int) -> int:
    """The class most confused with ``c`` (either way); the next class when there is none."""
    both = (cm[c] + cm[:, c]).clone()
    both[c] = -1
    if int(both.max()) <= 0:
        return (c + 1) % cm.shape[0]
    return int(both.argmax())


def _experts_rows(ctx: StageContext) -> list[dict]:
    payload = ctx.artifact("experts")
    rows = payload.get("rows") if isinstance(payload, dict) else None
    return [dict(r) for r in rows] if isinstance(rows, list) else []


def _essence_pairs(cfg: dict, names: list[str], cm: Tensor, y_eval: Tensor,
                   eval_name: str) -> tuple[list[dict], list[dict]]:
    """``(pairs, skipped)``: the class pairs to measure — the case's ``pairs`` first, then the
    ``n_confused`` most confused pairs of the confusion matrix ``cm`` (each unordered pair once)
    — as ``{"a", "b", "source": "case" | "confused", "confusions", "a_name", "b_name"}``; a pair
    with no held-out image of one of its classes in ``y_eval`` goes to ``skipped`` with a
    ``"skipped"`` reason instead."""
    pairs, seen = [], set()
    for p in cfg["pairs"]:
        a, b = (_class_index(c, names, "essence.pairs") for c in p)
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            pairs.append({"a": a, "b": b, "source": "case", "confusions": int(cm[a, b] + cm[b, a])})
    for p in most_confused_pairs(None, None, None, len(seen) + cfg["n_confused"], matrix=cm):
        if len([q for q in pairs if q["source"] == "confused"]) >= cfg["n_confused"]:
            break
        if frozenset((p["a"], p["b"])) not in seen:
            seen.add(frozenset((p["a"], p["b"])))
            pairs.append({"a": p["a"], "b": p["b"], "source": "confused", "confusions": p["confusions"]})
    for p in pairs:
        p.update(a_name=names[p["a"]], b_name=names[p["b"]])
        missing = [names[c] for c in (p["a"], p["b"]) if not bool((y_eval == c).any())]
        if missing:
            p["skipped"] = f"no held-out images of {', '.join(missing)} in {eval_name}"
    skipped = [p for p in pairs if "skipped" in p]
    return [p for p in pairs if "skipped" not in p], skipped


class _Run:
    """What every (model, layer) of one essence build shares: the settings, the evaluation
    images, the pairs, the experts stage's rows, the region sets, the results so far and the
    progress count."""

    def __init__(self, ctx: StageContext, cfg: dict, **shared):
        self.ctx, self.cfg, self.data = ctx, cfg, ctx.data
        self.__dict__.update(shared)
        self.curves, self.rows, self.ablations, self.regions, self.summary = [], [], [], [], []
        self.done, self.total = 0, 0

    def tick(self, msg: str) -> None:
        self.done += 1
        self.ctx.progress(self.done, self.total, msg)

    def measure(self, mname: str, model: nn.Module, layer: str) -> None:
        """Every measurement of ``model`` at ``layer``, in the order that fixes the random draws:
        the essence curves of every pair, then per fill the expert ablations and the region
        check."""
        cfg = self.cfg
        cut = _Cut(model, layer)
        z_eval = cut.slice(self.x_eval)
        # ablation fills: "mean" over n_rank training images per class
        fills = {f: unit_fill(model, layer, f, self.x_fill) if f == "mean"
                 else unit_fill(model, layer, f, z=z_eval) for f in cfg["fills"]}
        region_slices: dict = {}  # filled by region_check, reused across the fills
        for p in self.pairs:
            self.pair_curves(mname, model, layer, p, cut, z_eval)
        class_units, source = self.class_experts(mname, model, layer)
        other = {c: _partner(self.cm, c) for c in self.classes}
        other = {c: o for c, o in other.items() if o in class_units}
        for fill in cfg["fills"]:
            self.ablate(mname, model, layer, fill, fills, class_units, source, other, cut, z_eval)
            self.tick(f"{mname} {layer}: ablations ({fill})")
            if self.do_region:
                rc = self.region(mname, model, layer, fill, fills, cut, region_slices)
                rc["model"] = mname
                self.regions.append(rc)
                self.tick(f"{mname} {layer}: region check ({fill})")

    def pair_curves(self, mname: str, model: nn.Module, layer: str, p: dict, cut: _Cut,
                    z_eval: Tensor) -> None:
        """The essence curve of pair ``p`` for every fill (units ranked once, by comparative
        influence over ``n_rank`` training images per class), each with its summary row."""
        cfg, data, eval_name = self.cfg, self.data, self.eval_name
        a, b = p["a"], p["b"]
        xa = data.train.x[data.train.y == a][:cfg["n_rank"]]
        xb = data.train.x[data.train.y == b][:cfg["n_rank"]]
        scores = comparative_scores(model, layer, torch.cat([xa, xb]), a, b, reduce=cfg["reduce"])
        pseed = _seed_for(self.seed, mname, layer, a, b)
        for fill in cfg["fills"]:
            c = essence_curve(model, layer, xa, xb, self.x_eval, self.y_eval, a, b, ks=cfg["ks"],
                              fill=fill, random_draws=self.draws, seed=pseed, by=cfg["by"],
                              reduce=cfg["reduce"], confidence=self.conf, scores=scores, _cut=cut,
                              _z_eval=z_eval)
            c.update(model=mname, a_name=p["a_name"], b_name=p["b_name"], pair_source=p["source"],
                     eval_set=eval_name)
            self.curves.append(c)
            sk = smallest_k(c, cfg["share"])
            self.rows.append({"model": mname, "layer": layer, "a": a, "b": b, "a_name": p["a_name"],
                              "b_name": p["b_name"], "pair_source": p["source"], "fill": fill,
                              "width": c["width"], "full_acc": c["full"], "share": cfg["share"],
                              "k_top": sk["top"], "k_random": sk["random"], "k_bottom": sk["bottom"],
                              "k_random_high": sk["random_high"], "top1_acc": c["top"][0],
                              "random1_acc": c["random"]["median"][0], "n_eval": c["n_eval"],
                              "seed": pseed, "eval_set": eval_name})
            self.rows[-1]["degenerate"] = degenerate(self.rows[-1])
            self.tick(f"{mname} {layer}: {p['a_name']} vs {p['b_name']} ({fill})")

    def class_experts(self, mname: str, model: nn.Module, layer: str) -> tuple[dict, dict]:
        """``(class_units, source)``: each class's top-k expert units at ``layer`` — the experts
        stage's when it ranked k of them ("experts stage"), else ranked here by class influence
        over ``n_rank`` training images of the class ("computed")."""
        cfg, data, experts_cfg, top_k = self.cfg, self.data, self.experts_cfg, self.top_k
        own = {c: sorted((r for r in self.erows if r.get("model") == mname and r.get("layer") == layer
                          and int(r.get("class", -1)) == c), key=lambda r: r.get("rank", 0))
               for c in self.classes}
        class_units, source = {}, {}
        for c in self.classes:
            if len(own[c]) >= top_k:
                class_units[c] = [int(r["unit"]) for r in own[c][:top_k]]
                source[c] = "experts stage"
            else:
                xc = data.train.x[data.train.y == c][:cfg["n_rank"]]
                s = class_scores(model, layer, xc, c, reduce=experts_cfg.get("reduce", cfg["reduce"]))
                by = experts_cfg.get("by", "value")
                class_units[c] = _order(s, by)[:min(top_k, len(s))].tolist()
                source[c] = "computed"
        return class_units, source

    def ablate(self, mname: str, model: nn.Module, layer: str, fill: str, fills: dict,
               class_units: dict, source: dict, other: dict, cut: _Cut, z_eval: Tensor) -> None:
        """The :func:`ablation_table` of every class's experts with ``fill`` (against random
        units and the most-confused class's experts), and the (model, layer, fill) summary."""
        names, eval_name, rows = self.names, self.eval_name, self.rows
        table = ablation_table(model, layer, self.x_eval, self.y_eval, class_units, fill=fills[fill],
                               other=other, random_draws=self.draws, seed=_seed_for(self.seed, mname),
                               confidence=self.conf, _cut=cut, _z=z_eval)
        for r in table:
            r.update(model=mname, class_name=names[r["class"]], ranking_source=source[r["class"]],
                     fill=fill, eval_set=eval_name)
        self.ablations += table
        beats = [r["beats_random"] for r in table if r["beats_random"] is not None]
        mine = [r for r in rows if r["model"] == mname and r["layer"] == layer and r["fill"] == fill]
        self.summary.append({"model": mname, "layer": layer, "fill": fill, "n_classes": len(table),
                             "classes_beating_random": int(sum(beats)),
                             "experts_beat_random": bool(beats) and sum(beats) > len(beats) / 2,
                             "mean_acc_drop": _mean([r["experts"]["acc_drop"] for r in table]),
                             "mean_random_acc_drop": _mean([r["random"]["acc_drop"]["median"]
                                                            for r in table if r["random"]["acc_drop"]]),
                             "pairs": len(mine),
                             "k_top": [r["k_top"] for r in mine],
                             "k_random": [r["k_random"] for r in mine],
                             **_degenerate_summary(mine)})

    def region(self, mname: str, model: nn.Module, layer: str, fill: str, fills: dict, cut: _Cut,
               region_slices: dict) -> dict:
        """The :func:`region_check` of the layer's experts that the experts stage flags as
        shortcut carriers (each unit once, by rank then class), or an empty entry with a note
        when there are none."""
        draws = self.draws
        units = []
        for r in sorted((r for r in self.erows if r.get("model") == mname and r.get("layer") == layer
                         and r.get("shortcut")), key=lambda r: (r.get("rank", 0), r["class"])):
            if int(r["unit"]) not in units:
                units.append(int(r["unit"]))
        if units:
            rc = region_check(model, layer, units, self.region_sets, fill=fills[fill],
                              random_draws=draws, seed=_seed_for(self.seed, mname),
                              confidence=self.conf, _cut=cut, _slices=region_slices)
            rc["fill"] = fill
            return rc
        return {"layer": layer, "units": [], "fill": fill, "sets": [], "region_drop": None,
                "clean_drop": None, "region_minus_clean": None, "region_moves_more": None,
                "random_draws": draws,
                "seed": None, "note": "no expert of this layer carries the shortcut"}


def build(ctx: StageContext) -> dict:
    """Essence curves, expert ablations and the region check for the case's models and layers.

    Reads its section (:func:`check_config`), the data, the models and the experts stage's rows. For
    each model (default: the subject) and layer (default: the experts layers): for each pair (the
    case's ``pairs`` + the subject's ``n_confused`` most confused pairs on the validation split) and
    fill, an :func:`essence_curve` on the held-out images of the two classes (rankings and mean fill
    over ``n_rank`` training images per class); for each fill, an :func:`ablation_table` of every
    class's top-k experts (the experts stage's when it has k of them, else ranked here by class
    influence over the class's training images) against random units and the most-confused class's
    experts, on the evaluation set; with a region, a :func:`region_check` of the experts the experts
    stage flags as shortcut carriers.

    Returns plain JSON only: {"rows": one summary per (model, pair, layer, fill) with the smallest
    k per rule and ``degenerate`` (None, or why the test cannot discriminate there:
    :func:`core.methods.essence.degenerate`), "curves", "ablation", "region", "summary" (per
    model, layer, fill, with ``n_degenerate`` and ``degenerate``: the reasons when every pair
    row is degenerate), "degenerate" (the same over all rows, with ``n_rows``), "pairs",
    "seeds", "config", "provenance"}.
    """
    t0 = time.perf_counter()
    cfg = check_config(ctx.section, "essence")
    data = ctx.data
    names = _class_names(data, data.train.y)
    n_classes = len(names)
    subject = ctx.subject
    models = cfg["models"] or [subject]
    experts_cfg = dict(ctx.experts)
    layers = cfg["layers"] or list(experts_cfg.get("layers") or [])
    if not layers:
        raise ValueError("essence: no layers (set essence.layers or experts.layers)")
    classes = [int(c) for c in experts_cfg.get("classes") or range(n_classes)]
    top_k = int(cfg["top_k"] or experts_cfg.get("k") or 5)
    eval_name, ev = _eval_split(data, cfg["eval_set"])
    n = ev.n if cfg["n_eval"] is None else min(ev.n, cfg["n_eval"])
    x_eval, y_eval = ev.x[:n], ev.y[:n].long().cpu()
    x_fill, _ = _stratified(data.train.x, data.train.y, cfg["n_rank"], range(n_classes))
    draws, seed, conf = cfg["random_draws"], cfg["seed"], cfg["confidence"]

    # Pairs: the case's, then the subject's most confused (on the validation split).
    pick = data.val if data.val.n else ev  # no validation split: the evaluation set itself
    cm = confusion(ctx.model(subject), pick.x, pick.y, n_classes)
    pairs, skipped = _essence_pairs(cfg, names, cm, y_eval, eval_name)

    erows = _experts_rows(ctx)
    region_sets = _region_sets(data, cfg["n_eval"]) if cfg["region"] else {}
    do_region = bool(region_sets) and any(r for _, _, r in region_sets.values())
    run = _Run(ctx, cfg, names=names, classes=classes, top_k=top_k, experts_cfg=experts_cfg,
               eval_name=eval_name, x_eval=x_eval, y_eval=y_eval, x_fill=x_fill, draws=draws,
               seed=seed, conf=conf, cm=cm, pairs=pairs, erows=erows, region_sets=region_sets,
               do_region=do_region)
    run.total = len(models) * len(layers) * (len(pairs) * len(cfg["fills"]) + len(cfg["fills"])
                                             * (2 if do_region else 1))
    ctx.progress(0, run.total, "essence: ranking units")
    for mname in models:
        model = ctx.model(mname)
        for layer in layers:
            run.measure(mname, model, layer)
    seconds = time.perf_counter() - t0
    return {"rows": run.rows, "curves": run.curves, "ablation": run.ablations, "region": run.regions,
            "summary": run.summary,
            "degenerate": {"n_rows": len(run.rows), **_degenerate_summary(run.rows)},
            "pairs": pairs, "skipped_pairs": skipped, "confusion": cm.tolist(),
            "seeds": {"seed": seed, "random_draws": draws,
                      "rule": "torch.Generator(CPU) seeded per measurement: seed·1000003 + "
                              "crc32(model/layer/a/b or model/layer/kind/k) mod 1000003; "
                              "each curve and ablation row records its own"},
            "config": {**cfg, "layers": layers, "models": models, "eval_set": eval_name, "top_k": top_k,
                       "n_eval": int(n), "classes": classes},
            "provenance": {"seconds": round(seconds, 3), "device": str(model_device(ctx.model(subject)))}}


def _degenerate_summary(rows: list[dict]) -> dict:
    """``{"n_degenerate", "degenerate"}`` of a (model, layer, fill)'s pair rows: how many cannot
    discriminate, and — when all of them cannot — their reasons (else None)."""
    reasons = [r.get("degenerate") for r in rows]
    flagged = [x for x in reasons if x]
    return {"n_degenerate": len(flagged),
            "degenerate": "; ".join(dict.fromkeys(flagged)) if rows and len(flagged) == len(rows)
            else None}


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None

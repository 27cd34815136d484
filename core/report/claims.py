"""The claims a report makes, each with the tolerance its own evidence gives it.

A README or report number is a *claim* only as far as its evidence carries it: an accuracy on n
images is known to about its binomial standard error, a mean over seeds to its seeds' spread, a
threshold that is a 95% quantile of 50 experts to its bootstrap interval. Two builds of the same
code and config on different CPUs train to slightly different weights; they make the same claims
when every number lies within the other's tolerance, every verdict word is the same, and every
count lies inside the other's interval. :func:`claims` lists a report's claims; :func:`compare`
says which claims of an older build a newer one breaks.

A claim is a plain dict (JSON):

- ``{"key", "kind": "exact", "value"}``: names, sizes, configured values — must be equal.
- ``{"key", "kind": "number", "value", "tol", "why"}``: ``|new − old| ≤ max(tol_old, tol_new)``.
- ``{"key", "kind": "interval", "value", "low", "high", "why"}`` (accuracies, counts,
  thresholds): the claims agree when either value lies inside the other's interval.
- ``{"key", "kind": "verdict", "value", "fragile": reason | None}``: the word must be equal,
  unless either side is fragile (its evidence sits within a factor of ten of the test's α, or its
  seeds disagree): a fragile verdict is a tie in waiting and is counted, not compared.
- ``{"key", "kind": "grid", "value", "why", "fragile"?}`` (the smallest k of a doubling grid):
  equal or one step apart (``None`` = no k reached it); the essence's k's are fragile (the
  crossing of a curve whose steps lie within binomial noise: measured to move up to 16x between
  a 1- and a 2-thread build), counted and not held to.

Imports no torch; deterministic (the bootstrap is seeded).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterable

from core.methods.shortcut import quantile
from core.report.health import near_chance_threshold

__all__ = ["FRAGILE_FACTOR", "claims", "compare", "wilson"]

Z = 1.959963984540054  # two-sided 95%
FRAGILE_FACTOR = 10.0  # a verdict whose p-value is within this factor of α is not a firm claim
STATED = 0.02  # tolerance of a metric whose row carries no spread of its own (stated as such)
BOOT = 2000


def wilson(p: float, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a binomial proportion ``p`` observed on ``n``
    trials at the two-sided level of ``z`` (default 95%); (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def _num(key: str, value, tol: float, why: str) -> dict | None:
    if value is None:
        return {"key": key, "kind": "exact", "value": None}
    return {"key": key, "kind": "number", "value": float(value), "tol": float(tol), "why": why}


def _acc(key: str, p, n: int, sd: float | None = None) -> dict | None:
    """An accuracy on ``n`` images: its Wilson 95% interval, widened to two seeds' sd when the
    seeds spread more (an accuracy of 1.0 on 60 images still has an interval: 0.94–1)."""
    if p is None:
        return _num(key, None, 0, "")
    lo, hi = wilson(p, n)
    sd = sd or 0.0
    why = f"Wilson 95% (n {n})" + (f", widened to 2 × seeds' sd {sd:.3g}" if
                                   2 * sd > min(p - lo, hi - p) else "")
    return {"key": key, "kind": "interval", "value": float(p), "low": min(lo, p - 2 * sd),
            "high": max(hi, p + 2 * sd), "why": why}


def _fragile(p: float | None, alpha: float | None, seeds: Iterable[str] | None = None) -> str | None:
    seeds = list(seeds or [])
    if len(set(seeds)) > 1:
        return "its seeds disagree (" + ", ".join(seeds) + ")"
    if p is None or not alpha:
        return None
    if alpha / FRAGILE_FACTOR <= p <= alpha * FRAGILE_FACTOR:
        return f"p {p:.2g} within a factor {FRAGILE_FACTOR:g} of α {alpha:g}"
    return None


def _verdict(key: str, word, fragile: str | None = None) -> dict:
    return {"key": key, "kind": "verdict", "value": word, "fragile": fragile}


def _split_size(data: dict, set_name: str) -> int:
    """The number of images behind an accuracy named after an evaluation set."""
    name = set_name.removesuffix("_acc")
    if name.startswith("train") or name.endswith("train"):
        return int(data.get("n_train") or 0)
    if name.endswith("val") or name.startswith("val"):
        return int(data.get("n_val") or 0)
    return int(data.get("n_test") or 0)


def _data_claims(rep: dict) -> list[dict]:
    d = rep.get("data") or {}
    out = [{"key": f"data.{k}", "kind": "exact", "value": d.get(k)}
           for k in ("source", "n_train", "n_val", "n_test")]
    facts = rep.get("case_facts") or {}
    out.append({"key": "data.classes", "kind": "exact", "value": facts.get("classes")})
    out.append({"key": "data.region", "kind": "exact", "value": facts.get("region")})
    if facts.get("chance") is not None:
        out.append(_num("data.chance", facts["chance"], 1e-9, "configured"))
    return out


def _model_claims(rep: dict) -> list[dict]:
    out, data = [], rep.get("data") or {}
    for name, m in (rep.get("models") or {}).items():
        for k, v in m.items():
            if k.endswith("_acc"):
                out.append(_acc(f"models.{name}.{k}", v, _split_size(data, k), m.get(f"{k}_sd")))
    return out


def threshold_boot(ref: list[float], floor: float, q: float, seed: int = 0,
                   n_boot: int = BOOT) -> list[float]:
    """Bootstrap replicates of the shortcut rule's threshold max(floor, quantile q of ``ref``),
    resampling the reference model's experts with replacement (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_boot):
        s = sorted(rng.choice(ref) for _ in ref)
        out.append(max(floor, quantile(s, q)) if q > 0 else floor)
    return out


def _interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    s = sorted(values)
    lo = s[int(math.floor((1 - level) / 2 * (len(s) - 1)))]
    hi = s[int(math.ceil((1 + level) / 2 * (len(s) - 1)))]
    return lo, hi


def expert_intervals(e: dict, reference: str | None, seed: int = 0) -> dict:
    """Per layer: the threshold's bootstrap interval; per (model, layer): the flagged count's and
    the mean region mass's bootstrap intervals, resampling the reference's experts (for the
    threshold) and the model's experts together. Returns ``{"thresholds": {layer: (lo, hi)},
    "counts": {(model, layer): (lo, hi)}, "means": {(model, layer): (lo, hi)}}``."""
    top = e.get("top") or []
    out: dict = {"thresholds": {}, "counts": {}, "means": {}}
    chance = e.get("chance")
    factor, q = e.get("shortcut_factor") or 0.0, e.get("shortcut_quantile") or 0.0
    for layer in e.get("layers") or []:
        ref = [r["region_mass"] for r in top if r["model"] == reference and r["layer"] == layer
               and r.get("region_mass") is not None]
        boots = None
        if chance is not None:
            floor = factor * chance
            boots = threshold_boot(ref, floor, q, seed) if ref and q > 0 else [floor] * BOOT
            out["thresholds"][layer] = _interval(boots)
        for model in (e.get("summary") or {}):
            mass = [r["region_mass"] for r in top if r["model"] == model and r["layer"] == layer
                    and r.get("region_mass") is not None]
            if not mass:
                continue
            rng = random.Random(zlib.crc32(f"{seed}:{model}:{layer}".encode()))
            counts, means = [], []
            for b in range(BOOT):
                s = [rng.choice(mass) for _ in mass]
                means.append(sum(s) / len(s))
                if boots is not None:
                    counts.append(sum(1 for m in s if m > boots[b]))
            out["means"][(model, layer)] = _interval(means)
            if counts:
                out["counts"][(model, layer)] = _interval(counts)
    return out


def _expert_claims(rep: dict) -> list[dict]:
    e = rep.get("experts")
    if not e:
        return []
    out = [{"key": f"experts.{k}", "kind": "exact", "value": e.get(k)}
           for k in ("layers", "k", "bootstrap", "shortcut_rule")]
    iv = expert_intervals(e, rep.get("reference"))
    for layer, th in (e.get("shortcut_thresholds") or {}).items():
        lo, hi = iv["thresholds"].get(layer, (th, th))
        out.append({"key": f"experts.threshold.{layer}", "kind": "interval", "value": th,
                    "low": lo, "high": hi, "why": "bootstrap over the reference's experts"})
    for model, layers in (e.get("summary") or {}).items():
        for layer, s in layers.items():
            base = f"experts.{model}.{layer}"
            out.append({"key": f"{base}.n", "kind": "exact", "value": s.get("n")})
            if s.get("n_shortcut") is not None:
                lo, hi = iv["counts"].get((model, layer), (s["n_shortcut"], s["n_shortcut"]))
                out.append({"key": f"{base}.n_shortcut", "kind": "interval",
                            "value": s["n_shortcut"], "low": lo, "high": hi,
                            "why": "bootstrap over experts and the threshold"})
            m = s.get("mean_region_mass")
            if m is not None:
                lo, hi = iv["means"].get((model, layer), (m, m))
                out.append({"key": f"{base}.mean_region_mass", "kind": "interval", "value": m,
                            "low": lo, "high": hi, "why": "bootstrap over experts"})
            cells = [r for r in (e.get("top") or []) if r["model"] == model and r["layer"] == layer]
            flat = sum(1 for r in cells if r.get("ci_low") is not None and r["ci_low"] == r["ci_high"])
            n = len(cells) or 1
            half = 2 * math.sqrt(n * (flat / n) * (1 - flat / n)) + 1
            out.append({"key": f"{base}.zero_width", "kind": "interval", "value": flat,
                        "low": flat - half, "high": flat + half, "why": "binomial over experts"})
    return out


def _metric(key: str, row: dict, k: str) -> dict | None:
    """A metric: two SEs over images when the row has them, else two seeds' sd when there are
    several seeds, else the stated tolerance (named as such)."""
    v = row.get(k)
    se, sd = row.get(f"{k}_se"), row.get(f"{k}_sd")
    if isinstance(se, int | float) and se > 0:
        return _num(key, v, 2 * se + 5e-4, "2 × SE over images")
    if isinstance(sd, int | float) and (row.get("n_seeds") or 1) > 1:
        return _num(key, v, max(2 * sd, 0.005), "2 × seeds' sd")
    return _num(key, v, STATED, f"stated ±{STATED} (the row carries no spread)")


def _representation_claims(rep: dict) -> list[dict]:
    out = []
    for r in rep.get("representations") or []:
        base = f"representations.{r['model']}.{r['method']}"
        if r.get("error"):
            out.append({"key": f"{base}.error", "kind": "exact", "value": bool(r["error"])})
            continue
        for k in ("region_mass", "wrong_reason", "rank_accuracy", "deletion_auc",
                  "insertion_auc", "mprt_spearman", "sparseness"):
            if k in r:
                out.append(_metric(f"{base}.{k}", r, k))
    return out


def _correction_claims(rep: dict) -> list[dict]:
    rows = rep.get("corrections") or []
    out, data = [], rep.get("data") or {}
    for r in rows:
        base = f"corrections.{r['method']}"
        out.append({"key": f"{base}.uses_mask", "kind": "exact", "value": r.get("uses_mask")})
        out.append({"key": f"{base}.uses", "kind": "exact", "value": r.get("uses")})
        if r.get("error"):
            out.append({"key": f"{base}.error", "kind": "exact", "value": bool(r["error"])})
            continue
        head = f"{r.get('headline') or 'test'}_acc"
        n = int(r.get("paired_n") or _split_size(data, head))
        out.append(_acc(f"{base}.{head}", r.get(head), n, r.get(f"{head}_sd")))
        alpha = r.get("paired_alpha")
        for side in ("paired", "paired_reference"):
            d, se = r.get(f"{side}_delta"), r.get(f"{side}_delta_se")
            if d is None:
                continue
            out.append(_num(f"{base}.{side}_delta", d, 2 * (se or 0) + 0.5 / max(n, 1),
                            "2 × paired SE"))
            seeds = r.get("paired_verdict_per_seed") if side == "paired" else None
            out.append(_verdict(f"{base}.{side}_verdict", r.get(f"{side}_verdict"),
                                _fragile(r.get(f"{side}_p_value"),
                                         r.get(f"{side}_alpha", alpha), seeds)))
        per_seed = r.get("paired_verdict_per_seed") or []
        for i, word in enumerate(per_seed):
            out.append(_verdict(f"{base}.seed{i}.verdict", word, _fragile(None, alpha, per_seed)))
        gap, subj, ref = r.get("gap_closed"), r.get("subject_acc"), r.get("reference_acc")
        if gap is not None and subj is not None and ref is not None and abs(ref - subj) > 0:
            se = r.get("paired_delta_se") or 0.0
            tol = max(2 * se / abs(ref - subj), 2 * (r.get("gap_closed_sd") or 0.0)) + 0.005
            out.append(_num(f"{base}.gap_closed", gap, tol, "2 × paired SE / the gap, or 2 × "
                            "seeds' sd"))
        if r.get("region_mass") is not None:
            out.append(_metric(f"{base}.region_mass", r, "region_mass"))
        out.append(_strength(base, r))
    s = rep.get("corrections_summary") or {}
    pair = s.get("best_vs_runner_up")
    if pair and pair.get("delta") is not None:
        per = s.get("best_vs_runner_up_per_seed") or []
        frag = _fragile(pair.get("p_value"), pair.get("alpha"), [p["verdict"] for p in per])
        out.append(_verdict("corrections.best_vs_runner_up.verdict", s.get("verdict"), frag))
        ranking = f"{s.get('best')} > {s.get('runner_up')}"
        out.append(_verdict("corrections.best_vs_runner_up.ranking", ranking,
                            None if s.get("verdict") == "better" else
                            "a tie: the order of the two is not significant"))
        out.append(_num("corrections.best_vs_runner_up.delta", pair["delta"],
                        2 * (pair.get("delta_se") or 0) + 0.5 / max(pair.get("n") or 1, 1),
                        "2 × paired SE"))
    return out


def _strength(base: str, r: dict) -> dict:
    """The chosen strength: a choice on the validation split. Firm when several seeds all chose
    it, or when the row carries its grid and the choice beats the runner-up by more than two
    SEs of the difference; otherwise fragile (counted, not held to)."""
    word = f"{r.get('strength_name') or ''} {r.get('strength')}".strip()
    per = r.get("strength_per_seed") or []
    if len(per) > 1:
        return _verdict(f"{base}.strength", word, None if len(set(map(str, per))) == 1 else
                        "its seeds chose different strengths (" + ", ".join(map(str, per)) + ")")
    accs = sorted((g.get("val_acc") for g in r.get("grid") or [] if g.get("val_acc") is not None),
                  reverse=True)
    n = r.get("val_n")
    if len(accs) < 2 or not n:
        return _verdict(f"{base}.strength", word, None if len(accs) == 1 else
                        "one seed, and the validation grid's margin is not in the report")
    margin, p = accs[0] - accs[1], accs[0]
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return _verdict(f"{base}.strength", word, None if margin > 2 * se * math.sqrt(2) else
                    f"the runner-up strength is within noise on the validation split "
                    f"(margin {margin:.3f}, n {n})")


def _essence_claims(rep: dict) -> list[dict]:
    out = []
    for r in rep.get("essence") or []:
        base = f"essence.{r.get('model')}.{r.get('layer')}.{r.get('a_name')}-{r.get('b_name')}." \
               f"{r.get('fill')}"
        if r.get("error"):
            out.append({"key": f"{base}.error", "kind": "exact", "value": bool(r["error"])})
            continue
        n = int(r.get("n_eval") or 0)
        out.append(_acc(f"{base}.full_acc", r.get("full_acc"), n))
        for k in ("k_top", "k_random", "k_bottom"):
            if k in r:
                # k is where a curve measured on n_eval images first crosses the target; the
                # steps near it lie within binomial noise of each other, so a 1- vs 2-thread
                # build moved k by up to 16x (3 of 72 rows, DecoyMNIST): counted, not held to
                out.append({"key": f"{base}.{k}", "kind": "grid", "value": r[k],
                            "why": "one step of the doubling grid",
                            "fragile": f"a crossing of a curve measured on {n} images"})
        if "degenerate" in r:
            out.append(_essence_reading(base, r, n))
        if r.get("pair_source") == "confused":
            for c in out[-5 if "degenerate" in r else -4:]:
                c["data_driven"] = "the pair is chosen from the model's confusions"
    return out


def _essence_reading(base: str, r: dict, n: int) -> dict:
    """Whether an essence row can tell ("cannot tell" when the stage flags it degenerate, else
    "can tell"): firm only when the whole layer's Wilson 95% interval lies below the near-chance
    threshold (:func:`core.report.health.near_chance_threshold` at 50%, the rule the stage
    applies); otherwise it rests on the fragile smallest k's or on an interval that holds the
    threshold, and is counted, not held to."""
    word = "cannot tell" if r.get("degenerate") else "can tell"
    full = r.get("full_acc")
    if isinstance(full, int | float) and n:
        lo, hi = wilson(float(full), n)
        threshold = near_chance_threshold(0.5, n)
        if hi < threshold:
            return _verdict(f"{base}.reading", word, None)
        why = ("the whole layer's interval holds the near-chance threshold" if lo < threshold
               else "rests on the smallest k's (crossings within binomial noise)")
    else:
        why = "no whole-layer accuracy"
    return _verdict(f"{base}.reading", word, why)


def _discovery_claims(rep: dict) -> list[dict]:
    """Per model: whether any candidate is suspected, and the top candidate's class when it is
    (verdict claims: fragile when the top candidate's p-value is within the factor of its
    corrected α, or one of its effects' margins over the control is within two SEs of its
    threshold). Ranks and effects of single candidates are not claims: which region comes
    second follows the clustering of noisy maps."""
    out = []
    summary = rep.get("discovery_summary") or {}
    rows = [r for r in rep.get("discovery") or [] if r.get("kind") == "candidate"]
    for name, info in (summary.get("models") or {}).items():
        mine = [r for r in rows if r.get("model") == name]
        reason = None
        if mine:
            top = mine[0]
            reason = _fragile(top.get("p_value"), top.get("alpha_corrected"))
            th = top.get("thresholds") or {}
            for key, limit in (("necessity", th.get("min_effect")),
                               ("sufficiency", th.get("min_sufficiency", th.get("min_effect")))):
                n, v, c = top.get(f"{key}_n") or 0, top.get(key), top.get(f"control_{key}")
                if limit is None or v is None or c is None or not n:
                    continue
                se = math.sqrt(max(v * (1 - v) + c * (1 - c), 1e-12) / n)
                if abs(v - c - limit) <= 2 * se:
                    reason = reason or f"its {key} margin is within 2 SE of {limit:g}"
        suspected = bool(info.get("n_suspected"))
        out.append(_verdict(f"discovery.{name}.any_suspected", suspected, reason))
        if suspected and mine:
            out.append(_verdict(f"discovery.{name}.top_class", mine[0].get("class"), reason))
    return out


def _detection_claims(rep: dict) -> list[dict]:
    out = []
    for r in rep.get("detection") or []:
        base = f"detection.{r.get('detector')}"
        out.append({"key": f"{base}.layer", "kind": "exact", "value": r.get("layer")})
        if r.get("error") or r.get("auc") is None:
            out.append({"key": f"{base}.error", "kind": "exact", "value": bool(r.get("error"))})
            continue
        n0, n1 = int(r.get("n_clean") or 0), int(r.get("n_attacked") or 0)
        a = float(r["auc"])
        # Hanley & McNeil (1982): the AUC's standard error from the two sample sizes
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        se = math.sqrt(max(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a), 0.0)
                       / max(n0 * n1, 1))
        out.append(_num(f"{base}.auc", a, 2 * se + 5e-4, "2 × Hanley–McNeil SE"))
        for k in ("tpr_at_1", "tpr_at_5", "tpr_at_25"):
            if r.get(k) is not None:
                out.append(_acc(f"{base}.{k}", r[k], n1))
        out.append({"key": f"{base}.n_clean", "kind": "exact", "value": n0})
        half = 2 * math.sqrt(max(n1, 1)) + 1
        out.append({"key": f"{base}.n_attacked", "kind": "interval", "value": n1,
                    "low": n1 - half, "high": n1 + half, "why": "attack successes: ±2√n"})
    return out


def claims(rep: dict) -> list[dict]:
    """Every claim the report's Markdown makes (see the module docstring for the kinds), in a
    stable order; computed from ``rep`` (:meth:`CaseStudy.report`) alone."""
    parts = (_data_claims, _model_claims, _expert_claims, _representation_claims,
             _correction_claims, _essence_claims, _detection_claims, _discovery_claims)
    return [c for part in parts for c in part(rep) if c is not None]


def _agree(old: dict, new: dict) -> str | None:
    """None when ``new`` makes the claim ``old`` makes, else why not (one line)."""
    kind, a, b = old["kind"], old.get("value"), new.get("value")
    if kind != new["kind"]:
        if a is None and b is None:
            return None
        return f"{a!r} → {b!r}"
    if kind == "exact":
        return None if a == b else f"{a!r} → {b!r}"
    if kind == "verdict":
        if a == b or old.get("fragile") or new.get("fragile"):
            return None
        return f"verdict {a!r} → {b!r}"
    if kind == "number":
        tol = max(old["tol"], new["tol"])
        return None if abs(a - b) <= tol + 1e-12 else f"{a:.4g} → {b:.4g} (tolerance ±{tol:.3g}: " \
            f"{old.get('why')})"
    if kind == "interval":
        if old["low"] - 1e-12 <= b <= old["high"] + 1e-12 or \
                new["low"] - 1e-12 <= a <= new["high"] + 1e-12:
            return None
        return f"{a:.4g} → {b:.4g}, outside [{old['low']:.4g}, {old['high']:.4g}] ({old.get('why')})"
    if kind == "grid":
        if a == b or old.get("fragile") or new.get("fragile"):
            return None
        if a is None or b is None:
            return f"k {a} → {b}"
        return None if max(a, b) <= 2 * min(a, b) else f"k {a} → {b} (more than one grid step)"
    return f"unknown kind {kind}"  # pragma: no cover


def compare(old: list[dict], new: list[dict]) -> tuple[list[str], dict]:
    """Which of ``old``'s claims ``new`` breaks: (problems, counts). A claim present on one side
    only is a problem (a row or column came or went), except a data-driven one (e.g. the essence
    pairs picked from the confusions), which is counted. ``counts`` has ``compared``,
    ``fragile`` (verdicts not held to) and ``data_driven``."""
    by_new = {c["key"]: c for c in new}
    by_old = {c["key"]: c for c in old}
    problems, counts = [], {"compared": 0, "fragile": 0, "data_driven": 0}
    for key, c in by_old.items():
        other = by_new.get(key)
        if other is None:
            if c.get("data_driven"):
                counts["data_driven"] += 1
            else:
                problems.append(f"{key}: gone from the build")
            continue
        counts["compared"] += 1
        if c["kind"] in ("verdict", "grid") and (c.get("fragile") or other.get("fragile")):
            counts["fragile"] += 1
        why = _agree(c, other)
        if why:
            problems.append(f"{key}: {why}")
    for key, c in by_new.items():
        if key not in by_old:
            if c.get("data_driven"):
                counts["data_driven"] += 1
            else:
                problems.append(f"{key}: new in the build")
    return problems, counts

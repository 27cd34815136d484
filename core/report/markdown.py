"""The report as Markdown, and the README's generated blocks (no number typed by hand).

    python -m core report decoy-mnist --markdown     # the block for one case, on stdout
    python -m core readme                            # rewrite every generated block of README.md
    python -m core readme --check                    # exit 1 when a block differs from the build

A generated block sits between ``<!-- report:CASE -->`` and ``<!-- /report:CASE -->``; everything
in it comes from :meth:`core.casestudy.CaseStudy.report` (which reads the cache, never computes).
Imports no torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from core.report.claims import _split_size, expert_intervals, wilson
from core.report.degenerate import CANNOT_TELL, cannot_tell, essence_cannot_tell

__all__ = ["BLOCK", "drift", "markdown", "readme_blocks", "set_by", "stamped", "update_readme"]

BLOCK = re.compile(r"(<!-- report:(?P<case>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=case) -->)",
                   re.S)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(row: dict, key: str, digits: int = 3) -> str:
    v, sd = row.get(key), row.get(f"{key}_sd")
    if v is None:
        return "–"
    return f"{v:.{digits}f} ± {sd:.{digits}f}" if isinstance(sd, float) and row.get(
        "n_seeds", 1) > 1 else f"{v:.{digits}f}"


def _ci(v: float | None, lo: float, hi: float, integer: bool = False) -> str:
    """``v (lo–hi)`` with no digit the interval does not support: the last printed decimal is
    the first one the interval's half-width reaches (1 to 3 decimals)."""
    if v is None:
        return "–"
    if integer:
        return f"{v} ({max(0, math.floor(lo))}–{math.ceil(hi)})"
    half = max((hi - lo) / 2, 1e-9)
    d = min(3, max(1, math.ceil(-math.log10(half))))
    return f"{v:.{d}f} ({lo:.{d}f}–{hi:.{d}f})"


def _pct(v: float | None, lo: float | None = None, hi: float | None = None) -> str:
    """A share as ``v% (lo–hi%)`` with no digit the interval does not support: the last printed
    digit is the first one the interval's half-width reaches (tens of points to two decimals);
    ``v%`` to one decimal without an interval."""
    if v is None:
        return "–"
    if lo is None or hi is None or hi - lo <= 1e-12:  # no interval, or a constant (the floor)
        return f"{100 * v:.1f}%"
    half = max(100 * (hi - lo) / 2, 1e-9)
    d = min(2, math.ceil(-math.log10(half)))  # below 0: tens (or more) of points
    if d < 0:
        return "{}% ({}–{}%)".format(*(f"{round(100 * t, d):.0f}" for t in (v, lo, hi)))
    return f"{100 * v:.{d}f}% ({100 * lo:.{d}f}–{100 * hi:.{d}f}%)"


_INLINE = re.compile(r"([\\`*_\[\]<>$!~|])")
_PIPE = re.compile(r"(?<!\\)((?:\\\\)*)\|")


_ADDRESS = re.compile(r"(?i)(?<=www)(?=\.)|(?<=[@:])")  # where a bare address would autolink


def _inline(text) -> str:
    """A case-supplied string (a class, region, model or layer name) as inert Markdown on one
    line: whitespace, a newline too, collapsed to one space; every character that could open a
    link, an image, emphasis, code, HTML or math, or end a table cell, escaped with a backslash;
    an invisible word joiner (U+2060) after ``:`` and ``@`` and inside ``www.``, so that no web or
    e-mail address in it autolinks."""
    return _ADDRESS.sub("\u2060", _INLINE.sub(r"\\\1", " ".join(str(text).split())))


def _with_region(text: str, rep: dict) -> str:
    """``text`` (a rule the pipeline wrote) with the case's region name in it made inert."""
    region = (rep.get("case_facts") or {}).get("region")
    return text.replace(region, _inline(region)) if isinstance(region, str) and region else text


def _cell(text: str) -> str:
    """One table cell: on one line, and a ``|`` not already escaped escaped (so no cell splits)."""
    return _PIPE.sub(lambda m: m.group(1) + "\\|", " ".join(str(text).split()))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return out


def _label(key: str) -> str:
    return key[:-4].replace("_", " ") if key.endswith("_acc") else key.replace("_", " ")


def _data(rep: dict) -> list[str]:
    d, facts = rep.get("data") or {}, rep.get("case_facts") or {}
    if not d:
        return []
    classes = facts.get("classes") or []
    shown = ", ".join(map(_inline, classes[:10])) + (", …" if len(classes) > 10 else "")
    line = (f"**Data** ({d.get('source')}): {d.get('n_train')} training, {d.get('n_val')} "
            f"validation and {d.get('n_test')} test images")
    if facts:
        line += (f" of {facts.get('channels')}×{facts['size'][0]}×{facts['size'][1]}, "
                 f"{len(classes)} classes ({shown})")
    if facts.get("region"):
        line += (f"; region: the {_inline(facts['region'])} (chance share of the image "
                 f"{_f(facts.get('chance'), 4)})")
    elif facts:
        line += "; no region (no localisation metrics or shortcut verdicts)"
    return [line + "."]


def _models(rep: dict) -> list[str]:
    models = rep.get("models") or {}
    if not models:
        return []
    first = next(iter(models.values()))
    facts = rep.get("case_facts") or {}
    head = facts.get("headline")
    order = ["train", *([head] if head else []), *(facts.get("evaluation_sets") or [])]
    rank = {f"{name}_acc": i for i, name in reversed(list(enumerate(order)))}
    keys = sorted((k for k in first if k.endswith("_acc")), key=lambda k: (rank.get(k, 99), k))
    n = len(rep.get("seeds") or [0])
    roles = {rep.get("subject"): "under study", rep.get("reference"): "reference"}
    rows = [[_inline(name) + (f" ({roles[name]})" if name in roles and name and name != roles[name]
                              else "")]
            + [_pm({**m, "n_seeds": n}, k) for k in keys] for name, m in models.items()]
    note = f" (mean ± sd over {n} seeds)" if n > 1 else " (one seed)"
    out = [f"**Models**{note}, accuracy:", ""] + _table(["model", *map(_label, keys)], rows)
    data = rep.get("data") or {}
    hkey = f"{head}_acc" if head and f"{head}_acc" in first else (keys[1] if len(keys) > 1 else None)
    if hkey:
        cells = []
        for name, m in models.items():
            if m.get(hkey) is None:
                continue
            lo, hi = wilson(m[hkey], _split_size(data, hkey))
            sd = m.get(f"{hkey}_sd") or 0.0
            cells.append(f"{_inline(name)} "
                         f"{_ci(m[hkey], min(lo, m[hkey] - 2 * sd), max(hi, m[hkey] + 2 * sd))}")
        out += ["", f"Headline ({_label(hkey)}, {_split_size(data, hkey)} images) with its 95% "
                "interval (Wilson, widened to ±2 sd where the seeds spread more): "
                + "; ".join(cells) + "."]
    small = sorted({(k.removesuffix("_acc"), _split_size(data, k)) for k in keys
                    if 0 < _split_size(data, k) < 100}, key=lambda t: t[0])
    if small:
        out += ["", "Small evaluation sets (under 100 images; one binomial SE at 50% accuracy): "
                + ", ".join(f"{_label(name)} {n_} images (±{50 / math.sqrt(n_):.0f} points)"
                            for name, n_ in small) + "."]
    return out


def set_by(e: dict, layer: str) -> str | None:
    """Which term of the shortcut rule set ``layer``'s threshold in the experts section ``e`` of
    a report: "the floor (5 × chance)" when the threshold is the floor, else "the reference's
    95% quantile"; None when the section does not say (no chance or no threshold)."""
    th = (e.get("shortcut_thresholds") or {}).get(layer)
    chance, factor = e.get("chance"), e.get("shortcut_factor")
    if th is None or chance is None or factor is None:
        return None
    floor = float(factor) * float(chance)
    if abs(th - floor) <= 1e-12 * max(1.0, floor):
        return f"the floor ({factor:g} × chance)"
    q = e.get("shortcut_quantile")
    return f"the reference's {q:.0%} quantile" if q is not None else "the reference's quantile"


def _experts(rep: dict) -> list[str]:
    e = rep.get("experts")
    if not e:
        return []
    out = [f"**Experts**: top {e['k']} units per class by distributional influence (class logit, "
           f"DoI = the class's training images), {e['bootstrap']} bootstrap resamples, at "
           f"{', '.join(map(_inline, e['layers']))}."]
    top = e.get("top") or []
    iv = expert_intervals(e, rep.get("reference"))
    rows = []
    for layer in e["layers"]:
        for model, layers in (e.get("summary") or {}).items():
            s = layers.get(layer)
            if s is None:
                continue
            cells = [r for r in top if r["model"] == model and r["layer"] == layer]
            flat = sum(1 for r in cells if r.get("ci_low") is not None and r["ci_low"] == r["ci_high"])
            th = (e.get("shortcut_thresholds") or {}).get(layer)
            count = "–"
            if s.get("n_shortcut") is not None:
                lo, hi = iv["counts"].get((model, layer), (s["n_shortcut"], s["n_shortcut"]))
                count = f"{s['n_shortcut']}/{s['n']} ({max(0, math.floor(lo))}–{math.ceil(hi)})"
            th_cell = _pct(th) if th is None or layer not in iv["thresholds"] else \
                _pct(th, *iv["thresholds"][layer])
            by = set_by(e, layer) if th is not None else None
            if by:
                th_cell += f", {by}"
            mm = s.get("mean_region_mass")
            mm_cell = _pct(mm, *iv["means"][(model, layer)]) if mm is not None and \
                (model, layer) in iv["means"] else _pct(mm)
            undecided = "–" if s.get("n_undecided") is None else f"{s['n_undecided']}/{s['n']}"
            rows.append([_inline(layer), _inline(model), count, undecided, th_cell, mm_cell,
                         f"{flat}/{s['n']}"])
    if e.get("shortcut_rule"):
        out.append("")
        out.append(f"Rule: {_with_region(e['shortcut_rule'], rep)}.")
    out.append("")
    out += _table(["layer", "model", "experts carrying the shortcut (95% interval)",
                   "undecided (mass interval holds the threshold)",
                   "threshold (95% interval), set by",
                   "mean region mass (95% interval)",
                   "zero-width intervals"], rows)
    if iv["thresholds"]:
        wide = [layer for layer, (lo, hi) in iv["thresholds"].items()
                if hi - lo > 0.5 * max((e.get("shortcut_thresholds") or {}).get(layer) or 0, 1e-9)]
        out += ["", "Intervals: bootstrap over the experts (2000 resamples; the threshold's "
                "resamples the reference's experts, the counts resample both)."
                + (f" The threshold is unstable at {', '.join(map(_inline, wide))} (its "
                   "interval is wider than "
                   "half its value): a count there depends on a cut the evidence does not fix."
                   if wide else " Every layer's threshold is stable to within half its value.")]
    fa = e.get("false_alarms")
    if fa:
        model = next(iter(fa.values()))["model"]
        out.append("")
        model = " ".join(str(model).replace("`", "'").split())  # inside a code span
        out.append(f"False alarms of the rule: `{model}` is a model that does not use the region "
                   "(see its accuracies above); the share of its experts the rule flags, per "
                   "layer (95% bootstrap interval): " + ", ".join(
                       f"{_inline(layer)} {v['n_flagged']}/{v['n']}" + (
                           " ({}–{})".format(*map(round, iv["counts"][(model, layer)]))
                           if (model, layer) in iv["counts"] else "")
                       for layer, v in fa.items()) + ".")
    out.append("")
    out.append("A zero-width bootstrap interval is degenerate evidence, not stability: at a layer "
               "whose influence is a fixed weight row times a gate, resampling the images cannot "
               "move the score.")
    return out


_DIRECTION = {
    "region_mass": "high on a model that uses the region (faithful), low on one that does not",
    "wrong_reason": "as region mass", "rank_accuracy": "as region mass",
    "deletion_auc": "↓ (faithful: deleting the top pixels drops the score fast)",
    "insertion_auc": "↑ (faithful)", "mprt_spearman": "↓ (the map depends on the weights)",
    "sparseness": "↑ (concentrated)",
}


def _representations(rep: dict) -> list[str]:
    rows = rep.get("representations") or []
    if not rows:
        return []
    metrics = [k for k in ("region_mass", "wrong_reason", "rank_accuracy", "deletion_auc",
                           "insertion_auc", "mprt_spearman", "sparseness") if k in rows[0]]
    out = ["**Representations compared** (what each column asks: " + "; ".join(
        f"{k.replace('_', ' ')} {_DIRECTION[k]}" for k in metrics) + "):", ""]
    out += _table(["model", "method", *[k.replace("_", " ") for k in metrics]],
                  [[_inline(r["model"]), r.get("label", r["method"]),
                    *[_f(r.get(k)) for k in metrics]]
                   for r in rows])
    if not any(f"{k}_se" in rows[0] for k in metrics):
        out += ["", "These means carry no interval of their own (one pass over the images, no "
                "resampling): read differences under 0.02 as ties; the README check holds them "
                "to ±0.02."]
    return out


def _corrections(rep: dict) -> list[str]:
    rows = rep.get("corrections") or []
    if not rows:
        return []
    head = rows[0].get("headline") or (rep.get("case_facts") or {}).get("headline") or "test"
    hkey = f"{head}_acc"
    others = [k for k in rows[0] if k.endswith("_acc") and k != hkey and "val" not in k
              and k not in ("subject_acc", "reference_acc") and not k.startswith(
                  (f"{rep.get('subject')}_", f"{rep.get('reference')}_"))]
    n = rows[0].get("n_seeds", 1)
    out = [f"**Corrections** of the model under study ({'one seed' if n == 1 else f'{n} seeds'}; "
           "strengths chosen on the validation split, never the test set; Δ = paired "
           f"difference from the model under study on the {_label(hkey)} images ± its standard "
           "error" + (" (seed 0; every seed's verdict beside it)" if n > 1 else "")
           + "; a verdict is \"tie\" unless the exact McNemar p-value is below α):", ""]
    table = []
    for r in rows:
        alpha = r.get("paired_alpha")
        verdict = r.get("paired_verdict") or "–"
        if r.get("paired_p_value") is not None:
            verdict += f" (p {r['paired_p_value']:.2g}, α {alpha:g})"
        delta = "–" if r.get("paired_delta") is None else \
            f"{r['paired_delta']:+.3f} ± {r['paired_delta_se']:.3f}"
        if n > 1 and r.get("paired_delta_per_seed"):
            verdict += " · per seed: " + ", ".join(r.get("paired_verdict_per_seed") or [])
        ref = "–" if r.get("paired_reference_delta") is None else \
            f"{r['paired_reference_delta']:+.3f} ± {r['paired_reference_delta_se']:.3f} " \
            f"{r.get('paired_reference_verdict')} (p {r['paired_reference_p_value']:.2g})"
        table.append([r.get("label", r["method"]), r.get("uses") or _f(r.get("uses_mask")),
                      f"{r.get('strength_name') or ''} {_f(r.get('strength'), 3)}".strip(),
                      _pm(r, hkey), delta, verdict, ref, *[_pm(r, k) for k in others],
                      _f(r.get("gap_closed"), 2), _f(r.get("region_mass"))])
    out += _table(["method", "uses", "strength", _label(hkey), "Δ vs under study",
                   "verdict", "Δ vs reference", *map(_label, others), "gap closed",
                   "region mass after"], table)
    labels = {r.get("method"): r.get("label", r.get("method")) for r in rows}
    for method, why in (rep.get("corrections_cannot_tell") or {}).items():
        if method in labels:
            out += ["", f"{labels[method]}: whether it helps — {cannot_tell(why)}; its row is "
                        "the first strength of the grid, not a tuned result."]
    n_eval = int(rows[0].get("paired_n") or _split_size(rep.get("data") or {}, hkey))
    cells = []
    for r in rows:
        if r.get(hkey) is None:
            continue
        lo, hi = wilson(r[hkey], n_eval)
        sd = r.get(f"{hkey}_sd") or 0.0
        cells.append(f"{r.get('label', r['method'])} "
                     f"{_ci(r[hkey], min(lo, r[hkey] - 2 * sd), max(hi, r[hkey] + 2 * sd))}")
    out += ["", f"{_label(hkey).capitalize()} with its 95% interval ({n_eval} images; Wilson, "
            "widened to ±2 sd of the seeds): " + "; ".join(cells) + "."]
    summary = rep.get("corrections_summary") or {}
    pair = summary.get("best_vs_runner_up")
    if pair and pair.get("delta") is not None:
        names = {r["method"]: r.get("label", r["method"]) for r in rows}
        line = (f"Best vs runner-up on the {_label(hkey)} images: **{names.get(summary['best'])}** "
                f"vs **{names.get(summary['runner_up'])}**, Δ {pair['delta']:+.3f} ± "
                f"{pair['delta_se']:.3f} (p {pair['p_value']:.2g})")
        per = summary.get("best_vs_runner_up_per_seed") or []
        if len(per) > 1:
            line += "; per seed " + ", ".join(f"{p['delta']:+.3f} {p['verdict']}" for p in per)
        out += ["", f"{line}: **{summary.get('verdict')}** ({summary.get('rule')})."]
    return out


COLUMNS = {
    "essence": (["model", "layer", "a_name", "b_name", "fill", "full_acc", "k_top", "k_random",
                 "k_bottom", "reading"],
                "accuracy of A vs B with only the top k units of a layer kept (the others at their "
                "mean or zero): the whole layer's binary accuracy, and the smallest k reaching 95% "
                "of it keeping the top experts by comparative influence, random units (median of "
                "the draws) and the bottom units; – where no k reaches it; reading: cannot tell "
                "where the test is degenerate (below the table)"),
    "detection": (["detector", "uses_influence", "layer", "auc", "tpr_at_1", "tpr_at_5",
                   "tpr_at_25", "n_clean", "n_attacked"],
                  "adversarial patches against the model, detected on held-out images; TPR at 1, "
                  "5 and 25% false-positive rate"),
}


_CASE_KEYS = {"model", "layer", "a_name", "b_name"}  # cells that hold a case's own names


def _summary_section(rep: dict, stage: str, title: str) -> list[str]:
    rows = rep.get(stage) or []
    if not rows:
        return []
    wanted, what = COLUMNS.get(stage, ([], ""))
    derived = DERIVED.get(stage, {})
    keys = [k for k in wanted if k in rows[0] or k in derived] or \
        [k for k in rows[0] if not isinstance(rows[0][k], dict | list)][:9]
    rows = [{**r, **{k: f(r) for k, f in derived.items()}} for r in rows]
    head = f"**{title}** ({what}):" if what else f"**{title}**:"
    out = [head, ""] + _table([k.replace("_", " ") for k in keys],
                              [[_inline(r.get(k)) if k in _CASE_KEYS and isinstance(r.get(k), str)
                                else _f(r.get(k)) for k in keys] for r in rows[:48]])
    notes = _DEGENERATE.get(stage, lambda rows: [])(rows)
    ranking = (rep.get(f"{stage}_summary") or {}).get("ranking")
    if stage == "detection" and isinstance(ranking, dict) and ranking.get("verdict"):
        # the stage's own ranking (image-level bootstrap, ties as ties) replaces the estimate
        notes = [n for n in notes if not n.startswith("Best AUC")] + [
            f"Ranking ({ranking.get('method') or 'bootstrap'}): {ranking['verdict']}."]
    return out + (["", *notes] if notes else [])


def _essence_reading(row: dict) -> str:
    """An essence row in words: cannot tell (the stage's ``degenerate``), else whether fewer top
    experts than random units reach the target (``top < random``) or not."""
    if row.get("error"):
        return "–"
    if row.get("degenerate"):
        return CANNOT_TELL
    top, rnd = row.get("k_top"), row.get("k_random")
    if top is None:
        return "top never reaches it"
    return "top < random" if rnd is None or top < rnd else "top ≥ random"


def _essence_notes(rows: list[dict]) -> list[str]:
    """Name the essence rows that cannot discriminate (the stage's ``degenerate`` flag, computed
    from its own numbers: every rule at k = 1, or the whole layer near chance)."""
    ok = [r for r in rows if not r.get("error")]
    flat = essence_cannot_tell(ok)
    if not flat:
        return []
    reasons = list(dict.fromkeys(r["degenerate"].split("; ")[0] if "k = 1" in r["degenerate"]
                                 else "the whole layer near chance" for r in flat))
    accs = sorted({round(r["full_acc"], 2) for r in flat if r.get("full_acc") is not None})
    scope = "every row" if len(flat) == len(ok) else f"{len(flat)} of {len(ok)} rows"
    return [f"In {scope}: {cannot_tell('degenerate: ' + '; '.join(reasons))} — the whole "
            f"layer's accuracy there is {', '.join(map(str, accs))}, so the test cannot tell "
            "essence from chance, and these rows say nothing about whether the essence is "
            "concentrated."]


DERIVED = {"essence": {"reading": _essence_reading}}  # columns computed from a row's own fields


def _detection_notes(rows: list[dict]) -> list[str]:
    """Name a saturated detector table (a baseline at AUC 1) and detectors that cannot be told
    apart (the best's 95% interval overlaps the runner-up's; Hanley–McNeil SEs)."""
    ok = [r for r in rows if r.get("auc") is not None]
    if not ok:
        return []
    notes = []
    sat = [r["detector"] for r in ok if not r.get("uses_influence") and r["auc"] >= 0.995]
    if sat:
        notes.append(f"Saturated: {', '.join(sat)} (baselines without influence) reach AUC "
                     "1.0, so this benchmark cannot rank detectors.")

    def ci(r):
        a, n0, n1 = r["auc"], int(r.get("n_clean") or 0), int(r.get("n_attacked") or 0)
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        se = math.sqrt(max(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a), 0)
                       / max(n0 * n1, 1))
        return a - 1.96 * se, a + 1.96 * se

    ranked = sorted(ok, key=lambda r: -r["auc"])
    if len(ranked) > 1:
        (lo1, hi1), (lo2, hi2) = ci(ranked[0]), ci(ranked[1])
        a, b = ranked[0], ranked[1]
        tied = lo1 <= hi2
        notes.append(f"Best AUC: {a['detector']} {_ci(a['auc'], lo1, min(hi1, 1.0))} vs "
                     f"{b['detector']} {_ci(b['auc'], lo2, min(hi2, 1.0))} (95%, Hanley–McNeil): "
                     + ("their intervals overlap — they cannot be told apart on these images."
                        if tied else "the intervals separate them."))
    return notes


_DEGENERATE = {"essence": _essence_notes, "detection": _detection_notes}


def _discovery(rep: dict) -> list[str]:
    """Mask-free suspects: per model its headline and top candidates with their causal effects
    (95% Wilson intervals) against the same-shape control, the verdict and, when the case has a
    region, the IoU with it; the rule below the table."""
    rows = [r for r in rep.get("discovery") or [] if r.get("kind") == "candidate"]
    summary = rep.get("discovery_summary") or {}
    models = summary.get("models") or {}
    if not models:
        return []
    out = ["**Suspects found without masks** (the experts' maps grouped per class, a region per "
           "group, tested by cause on held-out images against the same region at random places):",
           ""]
    iou = any("region_iou" in r for r in rows)
    header = ["model", "rank", "class", "verdict", "necessity", "control", "sufficiency",
              "control", "share of image"] + (["IoU with the case's region"] if iou else [])
    table = []
    for name in models:
        mine = [r for r in rows if r.get("model") == name][:3]
        for r in mine:
            cells = [_inline(name), str(r.get("rank")), _inline(r.get("class")),
                     str(r.get("verdict"))]
            for key in ("necessity", "control_necessity", "sufficiency", "control_sufficiency"):
                lo, hi = (r.get(f"{key}_ci") or [None, None])[:2]
                cells.append(_ci(r.get(key), lo, hi) if lo is not None else _f(r.get(key), 2))
            cells.append(f"{r.get('share_of_image', 0):.1%}")
            if iou:
                cells.append(_f(r.get("region_iou"), 2))
            table.append(cells)
        if not mine:
            table.append([_inline(name), "–", "–", "no candidate"] + ["–"] * (len(header) - 4))
    out += _table(header, table)
    heads = "; ".join(f"{_inline(n)}: {i.get('headline')} ({i.get('n_suspected', 0)} suspected of "
                      f"{i.get('n_candidates', 0)})" for n, i in models.items())
    alarms = summary.get("false_alarms") or {}
    out += ["", f"Per model: {heads}."]
    if alarms.get("models"):
        out += [f"False alarms: {alarms.get('n_flagged', 0)} of {len(alarms['models'])} models "
                f"other than the one under study have a suspect."]
    if summary.get("rule"):
        out += [f"Rule: {_with_region(summary['rule'], rep)}."]
    return out


def markdown(rep: dict) -> str:
    """The case's results as Markdown (tables and a few sentences), every number from ``rep``
    (:meth:`CaseStudy.report`)."""
    parts = [_data(rep), _models(rep), _experts(rep), _discovery(rep), _representations(rep),
             _corrections(rep),
             _summary_section(rep, "essence", "Essence and causal check"),
             _summary_section(rep, "detection", "Attacks and their detection")]
    # (no timings here: they change from run to run; bench/ measures them)
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


FINGERPRINT = re.compile(r"<!-- code and config: (\w+) -->")
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?")


def stamped(block: str, fingerprint: str) -> str:
    """The block with its code-and-config fingerprint on its first line."""
    return f"<!-- code and config: {fingerprint} -->\n{block}"


def drift(old: str, new: str, tolerance: float = 0.02) -> list[str]:
    """Why two generated blocks differ, or [] when they agree: the fingerprint must be equal
    (code or config changed without regenerating), the words equal, and every number within
    ``tolerance`` (absolute; relative above 1) — the tolerance absorbs floating-point
    differences between machines, never a typed or stale number from other code."""
    problems = []
    fo, fn = FINGERPRINT.search(old), FINGERPRINT.search(new)
    if (fo and fo.group(1)) != (fn and fn.group(1)):
        problems.append(f"fingerprint {fo and fo.group(1)} ≠ {fn and fn.group(1)} (code or config "
                        "changed since the block was generated)")
    if NUMBER.sub("#", old) != NUMBER.sub("#", new):
        problems.append("the text differs (rows, columns or words)")
        return problems
    for a, b in zip(NUMBER.findall(old), NUMBER.findall(new), strict=True):
        x, y = float(a.replace("−", "-")), float(b.replace("−", "-"))
        if abs(x - y) > tolerance * max(1.0, abs(y)):
            problems.append(f"{a} ≠ {b}")
    return problems


def readme_blocks(text: str) -> list[str]:
    """The case names of the generated blocks in a README text, in order."""
    return [m.group("case") for m in BLOCK.finditer(text)]


def update_readme(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- report:CASE -->`` block's body replaced by ``blocks[CASE]``."""
    def swap(m: re.Match) -> str:
        case = m.group("case")
        body = blocks.get(case, m.group("body"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(swap, text)


def readme_path() -> Path:
    return Path(__file__).resolve().parents[2] / "README.md"

"""The study's findings in a few sentences, built from ``study.report()`` alone (plain data).

:func:`findings` answers what a reader of the first chapter or the HTML export wants before any
table: is the model worth explaining, where the shortcut lives (layer, counts with intervals),
which corrections close the gap (ties stated as ties), what the essence and detection stages
showed, and what the study could not tell. Every number comes from the report; nothing is
computed beyond counting and a Wilson interval. Each finding names the chapter that shows it
(``link``: an app page and its query parameters, and the HTML export's section id), so the app
draws a deep link and the export an in-page one. The texts are plain (no Markdown); callers
escape them for their medium.
"""

from __future__ import annotations

import math
from typing import Any

from core.report.degenerate import cannot_tell, essence_cannot_tell
from core.report.health import warnings as health_warnings

__all__ = ["CONFIDENCE", "findings", "wilson"]

CONFIDENCE = 0.90
_Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054}
SMALL_SET = 100  # an evaluation set under this many images is named as small (DESIGN §10)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    z = _Z.get(confidence, 1.6448536269514722)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _set(name: str | None) -> str:
    return str(name or "").replace("_", " ")


def _link(page: str, anchor: str, **params: Any) -> dict:
    return {"page": page, "params": {k: str(v) for k, v in params.items() if v is not None},
            "anchor": anchor}


def _accuracy(rep: dict, case: str) -> list[dict]:
    models = rep.get("models") or {}
    facts = rep.get("case_facts") or {}
    head = facts.get("headline")
    subject, reference = rep.get("subject"), rep.get("reference")
    if not head or subject not in models:
        return []
    key = f"{head}_acc"
    s = models[subject].get(key)
    if s is None:
        return []
    text = f"On {_set(head)}, the model under study ({subject}) scores {_pct(s, 1)}"
    r = models.get(reference, {}).get(key) if reference else None
    n_test = (rep.get("data") or {}).get("n_test")
    if r is not None:
        diff = 100 * (s - r)
        # two binomial SEs of the difference of two accuracies on the same test images
        noise = (200 * math.sqrt(max(s * (1 - s) + r * (1 - r), 1e-12) / n_test)
                 if isinstance(n_test, int) and n_test else 0.0)
        word = ("within noise of the reference: a tie" if abs(diff) <= noise else
                "it trails the reference" if diff < 0 else "it leads the reference")
        text += (f" against {_pct(r, 1)} for the reference {reference} ({diff:+.1f} points: "
                 + word + (f", ±{noise:.1f} points being two SEs" if noise else "") + ").")
    else:
        text += "; the case has no reference model to compare it with."
    if isinstance(n_test, int) and n_test:
        se = 100 * math.sqrt(max(s * (1 - s), 1e-12) / n_test)
        text += f" (± {se:.1f} points binomial SE on {n_test} test images.)"
    return [{"topic": "accuracy", "text": text,
             "link": _link("case-study", "results", case=case)}]


def _shortcut(rep: dict, case: str) -> tuple[list[dict], list[str]]:
    e = rep.get("experts") or {}
    subject = rep.get("subject")
    summary = (e.get("summary") or {}).get(subject) or {}
    if not summary:
        return [], []
    region = (rep.get("case_facts") or {}).get("region")
    if not region or not e.get("shortcut_thresholds"):
        return [], [f"Where a shortcut lives: the case names no region, so no expert is judged "
                    f"to carry one ({len(summary)} layers ranked)."]
    parts, best = [], None
    for layer, s in summary.items():
        k, n = s.get("n_shortcut"), s.get("n")
        if k is None or not n:
            continue
        lo, hi = wilson(int(k), int(n))
        undecided = s.get("n_undecided") or 0
        parts.append(f"{layer} {k}/{n} ({_pct(lo)}–{_pct(hi)}"
                     + (f"; {undecided} undecided" if undecided else "") + ")")
        if best is None or k / n > best[1] / best[2]:
            best = (layer, k, n)
    if best is None:
        return [], []
    layer, k, n = best
    if k == 0:
        text = (f"No expert of {subject} carries the shortcut in any ranked layer: "
                + ", ".join(parts) + f" experts flagged ({CONFIDENCE:.0%} Wilson intervals).")
    else:
        text = (f"The shortcut lives mostly in {layer}: {k} of {n} top experts of {subject} put "
                f"more of their attribution on the {region} than the rule allows. Per layer: "
                + ", ".join(parts) + f" ({CONFIDENCE:.0%} Wilson intervals).")
    if any((s.get("n_undecided") or 0) for s in summary.values()):
        text += (" An expert is undecided when the bootstrap interval of its region mass over "
                 "the images holds its layer's threshold: its verdict is on a knife edge.")
    reference = rep.get("reference")
    ref = (e.get("summary") or {}).get(reference, {}).get(layer) if reference else None
    if ref and ref.get("n") and ref.get("n_shortcut") is not None:
        text += (f" The reference {reference} has {ref['n_shortcut']}/{ref['n']} flagged "
                 f"in {layer}.")
    alarm = (e.get("false_alarms") or {}).get(layer)
    if alarm and alarm.get("n"):
        text += (f" The control {alarm.get('model')} (a model that does not use the {region}) "
                 f"has {alarm.get('n_flagged')}/{alarm['n']} flagged there: the rule's false-alarm "
                 "rate.")
    out = [{"topic": "shortcut", "text": text,
            "link": _link("overview", "experts", case=case)}]
    return out, []


def _corrections(rep: dict, case: str) -> tuple[list[dict], list[str]]:
    rows = rep.get("corrections") or []
    summary = rep.get("corrections_summary") or {}
    if not rows:
        return [], []
    head = summary.get("headline") or (rep.get("case_facts") or {}).get("headline")
    key = f"{head}_acc"
    labels = {r.get("method"): r.get("label") or r.get("method") for r in rows}
    scored = [r for r in rows if isinstance(r.get(key), int | float) and not r.get("control")]
    if not scored:
        return [], []
    best = summary.get("best") or max(scored, key=lambda r: r[key]).get("method")
    best_row = next((r for r in scored if r.get("method") == best), scored[0])
    text = f"Best correction on {_set(head)}: {labels.get(best, best)} ({_pct(best_row[key], 1)}"
    subj = best_row.get("subject_acc") or best_row.get("vanilla_" + key)
    if isinstance(subj, int | float):
        text += f" vs {_pct(subj, 1)} before"
    text += ")."
    if isinstance(best_row.get("gap_closed"), int | float):
        text += f" It closes {_pct(best_row['gap_closed'])} of the gap to the reference."
    ties = [r for r in scored if r.get("paired_verdict") == "tie"]
    better = [r for r in scored if r.get("paired_verdict") == "better"]
    runner = summary.get("runner_up")
    verdict = summary.get("verdict")
    if runner and verdict == "tie":
        vs = summary.get("best_vs_runner_up") or {}
        p = vs.get("p_value")
        text += (f" It cannot be told apart from {labels.get(runner, runner)}"
                 + (f" (paired test p = {p:.2f})" if isinstance(p, int | float) else "")
                 + ": a tie, not a ranking.")
    elif runner and verdict:
        text += f" It is {verdict} than the runner-up {labels.get(runner, runner)}."
    if scored and (better or ties):
        text += (f" Against the uncorrected model, {len(better)} of {len(scored)} corrections "
                 f"are better by the paired test and {len(ties)} tie.")
    unknown = []
    for method, why in (rep.get("corrections_cannot_tell") or {}).items():
        if method in labels:
            unknown.append(f"Whether {labels[method]} helps: {cannot_tell(why)}.")
    if ties and len(ties) == len(scored):
        unknown.append("Whether any correction helps: every correction ties with the uncorrected "
                       f"model on {_set(head)} (paired test).")
    return [{"topic": "corrections", "text": text,
             "link": _link("corrections", "corrections", case=case)}], unknown


def _essence(rep: dict, case: str) -> tuple[list[dict], list[str]]:
    """The causal check (each class's experts removed, against random units) and the essence test
    (only the top k units kept): how many (pair, layer, fill) rows need fewer top experts than
    random units; the rows that cannot discriminate (the stage's ``degenerate``) are left out of
    that count and named as "cannot tell" instead."""
    rows = (rep.get("essence_summary") or {}).get("summary") or []
    pairs = [r for r in rep.get("essence") or [] if not r.get("error")]
    if not rows and not pairs:
        return [], []
    parts = []
    beat = [r for r in rows if r.get("experts_beat_random")]
    layers = sorted({r.get("layer") for r in beat if r.get("layer")})
    all_layers = sorted({r.get("layer") for r in rows if r.get("layer")})
    if beat:
        parts.append(f"removing each class's top experts hurts that class more than removing as "
                     f"many random units in {', '.join(layers)} ({len(beat)} of {len(rows)} "
                     "layer × fill settings)")
    elif rows:
        parts.append(f"in no layer ({', '.join(all_layers)}) does removing the top experts hurt "
                     "their class more than removing random units")
    flagged = essence_cannot_tell(pairs)
    told = [r for r in pairs if r not in flagged and r.get("k_top") is not None]
    if told:
        fewer = sum(1 for r in told if r.get("k_random") is None or r["k_top"] < r["k_random"])
        parts.append(f"keeping only the top experts, fewer of them than of random units reach the "
                     f"target accuracy in {fewer} of {len(told)} pair × layer × fill rows")
    unknown = []
    if flagged:
        reasons = "; ".join(dict.fromkeys(r["degenerate"] for r in flagged))
        where = sorted({str(r.get("layer")) for r in flagged})
        scope = "every row" if len(flagged) == len(pairs) else f"{len(flagged)} of {len(pairs)} rows"
        unknown.append(f"Whether the essence is concentrated in the top experts ({', '.join(where)}"
                       f"; {scope}): {cannot_tell('degenerate: ' + reasons)}.")
        if not told:
            parts.append(f"whether the essence is concentrated: {cannot_tell('degenerate')} "
                         f"in {scope}")
    text = "Essence: " + "; ".join(parts) + "."
    return [{"topic": "essence", "text": text,
             "link": _link("essence", "essence", case=case)}], unknown


def _detection(rep: dict, case: str) -> tuple[list[dict], list[str]]:
    rows = [r for r in rep.get("detection") or [] if isinstance(r.get("auc"), int | float)]
    if not rows:
        return [], []
    best = max(rows, key=lambda r: r["auc"])
    infl = [r for r in rows if r.get("uses_influence")]
    ranking = (rep.get("detection_summary") or {}).get("ranking") or {}
    verdict = ranking.get("verdict") if isinstance(ranking, dict) else None
    untold = isinstance(verdict, str) and verdict.startswith(("saturated", "cannot be told apart"))
    who = (f"the highest AUC is {best.get('detector')}'s" if untold
           else f"the best detector is {best.get('detector')}")
    text = f"Detection of attacked images: {who} (AUC {best['auc']:.2f}"
    if isinstance(best.get("tpr_at_5"), int | float):
        text += f", {_pct(best['tpr_at_5'])} caught at 5% false alarms"
    text += ")"
    if infl:
        bi = max(infl, key=lambda r: r["auc"])
        if bi is not best:
            text += f"; the best influence-based one is {bi.get('detector')} (AUC {bi['auc']:.2f})"
    n_att, n_clean = best.get("n_attacked"), best.get("n_clean")
    if n_att is not None and n_clean is not None:
        text += f", on {n_att} attacked and {n_clean} clean held-out images"
    text += "."
    unknown = []
    if isinstance(verdict, str) and verdict:
        text += f" Ranking ({ranking.get('method') or 'bootstrap'}): {verdict}."
        if untold:
            unknown.append(f"Which detector is best: {cannot_tell(verdict)}.")
        return [{"topic": "detection", "text": text,
                 "link": _link("detection", "detection", case=case)}], unknown
    if isinstance(n_att, int) and n_att < SMALL_SET:
        unknown.append(f"Detector rankings: only {n_att} attacked images (under {SMALL_SET}), so "
                       "AUCs a few hundredths apart cannot be told apart.")
    return [{"topic": "detection", "text": text,
             "link": _link("detection", "detection", case=case)}], unknown


def _discovery(rep: dict, case: str) -> tuple[list[dict], list[str]]:
    """What the discovery stage found with no mask: the model under study's top suspect (class,
    share of the image, its effects against the control) and the controls' false alarms."""
    summary = rep.get("discovery_summary") or {}
    subject = summary.get("subject")
    info = (summary.get("models") or {}).get(subject)
    if not info:
        return [], []
    rows = [r for r in rep.get("discovery") or [] if r.get("model") == subject
            and r.get("kind") == "candidate" and r.get("verdict") == "suspected"]
    alarms = summary.get("false_alarms") or {}
    others = alarms.get("models") or []
    if rows:
        top = rows[0]
        text = (f"Found with no mask: {subject} is suspected of a shortcut for class "
                f"{top.get('class')!s} — a region of {_pct(top.get('share_of_image'), 1)} of the "
                f"image whose removal loses the class on {_pct(top.get('necessity'))} of its "
                f"held-out images (control {_pct(top.get('control_necessity'))}) and whose "
                f"content, pasted onto other classes' images, turns {_pct(top.get('sufficiency'))}"
                f" of them (control {_pct(top.get('control_sufficiency'))}); "
                f"{info.get('n_suspected')} suspect(s) in all.")
        link = _link("suspects", "suspects", case=case, smodel=subject, suspect=top.get("rank"))
    else:
        text = (f"Found with no mask: no suspected shortcut in {subject} "
                f"({info.get('n_candidates', 0)} candidates tested by cause).")
        link = _link("suspects", "suspects", case=case, smodel=subject)
    if others:
        text += (f" False alarms: {alarms.get('n_flagged', 0)} of {len(others)} other model(s) "
                 "have a suspect.")
    return [{"topic": "discovery", "text": text, "link": link}], []


def findings(report: dict) -> dict:
    """The study's findings from ``report`` (``study.report()``): ``{"case", "items":
    [{"topic", "text", "link": {"page", "params", "anchor"}}], "cannot_tell": [text],
    "warnings": [core.report.health warning]}``. Topics, in order: ``accuracy``, ``discovery``,
    ``shortcut``, ``corrections``, ``essence``, ``detection`` — each only when its stage is built. A model at
    chance heads ``cannot_tell``: nothing else the study says about it can be trusted."""
    case = report.get("case")
    items: list[dict] = []
    unknown: list[str] = []
    warns = health_warnings(report)
    for w in warns:
        if w["kind"] in ("chance", "train_eval_gap"):
            unknown.append(w["text"])
    items += _accuracy(report, case)
    for part in (_discovery, _shortcut, _corrections, _essence, _detection):
        got, cannot = part(report, case)
        items += got
        unknown += cannot
    for w in warns:
        if w["kind"] == "no_false_alarm_check":
            unknown.append(w["text"])
    built = report.get("built") or {}
    missing = [s for s, ok in built.items() if not ok]
    if missing:
        unknown.append("Not built yet, so not summarised here: " + ", ".join(missing) + ".")
    sizes = [(k, v) for k, v in (report.get("data") or {}).items()
             if k == "n_test" and isinstance(v, int) and v < SMALL_SET]
    for _, n in sizes:
        unknown.append(f"Accuracy differences of a few points: the test split has only {n} "
                       f"images (under {SMALL_SET}).")
    return {"case": case, "items": items, "cannot_tell": unknown, "warnings": warns}

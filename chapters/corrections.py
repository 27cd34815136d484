"""Chapter: correcting the shortcut, five methods head to head (reads ``core.stages.corrections``' stage).

Everything drawn here comes from the corrections payload (``ui.artifact("corrections")``), the
report JSON and the experts views of the corrected models; the page computes nothing itself.
"""

from __future__ import annotations

import math

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui

# ui's colour-blind-safe palette: the model under study and its reference keep their colours
# from every other page; the corrections are coloured by what they need.
COLORS = {"under study": ui.PALETTE[0], "reference": ui.PALETTE[1], "uses pixel mask": ui.PALETTE[4],
          "uses location prior": ui.PALETTE[2], "uses nothing": ui.PALETTE[3], "control": "#999999"}

study = ui.current_study()
facts = ui.facts(study)
SUBJECT, REFERENCE = facts.get("subject") or "the model", facts.get("reference")
REGION = ui.region_name(facts)
HEAD = facts.get("headline")
HKEY = f"{HEAD}_acc" if HEAD else None
HNAME = ui.set_label(HEAD) if HEAD else "headline set"
SETS = list(facts.get("evaluation_sets") or [])
# The sets the table shows: every held-out set, the headline first (validation sets only tune).
SHOW = ui.held_out_sets(facts)
OTHER = [x for x in SHOW if x != HEAD]
MASS_KEY = facts.get("region_alias") or "region_mass"
MASS_LABEL = (facts.get("region_alias") or f"{REGION} mass").replace("_", " ") if REGION else None
CHANCE = facts.get("chance")
SCALE = ui.scale_for(facts.get("size"))
# Plain-word definitions shown as help on the columns and controls that use these terms.
HELP = {
    "method": "The correction. Expert suppression damps the shortcut experts of one layer; P-ClArC "
              "(projective class artifact compensation) removes the shortcut's direction — the difference "
              "of the layer's mean activation with and without it — from one layer's output; neither "
              "retrains. RRR, the influence penalty and counterexamples fine-tune the model; the control "
              "fine-tunes with no penalty.",
    "uses": "What the correction uses to know where the shortcut is: a pixel mask (the region's masks, "
            "or clean twins of the images made with them), a location prior (a fixed guess of where the "
            "object is not, such as the image border; no per-image mask), or nothing.",
    "gap closed": "(accuracy − the model under study's) / (the reference's − the model under study's) on "
                  "the headline set: 0 is no better than the model under study, 1 matches the reference. "
                  "Empty when the reference does not beat the model under study.",
    "mass": "Region mass: the share of the positive Integrated Gradients attribution (for the image's "
            "label) that falls inside the region, averaged over test images (0 = none, 1 = all).",
    "tuned on validation": "The correction's strength, chosen on the validation split: λ is the weight of "
                           "the penalty added to the training loss (larger: the correction counts more "
                           "against accuracy); damping scales the suppressed units' outputs; copies / N "
                           "is how many counterexamples are added per training image.",
    "validation acc": "Accuracy on the validation split at the chosen strength (what the tuning maximised).",
    "seconds": "Wall time of the correction, its tuning grid included.",
    "vs subject": "Paired difference from the model under study on the same headline-set images "
                  "(accuracy after − before) ± its standard error, and the exact McNemar test on the "
                  "images only one of the two gets right: a verdict is \"tie\" unless p < α.",
    "vs reference": "The same paired comparison against the reference model: \"tie\" means the "
                    "corrected model cannot be told from the reference on these images.",
    "influence": "The unit's influence score: its distributional influence on the class (the average "
                 "gradient of the class's score with respect to the unit, over the class's training "
                 "images).",
}
ui.chapter(
    # without a region there is nothing to correct: no gate, the chapter says so below
    ["corrections"] if REGION else None, "Corrections",
    f"**{ui.inert(SUBJECT)}** may have learned to read the {REGION or 'shortcut'}. Can we make it read the "
    "object instead? Every correction starts from the **same model**: some remove the shortcut after "
    "training without retraining (*expert suppression*, *P-ClArC*), others fine-tune it "
    "(*RRR*, an *influence penalty*, *counterexamples*); a control fine-tunes with no penalty at "
    "all. Each one's strength is tuned on the **validation split**, never on the test set. "
    + (f"**Gap closed** = (accuracy − {ui.inert(SUBJECT)}) / ({ui.inert(REFERENCE)} − "
       f"{ui.inert(SUBJECT)}) on the {HNAME} set: "
       f"0 is no better than {ui.inert(SUBJECT)}, 1 matches {ui.inert(REFERENCE)}." if REFERENCE else
       "This case has no reference model, so there is no gap to close: read the accuracies."),
    study=study, what="The corrections chapter")

if not REGION:
    st.info(ui.no_region_note(facts) + " Without a region there is no shortcut to correct, so this "
            "chapter has nothing to show for this case.")
    ui.next_chapter("chapters/method.py", "Method")
    st.stop()

payload = ui.artifact("corrections", study) or {}
rows = payload.get("rows") or []
skipped = payload.get("skipped") or []
for sk in skipped:
    st.caption(f"Skipped {ui.plain(sk.get('method'))}: {ui.plain(sk.get('reason'))}.")
if not rows:
    st.warning("The corrections stage is built but holds no rows (no method configured, or every "
               "method was skipped).")
    st.stop()
# corrections whose validation grid could not choose a strength (core.report.degenerate)
FLAT = (ui.report(study).get("corrections_cannot_tell") or {})
ref = payload.get("reference") or {}
van, cln = ref.get(SUBJECT) or {}, (ref.get(REFERENCE) or {}) if REFERENCE else {}
n_seeds = int(payload.get("n_seeds") or 1)
records = payload.get("records") or {}


def _f(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _mass(r: dict) -> float:
    return _f(r.get(MASS_KEY, r.get("region_mass")))


def _sd(row: dict, key: str) -> str:
    sd = row.get(f"{key}_sd")
    return "" if sd is None or n_seeds < 2 else f" ± {100 * _f(sd):.1f}"


def _strength(row: dict) -> str:
    s = row.get("strength")
    name = row.get("strength_name") or "strength"
    if s is None:
        return "—"
    if isinstance(s, float):
        s = f"{s:g}"
    extra = ""
    if row.get("method") == "suppression" and row.get("units") is not None:
        extra = f" ({row.get('layer')} units {list(row['units'])})"
    return f"{name} = {s}{extra}"


def _paired(row: dict, prefix: str) -> str:
    """"+19.6 pp ± 1.3, better (p 1e-40)", with every seed's verdict when there are several."""
    d, se = row.get(f"{prefix}_delta"), row.get(f"{prefix}_delta_se")
    if d is None or se is None:
        return "—"
    text = (f"{100 * _f(d):+.1f} pp ± {100 * _f(se):.1f}, {row.get(f'{prefix}_verdict')} "
            f"(p {_f(row.get(f'{prefix}_p_value')):.2g})")
    per = row.get(f"{prefix}_verdict_per_seed")
    if n_seeds > 1:
        text = "seed 0: " + text
    if per and len(per) > 1:
        text += "; every seed: " + ", ".join(per)
    return text


def _uses(r: dict) -> str:
    """What a method uses to know where the shortcut is: "pixel mask", "location prior" (a fixed
    guess of where the object is not) or "nothing" (rows cached before the field: from uses_mask)."""
    return r.get("uses") or ("pixel mask" if r.get("uses_mask") else "nothing")


# ------------------------------------------------------------------------------------ the table
st.header("Results")
table = pd.DataFrame([{
    "method": r.get("label") or r["method"],
    "uses": _uses(r),
    **{ui.set_label(x): _f(r.get(f"{x}_acc")) for x in SHOW},
    "gap closed": _f(r.get("gap_closed")),
    f"Δ vs {ui.inert(SUBJECT)}": _paired(r, "paired"),
    **({f"Δ vs {ui.inert(REFERENCE)}": _paired(r, "paired_reference")} if REFERENCE else {}),
    MASS_LABEL: _mass(r),
    "tuned on validation": _strength(r) + (f" — {ui.cannot_tell('flat validation grid')}"
                                           if r["method"] in FLAT else ""),
    "validation acc": _f(r.get("val_acc")),
    "seconds": _f(r.get("seconds")),
} for r in rows])
ref_rows = [(SUBJECT, van)] + ([(REFERENCE, cln)] if REFERENCE else [])
ref_table = pd.DataFrame([
    {"model": ui.model_label(name, facts=facts), **{ui.set_label(x): _f(m.get(f"{x}_acc")) for x in SHOW},
     MASS_LABEL: _mass(m)} for name, m in ref_rows])
pct_cols = {c: st.column_config.NumberColumn(c, format="percent")
            for c in [*(ui.set_label(x) for x in SHOW), MASS_LABEL, "validation acc"]}
pct_cols[MASS_LABEL] = st.column_config.NumberColumn(MASS_LABEL, format="percent", help=HELP["mass"])
pct_cols["validation acc"] = st.column_config.NumberColumn("validation acc", format="percent",
                                                           help=HELP["validation acc"])
# What the text quotes sits beside the method (the paired differences, the headline set, the gap
# closed, the region mass), so that it shows unscrolled on a 1400 px wide page; the other sets, the
# tuning and the timings follow (scroll right, or download the CSV).
HEAD_COL = ui.set_label(HEAD) if HEAD in SHOW else None
FIRST = ["method", *([f"Δ vs {ui.inert(REFERENCE)}"] if REFERENCE else []), f"Δ vs {ui.inert(SUBJECT)}",
         *([HEAD_COL] if HEAD_COL else []), "gap closed", MASS_LABEL]
results_cfg = {
    **pct_cols,
    "method": st.column_config.TextColumn("method", width=150, help=HELP["method"], pinned=True),
    "uses": st.column_config.TextColumn("uses", help=HELP["uses"]),
    "gap closed": st.column_config.NumberColumn("gap closed", format="%.2f", width=76,
                                                help=HELP["gap closed"]),
    f"Δ vs {ui.inert(SUBJECT)}": st.column_config.TextColumn(f"Δ vs {ui.inert(SUBJECT)}", width=226,
                                                   help=HELP["vs subject"]),
    f"Δ vs {ui.inert(REFERENCE)}": st.column_config.TextColumn(f"Δ vs {ui.inert(REFERENCE)}", width=226,
                                                     help=HELP["vs reference"]),
    "tuned on validation": st.column_config.TextColumn("tuned on validation", width="large",
                                                       help=HELP["tuned on validation"]),
    "seconds": st.column_config.NumberColumn("seconds", format="%.1f", help=HELP["seconds"]),
}
if HEAD_COL:
    results_cfg[HEAD_COL] = st.column_config.NumberColumn(HEAD_COL, format="percent", width=100)
results_cfg[MASS_LABEL] = st.column_config.NumberColumn(MASS_LABEL, format="percent", width=110,
                                                        help=HELP["mass"])
st.dataframe(table, hide_index=True, column_order=ui.drawing.quoted_first(table, FIRST),
             column_config=results_cfg)
st.dataframe(ref_table, hide_index=True, column_config=pct_cols)
seed_note = (f"Means over {n_seeds} seeds (± one standard deviation in the narrative)."
             if n_seeds > 1 else "One seed (build the study with more seeds for means ± sd).")
st.caption(
    f"Accuracy on each evaluation set ({', '.join(ui.set_label(x) for x in SHOW)}). "
    f"{MASS_LABEL.capitalize()}: share of the positive Integrated Gradients attribution (label logit, "
    f"zero baseline) on the {REGION}, mean over test images"
    + (f" (chance {CHANCE:.1%})" if CHANCE is not None else "")
    + f". Seconds: wall time of the correction including its tuning grid. {seed_note}")
ui.download_csv(table, "corrections.csv", "Download the table (CSV)", key="dl-corrections")

# ------------------------------------------------------------------------------------ the chart
st.header("Accuracies side by side")
bars = []
set_order = [ui.set_label(x) for x in SHOW]
for name, r, kind in ([(SUBJECT, van, "under study")]
                      + ([(REFERENCE, cln, "reference")] if REFERENCE else [])
                      + [(r.get("label") or r["method"], r, "control" if r.get("control")
                          else f"uses {_uses(r)}") for r in rows]):
    for x in SHOW:
        key = f"{x}_acc"
        v = _f(r.get(key))
        sd = _f(r.get(f"{key}_sd")) if n_seeds > 1 else float("nan")
        bars.append({"model": name, "split": ui.set_label(x), "accuracy": v, "kind": kind,
                     "low": v - sd if math.isfinite(sd) else None,
                     "high": v + sd if math.isfinite(sd) else None})
chart_df = pd.DataFrame(bars)
order = list(dict.fromkeys(chart_df["model"]))
base = alt.Chart(chart_df).encode(
    y=alt.Y("model:N", sort=order, title=None, axis=alt.Axis(labelLimit=260)),
    yOffset=alt.YOffset("split:N", sort=set_order))
chart = base.mark_bar().encode(
    x=alt.X("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1]),
            axis=alt.Axis(format="%")),
    color=alt.Color("kind:N", title="model", scale=alt.Scale(
        domain=list(COLORS), range=list(COLORS.values()))),
    opacity=alt.Opacity("split:N", sort=set_order,
                        scale=alt.Scale(range=[1.0, 0.45]), title="evaluation set"),
    tooltip=["model", "split", alt.Tooltip("accuracy:Q", format=".1%")])
layers = [chart]
if chart_df["low"].notna().any():
    layers.append(base.mark_rule(color="#1F2328").encode(x="low:Q", x2="high:Q"))
target = _f(cln.get(HKEY)) if HKEY else float("nan")
if math.isfinite(target):
    layers.append(alt.Chart(pd.DataFrame({"x": [target]})).mark_rule(
        strokeDash=[4, 4], color="#1F2328").encode(x="x:Q"))
ui.chart(alt.layer(*layers).properties(height=22 * len(order) * max(1, len(SHOW)) + 40),
         "Accuracy of every corrected model on the held-out sets", chart_df, width="stretch")
st.caption(f"Solid bars: {set_order[0] if set_order else 'the first set'}; paler bars: "
           f"{', '.join(set_order[1:]) or '—'}"
           + (" (lines: ± one standard deviation over seeds)" if n_seeds > 1 else "")
           + (f". Dashed line: {ui.inert(REFERENCE)}'s {HNAME} accuracy (gap closed = 1)"
              if REFERENCE else "")
           + f". Colours: {ui.inert(SUBJECT)} and {ui.inert(REFERENCE or 'its reference')} as on "
           "every page; green: "
           f"corrections that need no pixel mask; orange: corrections that use the {REGION}'s masks; "
           "grey: the fine-tuning control.")

# ------------------------------------------------------------------------------------ narrative
st.header("Reading the numbers")
van_acc, cln_acc = _f(van.get(HKEY)), _f(cln.get(HKEY))
gap = cln_acc - van_acc
other_txt = "".join(f" and **{ui.pct(_f(van.get(f'{x}_acc')))}** on {ui.set_label(x)}" for x in OTHER[:1])
lines = [f"- **{ui.inert(SUBJECT)}** reaches **{ui.pct(van_acc)}** on the {HNAME} set{other_txt}"
         + (f"; **{ui.inert(REFERENCE)}** **{ui.pct(cln_acc)}**: a gap of **{ui.pp(gap)}** to close."
            if REFERENCE else ".")]
has_gap = math.isfinite(gap) and gap > 0
if REFERENCE and not has_gap:
    lines.append(f"- Here {ui.inert(REFERENCE)} is **not** better than {ui.inert(SUBJECT)} on the "
                 f"{HNAME} set, so there "
                 "is no gap to close (gap closed is left empty): the shortcut did not cost this model "
                 "accuracy. Read the accuracies themselves.")
elif has_gap and gap < 0.03:
    lines.append("- The gap is small on this case, so gap-closed ratios are noisy: read the "
                 "accuracies themselves.")
corrections = [r for r in rows if not r.get("control")] or rows
controls = [r for r in rows if r.get("control")]
ranked = sorted(corrections, key=lambda r: -_f(r.get(HKEY)))
best = ranked[0]


def _closed(r: dict) -> str:
    g = r.get("gap_closed")
    return f"closes **{_f(g):.0%}** of the gap" if g is not None else "reaches"


lines.append(f"- Highest: **{best.get('label')}** {_closed(best)} "
             f"({ui.pct(_f(best.get(HKEY)))} {HNAME}{_sd(best, HKEY)}"
             f"), using {_uses(best)}"
             + (f" (the {REGION}'s masks)." if _uses(best) == "pixel mask" else "."))
summary = payload.get("report") or {}
pair = summary.get("best_vs_runner_up") or {}
if summary.get("best") == best.get("method") and pair.get("delta") is not None:
    runner = next((r for r in rows if r["method"] == summary.get("runner_up")), {})
    per = summary.get("best_vs_runner_up_per_seed") or []
    lines.append(
        f"- Against the runner-up **{runner.get('label', summary.get('runner_up'))}**, paired on the "
        f"same {HNAME} images: {100 * _f(pair['delta']):+.1f} pp ± {100 * _f(pair.get('delta_se')):.1f} "
        f"(p {_f(pair.get('p_value')):.2g})"
        + (f"; per seed: {', '.join(x.get('verdict', '?') for x in per)}" if len(per) > 1 else "")
        + f" — {'**better**' if summary.get('verdict') == 'better' else '**a tie**: no single best'}"
        f" ({summary.get('rule')}).")
if REFERENCE and best.get("paired_reference_verdict"):
    v = best["paired_reference_verdict"]
    lines.append(f"- Against **{ui.inert(REFERENCE)}**: {_paired(best, 'paired_reference')} — "
                 + ("it cannot be told from the reference on these images." if v == "tie" else
                    f"it is {v} than the reference."))
free = [r for r in ranked if _uses(r) != "pixel mask"]
if free:
    fb = free[0]
    lines.append(f"- Best without a pixel mask (using {_uses(fb)}): **{fb.get('label')}**, "
                 f"{_closed(fb)} "
                 f"({ui.pct(_f(fb.get(HKEY)))}{_sd(fb, HKEY)}).")
for r in corrections:
    if r["method"] in FLAT:
        lines.append(
            f"- **{r.get('label')}**: whether it helps — **{ui.cannot_tell(ui.plain(FLAT[r['method']]))}**."
            f" Its row ({HNAME} {ui.pct(_f(r.get(HKEY)))}{_sd(r, HKEY)}) is the grid's first "
            "strength, not a tuned one: only a larger validation split (or cross-validation) can "
            "say whether it helps.")
failed = [r for r in corrections if has_gap and r["method"] not in FLAT
          and (r.get("gap_closed") is None or _f(r["gap_closed"]) < 0.5)]
for r in failed:
    g = r.get("gap_closed")
    lines.append(
        f"- **{r.get('label')}** {'did not help' if g is None or _f(g) <= 0.05 else 'helped little'}"
        f" (gap closed {'—' if g is None else f'{_f(g):.0%}'}; {HNAME} "
        f"{ui.pct(_f(r.get(HKEY)))}{_sd(r, HKEY)}"
        + "".join(f", {ui.set_label(x)} {ui.pct(_f(r.get(f'{x}_acc')))}" for x in OTHER[:1]) + ").")
removal = [r for r in failed if r["method"] in ("suppression", "pclarc")]
if removal:
    lines.append(
        f"- {' and '.join(r.get('label') for r in removal)} only remove: "
        f"{'they change' if len(removal) > 1 else 'it changes'} no weight that would teach the "
        f"classes. Removing what carries the shortcut cannot add the knowledge {ui.inert(SUBJECT)} never "
        "learned"
        + "".join(f": on {ui.set_label(x)} it reaches only {ui.pct(_f(van.get(f'{x}_acc')))}"
                  for x in OTHER[:1]) + ".")
    sup_grid = (records.get("suppression") or {}).get("grid") or []
    if any(r["method"] == "suppression" for r in removal) and sup_grid and van.get("val_acc"):
        deltas = [_f(g.get("val_acc")) - _f(van["val_acc"]) for g in sup_grid]
        most = max(int(g.get("n_units", 0)) for g in sup_grid)
        lines.append(
            f"- Across its grid (up to {most} experts per layer, {len(sup_grid)} settings), "
            f"suppression moved the validation accuracy by {ui.pp(min(deltas))} to "
            f"{ui.pp(max(deltas))}: the shortcut is not held by a handful of units.")
for r in controls if has_gap else []:
    lines.append(
        f"- Control: the same fine-tuning **without any penalty** reaches "
        f"{ui.pct(_f(r.get(HKEY)))} on the {HNAME} set (gap closed "
        f"{_f(r.get('gap_closed')):.0%}): training longer on the same data "
        + ("does not remove the shortcut, so the fine-tuned corrections' gains come from what "
           "they add to the loss or the data." if _f(r.get("gap_closed")) < 0.25 else
           "already helps here, so part of the fine-tuned corrections' gains is the extra "
           "training itself."))
n_test = (ui.report(study).get("data") or {}).get("n_test")
fine = [r for r in corrections if r["method"] in ("rrr", "influence_penalty", "counterexamples")]
if n_test and any(_f(r.get("gap_closed")) > 1.0 for r in fine):
    p = float(np.mean([_f(r.get(HKEY)) for r in fine]))
    se = math.sqrt(p * (1 - p) / n_test)
    lines.append(f"- A ratio above 1 means the corrected model beat {ui.inert(REFERENCE)} on the "
                 f"{HNAME} set. "
                 "The fine-tuned models train for more epochs in total than the reference (the "
                 "first training plus fine-tuning); differences of a point or so are "
                 f"within the noise of the test set (one standard error of an accuracy near "
                 f"{p:.0%} on {n_test} images is about {100 * se:.1f} pp).")
lines.append(f"- {MASS_LABEL.capitalize()} after correction tells whether the explanations moved off "
             f"the {REGION} (looking at the right thing: lower is better): "
             + ", ".join(f"{r.get('label')} {ui.pct(_mass(r))}" for r in rows)
             + f" ({ui.inert(SUBJECT)} {ui.pct(_mass(van))}"
             + (f", {ui.inert(REFERENCE)} {ui.pct(_mass(cln))}" if REFERENCE else "") + ").")
st.markdown("\n".join(lines))

st.subheader("What each method needs")
st.markdown("\n".join(
    f"- **{r.get('label')}** — uses: **{_uses(r)}**. "
    f"{str(r.get('mask_note', ''))[:1].upper()}{str(r.get('mask_note', ''))[1:]}." for r in rows))

# ------------------------------------------------------------------------------------ anchors
st.header("Published anchors")
anchors = payload.get("anchors") or []
if anchors:
    st.dataframe(pd.DataFrame([{
        "source": a.get("source"),
        "vanilla decoy test": _f(a.get("vanilla_decoy_test_acc")),
        "RRR decoy test": _f(a.get("rrr_decoy_test_acc")),
        "clean decoy test": _f(a.get("clean_decoy_test_acc")),
        "gap closed": _f(a.get("gap_closed"))} for a in anchors]), hide_index=True,
        column_config={c: st.column_config.NumberColumn(c, format="percent") for c in
                       ("vanilla decoy test", "RRR decoy test", "clean decoy test")}
        | {"gap closed": st.column_config.NumberColumn("gap closed", format="%.2f",
                                                       help=HELP["gap closed"])})
    rrr = next((r for r in rows if r["method"] == "rrr"), None)
    for a in anchors:
        mine = (f" Here RRR reaches {ui.pct(_f(rrr.get(HKEY)))} against {ui.inert(SUBJECT)} "
                f"{ui.pct(van_acc)} and {ui.inert(REFERENCE)} {ui.pct(cln_acc)} (gap closed "
                f"{'—' if rrr.get('gap_closed') is None else format(_f(rrr['gap_closed']), '.2f')}"
                ")." if rrr else "")
        st.markdown(f"**Their setup:** {a.get('setup', '')}.  \n"
                    f"**What differs here:** {a.get('differs', '')}.{mine}")

# ------------------------------------------------------------------------------------ tuning
st.header("Tuning on the validation split")
for r in rows:
    rec = records.get(r["method"]) or {}
    grid = rec.get("grid") or []
    with st.expander(f"{r.get('label')}: chosen {_strength(r)}"
                     + (f" — {ui.cannot_tell('flat grid')}" if r["method"] in FLAT else "")):
        if r["method"] in FLAT:
            st.caption(ui.cannot_tell(ui.plain(FLAT[r["method"]])).capitalize() + ".")
        if grid:
            st.dataframe(pd.DataFrame([{k: (str(v) if isinstance(v, list) else v)
                                        for k, v in g.items()} for g in grid]),
                         hide_index=True, column_config={"val_acc": st.column_config.NumberColumn(
                             "validation acc", format="percent")})
        if r["method"] == "influence_penalty" and rec.get("heatmap") is not None:
            heat = np.asarray(rec["heatmap"], dtype=float)
            region = np.asarray(rec.get("region"), dtype=bool)
            ui.image([ui.heatmap(heat, SCALE),
                      ui.heatmap(region.astype(float), SCALE)],
                     caption=[f"{ui.inert(SUBJECT)}'s influence (mean IG, training images)",
                              f"penalised region ({int(region.sum())} pixels, found without "
                              "the mask)"], about="influence penalty, heatmap")
            if rec.get("region_precision") is not None:
                st.caption(
                    f"Checked afterwards against the {REGION} positions (not used by the "
                    f"correction): {_f(rec['region_precision']):.0%} of the region's pixels lie "
                    f"where the {REGION} can be, and it covers {_f(rec.get('region_recall')):.0%} of "
                    "those positions. Slice penalised: "
                    f"{'the input' if rec.get('layer') is None else rec.get('layer')}.")
        if r["method"] == "suppression" and rec.get("candidates"):
            cand = rec["candidates"].get(rec.get("layer"), [])
            st.caption(f"Candidate experts of {rec.get('layer')} by border mass (share of their "
                       "interpretation's positive attribution on the "
                       f"{(payload.get('config') or {}).get('suppression', {}).get('border', '?')}"
                       "-pixel image border):")
            st.dataframe(pd.DataFrame(cand), hide_index=True)

# ------------------------------------------------------------------------------------ experts
st.header("Experts before and after")
names = [r["method"] for r in rows]
labels = {r["method"]: r.get("label") or r["method"] for r in rows}
LAYERS = [str(x) for x in (facts.get("layers") or [])]
CLASSES = list(range(len(facts.get("classes") or []))) or [0]
c1, c2, c3 = st.columns(3)
with c1:
    chosen = ui.choice("Correction", names, param="correction", format_func=labels.get,
                       help=HELP["method"])
with c2:
    layer = ui.choice("Layer", LAYERS, param="layer", default=LAYERS[-1],
                      help="The layer whose experts (most influential units for the class) are ranked.")
with c3:
    cls = ui.choice("Class", CLASSES, param="cls", format_func=lambda c: ui.class_name(c, facts),
                    help="The class whose experts are compared before and after the correction.")
qoi, doi = {"kind": "class", "class": int(cls)}, {"kind": "class-images"}


def _view(model: str | None) -> dict | None:
    if model is None:
        return None
    if model in (facts.get("models") or []):
        try:
            return ui.experts(model, layer, int(cls), study)
        except Exception:  # outside the precomputed classes/layers: the on-demand path below
            pass
    if ui.has_experts_for(model, layer, qoi, doi, study):
        return ui.experts_for(model, layer, qoi, doi, study)
    return None


before, after, ref_view = _view(SUBJECT), _view(chosen), _view(REFERENCE)
if after is None:
    offer = st.empty()
    with offer.container():
        st.info(f"The experts of **{ui.inert(layer)}** for class **{ui.class_name(cls, facts)}** of the "
                f"**{labels[chosen]}** model are not computed yet (a few seconds; cached on disk).")
        clicked = st.button("Compute", type="primary", key="compute-corrected-experts")
    if clicked:
        after = ui.compute_experts_for(chosen, layer, qoi, doi, study)
        if after is not None:
            offer.empty()


def _experts_mass(view: dict | None) -> float:
    dm = [_mass(x) for x in (view or {}).get("rows", [])]
    dm = [d for d in dm if math.isfinite(d)]
    return float(np.mean(dm)) if dm else float("nan")


panels = [(f"{ui.inert(SUBJECT)} (before)", before), (f"{labels[chosen]} (after)", after)]
if REFERENCE:
    panels.append((f"{ui.inert(REFERENCE)} (reference)", ref_view))
cols = st.columns(len(panels))
for col, (title, view) in zip(cols, panels, strict=True):
    with col:
        st.subheader(title)
        if view is None or not view.get("rows"):
            st.caption("Not available.")
            continue
        t = pd.DataFrame(view["rows"]).sort_values("rank")
        if MASS_KEY not in t and "region_mass" in t:
            t[MASS_KEY] = t["region_mass"]
        keep = [c for c in ("rank", "unit", "score", MASS_KEY) if c in t]
        st.dataframe(t[keep], hide_index=True, column_config={
            "score": st.column_config.NumberColumn("influence", format="%.4g", help=HELP["influence"]),
            MASS_KEY: st.column_config.NumberColumn(
                MASS_LABEL, format="percent",
                help="The share of the expert's interpretation (its positive attribution) that falls inside "
                     "the region, averaged over the class's test images.")})
        images, maps = np.asarray(view.get("images", [])), np.asarray(view.get("maps", []))
        if images.ndim in (3, 4) and maps.ndim == 4 and len(images):
            n_img = min(4, images.shape[0])
            grid = [[ui.masked(images[i], maps[k, i], SCALE)
                     for i in range(n_img)] for k in range(min(3, maps.shape[0]))]
            ui.image(ui.image_grid(grid), about="grid of expert masks",
                     caption=f"{title}: top experts (rows) on the same test images, "
                     "pixels above the 95th percentile of each interpretation")
        m = _experts_mass(view)
        if math.isfinite(m):
            st.caption(f"Mean {MASS_LABEL} of the experts' interpretations: {m:.0%}"
                       + (f" (chance {CHANCE:.1%})." if CHANCE is not None else "."))
mb, ma, mc = _experts_mass(before), _experts_mass(after), _experts_mass(ref_view)
if all(math.isfinite(v) for v in (mb, ma)):
    moved = ("fell" if ma < mb - 0.02 else "rose" if ma > mb + 0.02 else "barely moved")
    st.markdown(
        f"The experts' mean {MASS_LABEL} {moved}: {mb:.0%} before, {ma:.0%} after"
        + (f", {mc:.0%} for {ui.inert(REFERENCE)}" if math.isfinite(mc) else "")
        + ". An expert's interpretation shows what drives *that unit* (Integrated "
        "Gradients of its activation), not whether the class still depends on it: units near the "
        f"input keep seeing the {REGION} even in a model whose output ignores it"
        + (f" ({ui.inert(REFERENCE)}'s experts are the baseline for that)" if REFERENCE else "")
        + f". The class-level {MASS_LABEL} in the results table (attribution of the class logit) is "
        "the direct test of the correction.")
ui.next_chapter("chapters/essence.py" if ui.stage_exists("essence") else "chapters/method.py",
                "Essence & causal check" if ui.stage_exists("essence") else "Method",
                "Next: do the experts really carry the class? Keep only them, or remove them, and "
                "measure." if ui.stage_exists("essence") else "")

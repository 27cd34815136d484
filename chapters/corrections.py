"""Chapter: correcting the shortcut, five methods head to head (reads ``core.corrections``' stage).

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
from core import imaging

SCALE = 4
N_CLASSES = 10
COLORS = {"reference": "#8A8F98", "control": "#C9C3B8", "mask": "#B4412E",
          "mask-free": "#2E7D5B"}

study = ui.current_study()
st.title("Corrections")
st.markdown(
    "The vanilla model learned to read the corner patch. Can we make it read the digit instead? "
    "Five corrections start from the **same vanilla model**: two remove the shortcut after "
    "training without retraining (*expert suppression*, *P-ClArC*), three fine-tune it "
    "(*RRR*, an *influence penalty*, *counterexamples*); a control fine-tunes with no penalty at "
    "all. Each one's strength is tuned on the "
    "**validation split** (test-style random-shade patches), never on the test set. "
    "**Gap closed** = (accuracy − vanilla) / (clean reference − vanilla) on the decoy test set: "
    "0 is no better than vanilla, 1 matches the model trained without the patch.")

if not ui.require(study, ["corrections"], "The corrections chapter"):
    st.stop()

payload = ui.artifact("corrections", study) or {}
rows = payload.get("rows") or []
if not rows:
    st.warning("The corrections stage is built but holds no rows (no method configured?).")
    st.stop()
ref = payload.get("reference") or {}
van, cln = ref.get("vanilla") or {}, ref.get("clean") or {}
n_seeds = int(payload.get("n_seeds") or 1)
records = payload.get("records") or {}


def _f(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


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


# ------------------------------------------------------------------------------------ the table
st.header("Results")
table = pd.DataFrame([{
    "method": r.get("label") or r["method"],
    "uses mask": "yes" if r.get("uses_mask") else "no",
    "decoy test": _f(r.get("decoy_test_acc")),
    "clean test": _f(r.get("clean_test_acc")),
    "gap closed": _f(r.get("gap_closed")),
    "decoy mass": _f(r.get("decoy_mass")),
    "tuned on validation": _strength(r),
    "validation acc": _f(r.get("val_acc")),
    "seconds": _f(r.get("seconds")),
} for r in rows])
ref_table = pd.DataFrame([
    {"model": "vanilla (trained with the decoy)", "decoy test": _f(van.get("decoy_test_acc")),
     "clean test": _f(van.get("clean_test_acc")), "decoy mass": _f(van.get("decoy_mass"))},
    {"model": "clean reference (trained without it)", "decoy test": _f(cln.get("decoy_test_acc")),
     "clean test": _f(cln.get("clean_test_acc")), "decoy mass": _f(cln.get("decoy_mass"))},
])
pct_cols = {c: st.column_config.NumberColumn(c, format="percent")
            for c in ("decoy test", "clean test", "decoy mass", "validation acc")}
st.dataframe(table, hide_index=True, column_config={
    **pct_cols,
    "method": st.column_config.TextColumn("method", width="medium"),
    "gap closed": st.column_config.NumberColumn("gap closed", format="%.2f"),
    "tuned on validation": st.column_config.TextColumn("tuned on validation", width="large"),
    "seconds": st.column_config.NumberColumn("seconds", format="%.1f"),
})
st.dataframe(ref_table, hide_index=True, column_config=pct_cols)
seed_note = (f"Means over {n_seeds} seeds (± one standard deviation in the narrative)."
             if n_seeds > 1 else "One seed (build the study with more seeds for means ± sd).")
st.caption(
    "Decoy test: test images with a random-shade patch; clean test: the same images without it. "
    "Decoy mass: share of the positive Integrated Gradients attribution (label logit, zero "
    f"baseline) on the 16 patch pixels, mean over test images (chance {ui.CHANCE_DECOY_MASS:.1%}). "
    f"Seconds: wall time of the correction including its tuning grid. {seed_note}")
ui.download_csv(table, "corrections.csv", "Download the table (CSV)", key="dl-corrections")

# ------------------------------------------------------------------------------------ the chart
st.header("Accuracies side by side")
bars = []
for name, r, kind in ([("vanilla", van, "reference"), ("clean reference", cln, "reference")]
                      + [(r.get("label") or r["method"], r, "control" if r.get("control")
                          else "mask" if r.get("uses_mask") else "mask-free") for r in rows]):
    for split, key in (("decoy test", "decoy_test_acc"), ("clean test", "clean_test_acc")):
        v = _f(r.get(key))
        sd = _f(r.get(f"{key}_sd")) if n_seeds > 1 else float("nan")
        bars.append({"model": name, "split": split, "accuracy": v, "kind": kind,
                     "low": v - sd if math.isfinite(sd) else None,
                     "high": v + sd if math.isfinite(sd) else None})
chart_df = pd.DataFrame(bars)
order = list(dict.fromkeys(chart_df["model"]))
base = alt.Chart(chart_df).encode(
    y=alt.Y("model:N", sort=order, title=None, axis=alt.Axis(labelLimit=260)),
    yOffset=alt.YOffset("split:N", sort=["decoy test", "clean test"]))
chart = base.mark_bar().encode(
    x=alt.X("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1]),
            axis=alt.Axis(format="%")),
    color=alt.Color("kind:N", title="model", scale=alt.Scale(
        domain=list(COLORS), range=list(COLORS.values()))),
    opacity=alt.Opacity("split:N", sort=["decoy test", "clean test"],
                        scale=alt.Scale(range=[1.0, 0.45]), title="test set"),
    tooltip=["model", "split", alt.Tooltip("accuracy:Q", format=".1%")])
layers = [chart]
if chart_df["low"].notna().any():
    layers.append(base.mark_rule(color="#1F2328").encode(x="low:Q", x2="high:Q"))
target = _f(cln.get("decoy_test_acc"))
if math.isfinite(target):
    layers.append(alt.Chart(pd.DataFrame({"x": [target]})).mark_rule(
        strokeDash=[4, 4], color="#1F2328").encode(x="x:Q"))
st.altair_chart(alt.layer(*layers).properties(height=44 * len(order) + 40), width="stretch")
st.caption("Solid bars: decoy test; pale bars: clean test"
           + (" (lines: ± one standard deviation over seeds)" if n_seeds > 1 else "")
           + ". Dashed line: the clean reference's decoy-test accuracy (gap closed = 1). Green: "
           "corrections that need no pixel mask; red: corrections that use the patch location; "
           "beige: the fine-tuning control.")

# ------------------------------------------------------------------------------------ narrative
st.header("Reading the numbers")
van_acc, cln_acc = _f(van.get("decoy_test_acc")), _f(cln.get("decoy_test_acc"))
gap = cln_acc - van_acc
lines = [f"- The vanilla model reaches **{ui.pct(van_acc)}** on the decoy test set and "
         f"**{ui.pct(_f(van.get('clean_test_acc')))}** without the patch; the clean reference "
         f"**{ui.pct(cln_acc)}**: a gap of **{ui.pp(gap)}** to close."]
has_gap = math.isfinite(gap) and gap > 0
if not has_gap:
    lines.append("- Here the clean reference is **not** better than the vanilla model on the decoy "
                 "test set, so there is no gap to close (gap closed is left empty): the shortcut "
                 "did not cost this model accuracy. Read the accuracies themselves.")
elif gap < 0.03:
    lines.append("- The gap is small on this case, so gap-closed ratios are noisy: read the "
                 "accuracies themselves.")
corrections = [r for r in rows if not r.get("control")] or rows
controls = [r for r in rows if r.get("control")]
ranked = sorted(corrections, key=lambda r: -_f(r.get("decoy_test_acc")))
best = ranked[0]


def _closed(r: dict) -> str:
    g = r.get("gap_closed")
    return f"closes **{_f(g):.0%}** of the gap" if g is not None else "reaches"


lines.append(f"- Best: **{best.get('label')}** {_closed(best)} "
             f"({ui.pct(_f(best.get('decoy_test_acc')))} decoy test{_sd(best, 'decoy_test_acc')}"
             f"), {'using' if best.get('uses_mask') else 'without'} the patch mask.")
free = [r for r in ranked if not r.get("uses_mask")]
if free:
    fb = free[0]
    lines.append(f"- Best without any pixel mask: **{fb.get('label')}**, {_closed(fb)} "
                 f"({ui.pct(_f(fb.get('decoy_test_acc')))}{_sd(fb, 'decoy_test_acc')}).")
failed = [r for r in corrections if has_gap and (r.get("gap_closed") is None
                                                 or _f(r["gap_closed"]) < 0.5)]
for r in failed:
    g = r.get("gap_closed")
    lines.append(
        f"- **{r.get('label')}** {'did not help' if g is None or _f(g) <= 0.05 else 'helped little'}"
        f" (gap closed {'—' if g is None else f'{_f(g):.0%}'}; decoy test "
        f"{ui.pct(_f(r.get('decoy_test_acc')))}{_sd(r, 'decoy_test_acc')}, clean test "
        f"{ui.pct(_f(r.get('clean_test_acc')))}).")
removal = [r for r in failed if r["method"] in ("suppression", "pclarc")]
if removal:
    lines.append(
        f"- {' and '.join(r.get('label') for r in removal)} only remove: "
        f"{'they change' if len(removal) > 1 else 'it changes'} no weight that would teach the "
        "digits. Removing what carries the shortcut cannot add the knowledge the vanilla model "
        f"never learned: on images with no patch at all it reaches only "
        f"{ui.pct(_f(van.get('clean_test_acc')))}.")
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
        f"{ui.pct(_f(r.get('decoy_test_acc')))} on the decoy test set (gap closed "
        f"{_f(r.get('gap_closed')):.0%}): training longer on the decoy data "
        + ("does not remove the shortcut, so the fine-tuned corrections' gains come from what "
           "they add to the loss or the data." if _f(r.get("gap_closed")) < 0.25 else
           "already helps here, so part of the fine-tuned corrections' gains is the extra "
           "training itself."))
n_test = (ui.report(study).get("data") or {}).get("n_test")
fine = [r for r in corrections if r["method"] in ("rrr", "influence_penalty", "counterexamples")]
if n_test and any(_f(r.get("gap_closed")) > 1.0 for r in fine):
    p = float(np.mean([_f(r.get("decoy_test_acc")) for r in fine]))
    se = math.sqrt(p * (1 - p) / n_test)
    lines.append("- A ratio above 1 means the corrected model beat the clean reference on the decoy "
                 "test set. The fine-tuned models train for more epochs in total than the "
                 "reference (vanilla training plus fine-tuning); differences of a point or so are "
                 f"within the noise of the test set (one standard error of an accuracy near "
                 f"{p:.0%} on {n_test} images is about {100 * se:.1f} pp).")
lines.append("- Decoy mass after correction tells whether the explanations moved off the patch: "
             + ", ".join(f"{r.get('label')} {ui.pct(_f(r.get('decoy_mass')))}" for r in rows)
             + f" (vanilla {ui.pct(_f(van.get('decoy_mass')))}, clean "
             f"{ui.pct(_f(cln.get('decoy_mass')))}).")
st.markdown("\n".join(lines))

st.subheader("What each method needs")
st.markdown("\n".join(
    f"- **{r.get('label')}** — uses the mask: **{'yes' if r.get('uses_mask') else 'no'}**. "
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
        | {"gap closed": st.column_config.NumberColumn("gap closed", format="%.2f")})
    rrr = next((r for r in rows if r["method"] == "rrr"), None)
    for a in anchors:
        mine = (f" Here RRR reaches {ui.pct(_f(rrr.get('decoy_test_acc')))} against a vanilla "
                f"{ui.pct(van_acc)} and a clean reference {ui.pct(cln_acc)} (gap closed "
                f"{'—' if rrr.get('gap_closed') is None else format(_f(rrr['gap_closed']), '.2f')}"
                ")." if rrr else "")
        st.markdown(f"**Their setup:** {a.get('setup', '')}.  \n"
                    f"**What differs here:** {a.get('differs', '')}.{mine}")

# ------------------------------------------------------------------------------------ tuning
st.header("Tuning on the validation split")
for r in rows:
    rec = records.get(r["method"]) or {}
    grid = rec.get("grid") or []
    with st.expander(f"{r.get('label')}: chosen {_strength(r)}"):
        if grid:
            st.dataframe(pd.DataFrame([{k: (str(v) if isinstance(v, list) else v)
                                        for k, v in g.items()} for g in grid]),
                         hide_index=True, column_config={"val_acc": st.column_config.NumberColumn(
                             "validation acc", format="percent")})
        if r["method"] == "influence_penalty" and rec.get("heatmap") is not None:
            heat = np.asarray(rec["heatmap"], dtype=float)
            region = np.asarray(rec.get("region"), dtype=bool)
            st.image([imaging.heatmap(heat, scale=SCALE),
                      imaging.heatmap(region.astype(float), scale=SCALE)],
                     caption=["vanilla influence (mean IG, training images)",
                              f"penalised region ({int(region.sum())} pixels, found without "
                              "the mask)"])
            if rec.get("region_precision") is not None:
                st.caption(
                    f"Checked afterwards against the patch positions (not used by the "
                    f"correction): {_f(rec['region_precision']):.0%} of the region's pixels lie "
                    f"where a patch can be, and it covers {_f(rec.get('region_recall')):.0%} of "
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
cfg_experts = getattr(study.config, "experts", None) or {}
LAYERS = [str(x) for x in (cfg_experts.get("layers") or ["conv2"])]
c1, c2, c3 = st.columns(3)
with c1:
    chosen = ui.choice("Correction", names, param="correction", format_func=labels.get)
with c2:
    layer = ui.choice("Layer", LAYERS, param="layer", default=LAYERS[-1])
with c3:
    cls = ui.choice("Class", list(range(N_CLASSES)), param="cls")
qoi, doi = {"kind": "class", "class": int(cls)}, {"kind": "class-images"}


def _view(model: str) -> dict | None:
    if model in ui.BASE_MODELS:
        try:
            return ui.experts(model, layer, int(cls), study)
        except Exception:  # outside the precomputed classes/layers: the on-demand path below
            pass
    if ui.has_experts_for(model, layer, qoi, doi, study):
        return ui.experts_for(model, layer, qoi, doi, study)
    return None


before, after, ref_view = _view("vanilla"), _view(chosen), _view("clean")
if after is None:
    offer = st.empty()
    with offer.container():
        st.info(f"The experts of **{layer}** for class **{cls}** of the **{labels[chosen]}** model "
                "are not computed yet (a few seconds; cached on disk).")
        clicked = st.button("Compute", type="primary", key="compute-corrected-experts")
    if clicked:
        after = ui.compute_experts_for(chosen, layer, qoi, doi, study)
        if after is not None:
            offer.empty()


def _mass(view: dict | None) -> float:
    dm = [_f(x.get("decoy_mass")) for x in (view or {}).get("rows", [])]
    dm = [d for d in dm if math.isfinite(d)]
    return float(np.mean(dm)) if dm else float("nan")


cols = st.columns(3)
for col, title, view in ((cols[0], "vanilla (before)", before),
                         (cols[1], f"{labels[chosen]} (after)", after),
                         (cols[2], "clean reference", ref_view)):
    with col:
        st.subheader(title)
        if view is None or not view.get("rows"):
            st.caption("Not available.")
            continue
        t = pd.DataFrame(view["rows"]).sort_values("rank")
        keep = [c for c in ("rank", "unit", "score", "decoy_mass") if c in t]
        st.dataframe(t[keep], hide_index=True, column_config={
            "score": st.column_config.NumberColumn("influence", format="%.4g"),
            "decoy_mass": st.column_config.NumberColumn("decoy mass", format="percent")})
        images, maps = np.asarray(view.get("images", [])), np.asarray(view.get("maps", []))
        if images.ndim == 3 and maps.ndim == 4 and len(images):
            n_img = min(4, images.shape[0])
            grid = [[imaging.masked_image(images[i], maps[k, i], scale=SCALE)
                     for i in range(n_img)] for k in range(min(3, maps.shape[0]))]
            st.image(ui.image_grid(grid), caption="top experts (rows) on the same test images: "
                     "pixels above the 95th percentile of each interpretation")
        m = _mass(view)
        if math.isfinite(m):
            st.caption(f"Mean decoy mass of the experts' interpretations: {m:.0%} "
                       f"(chance {ui.CHANCE_DECOY_MASS:.1%}).")
mb, ma, mc = _mass(before), _mass(after), _mass(ref_view)
if all(math.isfinite(v) for v in (mb, ma, mc)):
    moved = ("fell" if ma < mb - 0.02 else "rose" if ma > mb + 0.02 else "barely moved")
    st.markdown(
        f"The experts' mean decoy mass {moved}: {mb:.0%} before, {ma:.0%} after, {mc:.0%} for the "
        "clean reference. An expert's interpretation shows what drives *that unit* (Integrated "
        "Gradients of its activation), not whether the class still depends on it: units near the "
        "input keep seeing a bright corner square even in a model whose output ignores it (the "
        "clean reference's experts are the baseline for that). The class-level decoy mass in the "
        "results table (attribution of the class logit) is the direct test of the correction.")

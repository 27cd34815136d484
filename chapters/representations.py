"""Chapter 3: the representations of influence compared, measured — which one exposes the shortcut?

Everything drawn here is read from the ``representations`` stage
(``core.stages.representations.build``):
the maps, the metrics, the curves and the randomisation test; every case-specific word (models,
region, classes) from ``study.case_facts()``. This page never trains or differentiates; when the
stage is missing it offers to build it (inside ``st.status``, with a progress bar).
"""

from __future__ import annotations

import math

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui

VIEWS = {"heatmap": "signed heatmap", "overlay": "heatmap over the image"}
# Plain-word definitions of the engine's terms, shown as help where the columns and controls use them.
TERMS = {
    "slice": "Where in the network the influence is measured: the input pixels or one internal layer.",
    "quantity": "Quantity of interest: the output number being explained, e.g. the score (logit) of the "
                "image's class, the difference of two classes' scores, or one unit's activation.",
    "distribution": "Distribution of interest: the inputs the gradient is averaged over — the image alone "
                    "(point), a straight path from a black image to it (linear, as in Integrated "
                    "Gradients), noisy copies of it (Gaussian), or every training image of a class.",
    "multiplier": "What the averaged gradient is multiplied by to give an attribution, e.g. the input x "
                  "or its difference from the baseline x − x′ (— : the gradient itself).",
    "then": "A step after the influence call: Grad-CAM weighs the layer's channels and upsamples; internal "
            "influence keeps the top experts and combines their interpretations.",
}

study = ui.current_study()
facts = ui.facts(study)
ui.chapter(
    ["representations"], "Representations compared",
    "Saliency, gradient × input, Integrated Gradients, SmoothGrad, Grad-CAM and the paper's "
    "internal influence are **one engine in six configurations**: a slice of the network, a quantity "
    "(the logit of the image's class), a distribution of interest and an optional multiplier. Here "
    "they explain the same test images for each model of the case, and each explanation is "
    "measured: is it faithful to the model (deletion / insertion), does it depend on the learned "
    "weights at all (randomisation test)"
    + (f", and does it point at the {ui.region_name(facts)}?" if facts.get("region") else "?"),
    study=study, what="This page", key="build-representations")
payload = ui.artifact("representations", study)
if not payload or not payload.get("rows"):
    st.warning("The representations stage is built but holds no rows; rebuild it from the command "
               "line: `python -m core build <case> --force` (or the build button after clearing the cache).")
    st.stop()

info: dict = payload.get("metrics_info", {})
rows = pd.DataFrame(payload["rows"])
methods_meta = {m["method"]: m for m in payload.get("methods", [])}
labels = {m: methods_meta.get(m, {}).get("label", m) for m in rows["method"].unique()}
models = list(dict.fromkeys(rows["model"]))
methods = list(dict.fromkeys(rows["method"]))
cfg = payload.get("config", {})
REGION = ui.region_name(facts)
# Only the metrics the rows carry: without a region the localisation ones are absent, not zero.
metric_keys = [k for k in info if k in rows.columns and rows[k].notna().any()]
ALIAS = facts.get("region_alias")  # the case's own name of the region mass (DecoyMNIST: decoy_mass)
MASS = next((k for k in (ALIAS, "region_mass") if k and k in metric_keys), None)
if MASS:  # one localisation share is enough: the alias duplicates region_mass
    metric_keys = [k for k in metric_keys if k not in ("region_mass", ALIAS) or k == MASS]
REGION = REGION or ("region" if MASS else None)
chance = payload.get("chance", facts.get("chance"))
chance = None if chance is None else float(chance)
subject = facts.get("subject") if facts.get("subject") in models else models[0]
reference = facts.get("reference") if facts.get("reference") in models else None
if reference is None and not facts.get("models") and len(models) > 1:
    reference = models[1]  # a study that cannot state its roles: the second model is the reference
SCALE = ui.scale_for(facts.get("size") or (np.asarray(payload.get("images", {}).get("x", [])).shape[1:3]
                                           or None))


def _value(model: str | None, method: str, key: str) -> float | None:
    sel = rows[(rows["model"] == model) & (rows["method"] == method)]
    if sel.empty:
        return None
    v = sel.iloc[0][key]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _head(key: str) -> str:
    meta = info.get(key, {})
    return ui.inert(f"{meta.get('label', key)} {meta.get('arrow', '')}".strip())  # names the region


# ------------------------------------------------------------------------------------ the methods
with st.expander("The six methods as engine configurations", expanded=False):
    table = pd.DataFrame([{"method": m.get("label", m["method"]), "slice": m.get("slice"),
                           "quantity": m.get("qoi"), "distribution": m.get("doi"),
                           "multiplier": m.get("multiplier"), "then": m.get("post")}
                          for m in payload.get("methods", [])])
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={k: st.column_config.TextColumn(k, help=v) for k, v in TERMS.items()})
    used = ", ".join(f"{labels.get(k, k)}: {v}" for k, v in (cfg.get("options") or {}).items() if v)
    st.caption("Every map comes from the same `influence(model, inputs, layer, qoi, doi)` call; only the "
               "configuration changes. Grad-CAM and internal influence add one step after it (the last "
               "column)." + (f" Options set by the case study — {used}." if used else ""))
    chosen = payload.get("experts") or {}
    if chosen:
        st.markdown("**The experts behind the internal-influence maps** (per target class: the units of "
                    "the layer with the largest class-conditional influence, and the weight of each "
                    "unit's interpretation in the map)")
        st.dataframe(pd.DataFrame([
            {"model": mod, "class": ui.class_name(int(e["class"]), facts),
             "experts (unit: weight)": ", ".join(f"{int(u)}: {float(w):.2f}"
                                                 for u, w in zip(e["units"], e["weights"], strict=False))}
            for mod, per in chosen.items() for e in per]), hide_index=True, width="stretch",
            column_config={"experts (unit: weight)": st.column_config.TextColumn(
                "experts (unit: weight)",
                help="Experts: the units of the layer with the largest class-conditional influence on the "
                     "class. Weight: each one's share in the map (its positive influence score over the "
                     "sum of them).")})

# ------------------------------------------------------------------------------------ the narrative
rep = ui.report(study)
accs = (rep.get("models") or {})
headline = facts.get("headline")
lines = []
if subject in accs:
    cols = ui.accuracy_columns(accs, facts)
    shown_sets = [(k, lab) for k, lab in cols if not k.startswith("train")][:3]
    parts = [f"**{ui.pct(accs[subject].get(k))}** on {lab}" for k, lab in shown_sets
             if accs[subject].get(k) is not None]
    if parts:
        ref_parts = ([f"**{ui.pct(accs[reference].get(k))}**" for k, _ in shown_sets
                      if accs[reference].get(k) is not None] if reference in accs else [])
        lines.append(f"**{ui.inert(subject)}** scores {', '.join(parts)}"
                     + (f"; **{ui.inert(reference)}** {' / '.join(ref_parts)}." if ref_parts else "."))
if MASS:
    vm = {m: _value(subject, m, MASS) for m in methods}
    cm = {m: _value(reference, m, MASS) for m in methods} if reference else {}
    gap = {m: vm[m] - cm[m] for m in methods if vm.get(m) is not None and cm.get(m) is not None}
    known = [m for m in vm if vm[m] is not None]
    best = max(gap, key=gap.get) if gap else max(known, key=vm.get, default=None)
    if best is not None:
        tail = (f", against **{ui.pct(cm[best])}** on {ui.inert(reference)}"
                if best in cm and cm[best] is not None else "")
        chance_txt = f" (chance {ui.pct(chance)})" if chance is not None else ""
        lines.append(
            f"**{labels[best]}** exposes the shortcut best: on {ui.inert(subject)} it puts "
            f"**{ui.pct(vm[best])}** of its positive attribution on the {REGION}{tail}{chance_txt}, "
            + (f"the largest {ui.inert(subject)}-minus-{ui.inert(reference)} gap of the {len(methods)} "
               f"methods."
               if gap else f"the largest of the {len(methods)} methods."))
        if chance is not None:
            below = [labels[m] for m in methods if vm.get(m) is not None and vm[m] <= 2 * chance]
            if below:
                lines.append(f"At most twice chance on {ui.inert(subject)} — the shortcut barely shows: "
                             f"{', '.join(below)}.")
if "mprt_spearman" in metric_keys:
    sim = {m: _value(subject, m, "mprt_spearman") for m in methods}
    sim = {m: v for m, v in sim.items() if v is not None}
    if sim:
        worst = max(sim, key=sim.get)
        bestm = min(sim, key=lambda m: abs(sim[m]))
        lines.append(
            f"Sanity check (every layer re-initialised, top first): **{labels[worst]}** stays the most "
            f"similar to its explanation of the trained {ui.inert(subject)} (Spearman "
            f"**{sim[worst]:.2f}**), so "
            f"it depends least on what the model learned; **{labels[bestm]}** changes most "
            f"(**{sim[bestm]:+.2f}**).")
if {"deletion_auc", "insertion_auc"} <= set(metric_keys):
    de = {m: _value(subject, m, "deletion_auc") for m in methods}
    ins = {m: _value(subject, m, "insertion_auc") for m in methods}
    de = {m: v for m, v in de.items() if v is not None}
    ins = {m: v for m, v in ins.items() if v is not None}
    if de and ins:
        d, i = min(de, key=de.get), max(ins, key=ins.get)
        lines.append(f"Faithfulness on {ui.inert(subject)}: deleting pixels in **{labels[d]}**'s order "
                     f"destroys the prediction fastest (deletion AUC **{de[d]:.3f}**); inserting them in "
                     f"**{labels[i]}**'s order restores it fastest (insertion AUC **{ins[i]:.3f}**).")
st.subheader("What the measurements say")
st.markdown("\n".join(f"- {line}" for line in lines) or "No measurements to read.")
if MASS:
    st.caption(
        f"Two questions, two directions. *Is the explanation faithful to a flawed model?* On "
        f"{ui.inert(subject)}, which may use the {REGION}, a faithful explanation **should** point at it "
        f"({_head(MASS).rsplit(' ', 1)[0]} ↑ on {ui.inert(subject)})"
        + (f", and should not on {ui.inert(reference)} (↓)" if reference else "")
        + f". *Does the model look at the right thing?* The less attribution on the {REGION}, the "
        "better (↓) — for any model. The table's arrows answer the second question.")
else:
    st.caption(ui.no_region_note(facts))

# ------------------------------------------------------------------------------------ the maps
st.subheader("The same images under every method")
images = payload.get("images", {})
xs = np.asarray(images.get("x", np.zeros((0, 8, 8))))
masks = images.get("mask")
masks = None if masks is None else np.asarray(masks)
ys = np.asarray(images.get("y", np.zeros(len(xs), int)))
preds = images.get("pred", {}) or {}
maps = payload.get("maps", {})
pair_label = f"{ui.inert(subject)} and {ui.inert(reference)}" if reference else subject
c1, c2, c3 = st.columns([1.2, 1.2, 2])
with c1:
    view = ui.choice("Show maps as", list(VIEWS), param="rview", widget="radio", format_func=VIEWS.get,
                     horizontal=True,
                     help="Signed heatmap: red pixels raise the class's score, blue ones lower it. Over the "
                          "image: the same colours blended over the picture.")
with c2:
    shown_models = [m for m in models if m in maps]
    pair = ui.choice("Models", ["both", *shown_models], param="rmodels",
                     format_func=lambda m: pair_label if m == "both" else ui.model_label(m, facts=facts),
                     help="Whose explanations to draw: the model under study, the reference (trained "
                          "without the shortcut), or both side by side.")
with c3:
    n_show = st.slider("Images", 1, max(1, len(xs)), min(4, max(1, len(xs))), key="rep-n-images",
                       help="How many of the stage's test images to draw (the same images for every "
                            "method).")
cols_models = ([m for m in shown_models if m in (subject, reference)] if pair == "both" else [pair])


def _render(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    return ui.heatmap(a, SCALE) if view == "heatmap" else ui.overlay(x, a, SCALE)


header = st.columns(1 + len(methods))
header[0].markdown(f"**image** ({REGION} in red)" if masks is not None else "**image**")
for j, m in enumerate(methods):
    header[j + 1].markdown(f"**{labels[m]}**")
for i in range(min(n_show, len(xs))):
    cells = st.columns(1 + len(methods))
    pred_txt = ", ".join(f"{ui.inert(m)}: {ui.class_name(int(np.asarray(preds[m])[i]), facts)}"
                         for m in cols_models if m in preds)
    ui.image(ui.tinted(xs[i], None if masks is None else masks[i], SCALE), where=cells[0],
                   about=f"image {i + 1}",
                   caption=f"label {ui.class_name(int(ys[i]), facts)}; predicted {pred_txt}")
    for j, m in enumerate(methods):
        shown = [(_render(xs[i], np.asarray(maps[mod][m])[i]), mod) for mod in cols_models if m in maps[mod]]
        if shown:
            ui.image([s for s, _ in shown], where=cells[j + 1], about=VIEWS[view],
                               caption=[f"{labels[m]} of {ui.inert(mod)} on image {i + 1}"
                                        for _, mod in shown])
TARGET = cfg.get("target", "label")
st.caption("Red: positive attribution (evidence for the explained class), blue: negative; each map is "
           "scaled to its own largest magnitude. Grad-CAM and internal influence are "
           "non-negative by construction. The explained class (the target) is each image's "
           + ("**label**" if TARGET == "label" else "**predicted class** (each model's own prediction)")
           + ", as the case study's `[representations] target` sets it (\"label\" or \"prediction\"); "
           "the influence chapter offers both targets per view.")

# ------------------------------------------------------------------------------------ the table
st.subheader("Metrics")
table = rows[["label", "model", *metric_keys]].rename(columns={"label": "method", **{k: _head(k) for k in
                                                                                     metric_keys}})
# The metrics the text quotes (MPRT, sparseness) come right after the method and the model, so
# that they show unscrolled on a 1400 px wide page; the method stays pinned when scrolled.
QUOTED = [_head(k) for k in ("mprt_spearman", "sparseness") if k in metric_keys]
st.dataframe(table, hide_index=True, width="stretch",
             column_order=ui.drawing.quoted_first(table, ["method", "model", *QUOTED]),
             column_config={"method": st.column_config.TextColumn("method", width=150, pinned=True),
                            **{_head(k): st.column_config.NumberColumn(
                                _head(k), format="%.3f", help=ui.inert(info[k].get("description")))
                               for k in metric_keys}})
st.caption(f"Means over {cfg.get('n_images', '?')} test images (randomisation test: the first "
           f"{payload.get('mprt', {}).get('n_images', '?')}). ↑ higher is better, ↓ lower is better"
           + (f" (for the {REGION} metrics: does the model look at the right thing)" if MASS else "")
           + ". MPRT Spearman is the similarity after every layer is re-initialised; the curve below "
           "shows each step.")
csv = rows[["method", "label", "model", *metric_keys]]
ui.download_csv(csv, f"representations_{ui.current_case()}.csv", "Download the metrics (CSV)",
                key="dl-representations-csv")
with st.expander("What each metric measures, and whose implementation it is"):
    # a list, not a table: the descriptions are paragraphs, and table cells would clip them
    st.markdown("\n".join(f"- **{_head(k)}** — {ui.inert(info[k].get('description'))} "
                          f"*Implementation:* {info[k].get('implementation')}." for k in metric_keys))

# ------------------------------------------------------------------------------------ charts
st.subheader("Each metric per method")
long = rows.melt(id_vars=["label", "model"], value_vars=metric_keys, var_name="metric", value_name="value")
long["metric"] = long["metric"].map(_head)
long = long.dropna(subset=["value"])
bars = alt.Chart(long).mark_bar().encode(
    y=alt.Y("label:N", title=None, sort=[labels[m] for m in methods], axis=alt.Axis(labelLimit=180)),
    yOffset=alt.YOffset("model:N", sort=models),
    x=alt.X("value:Q", title=None),
    color=alt.Color("model:N", sort=models, title="model",
                    scale=alt.Scale(domain=list(models),
                                    range=[ui.model_colors(list(models), facts)[m] for m in models])),
    tooltip=["metric", "label", "model", alt.Tooltip("value:Q", format=".3f")],
).properties(width=210, height=190).facet(facet=alt.Facet("metric:N", title=None,
                                                          sort=[_head(k) for k in metric_keys]), columns=3
                                          ).resolve_scale(x="independent")
ui.chart(bars, "Every metric of every method, per model", long)

st.subheader("Deletion and insertion curves")
curves = payload.get("curves", {})
frac = list(curves.get("fraction", []))
recs = []
for kind in ("deletion", "insertion"):
    for mod, per in (curves.get(kind) or {}).items():
        for meth, ys_ in per.items():
            for f, v in zip(frac, list(np.asarray(ys_, dtype=float)), strict=False):
                recs.append({"curve": kind, "model": mod, "method": labels.get(meth, meth),
                             "fraction of pixels": f, "probability of the class": v})
if recs:
    cdf = pd.DataFrame(recs)
    curve_model = ui.choice("Model (curves)", [m for m in models if m in set(cdf["model"])],
                            param="rcurves",
                            format_func=lambda m: ui.model_label(m, facts=facts),
                            help="Deletion AUC: area under the class probability as the most-attributed "
                                 "pixels are blacked out first (lower: a more faithful map). Insertion AUC: "
                                 "the same as they are put back into a blurred image (higher is better).")
    sub = cdf[cdf["model"] == curve_model]
    line = alt.Chart(sub).mark_line().encode(
        x=alt.X("fraction of pixels:Q", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("probability of the class:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("method:N", sort=[labels[m] for m in methods]),
        tooltip=["method", alt.Tooltip("fraction of pixels:Q", format=".2f"),
                 alt.Tooltip("probability of the class:Q", format=".3f")],
    ).properties(width=320, height=260).facet(column=alt.Column("curve:N", title=None,
                                                                sort=["deletion", "insertion"]))
    ui.chart(line, "Deletion and insertion curves of every method", sub)
    st.caption("Deletion: the most-attributed pixels are set to black first (a faithful map makes the curve "
               "fall fast: low area ↓). Insertion: they are put back first into a blurred image (a faithful "
               "map makes it rise fast: high area ↑). Mean over the images.")

st.subheader("Randomisation test (MPRT)", help=(
    "MPRT, the model parameter randomisation test: re-initialise the network's layers one after another "
    "and see whether the explanation changes. A map that stays the same cannot be explaining what the "
    "model learned."))
mp = payload.get("mprt", {})
layers = list(mp.get("layers", []))
steps = [("+ " if k else "") + name for k, name in enumerate(layers)]
mrecs = []
for mod, per in (mp.get("curves") or {}).items():
    for meth, vals in per.items():
        for k, v in enumerate(vals):
            if v is not None:
                mrecs.append({"model": mod, "method": labels.get(meth, meth), "randomised up to": steps[k],
                              "step": k, "Spearman": float(v)})
if mrecs:
    mdf = pd.DataFrame(mrecs)
    chart = alt.Chart(mdf).mark_line(point=True).encode(
        x=alt.X("randomised up to:N", sort=steps, title="layers re-initialised (top first, cumulative)"),
        y=alt.Y("Spearman:Q", title="Spearman with the trained model's map"),
        color=alt.Color("method:N", sort=[labels[m] for m in methods]),
        tooltip=["model", "method", "randomised up to", alt.Tooltip("Spearman:Q", format=".3f")],
    ).properties(width=320, height=260).facet(column=alt.Column("model:N", sort=models, title=None))
    ui.chart(chart, "Randomisation test: Spearman with the trained model's map as layers are re-initialised",
             mdf)
    st.caption("Adebayo et al. (2018): the layers are re-initialised one after another from the output down; "
               "after each, the map is compared with the trained model's map (Spearman rank correlation). "
               "An explanation that stays similar does not depend on what the model learned — it fails the "
               "sanity check. The table's MPRT column is the last point (every layer re-initialised).")

seconds = payload.get("seconds") or {}
if seconds.get("total") is not None:
    cpu = seconds.get("cpu")
    st.caption(f"This stage took {float(seconds['total']):.0f} s to compute"
               + (f" ({float(cpu):.0f} s of CPU time)." if cpu is not None else "."))

ui.next_chapter("chapters/corrections.py" if ui.stage_exists("corrections") else "chapters/method.py",
                "Corrections" if ui.stage_exists("corrections") else "Method",
                "Next: what it takes to remove the shortcut, and how much of the gap each correction "
                "closes." if ui.stage_exists("corrections") else "")

"""Chapter 3: the representations of influence compared, measured — which one exposes the shortcut?

Everything drawn here is read from the ``representations`` stage (``core.representations.build_stage``):
the maps, the metrics, the curves and the randomisation test. This page never trains or differentiates;
when the stage is missing it offers to build it (inside ``st.status``, with a progress bar).
"""

from __future__ import annotations

import math

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui
from core import imaging

SCALE = 3
VIEWS = {"heatmap": "signed heatmap", "overlay": "heatmap over the image"}

study = ui.current_study()
st.title("Representations compared")
st.markdown(
    "Saliency, gradient × input, Integrated Gradients, SmoothGrad, Grad-CAM and the paper's "
    "internal influence are **one engine in six configurations**: a slice of the network, a quantity "
    "(the logit of the image's class), a distribution of interest and an optional multiplier. Here "
    "they explain the same decoy test images for the model trained **with** the decoy (vanilla) and "
    "the same network trained **without** it (clean), and each explanation is measured: does it point "
    "at the patch, is it faithful to the model (deletion / insertion), does it depend on the learned "
    "weights at all (randomisation test)?")

if not ui.require(study, ["representations"], "This page", key="build-representations"):
    st.stop()
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
chance = float(payload.get("chance_decoy_mass", ui.CHANCE_DECOY_MASS))
cfg = payload.get("config", {})
metric_keys = [k for k in info if k in rows.columns]


def _value(model: str, method: str, key: str) -> float | None:
    sel = rows[(rows["model"] == model) & (rows["method"] == method)]
    if sel.empty:
        return None
    v = sel.iloc[0][key]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _head(key: str) -> str:
    meta = info.get(key, {})
    return f"{meta.get('label', key)} {meta.get('arrow', '')}".strip()


# ------------------------------------------------------------------------------------ the methods
with st.expander("The six methods as engine configurations", expanded=False):
    table = pd.DataFrame([{"method": m.get("label", m["method"]), "slice": m.get("slice"),
                           "quantity": m.get("qoi"), "distribution": m.get("doi"),
                           "multiplier": m.get("multiplier"), "then": m.get("post")}
                          for m in payload.get("methods", [])])
    st.dataframe(table, hide_index=True, width="stretch")
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
            {"model": mod, "class": int(e["class"]),
             "experts (unit: weight)": ", ".join(f"{int(u)}: {float(w):.2f}"
                                                 for u, w in zip(e["units"], e["weights"], strict=False))}
            for mod, per in chosen.items() for e in per]), hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------ the narrative
vanilla, clean = ("vanilla" if "vanilla" in models else models[0]), ("clean" if "clean" in models else None)
rep = ui.report(study)
accs = (rep.get("models") or {})
lines = []
if vanilla in accs and accs[vanilla].get("decoy_test_acc") is not None:
    a = accs[vanilla]
    lines.append(f"The vanilla model scores **{ui.pct(a.get('decoy_test_acc'))}** on decoy test images and "
                 f"**{ui.pct(a.get('clean_test_acc'))}** without the patch"
                 + (f"; the clean model **{ui.pct(accs[clean].get('decoy_test_acc'))}** / "
                    f"**{ui.pct(accs[clean].get('clean_test_acc'))}**." if clean in accs else "."))
if "decoy_mass" in rows.columns:
    vm = {m: _value(vanilla, m, "decoy_mass") for m in methods}
    cm = {m: _value(clean, m, "decoy_mass") for m in methods} if clean else {}
    gap = {m: vm[m] - cm[m] for m in methods if vm.get(m) is not None and cm.get(m) is not None}
    known = [m for m in vm if vm[m] is not None]
    best = max(gap, key=gap.get) if gap else max(known, key=vm.get, default=None)
    if best is not None:
        tail = (f", against **{ui.pct(cm[best])}** on the clean model" if best in cm and cm[best] is not None
                else "")
        lines.append(
            f"**{labels[best]}** exposes the shortcut best: on the vanilla model it puts "
            f"**{ui.pct(vm[best])}** of its positive attribution on the 16 patch pixels{tail} "
            f"(chance {ui.pct(chance)}), the largest vanilla-minus-clean gap of the "
            f"{len(methods)} methods.")
        below = [labels[m] for m in methods if vm.get(m) is not None and vm[m] <= 2 * chance]
        if below:
            lines.append(f"At most twice chance on the vanilla model — the shortcut barely shows: "
                         f"{', '.join(below)}.")
if "mprt_spearman" in rows.columns:
    sim = {m: _value(vanilla, m, "mprt_spearman") for m in methods}
    sim = {m: v for m, v in sim.items() if v is not None}
    if sim:
        worst = max(sim, key=sim.get)
        bestm = min(sim, key=lambda m: abs(sim[m]))
        lines.append(
            f"Sanity check (every layer re-initialised, top first): **{labels[worst]}** stays the most "
            f"similar to its explanation of the trained vanilla model (Spearman **{sim[worst]:.2f}**), so "
            f"it depends least on what the model learned; **{labels[bestm]}** changes most "
            f"(**{sim[bestm]:+.2f}**).")
if {"deletion_auc", "insertion_auc"} <= set(rows.columns):
    de = {m: _value(vanilla, m, "deletion_auc") for m in methods}
    ins = {m: _value(vanilla, m, "insertion_auc") for m in methods}
    de = {m: v for m, v in de.items() if v is not None}
    ins = {m: v for m, v in ins.items() if v is not None}
    if de and ins:
        d, i = min(de, key=de.get), max(ins, key=ins.get)
        lines.append(f"Faithfulness on the vanilla model: deleting pixels in **{labels[d]}**'s order "
                     f"destroys the prediction fastest (deletion AUC **{de[d]:.3f}**); inserting them in "
                     f"**{labels[i]}**'s order restores it fastest (insertion AUC **{ins[i]:.3f}**).")
st.subheader("What the measurements say")
st.markdown("\n".join(f"- {line}" for line in lines) or "No measurements to read.")
st.caption("Reading the decoy metrics: on the **vanilla** model, which uses the patch, a faithful "
           "explanation *should* point at it (high decoy mass); on the **clean** model it should "
           "not. The ↓ marks the direction for a sound model.")

# ------------------------------------------------------------------------------------ the maps
st.subheader("The same images under every method")
images = payload.get("images", {})
xs = np.asarray(images.get("x", np.zeros((0, 28, 28))))
masks = np.asarray(images.get("mask", np.zeros_like(xs, dtype=bool)))
ys = np.asarray(images.get("y", np.zeros(len(xs), int)))
preds = images.get("pred", {}) or {}
maps = payload.get("maps", {})
c1, c2, c3 = st.columns([1.2, 1.2, 2])
with c1:
    view = ui.choice("Show maps as", list(VIEWS), param="rview", widget="radio", format_func=VIEWS.get,
                     horizontal=True)
with c2:
    shown_models = [m for m in models if m in maps]
    pair = ui.choice("Models", ["both", *shown_models], param="rmodels",
                     format_func=lambda m: "vanilla and clean" if m == "both" else ui.model_label(m))
with c3:
    n_show = st.slider("Images", 1, max(1, len(xs)), min(4, max(1, len(xs))), key="rep-n-images")
cols_models = [m for m in shown_models if m in (vanilla, clean)] if pair == "both" else [pair]


def _outlined(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = imaging.grayscale(x, scale=SCALE).astype(np.float64)
    m = np.asarray(mask, bool).repeat(SCALE, 0).repeat(SCALE, 1)
    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([230.0, 40.0, 40.0])
    return rgb.round().astype(np.uint8)


def _render(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    return imaging.heatmap(a, scale=SCALE) if view == "heatmap" else imaging.overlay(x, a, scale=SCALE)


header = st.columns(1 + len(methods))
header[0].markdown("**image** (patch in red)")
for j, m in enumerate(methods):
    header[j + 1].markdown(f"**{labels[m]}**")
for i in range(min(n_show, len(xs))):
    cells = st.columns(1 + len(methods))
    pred_txt = ", ".join(f"{m}: {int(np.asarray(preds[m])[i])}" for m in cols_models if m in preds)
    cells[0].image(_outlined(xs[i], masks[i]), caption=f"label {int(ys[i])}; predicted {pred_txt}")
    for j, m in enumerate(methods):
        shown = [(_render(xs[i], np.asarray(maps[mod][m])[i]), mod) for mod in cols_models if m in maps[mod]]
        if shown:
            cells[j + 1].image([s for s, _ in shown], caption=[mod for _, mod in shown])
st.caption("Red: positive attribution (evidence for the image's class), blue: negative; each map is "
           "scaled to its own largest magnitude. Grad-CAM and internal influence are "
           "non-negative by construction.")

# ------------------------------------------------------------------------------------ the table
st.subheader("Metrics")
table = rows[["label", "model", *metric_keys]].rename(columns={"label": "method", **{k: _head(k) for k in
                                                                                     metric_keys}})
st.dataframe(table, hide_index=True, width="stretch",
             column_config={_head(k): st.column_config.NumberColumn(_head(k), format="%.3f",
                                                                    help=info[k].get("description"))
                            for k in metric_keys})
st.caption(f"Means over {cfg.get('n_images', '?')} decoy test images (randomisation test: the first "
           f"{payload.get('mprt', {}).get('n_images', '?')}). ↑ higher is better, ↓ lower is better (for the "
           "decoy metrics: for a sound model). MPRT Spearman is the similarity after every layer is "
           "re-initialised; the curve below shows each step.")
csv = rows[["method", "label", "model", *metric_keys]]
ui.download_csv(csv, f"representations_{ui.current_case()}.csv", "Download the metrics (CSV)",
                key="dl-representations-csv")
with st.expander("What each metric measures, and whose implementation it is"):
    st.dataframe(pd.DataFrame([{"metric": _head(k), "meaning": info[k].get("description"),
                                "implementation": info[k].get("implementation")} for k in metric_keys]),
                 hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------ charts
st.subheader("Each metric per method")
long = rows.melt(id_vars=["label", "model"], value_vars=metric_keys, var_name="metric", value_name="value")
long["metric"] = long["metric"].map(_head)
long = long.dropna(subset=["value"])
bars = alt.Chart(long).mark_bar().encode(
    y=alt.Y("label:N", title=None, sort=[labels[m] for m in methods], axis=alt.Axis(labelLimit=180)),
    yOffset=alt.YOffset("model:N", sort=models),
    x=alt.X("value:Q", title=None),
    color=alt.Color("model:N", sort=models, title="model"),
    tooltip=["metric", "label", "model", alt.Tooltip("value:Q", format=".3f")],
).properties(width=210, height=190).facet(facet=alt.Facet("metric:N", title=None,
                                                          sort=[_head(k) for k in metric_keys]), columns=3
                                          ).resolve_scale(x="independent")
st.altair_chart(bars)

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
    curve_model = ui.choice("Model", [m for m in models if m in set(cdf["model"])], param="rcurves",
                            format_func=ui.model_label)
    sub = cdf[cdf["model"] == curve_model]
    line = alt.Chart(sub).mark_line().encode(
        x=alt.X("fraction of pixels:Q", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("probability of the class:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("method:N", sort=[labels[m] for m in methods]),
        tooltip=["method", alt.Tooltip("fraction of pixels:Q", format=".2f"),
                 alt.Tooltip("probability of the class:Q", format=".3f")],
    ).properties(width=320, height=260).facet(column=alt.Column("curve:N", title=None,
                                                                sort=["deletion", "insertion"]))
    st.altair_chart(line)
    st.caption("Deletion: the most-attributed pixels are set to black first (a faithful map makes the curve "
               "fall fast: low area ↓). Insertion: they are put back first into a blurred image (a faithful "
               "map makes it rise fast: high area ↑). Mean over the images.")

st.subheader("Randomisation test (MPRT)")
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
    st.altair_chart(chart)
    st.caption("Adebayo et al. (2018): the layers are re-initialised one after another from the output down; "
               "after each, the map is compared with the trained model's map (Spearman rank correlation). "
               "An explanation that stays similar does not depend on what the model learned — it fails the "
               "sanity check. The table's MPRT column is the last point (every layer re-initialised).")

seconds = payload.get("seconds") or {}
if seconds.get("total") is not None:
    cpu = seconds.get("cpu")
    st.caption(f"This stage took {float(seconds['total']):.0f} s to compute"
               + (f" ({float(cpu):.0f} s of CPU time)." if cpu is not None else "."))

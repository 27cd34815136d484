"""Chapter 2: which internal units carry a class (the experts), and what each of them looks at.

Precomputed views come from ``study.experts(model, layer, cls)``; any other quantity or
distribution from ``study.experts_for`` (computed on request, inside ``st.status``). The choices
live in the URL (model, cls, quantity, vs, layer, doi, expert, view), so a copied link reopens
this view.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui
from core import imaging

N_CLASSES = 10
SCALE = 4
DEFAULT_DOI = "class-images"
DOIS = {
    "class-images": "training images of the class",
    "class-images-linear": "linear paths to the class's images",
}
VIEWS = {"mask": "mask (95th percentile)", "heatmap": "heatmap", "overlay": "heatmap over the image"}

study = ui.current_study()
st.title("Influence & experts")
st.markdown(
    "Which internal units does the network rely on for a class? For a **layer**, a **quantity** (the "
    "class's logit, or the difference between two classes) and a **distribution** of inputs, each "
    "unit's *distributional influence* is the average gradient of the quantity with respect to that "
    "unit. The units with the largest influence are the class's **experts**. Each expert is then "
    "interpreted on real images: which pixels drive that unit?")

if not ui.require(study, ["models", "experts"], "This page"):
    st.stop()

cfg = getattr(study.config, "experts", None) or {}
rep = ui.report(study)
rep_experts = rep.get("experts") or {}


def _layers() -> list[str]:
    layers = cfg.get("layers") or ([cfg["layer"]] if cfg.get("layer") else [])
    if rep_experts.get("layer") and rep_experts["layer"] not in layers:
        layers = [rep_experts["layer"], *layers]
    return [str(x) for x in layers] or ["conv2"]


LAYERS = _layers()
PRECOMPUTED_CLASSES = [int(c) for c in cfg.get("classes", range(N_CLASSES))]
RESOLUTION = int(cfg.get("resolution", 20))
model = ui.current_model()

# ------------------------------------------------------------------------------------------ choices
c1, c2, c3, c4 = st.columns([1, 1.3, 1, 1.4])
with c1:
    cls = ui.choice("Class", list(range(N_CLASSES)), param="cls",
                    default=PRECOMPUTED_CLASSES[0] if PRECOMPUTED_CLASSES else 0)
with c2:
    quantity = ui.choice("Quantity", ["class", "comparative"], param="quantity", widget="radio",
                         horizontal=True,
                         format_func=lambda q: {"class": f"why {cls}", "comparative": f"why {cls}, not …"}[q])
    vs = None
    if quantity == "comparative":
        vs = ui.choice("… and not", [c for c in range(N_CLASSES) if c != cls], param="vs",
                       default=(cls + 5) % N_CLASSES)
with c3:
    layer = ui.choice("Layer", LAYERS, param="layer", default=rep_experts.get("layer"))
with c4:
    doi_kind = ui.choice("Distribution", list(DOIS), param="doi", format_func=DOIS.get,
                         help="Class images: the gradient at every training image of the class. Linear "
                              f"paths: along the straight line from a black image to each of them "
                              f"({RESOLUTION} points per image).")
if quantity != "comparative":
    ui.qp_set(vs=None)

qoi = ({"kind": "class", "class": int(cls)} if quantity == "class"
       else {"kind": "comparative", "a": int(cls), "b": int(vs)})
doi = {"kind": doi_kind} if doi_kind == DEFAULT_DOI else {"kind": doi_kind, "resolution": RESOLUTION}
what = f"class {cls}" if quantity == "class" else f"{cls} rather than {vs}"


def _load(model: str, layer: str, qoi: dict, doi: dict) -> dict | None:
    """The view if it is precomputed or cached on disk; None when it must be computed."""
    if (model in ui.BASE_MODELS and layer in LAYERS and qoi["kind"] == "class"
            and doi == {"kind": DEFAULT_DOI} and qoi["class"] in PRECOMPUTED_CLASSES):
        try:
            return ui.experts(model, layer, qoi["class"], study)
        except Exception:  # not precomputed for this model/layer: fall back to the on-demand path
            pass
    if ui.has_experts_for(model, layer, qoi, doi, study):
        return ui.experts_for(model, layer, qoi, doi, study)
    return None


view = _load(model, layer, qoi, doi)
if view is None:
    st.info(f"The experts of **{layer}** for **{what}** on the model "
            f"**{ui.model_label(model, ui.correction_labels(study))}** over "
            f"*{DOIS[doi_kind]}* are not computed yet. Computing them takes a few seconds to a minute "
            "and is cached on disk.")
    if st.button("Compute", type="primary", key="compute-experts"):
        view = ui.compute_experts_for(model, layer, qoi, doi, study)
    if view is None:
        st.stop()

rows = view.get("rows") or []
if not rows:
    st.warning("No experts were returned for this view.")
    st.stop()
SHORTCUT = float(view["threshold"])  # core flags each row against it
RULE = rep_experts.get("shortcut_rule") or f"decoy mass > {SHORTCUT:.3f}"
table = pd.DataFrame(rows).sort_values("rank").reset_index(drop=True)
table["decoy_mass"] = pd.to_numeric(table["decoy_mass"], errors="coerce")
table["carries shortcut"] = table["shortcut"].astype(bool)
table["unit"] = table["unit"].astype(int)
units = table["unit"].tolist()

# ------------------------------------------------------------------------------------------ ranking
st.header(f"Experts of {layer} for {what}")
st.caption(f"Model **{ui.model_label(model, ui.correction_labels(study))}** · "
           f"distribution: {DOIS[doi_kind]} · "
           f"{len(units)} experts of {len(view.get('scores', [])) or '?'} units.")
chart_df = table.assign(label=table["unit"].map(lambda u: f"unit {u}"),
                        shortcut=table["carries shortcut"].map({True: "carries the shortcut",
                                                                False: "does not"}))
order = chart_df["label"].tolist()
bars = alt.Chart(chart_df).mark_bar().encode(
    x=alt.X("label:N", sort=order, title="expert (by rank)", axis=alt.Axis(labelAngle=0)),
    y=alt.Y("score:Q", title="influence score"),
    color=alt.Color("shortcut:N", title=f"decoy mass > {SHORTCUT:.0%}",
                    scale=alt.Scale(domain=["carries the shortcut", "does not"],
                                    range=["#B4412E", "#6C8EAD"])),
    tooltip=["unit", alt.Tooltip("score:Q", format=".4g"), alt.Tooltip("ci_low:Q", format=".4g"),
             alt.Tooltip("ci_high:Q", format=".4g"), alt.Tooltip("frequency:Q", format=".0%"),
             alt.Tooltip("decoy_mass:Q", format=".1%")],
)
layers_ = [bars]
if table["ci_low"].notna().all() and table["ci_high"].notna().all():
    layers_.append(alt.Chart(chart_df).mark_rule(color="#1F2328", strokeWidth=1.5).encode(
        x=alt.X("label:N", sort=order), y="ci_low:Q", y2="ci_high:Q"))
if table["frequency"].notna().all():
    layers_.append(alt.Chart(chart_df).mark_text(dy=-8, fontSize=11, color="#1F2328").encode(
        x=alt.X("label:N", sort=order), y=alt.Y("ci_high:Q" if len(layers_) > 1 else "score:Q"),
        text=alt.Text("frequency:Q", format=".0%")))
left, right = st.columns([3, 2])
with left:
    st.altair_chart(alt.layer(*layers_).properties(height=300), width="stretch")
    st.caption("Bars: influence score; lines: bootstrap interval; numbers: how often the unit stays in "
               "the top k when the images are resampled (top-k frequency).")
scores = np.asarray(view.get("scores", []), dtype=float).ravel()
with right:
    if scores.size:
        all_df = pd.DataFrame({"unit": np.arange(scores.size), "score": scores})
        all_df["expert"] = all_df["unit"].isin(units).map({True: "expert", False: "other unit"})
        all_df = all_df.sort_values("score", ascending=False).reset_index(drop=True)
        all_df["position"] = np.arange(len(all_df)) + 1
        st.altair_chart(alt.Chart(all_df).mark_bar().encode(
            x=alt.X("position:O", title="every unit of the layer, by score", axis=alt.Axis(labels=False,
                                                                                         ticks=False)),
            y=alt.Y("score:Q", title="influence score"),
            color=alt.Color("expert:N", title=None, scale=alt.Scale(domain=["expert", "other unit"],
                                                                    range=["#B4412E", "#C9C3B8"])),
            tooltip=["unit", alt.Tooltip("score:Q", format=".4g")],
        ).properties(height=300), width="stretch")
        pos = np.clip(scores, 0, None)
        top_share = pos[units].sum() / pos.sum() if pos.sum() > 0 else float("nan")
        st.caption(f"The {len(units)} experts hold {top_share:.0%} of the layer's positive influence."
                   if np.isfinite(top_share) else "No unit has positive influence.")

shown = table[["rank", "unit", "score", "ci_low", "ci_high", "frequency", "decoy_mass", "carries shortcut"]]
st.dataframe(shown, hide_index=True, column_config={
    "score": st.column_config.NumberColumn(format="%.4g"),
    "ci_low": st.column_config.NumberColumn("interval low", format="%.4g"),
    "ci_high": st.column_config.NumberColumn("interval high", format="%.4g"),
    "frequency": st.column_config.NumberColumn("top-k frequency", format="percent"),
    "decoy_mass": st.column_config.NumberColumn("decoy mass", format="percent"),
})
q_name = f"{cls}" if quantity == "class" else f"{cls}-vs-{vs}"
st.caption(f"Shortcut rule: {RULE}.")
ui.download_csv(shown, f"experts_{model}_{layer}_{q_name}_{doi_kind}.csv", "Download the experts (CSV)",
                key="dl-experts")

# ------------------------------------------------------------------------------------------ interpretation
images = np.asarray(view.get("images", []))
maps = np.asarray(view.get("maps", []))


@st.cache_data(show_spinner=False, max_entries=64)
def _render(key: tuple, style: str, _images: np.ndarray, _maps: np.ndarray) -> list[list[np.ndarray]]:
    """One row of rendered interpretations per expert (uint8 RGB), cached per view and style."""
    out = []
    for k in range(_maps.shape[0]):
        row = []
        for i in range(_images.shape[0]):
            if style == "mask":
                row.append(imaging.masked_image(_images[i], _maps[k, i], scale=SCALE))
            elif style == "heatmap":
                row.append(imaging.heatmap(_maps[k, i], scale=SCALE))
            else:
                row.append(imaging.overlay(_images[i], _maps[k, i], scale=SCALE))
        out.append(row)
    return out


st.header("What each expert looks at")
if images.ndim != 3 or maps.ndim != 4 or maps.shape[1] != images.shape[0] or not len(images):
    st.info("This view carries no interpretations (no images or maps).")
    st.stop()
style = ui.choice("Show the interpretation as", list(VIEWS), param="view", widget="radio", horizontal=True,
                  format_func=VIEWS.get)
st.markdown(
    "Each row is one expert on the same real images: the attribution of that unit's activation to the "
    "pixels (Integrated Gradients of the unit from a black image). "
    + {"mask": "The *mask* keeps the pixels above the 95th percentile (softly blurred, tinted red) and "
               "dims the rest — the paper's way of showing an expert.",
       "heatmap": "Red pixels raise the unit's activation, blue ones lower it; white is neutral.",
       "overlay": "The signed heatmap (red raises, blue lowers) blended over the image."}[style]
    + " If an expert's marks sit in a corner square rather than on the strokes, it reads the decoy.")
view_key = ui.stamp(study) + (model, layer, repr(sorted(qoi.items())), repr(sorted(doi.items())))
grid = _render(view_key, style, images, maps)
n_maps = min(len(grid), len(table))
for k in range(n_maps):
    r = table.iloc[k]
    mass = float(r["decoy_mass"])
    mass_text = "decoy mass —" if np.isnan(mass) else f"decoy mass {mass:.0%}"
    verdict = (f":red[**carries the shortcut**] ({mass_text}, chance {ui.CHANCE_DECOY_MASS:.0%})"
               if r["carries shortcut"] else f"does not carry it ({mass_text}, chance "
               f"{ui.CHANCE_DECOY_MASS:.0%})")
    st.markdown(f"**#{int(r['rank'])} · unit {int(r['unit'])}** — {verdict}")
    st.image(grid[k], caption=[f"image {i + 1}" for i in range(len(grid[k]))])
ui.download_png(lambda: ui.image_grid([[imaging.grayscale(im, scale=SCALE) for im in images], *grid]),
                f"experts_{model}_{layer}_{q_name}_{style}.png", "Download the grid (PNG)", key="dl-grid")

# ------------------------------------------------------------------------------------------ one expert
st.header("One expert up close")
unit = ui.choice("Expert", units[:n_maps], param="expert", format_func=lambda u: f"unit {u}")
k = units.index(unit)
r = table.iloc[k]
m1, m2, m3, m4 = st.columns(4)
m1.metric("rank", int(r["rank"]))
m2.metric("influence score", f"{float(r['score']):.4g}")
m3.metric("top-k frequency", "—" if pd.isna(r["frequency"]) else f"{float(r['frequency']):.0%}")
m4.metric("decoy mass", "—" if pd.isna(r["decoy_mass"]) else f"{float(r['decoy_mass']):.0%}",
          help=f"chance: {ui.CHANCE_DECOY_MASS:.1%}; the rule: {RULE}")
close = _render(view_key, "mask", images, maps)[k], _render(view_key, "heatmap", images, maps)[k]
st.image([imaging.grayscale(im, scale=SCALE) for im in images], caption=["image"] * len(images))
st.image(close[0], caption=["mask"] * len(images))
st.image(close[1], caption=["heatmap"] * len(images))

# ------------------------------------------------------------------------------------------ reading
st.header("How to read this")
n_short = int(table["carries shortcut"].sum())
mean_mass = float(table["decoy_mass"].mean())
lines = [
    f"- Of the {len(table)} experts of **{layer}** for **{what}**, **{n_short}** carr"
    f"{'ies' if n_short == 1 else 'y'} the shortcut: more than {SHORTCUT:.0%} of the positive "
    "attribution of its interpretation falls on the 16 patch pixels. The experts' mean decoy mass is "
    f"**{mean_mass:.0%}**, against **{ui.CHANCE_DECOY_MASS:.1%}** if attribution were spread evenly.",
]
other = "clean" if model != "clean" else "vanilla"
try:
    twin = _load(other, layer, qoi, doi)
except Exception:  # the comparison is a bonus: never let it break the page
    twin = None
if twin and twin.get("rows"):
    twin_mass = float(np.nanmean([np.nan if x.get("decoy_mass") is None else float(x["decoy_mass"])
                                  for x in twin["rows"]]))
    twin_short = sum(bool(x["shortcut"]) for x in twin["rows"])
    lines.append(
        f"- The same view of the **{other}** model: mean decoy mass **{twin_mass:.0%}**, {twin_short} of "
        f"{len(twin['rows'])} experts carrying the shortcut. "
        + ("The difference is the shortcut the decoy taught." if model == "vanilla" and mean_mass > twin_mass
           else "Compare the two to see what the decoy changed."))
if not table["frequency"].isna().all():
    stable = int((table["frequency"].astype(float) >= 0.8).sum())
    lines.append(f"- {stable} of {len(table)} experts stay in the top {len(table)} in at least 80% of "
                 "bootstrap resamples; a less stable ranking says less about any single unit.")
if quantity == "comparative":
    lines.append(f"- The comparative quantity y{cls} − y{vs} cancels what the two classes share; its "
                 f"experts are the units that tell a {cls} from a {vs}.")
st.markdown("\n".join(lines))

"""Chapter 2: which internal units carry a class (the experts), and what each of them looks at.

Every view comes from ``study.experts_for`` (the experts stage's views are read from that stage;
any other quantity, distribution or image set is computed on request, inside ``st.status``, and
cached on disk). The choices live in the URL (model, cls, target, wrong, quantity, vs, layer, doi,
expert, view), so a copied link reopens this view. The target says which test images the experts are
interpreted on: those *labelled* with the class, or those the model *predicts* as the class (the
images a shortcut fools are among them); every tile says "label → predicted", from core.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui

DEFAULT_DOI = "class-images"
DOIS = {
    "class-images": "training images of the class",
    "class-images-linear": "linear paths to the class's images",
}
VIEWS = {"mask": "mask (95th percentile)", "heatmap": "heatmap", "overlay": "heatmap over the image"}
TARGETS = {"label": "label", "predicted": "predicted class"}

study = ui.current_study()
facts = ui.facts(study)
ui.chapter(
    ["models", "experts"], "Influence & experts",
    "Which internal units does the network rely on for a class? For a **layer**, a **quantity** (the "
    "class's logit, or the difference between two classes) and a **distribution** of inputs, each "
    "unit's *distributional influence* is the average gradient of the quantity with respect to that "
    "unit. The units with the largest influence are the class's **experts**. Each expert is then "
    "interpreted on real images: which pixels drive that unit?",
    study=study, what="This page")
facts = ui.facts(study)
CLASSES = list(range(len(facts.get("classes") or []))) or list(range(10))
SCALE = ui.scale_for(facts.get("size"))
REGION = ui.region_name(facts)
CHANCE = facts.get("chance")
MASS_KEY = facts.get("region_alias") or "region_mass"
MASS_LABEL = (facts.get("region_alias") or f"{REGION} mass").replace("_", " ") if REGION else None
SUBJECT, REFERENCE = facts.get("subject"), facts.get("reference")
name = (lambda c: ui.class_name(c, facts))

cfg = getattr(study.config, "experts", None) or {}
rep = ui.report(study)
rep_experts = rep.get("experts") or {}


def _layers() -> list[str]:
    layers = cfg.get("layers") or ([cfg["layer"]] if cfg.get("layer") else [])
    if rep_experts.get("layer") and rep_experts["layer"] not in layers:
        layers = [rep_experts["layer"], *layers]
    return [str(x) for x in layers] or [str(x) for x in facts.get("layers") or []]


LAYERS = _layers()
# The classes the experts stage ranks (core's rule: [experts] classes, else the first ten classes).
PRECOMPUTED_CLASSES = [int(c) for c in (study.expert_classes() if hasattr(study, "expert_classes")
                                        else cfg.get("classes") or CLASSES[:10])]
RESOLUTION = int(cfg.get("resolution", 20))
model = ui.current_model(study)

# ------------------------------------------------------------------------------------------ choices
c1, c2, c3, c4 = st.columns([1, 1.3, 1, 1.4])
with c1:
    cls = ui.choice("Class", CLASSES, param="cls", format_func=name,
                    default=PRECOMPUTED_CLASSES[0] if PRECOMPUTED_CLASSES else 0)
    target = ui.choice("Target", list(TARGETS), param="target", widget="radio",
                       horizontal=True, format_func=TARGETS.get,
                       help="Which test images the experts are interpreted on. label: images "
                            "labelled with the class. predicted class: images the model predicts as "
                            "the class, whatever their label, so the images a shortcut fools into "
                            "the class are among them. The experts (the ranking) are the same.")
with c2:
    quantity = ui.choice("Quantity", ["class", "comparative"], param="quantity", widget="radio",
                         horizontal=True,
                         help="The quantity of interest: the output the influence is measured for. "
                              "A class's logit (why this class), or the difference of two classes' "
                              "logits (why this class rather than that one: what the two share "
                              "cancels).",
                         format_func=lambda q: {"class": f"why {name(cls)}",
                                                "comparative": f"why {name(cls)}, not …"}[q])
    vs = None
    if quantity == "comparative":
        vs = ui.choice("… and not", [c for c in CLASSES if c != cls], param="vs", format_func=name,
                       default=(cls + len(CLASSES) // 2) % len(CLASSES))
with c3:
    layer = ui.choice("Layer", LAYERS, param="layer", default=rep_experts.get("layer"))
with c4:
    doi_kind = ui.choice("Distribution", list(DOIS), param="doi", format_func=DOIS.get,
                         help="The distribution of interest: the inputs over which the influence "
                              "is averaged. Class images: the gradient at every training image of "
                              "the class. Linear "
                              f"paths: along the straight line from a black image to each of them "
                              f"({RESOLUTION} points per image).")
if quantity != "comparative":
    ui.qp_set(vs=None)

qoi = ({"kind": "class", "class": int(cls)} if quantity == "class"
       else {"kind": "comparative", "a": int(cls), "b": int(vs)})
doi = {"kind": doi_kind} if doi_kind == DEFAULT_DOI else {"kind": doi_kind, "resolution": RESOLUTION}
what = f"class {name(cls)}" if quantity == "class" else f"{name(cls)} rather than {name(vs)}"


def _in_stage(model: str, layer: str, qoi: dict, doi: dict) -> bool:
    """The experts stage ranked this view's units (only the images may differ)."""
    return (model in (facts.get("models") or []) and layer in LAYERS and qoi["kind"] == "class"
            and doi == {"kind": DEFAULT_DOI} and qoi["class"] in PRECOMPUTED_CLASSES)


def _load(model: str, layer: str, qoi: dict, doi: dict, images: str) -> dict | None:
    """The view if it is precomputed or cached on disk; None when it must be computed."""
    if ui.has_experts_for(model, layer, qoi, doi, study, images=images):
        return ui.experts_for(model, layer, qoi, doi, study, images=images)
    return None


view = _load(model, layer, qoi, doi, target)
if view is None and target == "predicted" and _in_stage(model, layer, qoi, doi):
    # the stage's ranking is reused: only the interpretations on other images are computed
    view = ui.compute_experts_for(model, layer, qoi, doi, study, images=target)
if view is None:
    offer = st.empty()  # the offer goes once the experts are computed (no stale "not computed yet")
    with offer.container():
        st.info(f"The experts of **{ui.inert(layer)}** for **{what}** on the model "
                f"**{ui.model_label(model, ui.correction_labels(study))}** over "
                f"*{DOIS[doi_kind]}* are not computed yet. Computing them takes a few seconds to a "
                "minute and is cached on disk.")
        clicked = st.button("Compute", type="primary", key="compute-experts")
    if clicked:
        view = ui.compute_experts_for(model, layer, qoi, doi, study, images=target)
    if view is None:
        st.stop()
    offer.empty()

rows = view.get("rows") or []
if not rows:
    st.warning("No experts were returned for this view.")
    st.stop()
THRESHOLD = view.get("threshold")  # core flags each row against it; None without a region
THRESHOLD = None if THRESHOLD is None or not REGION else float(THRESHOLD)
RULE = rep_experts.get("shortcut_rule") or (
    f"{MASS_LABEL} > {THRESHOLD:.3f}" if THRESHOLD is not None else None)
RULE = ui.plain(RULE, limit=2000) if RULE else None  # it names the case's region: drawn as text
HAS_MASS = REGION is not None and any(r.get(MASS_KEY, r.get("region_mass")) is not None for r in rows)
table = pd.DataFrame(rows).sort_values("rank").reset_index(drop=True)
if HAS_MASS:
    if MASS_KEY not in table:
        table[MASS_KEY] = table.get("region_mass")
    table[MASS_KEY] = pd.to_numeric(table[MASS_KEY], errors="coerce")
HAS_VERDICT = HAS_MASS and THRESHOLD is not None and "shortcut" in table
if HAS_VERDICT:
    table["carries shortcut"] = table["shortcut"].astype(bool)
    # a verdict whose region-mass interval over the images holds the threshold is undecided
    words = {"carries": "carries the shortcut", "does not": "does not", "undecided": "undecided"}
    fallback = table["carries shortcut"].map({True: "carries", False: "does not"})
    table["verdict"] = (table["verdict"].fillna(fallback) if "verdict" in table
                        else fallback).map(words)
HAS_INTERVAL = HAS_VERDICT and {"mass_low", "mass_high"} <= set(table)
table["unit"] = table["unit"].astype(int)
units = table["unit"].tolist()
labels_ = ui.correction_labels(study)


def _verdict_reason(mass: float) -> str:
    """The threshold and why: each verdict says the number it was judged against."""
    chance = f"; chance {CHANCE:.1%}" if CHANCE is not None else ""
    if np.isnan(mass):
        return f"{MASS_LABEL} —, threshold {THRESHOLD:.0%}{chance}"
    op = ">" if mass > THRESHOLD else "≤"
    return f"{MASS_LABEL} {mass:.0%} {op} threshold {THRESHOLD:.0%}{chance}"


# ------------------------------------------------------------------------------------------ ranking
st.header(f"Experts of {ui.inert(layer)} for {what}")
st.caption(f"Model **{ui.model_label(model, labels_, facts)}** · "
           f"distribution: {DOIS[doi_kind]} · "
           f"{len(units)} experts of {len(view.get('scores', [])) or '?'} units.")
chart_df = table.assign(label=table["unit"].map(lambda u: f"unit {u}"))
order = chart_df["label"].tolist()
tooltip = ["unit", alt.Tooltip("score:Q", format=".4g"), alt.Tooltip("ci_low:Q", format=".4g"),
           alt.Tooltip("ci_high:Q", format=".4g"), alt.Tooltip("frequency:Q", format=".0%")]
if HAS_MASS:
    tooltip.append(alt.Tooltip(f"{MASS_KEY}:Q", format=".1%", title=MASS_LABEL))
color = (alt.Color("verdict:N", title=f"{MASS_LABEL} > {THRESHOLD:.0%}",
                   scale=alt.Scale(domain=["carries the shortcut", "undecided", "does not"],
                                   range=["#B4412E", "#8A8F98", "#6C8EAD"]))
         if HAS_VERDICT else alt.value("#6C8EAD"))
bars = alt.Chart(chart_df).mark_bar().encode(
    x=alt.X("label:N", sort=order, title="expert (by rank)", axis=alt.Axis(labelAngle=0)),
    y=alt.Y("score:Q", title="influence score"), color=color, tooltip=tooltip)
layers_ = [bars]
if table["ci_low"].notna().all() and table["ci_high"].notna().all():
    layers_.append(alt.Chart(chart_df).mark_rule(color="#1F2328", strokeWidth=1.5).encode(
        x=alt.X("label:N", sort=order), y="ci_low:Q", y2="ci_high:Q"))
if table["frequency"].notna().all():
    layers_.append(alt.Chart(chart_df).mark_text(dy=-8, fontSize=11, color="#1F2328").encode(
        x=alt.X("label:N", sort=order), y=alt.Y("ci_high:Q" if len(layers_) > 1 else "score:Q"),
        text=alt.Text("frequency:Q", format=".0%")))
_width = (table["ci_high"].astype(float) - table["ci_low"].astype(float)).abs()
ZERO_WIDTH = int((_width <= 1e-12).sum()) if table["ci_low"].notna().all() and \
    table["ci_high"].notna().all() else 0  # rows whose every resample gave the same score
left, right = st.columns([3, 2])
with left:
    ui.chart(alt.layer(*layers_).properties(height=300),
             f"Influence score of the top experts of {ui.inert(layer)}", chart_df, width="stretch")
    st.caption("Bars: influence score; lines: bootstrap interval; numbers: how often the unit stays in "
               "the top k when the images are resampled (top-k frequency).")
    if ZERO_WIDTH:  # said where the intervals and frequencies are drawn, not only further down
        st.caption(f"{ZERO_WIDTH} of {len(table)} experts have a **zero-width** bootstrap interval: every "
                   "resample gave the same score. That is degenerate evidence (the resampling could not "
                   "vary it), not stability; their top-k frequency says nothing about other images.")
scores = np.asarray(view.get("scores", []), dtype=float).ravel()
with right:
    if scores.size:
        all_df = pd.DataFrame({"unit": np.arange(scores.size), "score": scores})
        all_df["expert"] = all_df["unit"].isin(units).map({True: "expert", False: "other unit"})
        all_df = all_df.sort_values("score", ascending=False).reset_index(drop=True)
        all_df["position"] = np.arange(len(all_df)) + 1
        ui.chart(alt.Chart(all_df).mark_bar().encode(
            x=alt.X("position:O", title="every unit of the layer, by score", axis=alt.Axis(labels=False,
                                                                                         ticks=False)),
            y=alt.Y("score:Q", title="influence score"),
            color=alt.Color("expert:N", title=None, scale=alt.Scale(domain=["expert", "other unit"],
                                                                    range=["#B4412E", "#C9C3B8"])),
            tooltip=["unit", alt.Tooltip("score:Q", format=".4g")],
        ).properties(height=300), f"Influence score of every unit of {ui.inert(layer)}, by score",
            all_df[["position", "unit", "score", "expert"]], width="stretch")
        pos = np.clip(scores, 0, None)
        top_share = pos[units].sum() / pos.sum() if pos.sum() > 0 else float("nan")
        st.caption(f"The {len(units)} experts hold {top_share:.0%} of the layer's positive influence."
                   if np.isfinite(top_share) else "No unit has positive influence.")

cols = ["rank", "unit", "score", "ci_low", "ci_high", "frequency"]
if HAS_MASS:
    cols.append(MASS_KEY)
if HAS_VERDICT:
    table["threshold"] = THRESHOLD
    cols += (["mass_low", "mass_high"] if HAS_INTERVAL else []) + ["threshold", "verdict"]
shown = table[cols]
st.dataframe(shown, hide_index=True, column_config={
    "ci_low": st.column_config.NumberColumn("interval low", format="%.4g"),
    "ci_high": st.column_config.NumberColumn("interval high", format="%.4g"),
    "score": st.column_config.NumberColumn(
        format="%.4g", help="Distributional influence: the unit's gradient of the quantity, "
                            "averaged over the distribution (summed over the channel's positions)."),
    "frequency": st.column_config.NumberColumn(
        "top-k frequency", format="percent",
        help="How often the unit stays among the top k when the class's training images are "
             "resampled with replacement (bootstrap): how much the ranking depends on which images "
             "were drawn."),
    MASS_KEY: st.column_config.NumberColumn(
        MASS_LABEL or MASS_KEY, format="percent",
        help=f"Region mass: the share of the positive attribution of the unit's interpretation that "
             f"falls on the {REGION}, averaged over the images below"
             + (f"; an evenly spread map scores the chance level {CHANCE:.1%}." if CHANCE is not None
                else ".")),
    "mass_low": st.column_config.NumberColumn(
        "mass low", format="percent", help="Bootstrap interval of the region mass over the images "
        "(resampled with replacement, the experts' confidence); a verdict whose interval holds "
        "the threshold is undecided."),
    "mass_high": st.column_config.NumberColumn("mass high", format="percent"),
    "threshold": st.column_config.NumberColumn("threshold", format="percent",
                                               help=RULE or "the region mass above which a unit "
                                               "carries the shortcut"),
})
q_name = f"{cls}" if quantity == "class" else f"{cls}-vs-{vs}"
CAVEAT = ui.rule_caveat(study)  # no reference: the threshold has no false-alarm check
if HAS_VERDICT and RULE:
    st.caption(f"Shortcut rule: {RULE}.")
    won = ui.threshold_term(rep_experts, layer)
    if won:
        st.caption(f"This layer's threshold — {ui.plain(won['text'])}.")
    if CAVEAT:
        st.warning(CAVEAT, icon=":material/report:")
elif not REGION:
    st.caption(ui.no_region_note(facts))
ui.download_csv(shown, f"experts_{model}_{layer}_{q_name}_{doi_kind}.csv", "Download the experts (CSV)",
                key="dl-experts")

# ------------------------------------------------------------------------------------------ interpretation
images = np.asarray(view.get("images", []))
maps = np.asarray(view.get("maps", []))


@st.cache_data(show_spinner=False, max_entries=64)
def _render(key: tuple, style: str, scale: int, _images: np.ndarray,
            _maps: np.ndarray) -> list[list[np.ndarray]]:
    """One row of rendered interpretations per expert (uint8 RGB), cached per view and style."""
    out = []
    for k in range(_maps.shape[0]):
        row = []
        for i in range(_images.shape[0]):
            if style == "mask":
                row.append(ui.masked(_images[i], _maps[k, i], scale))
            elif style == "heatmap":
                row.append(ui.heatmap(_maps[k, i], scale))
            else:
                row.append(ui.overlay(_images[i], _maps[k, i], scale))
        out.append(row)
    return out


st.header("What each expert looks at")
if (images.ndim not in (3, 4) or maps.ndim != 4 or maps.shape[1] != images.shape[0]):
    st.info("This view carries no interpretations (no images or maps).")
    st.stop()
n_all = len(images)
LABELS = np.asarray(view.get("labels", []), dtype=int).ravel()
PREDS = np.asarray(view.get("predictions", []), dtype=int).ravel()
SHOW_PRED = len(LABELS) == n_all and len(PREDS) == n_all
IMAGE_CLASSES = np.asarray(view.get("image_classes", []), dtype=int).ravel()
if len(IMAGE_CLASSES) != n_all:
    IMAGE_CLASSES = np.full(n_all, int(view.get("class", cls)))
model_name_ = ui.model_label(model, labels_, facts)
by_what = "labelled" if target == "label" else "predicted as"
shown_for = [int(cls)] if quantity == "class" else [int(cls), int(vs)]
if quantity == "class" and int(view.get("class", cls)) != int(cls):
    shown_for = [int(view.get("class", cls))]
counts = ", ".join(f"{int((IMAGE_CLASSES == c).sum())} {by_what} {name(c)}" for c in shown_for)
if not n_all:
    st.info(f"No test image is {by_what} {' or '.join(name(c) for c in shown_for)} by "
            f"**{model_name_}**: there is nothing to interpret the experts on.")
    st.stop()
shown_idx = list(range(n_all))
if SHOW_PRED:
    wrong = [i for i in range(n_all) if PREDS[i] != LABELS[i]]
    st.markdown(
        f"The experts are interpreted on test images {by_what} "
        f"{' and '.join(f'**{name(c)}**' for c in shown_for)} ({counts}"
        + (f"; the predictions are **{model_name_}**'s" if target == "predicted" else "") + "). "
        f"Under each tile: its label → what **{model_name_}** predicts. It gets "
        f"**{len(wrong)} of {n_all}** of them wrong"
        + (" — an image predicted as the class but labelled otherwise is one the model was fooled "
           "into the class; with a region, see whether the experts' marks sit on it."
           if target == "predicted" else "."))
    only_wrong = st.checkbox("only the images the model gets wrong", key="only-wrong",
                             value=ui.qp_get("wrong") == "1")
    ui.qp_set(wrong="1" if only_wrong else None)
    if only_wrong:
        shown_idx = wrong
        if not wrong:
            st.info(f"**{ui.inert(model)}** gets all {n_all} of these images right: no tile to show.")
else:
    ui.qp_set(wrong=None)


def _tile(i: int, caption: str) -> str:
    """Image i's ``caption``, followed by "label → predicted" when core gave the predictions."""
    if SHOW_PRED:
        return f"{caption} · {name(int(LABELS[i]))} → {name(int(PREDS[i]))}"
    return caption


def _image_name(i: int) -> str:
    """"<class> image j": numbered within the class the image was chosen for."""
    c = int(IMAGE_CLASSES[i])
    j = int((IMAGE_CLASSES[:i] == c).sum()) + 1
    return f"{name(c)} image {j}" if c >= 0 else f"image {i + 1}"


# Tiles of every image grid on this page: a whole-number enlargement that fits the row's images
# on one line beside its label (84 px for a 28×28 digit, 96 px for a 48×48 face), so that the
# chapter stays short; the single uploaded image below keeps the larger SCALE.
GRID_SCALE = ui.figures.tile_scale(images.shape[1:3], len(images))
TILE = GRID_SCALE * max(images.shape[1:3])
ROW_SPLIT = [1, 6]
style = ui.choice("Show the interpretation as", list(VIEWS), param="view", widget="radio", horizontal=True,
                  format_func=VIEWS.get)
st.markdown(
    "Each row is one expert on the same real images: the attribution of that unit's activation to the "
    "pixels (Integrated Gradients of the unit from a black image). "
    + {"mask": "The *mask* keeps the pixels above the 95th percentile (softly blurred, tinted red) and "
               "dims the rest — the paper's way of showing an expert.",
       "heatmap": "Red pixels raise the unit's activation, blue ones lower it; white is neutral.",
       "overlay": "The signed heatmap (red raises, blue lowers) blended over the image."}[style]
    + (f" If an expert's marks sit on the {REGION} rather than on the object, it reads the shortcut."
       if REGION else ""))
if style != "mask":
    ui.image(ui.heat_legend(), caption=ui.HEAT_SCALE_NOTE, width=240,
             alt=ui.HEAT_LEGEND_ALT)
view_key = ui.stamp(study) + (model, layer, repr(sorted(qoi.items())), repr(sorted(doi.items())),
                             target)
grid = _render(view_key, style, GRID_SCALE, images, maps)
n_maps = min(len(grid), len(table))


def _short_reason(mass: float) -> str:
    """The verdict's number against the threshold, in one short line (the row label's second)."""
    if np.isnan(mass):
        return f"{MASS_LABEL} — vs threshold {THRESHOLD:.0%}"
    return f"{MASS_LABEL} {mass:.0%} {'>' if mass > THRESHOLD else '≤'} threshold {THRESHOLD:.0%}"


for k in range(n_maps):
    r = table.iloc[k]
    details = None  # the whole reason: the row label's tooltip (chance, the interval)
    if HAS_VERDICT:
        mass = float(r[MASS_KEY])
        if r["verdict"] == "undecided":
            verdict = f"**undecided**  \n{_short_reason(mass)}"
            details = (f"undecided: {_verdict_reason(mass)}; its interval over the images, "
                       f"{float(r['mass_low']):.0%}–{float(r['mass_high']):.0%}, holds the threshold")
        elif r["carries shortcut"]:
            verdict = f":red[**carries the shortcut**]  \n{_short_reason(mass)}"
            details = f"carries the shortcut: {_verdict_reason(mass)}"
        else:
            verdict = f"does not carry it  \n{_short_reason(mass)}"
            details = f"does not carry it: {_verdict_reason(mass)}"
    elif HAS_MASS:
        mass = float(r[MASS_KEY])
        verdict = f"{MASS_LABEL} {'—' if np.isnan(mass) else f'{mass:.0%}'}"
    else:
        verdict = "no region to judge it against"
    # a compact grid: the row's label on the left (rank, unit, verdict; the reason in full on its
    # tooltip), its tiles at TILE px on the right; each tile's caption names only its image (the
    # row says the unit, the alt text both)
    label_col, tiles_col = st.columns(ROW_SPLIT, vertical_alignment="center")
    label_col.markdown(f"**#{int(r['rank'])} · unit {int(r['unit'])}**  \n{verdict}", help=details)
    if shown_idx:
        ui.image([grid[k][i] for i in shown_idx], where=tiles_col, width=TILE,
                 about=f"{ui.inert(model)}, {ui.inert(layer)}, expert #{k + 1}, unit {int(r['unit'])}, "
                       f"{VIEWS[style]}",
                 caption=[_tile(i, _image_name(i)) for i in shown_idx])
if shown_idx:
    def _grid_png() -> np.ndarray:
        """The grid as a self-describing PNG: what, which model, each row's unit, the legend."""
        row_labels = ["image"] + [
            f"unit {int(table.iloc[j]['unit'])}"
            + (f" ({MASS_LABEL} {float(table.iloc[j][MASS_KEY]):.0%})"
               if HAS_MASS and pd.notna(table.iloc[j][MASS_KEY]) else "")
            for j in range(n_maps)]
        under = [f"{name(int(LABELS[i]))}>{name(int(PREDS[i]))}" for i in shown_idx] if SHOW_PRED else []
        legend = {"mask": "mask: pixels above the 95th percentile of the unit's attribution, tinted red.",
                  "heatmap": ui.HEAT_SCALE_NOTE, "overlay": ui.HEAT_SCALE_NOTE}[style]
        title = (f"{model_name_} | experts of {ui.inert(layer)} for {what} | distribution: "
                 f"{DOIS[doi_kind]} | "
                 f"test images {by_what} the class")
        footer = legend + (f" Columns, label>predicted: {', '.join(under)}." if under else "")
        return ui.labelled_grid([[ui.picture(images[i], GRID_SCALE) for i in shown_idx],
                                 *[[row[i] for i in shown_idx] for row in grid[:n_maps]]],
                                row_labels, title, footer)

    ui.download_png(_grid_png,
                    f"experts_{model}_{layer}_{q_name}_{doi_kind}_{target}_{style}.png",
                    "Download the grid (PNG)", key="dl-grid")

# ------------------------------------------------------------------------------------------ one expert
st.header("One expert up close")
unit = ui.choice("Expert", units[:n_maps], param="expert", format_func=lambda u: f"unit {u}")
k = units.index(unit)
r = table.iloc[k]
mcols = st.columns(4 if HAS_MASS else 3)
mcols[0].metric("rank", int(r["rank"]))
mcols[1].metric("influence score", f"{float(r['score']):.4g}")
mcols[2].metric("top-k frequency", "—" if pd.isna(r["frequency"]) else f"{float(r['frequency']):.0%}")
if HAS_MASS:
    mcols[3].metric(MASS_LABEL, "—" if pd.isna(r[MASS_KEY]) else f"{float(r[MASS_KEY]):.0%}",
                    help=(f"chance: {CHANCE:.1%}; " if CHANCE is not None else "")
                    + (f"the rule: {RULE}" if RULE else ""))


@st.cache_data(show_spinner=False, max_entries=64)
def _damp(key: tuple, case: str, model_: str, layer_: str, unit_: str, cls_: str, fill: str,
          _study) -> dict:
    """Damp one unit (filled with its mean activation over training images of the class) and
    measure the class on the headline evaluation set; beside it, one random unit of the layer
    (drawn 20 times). Keyed on strings only."""
    import torch

    from core.stages import essence

    data = _study.data()
    split = data.evaluation_sets.get(data.headline, data.test)
    n_max = 2000
    x, y = split.x[:n_max], split.y[:n_max]
    train = data.train
    fill_from = train.x[train.y == int(cls_)][:256]
    net = _study.model(model_)
    dev = next(net.parameters()).device
    with torch.no_grad():
        x, y, fill_from = x.to(dev), y.to(dev), fill_from.to(dev)
        out = essence.ablation(net, layer_, [int(unit_)], x, y, int(cls_), fill=fill, fill_from=fill_from)
        rand = None
        table_fn = getattr(essence, "ablation_table", None)
        if callable(table_fn):
            row = table_fn(net, layer_, x, y, {int(cls_): [int(unit_)]}, fill=fill, fill_from=fill_from,
                           random_draws=20)[0]
            rand = row.get("random")
    return {**out, "random": rand, "n_images": int(len(y)), "set": str(data.headline)}


dcol1, dcol2 = st.columns([1, 3])
damp_key = (ui.current_case(), model, layer, str(unit), str(cls), "mean")
with dcol1:
    damp_clicked = st.button("Damp this unit", key="damp-unit", icon=":material/filter_alt_off:",
                             help=f"Set unit {unit} of {ui.inert(layer)} to its mean activation over "
                                  f"training "
                                  f"images of {name(cls)} and measure {name(cls)} before and after.")
if damp_clicked:
    st.session_state["damp-shown"] = damp_key
if st.session_state.get("damp-shown") == damp_key:
    ok, damp = ui.run_with_status(
        f"Damping unit {unit} of {ui.inert(layer)} …",
        lambda: _damp(ui.stamp(study), *damp_key, study), done=f"Damped unit {unit} of {ui.inert(layer)}")
    if ok and damp:
        with dcol2:
            dm = st.columns(2)
            dm[0].metric(f"accuracy on {name(cls)}", ui.pct(damp.get("acc_after")),
                         delta=None if damp.get("acc_drop") is None else ui.pp(-damp["acc_drop"]),
                         help=f"before: {ui.pct(damp.get('acc_before'))}")
            lb, la = damp.get("logit_before"), damp.get("logit_after")
            dm[1].metric(f"mean logit of {name(cls)}", "—" if la is None else f"{la:.3g}",
                         delta=None if la is None or lb is None else f"{la - lb:+.3g}",
                         help="before: " + ("—" if lb is None else f"{lb:.3g}"))
            line = (f"Unit {unit} damped (mean fill): {name(cls)} accuracy "
                    f"{ui.pct(damp.get('acc_before'))} → "
                    f"{ui.pct(damp.get('acc_after'))}, mean logit "
                    + ("—" if lb is None or la is None else f"{lb:.3g} → {la:.3g}")
                    + f" on the first {damp['n_images']} images of the {ui.set_label(damp['set'])} set.")
            rnd = damp.get("random") or {}
            if (rnd.get("acc_drop") or {}).get("median") is not None:
                line += (f" One random unit instead (20 draws, median): accuracy drop "
                         f"{ui.pp(rnd['acc_drop']['median'])}, logit drop "
                         f"{rnd['logit_drop']['median']:.3g}.")
            st.caption(line)

close = (_render(view_key, "mask", GRID_SCALE, images, maps)[k],
         _render(view_key, "heatmap", GRID_SCALE, images, maps)[k])
if shown_idx:
    MASKS = view.get("masks")
    MASKS = None if MASKS is None or len(np.asarray(MASKS)) != n_all else np.asarray(MASKS)
    rows_up_close = [("the images" + (f"  \n:red[{REGION}] shaded red" if MASKS is not None else ""),
                      [ui.tinted(images[i], MASKS[i], GRID_SCALE) if MASKS is not None
                       else ui.picture(images[i], GRID_SCALE) for i in shown_idx],
                      "", [_tile(i, _image_name(i) + (f" ({REGION} shaded red)" if MASKS is not None else ""))
                           for i in shown_idx]),
                     (f"unit {unit}: mask", [close[0][i] for i in shown_idx],
                      f"{ui.inert(model)}, {ui.inert(layer)}, unit {unit}, mask",
                      [_tile(i, _image_name(i)) for i in shown_idx]),
                     (f"unit {unit}: heatmap", [close[1][i] for i in shown_idx],
                      f"{ui.inert(model)}, {ui.inert(layer)}, unit {unit}, heatmap",
                      [_tile(i, _image_name(i)) for i in shown_idx])]
    for row_label, tiles, about, caps in rows_up_close:
        label_col, tiles_col = st.columns(ROW_SPLIT, vertical_alignment="center")
        label_col.markdown(f"**{row_label}**")
        ui.image(tiles, about=about, caption=caps, where=tiles_col, width=TILE)

# ------------------------------------------------------------------------------------------ the other model
other = REFERENCE if model != REFERENCE else SUBJECT
twin = None
if other and other != model:
    other_label = ui.model_label(other, labels_, facts)
    st.header(f"The same view of {other_label}")
    try:
        twin = _load(other, layer, qoi, doi, target)
    except Exception as exc:  # the comparison is a bonus: never let it break the page
        st.caption(f"Not available: {ui.plain(exc)}")
    twin_offer = st.empty()  # cleared once the twin is computed: no stale offer beside it
    if twin is None and twin_offer.button(
            f"Compute it for {ui.inert(other)}", key="compute-twin",
            help=f"The experts of {ui.inert(layer)} for {what} in {ui.inert(other)}, interpreted on "
                 f"test images {'labelled' if target == 'label' else 'predicted as'} the class; "
                 "cached on disk."):
        twin = ui.compute_experts_for(other, layer, qoi, doi, study, images=target)
    if twin is not None:
        twin_offer.empty()
    if twin is None:
        st.caption(f"Not computed yet for **{other_label}**: the button above computes it "
                   "(a few seconds to a minute).")
    elif twin.get("rows"):
        t_images = np.asarray(twin.get("images", []))
        t_maps = np.asarray(twin.get("maps", []))
        t_labels = np.asarray(twin.get("labels", []), dtype=int).ravel()
        t_preds = np.asarray(twin.get("predictions", []), dtype=int).ravel()
        t_rows = sorted(twin["rows"], key=lambda x: x.get("rank", 0))
        t_mass = [x.get(MASS_KEY, x.get("region_mass")) for x in t_rows]
        t_table = pd.DataFrame({"rank": [x.get("rank") for x in t_rows],
                                "unit": [int(x["unit"]) for x in t_rows],
                                "score": [x.get("score") for x in t_rows]})
        if HAS_MASS:
            t_table[MASS_KEY] = pd.to_numeric(pd.Series(t_mass), errors="coerce")
        if HAS_VERDICT and all("shortcut" in x for x in t_rows):
            t_table["carries shortcut"] = [bool(x["shortcut"]) for x in t_rows]
        st.dataframe(t_table, hide_index=True, column_config={
            "score": st.column_config.NumberColumn(format="%.4g"),
            MASS_KEY: st.column_config.NumberColumn(MASS_LABEL or MASS_KEY, format="percent")})
        if (t_maps.ndim == 4 and t_images.ndim in (3, 4) and t_maps.shape[1] == len(t_images)
                and len(t_images)):
            t_key = ui.stamp(study) + (other, layer, repr(sorted(qoi.items())), repr(sorted(doi.items())),
                                     target)
            t_scale = ui.figures.tile_scale(t_images.shape[1:3], len(t_images))
            t_grid = _render(t_key, "mask", t_scale, t_images, t_maps)
            both = len(t_labels) == len(t_images) == len(t_preds)
            # the twin's grid is a comparison: opened on demand, so the chapter stays short
            with st.expander(f"Masks of {other_label}'s {min(len(t_rows), len(t_grid))} experts"):
                for j, row in enumerate(t_rows[:len(t_grid)]):
                    label_col, tiles_col = st.columns(ROW_SPLIT, vertical_alignment="center")
                    label_col.markdown(f"**unit {int(row['unit'])}**  \nrank {j + 1}")
                    ui.image(t_grid[j], about=f"{ui.inert(layer)}, mask view", where=tiles_col,
                             width=t_scale * max(t_images.shape[1:3]), caption=[
                                 f"{ui.inert(other)}: unit {int(row['unit'])} on image {i + 1}"
                                 + (f" · {name(int(t_labels[i]))} → {name(int(t_preds[i]))}" if both else "")
                                 for i in range(len(t_images))])
            st.caption(f"Masks (95th percentile) of {other_label}'s experts, on the test images "
                       f"{'labelled' if target == 'label' else f'{ui.inert(other)} predicts as'} "
                       f"{' and '.join(name(c) for c in shown_for)}; label → {ui.inert(other)}'s "
                       f"prediction under "
                       "each tile.")

# ------------------------------------------------------------------------------------------ reading
st.header("How to read this")
lines = []
if HAS_VERDICT:
    n_short = int(table["carries shortcut"].sum())
    mean_mass = float(table[MASS_KEY].mean())
    lines.append(
        f"- Of the {len(table)} experts of **{ui.inert(layer)}** for **{what}**, **{n_short}** carr"
        f"{'ies' if n_short == 1 else 'y'} the shortcut: more than {THRESHOLD:.0%} of the positive "
        f"attribution of its interpretation falls on the {REGION}. The experts' mean {MASS_LABEL} is "
        f"**{mean_mass:.0%}**"
        + (f", against **{CHANCE:.1%}** if attribution were spread evenly." if CHANCE is not None else "."))
    if RULE:
        lines.append(f"- Why that threshold: {RULE}." + (f" {CAVEAT}" if CAVEAT else ""))
    alarm = (rep_experts.get("false_alarms") or {}).get(layer)
    if alarm and alarm.get("n"):
        lines.append(
            f"- How often the rule cries wolf: **{alarm.get('model')}**, a model that does not use the "
            f"{REGION}, has **{alarm.get('n_flagged')} of {alarm['n']}** top experts of "
            f"{ui.inert(layer)} flagged "
            f"({ui.pct(alarm.get('rate'))}): read the verdicts against that rate.")
elif HAS_MASS:
    lines.append(f"- The experts' mean {MASS_LABEL} is **{float(table[MASS_KEY].mean()):.0%}**.")
else:
    lines.append(f"- {ui.no_region_note(facts)}")
if HAS_MASS and twin and twin.get("rows"):
    tm = [x.get(MASS_KEY, x.get("region_mass")) for x in twin["rows"]]
    tm = [float(v) for v in tm if v is not None]
    if tm:
        twin_mass = float(np.mean(tm))
        mean_mass = float(table[MASS_KEY].mean())
        twin_short = sum(bool(x.get("shortcut")) for x in twin["rows"])
        lines.append(
            f"- The same view of **{ui.model_label(other, labels_, facts)}**: mean {MASS_LABEL} "
            f"**{twin_mass:.0%}**, {twin_short} of {len(twin['rows'])} experts carrying the shortcut. "
            + (f"The difference is the shortcut {ui.inert(model)} learned."
               if model == SUBJECT and mean_mass > twin_mass
               else "Compare the two to see what the region changed."))
if ZERO_WIDTH:
    # the bootstrap could not vary those scores (a unit silent on every image, or a distribution
    # the resampling does not touch): degenerate evidence, not stability
    lines.append(f"- {ZERO_WIDTH} of {len(table)} experts have a **zero-width** bootstrap interval: "
                 "every resample gave the same score, so the resampling could not vary it. That "
                 "is degenerate evidence, not stability, and their top-k frequency says nothing "
                 "about how the ranking would move on other images.")
if not table["frequency"].isna().all() and ZERO_WIDTH < len(table):
    live = table[_width > 1e-12] if ZERO_WIDTH else table
    stable = int((live["frequency"].astype(float) >= 0.8).sum())
    lines.append(f"- {stable} of {len(live)} experts" + (" with a non-degenerate interval"
                 if ZERO_WIDTH else "") + f" stay in the top {len(table)} in at least 80% of "
                 "bootstrap resamples; a less stable ranking says less about any single unit.")
if quantity == "comparative":
    lines.append(f"- The comparative quantity y({name(cls)}) − y({name(vs)}) cancels what the two classes "
                 f"share; its experts are the units that tell a {name(cls)} from a {name(vs)}.")
st.markdown("\n".join(lines))

# ------------------------------------------------------------------------------------------ your image
st.subheader("Explain your own image")
SIZE = facts.get("size") or list(np.asarray(images).shape[1:3])
CHANNELS = int(facts.get("channels") or (3 if images.ndim == 4 else 1))
st.markdown(
    f"Upload a PNG or JPEG: it is converted to the case's input ({SIZE[0]}×{SIZE[1]}, "
    f"{'colour' if CHANNELS == 3 else 'grey'}), and **{ui.inert(model)}** says what it sees, which "
    f"pixels drive that "
    f"answer and what its top experts of **{ui.inert(layer)}** look at in it. The file stays in memory; "
    f"nothing "
    "is written to disk.")
upload = st.file_uploader("Your image (PNG or JPEG)", type=["png", "jpg", "jpeg"], key="own-image")
if upload is not None:
    from core.queries.explain import ImageError, explain_image, read_image

    try:
        own = read_image(upload.getvalue(), SIZE, CHANNELS)
    except ImageError as exc:
        st.error(f"Could not use this file: {ui.plain(exc)}")
        own = None
    if own is not None:
        memo_key = ("own-image", getattr(upload, "file_id", upload.name), upload.size, model, layer)
        result = st.session_state.get("own-image-result")
        if not result or result[0] != memo_key:
            ok, value = ui.run_with_status("Explaining your image …",
                                           lambda: explain_image(study, model, own, layer=layer, k=3),
                                           done="Explained your image")
            result = (memo_key, value) if ok else None
            st.session_state["own-image-result"] = result
        if result:
            res = result[1]
            probs = res["probs"]
            pred = int(res["pred"])
            st.markdown(f"**{ui.inert(model)}** answers **{name(pred)}** ({probs[pred]:.0%}).")
            pics = [ui.picture(own, SCALE), ui.heatmap(res["attribution"], SCALE),
                    ui.overlay(own, res["attribution"], SCALE)]
            caps = ["your image, as the model sees it",
                    f"Integrated Gradients of {name(pred)} (red raises it, blue lowers it)",
                    "the same over your image"]
            for ex in res["experts"]:
                pics.append(ui.masked(own, ex["map"], SCALE))
                caps.append(f"expert unit {ex['unit']} of {ui.inert(layer)}: where it looks (95th "
                            f"percentile)")
            ui.image(pics, caption=caps, about="your image")
            if res["experts"]:
                st.caption(f"The experts are the top units of {ui.inert(layer)} for {name(pred)} "
                           + ("from the experts stage." if res.get("source") == "experts stage"
                              else "ranked on your image alone (the experts stage does not cover this "
                                   "model, layer and class)."))
            st.dataframe(pd.DataFrame({"class": [name(c) for c in range(len(probs))], "probability": probs}),
                         hide_index=True,
                         column_config={"probability": st.column_config.NumberColumn(format="percent")})

nxt = ("chapters/representations.py", "Representations compared") if ui.stage_exists("representations") \
    else ("chapters/method.py", "Method")
ui.next_chapter(*nxt, "Next: the same question asked of six popular explanation methods, and measured.")

"""Chapter 1: the domain problem — a digit classifier that can cheat by reading a corner patch.

Every number on this page is read from ``study.report()``; nothing is typed in.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui

SPLITS = [("train_acc", "train"), ("decoy_test_acc", "decoy test"), ("clean_test_acc", "clean test")]
N_SAMPLES = 8
PALETTE = ["#B4412E", "#6C8EAD", "#D9A441", "#5B8C5A", "#8A6FB0", "#9C9C9C"]
SCALE = 4

study = ui.current_study()
title = getattr(study.config, "title", None) or "DecoyMNIST"
st.title(title)

st.markdown(
    "A classifier can be right for the wrong reason. **DecoyMNIST** (Ross et al., 2017) makes that "
    "easy to see: every handwritten digit gets a small 4×4 square — the *decoy* — in a random corner. "
    "In the **training** images the square's shade gives the answer away (a 0 gets a white square, "
    "each higher digit a darker one: shade 255 − 25·label). In the **test** images the shade is "
    "drawn at random, so a model that learned to read the square instead of the digit is misled. A "
    "**clean** copy of every image has no square at all.")
description = getattr(study.config, "description", None)
if description:
    st.caption(description)

if not ui.require(study, ["data"], "This page"):
    st.stop()
rep = ui.report(study)
data = rep.get("data") or {}


def _gray(x: np.ndarray) -> np.ndarray:
    """(28, 28) float image in [0, 1] (or 0–255) → enlarged uint8 RGB, shades kept as they are."""
    x = np.asarray(x, np.float64)
    x = x / 255 if x.max() > 1.5 else x
    g = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return np.stack([g] * 3, -1).repeat(SCALE, 0).repeat(SCALE, 1)


def _outlined(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the patch pixels tinted red, so a dark patch on black is visible."""
    rgb = _gray(x).astype(np.float64)
    m = np.asarray(mask, bool).repeat(SCALE, 0).repeat(SCALE, 1)
    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([230.0, 40.0, 40.0])
    return rgb.round().astype(np.uint8)


def _patch_shade(x: np.ndarray, mask: np.ndarray) -> int | None:
    if not np.asarray(mask).any():
        return None
    v = float(np.asarray(x)[np.asarray(mask, bool)].mean())
    return int(round(v * 255 if np.asarray(x).max() <= 1.5 else v))


st.header("The images")
source = data.get("source")
sizes = ", ".join(f"{data[k]:,} {k[2:]}" for k in ("n_train", "n_val", "n_test")
                  if isinstance(data.get(k), int))
if sizes or source:
    st.markdown(f"Data: {sizes or 'sizes unknown'}{f' images from {source}' if source else ''}.")

for split, what in [("train", "Training images: the patch's shade encodes the label."),
                    ("test", "Test images: the patch's shade is random; the clean copy has none.")]:
    s = ui.samples(split, N_SAMPLES, study)
    x, x_clean, mask, y = s["x"], s["x_clean"], s["mask"], s["y"]
    st.subheader(f"{split.capitalize()} split")
    st.caption(what)
    shades = [_patch_shade(x[i], mask[i]) for i in range(len(y))]
    captions = [f"label {int(y[i])} · patch {shades[i] if shades[i] is not None else '—'}"
                for i in range(len(y))]
    st.image([_gray(x[i]) for i in range(len(y))], caption=captions)
    st.caption("The same images with the patch tinted red (a dark patch is hard to see on black):")
    st.image([_outlined(x[i], mask[i]) for i in range(len(y))])
    st.caption("Their clean copies, without the patch:")
    st.image([_gray(x_clean[i]) for i in range(len(y))])
    ui.download_png(lambda x=x, x_clean=x_clean, mask=mask: ui.image_grid(
        [[_gray(a) for a in x], [_outlined(a, m) for a, m in zip(x, mask, strict=True)],
         [_gray(a) for a in x_clean]]), f"samples_{split}.png", "Download these images (PNG)",
        key=f"dl-samples-{split}")

st.header("What the models learned")
if not ui.require(study, ["models"], "The accuracy comparison"):
    st.stop()
rep = ui.report(study)
models = rep.get("models") or {}
table = pd.DataFrame(
    [{"model": name, **{label: m.get(key) for key, label in SPLITS}} for name, m in models.items()])
st.markdown(
    "Two copies of the same network: **vanilla** trained on the images with the decoy, **clean** "
    "trained on the same images without it. Both are tested on the decoy test set (random shades) and "
    "on the clean test set (no patch).")
n_seeds = max(int(m.get("n_seeds") or 1) for m in models.values()) if models else 1
shown = table.copy()
if n_seeds > 1:  # mean ± sample sd over the seeds the report aggregates
    for key, label in SPLITS:
        shown[f"{label} sd"] = [m.get(f"{key}_sd") for m in models.values()]
    st.caption(f"Means over {n_seeds} training seeds, with their standard deviations.")
st.dataframe(shown, hide_index=True, column_config={
    col: st.column_config.NumberColumn(col, format="percent") for col in shown.columns if col != "model"})
long = table.melt(id_vars="model", var_name="split", value_name="accuracy").dropna()
sd = {(name, label): m.get(f"{key}_sd") for name, m in models.items() for key, label in SPLITS}
long["low"] = [a - (sd.get((n, sp)) or 0) for n, sp, a in zip(long["model"], long["split"], long["accuracy"],
                                                             strict=True)]
long["high"] = [a + (sd.get((n, sp)) or 0) for n, sp, a in zip(long["model"], long["split"], long["accuracy"],
                                                              strict=True)]
order = [label for _, label in SPLITS]
bars = alt.Chart(long).mark_bar().encode(
    x=alt.X("split:N", sort=order, title=None, axis=alt.Axis(labelAngle=0)),
    xOffset=alt.XOffset("model:N", sort=list(models)),
    y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="accuracy"),
    color=alt.Color("model:N", title="model", sort=list(models),
                    scale=alt.Scale(domain=list(models), range=PALETTE[:len(models)])),
    tooltip=["model", "split", alt.Tooltip("accuracy:Q", format=".1%")],
)
labels = bars.mark_text(dy=-6, fontSize=11).encode(text=alt.Text("accuracy:Q", format=".0%"),
                                                     color=alt.value("#1F2328"))
chart = bars + labels
if n_seeds > 1:
    chart += alt.Chart(long).mark_rule(color="#1F2328").encode(
        x=alt.X("split:N", sort=order), xOffset=alt.XOffset("model:N", sort=list(models)),
        y="low:Q", y2="high:Q")
st.altair_chart(chart.properties(height=320), width="stretch")
c1, c2 = st.columns(2)
with c1:
    ui.download_csv(shown, f"{rep.get('case', 'case')}_accuracy.csv", "Download the table (CSV)",
                    key="dl-accuracy")
with c2:
    ui.download_json(rep, f"{rep.get('case', 'case')}_report.json", "Download the report (JSON)",
                     key="dl-report")

st.header("What the gap means")
van, cln = models.get("vanilla") or {}, models.get("clean") or {}
v_train, v_decoy, v_clean = (van.get(k) for k, _ in SPLITS)
c_decoy = cln.get("decoy_test_acc")
if None in (v_train, v_decoy, v_clean, c_decoy):
    st.info("The gap needs both the vanilla and the clean model's accuracies in the report.")
    st.stop()
gap = c_decoy - v_decoy
m1, m2, m3 = st.columns(3)
m1.metric("vanilla, decoy test", ui.pct(v_decoy), ui.pp(v_decoy - v_train), delta_color="normal",
          help="Change against its own training accuracy.")
m2.metric("clean model, decoy test", ui.pct(c_decoy))
m3.metric("the shortcut's cost", ui.pp(gap), help="Clean model minus vanilla model, on the decoy test set.")
lines = [
    f"- The vanilla model is right on **{ui.pct(v_train)}** of its training images but only "
    f"**{ui.pct(v_decoy)}** of the decoy test images, where the patch no longer tells the truth.",
    f"- The same network trained without the patch reaches **{ui.pct(c_decoy)}** on that decoy test "
    "set: the digits alone are learnable to that level, and the patch does not bother a model that never "
    "relied on it.",
]
if gap > 0.02:
    lines.append(
        f"- The difference, **{ui.pp(gap)}**, is what the shortcut costs. It is the gap the corrections "
        "chapter tries to close (a correction that reaches the clean model closes 100% of it).")
else:
    lines.append(
        f"- The difference is small (**{ui.pp(gap)}**): in this build the vanilla model barely uses the "
        "decoy, so there is little shortcut to find or remove.")
if v_clean < c_decoy - 0.02:
    lines.append(
        f"- Without any patch the vanilla model scores **{ui.pct(v_clean)}**, below the clean model: "
        "while it could lean on the patch it learned less about the digits themselves. Removing the "
        "shortcut after training cannot add that missing knowledge; retraining or fine-tuning can.")
else:
    lines.append(
        f"- Without any patch the vanilla model scores **{ui.pct(v_clean)}**: it did learn the digits, "
        "and the random patch shades mislead it on top of that knowledge.")
st.markdown("\n".join(lines))
st.markdown(
    "The next chapter asks the model itself which internal units carry the shortcut: the influence "
    "of each unit on a class, and what each of the most influential units looks at.")
st.page_link("pages/influence.py", label="Influence & experts", icon=":material/arrow_forward:")

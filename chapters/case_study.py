"""Chapter 1: the domain problem — the case's images, its models, and what the accuracy gap says.

Every number on this page is read from ``study.report()`` and every case-specific word (class
names, the region's name, the models, the evaluation sets) from ``study.case_facts()``.
"""

from __future__ import annotations

import math

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui

N_SAMPLES = 8

study = ui.current_study()
facts = ui.facts(study)
title = facts.get("title") or getattr(study.config, "title", None) or study.config.name

classes = facts.get("classes") or []
region = ui.region_name(facts)  # inert text: a case string drawn as it reads
subject, reference = facts.get("subject"), facts.get("reference")
headline = facts.get("headline")
SCALE = ui.scale_for(facts.get("size"))

intro = ["A classifier can be right for the wrong reason: it may lean on something in the images "
         "that happens to go with the answer (a *shortcut*) instead of the thing itself."]
shape = facts.get("size")
if classes:
    intro.append(f"This case has **{len(classes)} classes** ({', '.join(map(ui.inert, classes[:12]))}"
                 f"{' …' if len(classes) > 12 else ''})"
                 + (f", {shape[0]}×{shape[1]} {'colour' if facts.get('channels') == 3 else 'grey'} "
                    "images" if shape else "") + ".")
if region:
    intro.append(f"Each image comes with a mask of the **{region}**, the suspected shortcut: it is "
                 "the ground truth the report uses to ask whether an explanation points at it.")
else:
    intro.append("It names no region (no suspected shortcut marked in the images).")
if subject:
    intro.append(f"The model under study is **{ui.inert(subject)}**"
                 + (f"; **{ui.inert(reference)}** is the reference it is compared with." if reference
                    else "; there is no reference model to compare it with."))
description = facts.get("description") or getattr(study.config, "description", None)


def _intro() -> None:
    st.markdown(" ".join(intro))
    if description:
        st.caption(ui.inert(description))


ui.chapter("data", ui.inert(title), _intro, study=study, what="This page", findings=True)
facts = ui.facts(study)
rep = ui.report(study)
data = rep.get("data") or {}

st.header("The images")
source = data.get("source")
sizes = ", ".join(f"{data[k]:,} {k[2:]}" for k in ("n_train", "n_val", "n_test")
                  if isinstance(data.get(k), int))
if sizes or source:
    st.markdown(f"Data: {sizes or 'sizes unknown'}{f' images from {ui.plain(source)}' if source else ''}.")



def _balanced(y, n: int) -> list[int]:
    """Up to ``n`` indices taking the classes in turn (the splits are often sorted by class)."""
    by: dict[int, list[int]] = {}
    for i, c in enumerate(y):
        by.setdefault(int(c), []).append(i)
    out, queues = [], [list(v) for _, v in sorted(by.items())]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


for split, what in [("train", "Training images"), ("test", "Test images")]:
    s = ui.samples(split, N_SAMPLES * max(1, min(len(classes), 25)), study)
    pick = _balanced(s["y"], N_SAMPLES)
    s = {k: (None if v is None or np.ndim(v) < 1 else np.asarray(v)[pick]) for k, v in s.items()}
    x, x_clean, mask, y = s["x"], s.get("x_clean"), s.get("mask"), s["y"]
    if x is None or not len(y):
        continue
    x_clean = None if x_clean is None or x_clean.ndim < 2 else x_clean
    mask = None if mask is None or mask.ndim < 2 else mask
    st.subheader(f"{split.capitalize()} split")
    names = [ui.class_name(int(c), facts) for c in y]
    st.caption(f"{what}, with their class." + (f" The {region} is part of the image." if region else ""))
    ui.image([ui.picture(x[i], SCALE) for i in range(len(y))], about=f"{what}, class",
             caption=[f"{split} image {i + 1}: {names[i]}" for i in range(len(y))])
    grid = [[ui.picture(a, SCALE) for a in x]]
    if mask is not None:
        st.caption(f"The same images with the {region} tinted red (its mask):")
        ui.image([ui.tinted(x[i], mask[i], SCALE) for i in range(len(y))], about=f"{split} image",
                 caption=[f"{names[i]}: {region} tinted red" for i in range(len(y))])
        grid.append([ui.tinted(a, m, SCALE) for a, m in zip(x, mask, strict=True)])
    if x_clean is not None:
        st.caption(f"The same images without the {region or 'region'}:")
        ui.image([ui.picture(x_clean[i], SCALE) for i in range(len(y))], about=f"{split} image",
                 caption=[f"{names[i]}: without the {region or 'region'}" for i in range(len(y))])
        grid.append([ui.picture(a, SCALE) for a in x_clean])
    ui.download_png(lambda grid=grid: ui.image_grid(grid), f"samples_{split}.png",
                    "Download these images (PNG)", key=f"dl-samples-{split}")

st.header("What the models learned")
if not ui.require(study, ["models"], "The accuracy comparison"):
    st.stop()
rep = ui.report(study)
models = rep.get("models") or {}
SPLITS = ui.accuracy_columns(models, facts)
table = pd.DataFrame(
    [{"model": name, **{label: m.get(key) for key, label in SPLITS}} for name, m in models.items()])
roles = []
if subject in models:
    roles.append(f"**{ui.inert(subject)}** is the model under study")
if reference in models:
    roles.append(f"**{ui.inert(reference)}** the reference it is compared with")
others = [m for m in models if m not in (subject, reference)]
if others:
    roles.append(f"also in the case: {', '.join(f'**{ui.inert(m)}**' for m in others)}")
sets = [ui.set_label(s) for s in facts.get("evaluation_sets") or []]
st.markdown(
    (("; ".join(roles) + ". ") if roles else "")
    + (f"Each is measured on its training images and on every evaluation set of the case "
       f"({', '.join(sets)}); the headline is **{ui.set_label(headline)}**." if sets else ""))
n_seeds = max(int(m.get("n_seeds") or 1) for m in models.values()) if models else 1
shown = table.copy()
if n_seeds > 1:  # mean ± sample sd over the seeds the report aggregates
    for key, label in SPLITS:
        shown[f"{label} sd"] = [m.get(f"{key}_sd") for m in models.values()]
    st.caption(f"Means over {n_seeds} training seeds, with their standard deviations.")
st.dataframe(shown, hide_index=True, column_config={
    col: st.column_config.NumberColumn(
        col, format="percent",
        help=("The sample standard deviation of that accuracy over the training seeds." if col.endswith(" sd")
              else f"Accuracy: the share of the {col} images the model classifies correctly."))
    for col in shown.columns if col != "model"})
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
                    scale=alt.Scale(domain=list(models),
                                    range=[ui.model_colors(list(models), facts)[m] for m in models])),
    tooltip=["model", "split", alt.Tooltip("accuracy:Q", format=".1%")],
)
labels = bars.mark_text(dy=-6, fontSize=11).encode(text=alt.Text("accuracy:Q", format=".0%"),
                                                     color=alt.value("#1F2328"))
chart = bars + labels
if n_seeds > 1:
    chart += alt.Chart(long).mark_rule(color="#1F2328").encode(
        x=alt.X("split:N", sort=order), xOffset=alt.XOffset("model:N", sort=list(models)),
        y="low:Q", y2="high:Q")
ui.chart(chart.properties(height=320), "Accuracy of every model on each set", long, width="stretch")
st.caption("Accuracy of every model on its training images and on each evaluation set (bars), "
           "read from the report.")
c1, c2 = st.columns(2)
with c1:
    ui.download_csv(shown, f"{rep.get('case', 'case')}_accuracy.csv", "Download the table (CSV)",
                    key="dl-accuracy")
with c2:
    ui.download_json(rep, f"{rep.get('case', 'case')}_report.json", "Download the report (JSON)",
                     key="dl-report")

hkey = f"{headline}_acc" if headline else None
sub, ref = models.get(subject) or {}, models.get(reference) or {}
s_train, s_head = sub.get("train_acc"), sub.get(hkey) if hkey else None
r_head = ref.get(hkey) if hkey else None
hname = ui.set_label(headline) if headline else "headline"
other_sets = [s for s in ui.held_out_sets(facts) if s != headline and sub.get(f"{s}_acc") is not None]

if reference is None or r_head is None:
    st.header("What the accuracy says")
    if s_head is None:
        st.info("The report holds no headline accuracy for the model under study yet.")
    else:
        m1, m2 = st.columns(2)
        m1.metric(f"{ui.inert(subject)}, {hname}", ui.pct(s_head),
                  ui.pp(s_head - s_train) if s_train is not None else None,
                  help="Change against its own training accuracy.")
        if s_train is not None:
            m2.metric(f"{ui.inert(subject)}, training images", ui.pct(s_train))
        lines = [f"- **{ui.inert(subject)}** is right on **{ui.pct(s_train)}** of its training images and "
                 f"**{ui.pct(s_head)}** of the {hname} images."]
        for s in other_sets:
            lines.append(f"- On {ui.set_label(s)}: **{ui.pct(sub.get(f'{s}_acc'))}**.")
        lines.append("- This case has no reference model, so there is no gap to measure: the chapters "
                     "show the one model and what it relies on.")
        st.markdown("\n".join(lines))
else:
    st.header("What the gap means")
    gap = r_head - s_head if s_head is not None else None
    m1, m2, m3 = st.columns(3)
    m1.metric(f"{ui.inert(subject)}, {hname}", ui.pct(s_head),
              ui.pp(s_head - s_train) if None not in (s_head, s_train) else None,
              delta_color="normal", help="Change against its own training accuracy.")
    m2.metric(f"{ui.inert(reference)}, {hname}", ui.pct(r_head))
    m3.metric("the gap", ui.pp(gap),
              help=f"{ui.inert(reference)} minus {ui.inert(subject)}, on the {hname} set (the headline "
                   f"evaluation set).")
    lines = []
    if s_head is not None:
        lines.append(f"- **{ui.inert(subject)}** is right on **{ui.pct(s_train)}** of its training "
                     f"images and "
                     f"**{ui.pct(s_head)}** of the {hname} images.")
    lines.append(f"- **{ui.inert(reference)}** reaches **{ui.pct(r_head)}** on the same {hname} set.")
    # the gap's noise: two binomial SEs of a difference of two accuracies on the same n images
    n_head = int((rep.get("data") or {}).get("n_test") or 0)
    noise = (2 * math.sqrt((s_head * (1 - s_head) + r_head * (1 - r_head)) / n_head)
             if gap is not None and n_head else 0.0)
    if gap is not None and abs(gap) <= max(noise, 0.02):
        lines.append(
            f"- The difference, **{ui.pp(gap)}**, is within noise"
            + (f" (two standard errors on {n_head} images: ±{100 * noise:.1f} pp)" if noise else "")
            + f": {ui.inert(subject)} and {ui.inert(reference)} cannot be told apart on the {hname} "
            "set, so there is no shortcut cost to find or remove here.")
    elif gap is not None and gap > 0:
        lines.append(
            f"- The difference, **{ui.pp(gap)}**, is what relying on the "
            f"{region or 'shortcut'} may cost. It is the gap the corrections chapter tries to close "
            f"(a correction that reaches {ui.inert(reference)} closes 100% of it).")
    elif gap is not None:
        lines.append(
            f"- **{ui.inert(subject)}** leads {ui.inert(reference)} by **{ui.pp(-gap)}** on the {hname} "
            f"set: the reference is not better here, so this set shows no cost of the "
            f"{region or 'shortcut'} (does it break the shortcut?).")
    for s in other_sets:
        sv, rv = sub.get(f"{s}_acc"), ref.get(f"{s}_acc")
        lines.append(f"- On {ui.set_label(s)}: {ui.inert(subject)} **{ui.pct(sv)}**"
                     + (f", {ui.inert(reference)} **{ui.pct(rv)}**." if rv is not None else "."))
    st.markdown("\n".join(lines))

data_sizes = rep.get("data") or {}
small = [(name, int(data_sizes[key])) for name, key in (("test", "n_test"), ("validation", "n_val"))
         if isinstance(data_sizes.get(key), int) and 0 < data_sizes[key] < 100]
if small:  # issue 18: an evaluation set under 100 images is named, with its noise
    st.caption("Small evaluation sets: " + "; ".join(
        f"the {name} split has {n} images (small: ±{50 / math.sqrt(n):.0f} points, one binomial "
        "SE at 50%)" for name, n in small) + ". Differences of a few points there are noise.")
if not region:
    st.caption(ui.no_region_note(facts))
ui.next_chapter("chapters/influence.py", "Influence & experts",
                "The next chapter asks the model itself which internal units it relies on for each "
                "class, and what each of the most influential units looks at.")

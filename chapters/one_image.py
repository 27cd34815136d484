"""One image, end to end: one test image followed from the input to the experts of every layer.

The reader picks a test image (``?image=`` is its number in the test split, counted from 1 as in
every chapter; by default the first one the model under study gets wrong, else the first). The page
shows the image (its region shaded when the case has one), its label, the prediction and class
probabilities of the sidebar's model and of the reference, the Integrated Gradients of the predicted
class at the input, and then, for every expert layer of the case, the predicted class's top experts
and what each looks at on this image (with each expert's region mass when the case has a region).
Everything is computed by ``core.queries.explain.trace_image`` / ``predict_split``; this page only
draws what they return.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

import ui

K = 3  # experts shown per layer
KEY = "one-image-index"

study = ui.current_study()
ui.chapter(
    ["data", "models"], "One image, end to end",
    "The other chapters summarise many images. Here one test image is followed the whole way: what the "
    "model answers, which input pixels that answer rests on, and — layer after layer — which "
    "**experts** (the internal units with the most influence on the predicted class) carry it and what "
    "each of them looks at in this very image.",
    study=study, what="Following an image through the model", key="one-image-build")

facts = ui.facts(study)
MODEL = ui.current_model(study)
SUBJECT, REFERENCE = facts.get("subject"), facts.get("reference")
REGION = ui.region_name(facts)
LAYERS = tuple(str(x) for x in facts.get("layers") or [])
SCALE = ui.scale_for(facts.get("size"), target=160)
labels_ = ui.correction_labels(study) if ui.status(study).get("corrections") else {}


def name(c) -> str:
    return ui.class_name(c, facts)


def label_of(m: str) -> str:
    return ui.model_label(m, labels_, facts)


@st.cache_data(show_spinner=False, max_entries=8)
def _predictions(stamp: tuple, model: str, _study) -> dict:
    from core.queries.explain import predict_split

    got = predict_split(_study, model, "test")
    return {"n": int(len(got["label"])), "wrong": list(got["wrong"])}


@st.cache_data(show_spinner=False, max_entries=32)
def _trace(stamp: tuple, model: str, index: int, layers: tuple[str, ...], k: int, _study) -> dict:
    from core.queries.explain import trace_image

    return trace_image(_study, model, int(index), layers=list(layers), k=k)


ok, preds = ui.run_with_status(f"Predicting the test images with {ui.inert(MODEL)} …",
                               lambda: _predictions(ui.stamp(study), MODEL, study),
                               done="Predicted the test images")
if not ok or not preds or preds["n"] == 0:
    st.info("There are no test images to follow for this case study.")
    st.stop()
N, WRONG = preds["n"], preds["wrong"]
DEFAULT = WRONG[0] if WRONG else 0

# -------------------------------------------------------------------------------------- the image
asked = ui.qp_get("image")
if KEY not in st.session_state:
    start = DEFAULT + 1  # the widget holds the image's number (1-based, as readers count)
    if asked is not None:
        try:
            wanted = int(asked.strip())
            if not 1 <= wanted <= N:
                raise IndexError
            start = wanted
        except (ValueError, IndexError):
            st.error(f"No test image {ui.plain(repr(asked[:40]))}: the image is a number from 1 to {N}; "
                     f"showing image {DEFAULT + 1}.")
    st.session_state[KEY] = start


def _next_wrong() -> None:
    current = int(st.session_state.get(KEY, 1)) - 1
    later = [i for i in WRONG if i > current] or WRONG
    if later:
        st.session_state[KEY] = int(later[0]) + 1


left, right = st.columns([2, 3], vertical_alignment="bottom")
with left:
    NUMBER = int(st.number_input(
        "Test image", min_value=1, max_value=N, step=1, key=KEY,
        help=f"The image's number in the test split (1 to {N}). The URL keeps it (?image=), so a "
             "copied link reopens this image."))
    INDEX = NUMBER - 1  # its index in the split (what core is asked for)
with right:
    st.button("Next wrong image", icon=":material/skip_next:", on_click=_next_wrong, disabled=not WRONG,
              help=f"The next test image (after this one, wrapping round) that {label_of(MODEL)} "
                   "classifies wrongly.")
ui.qp_set(image=NUMBER)
st.caption(f"{label_of(MODEL)} gets **{len(WRONG)} of {N}** test images wrong"
           + (f"; the first is image {WRONG[0] + 1}." if WRONG else "."))

ok, trace = ui.run_with_status(
    f"Following test image {NUMBER} through {ui.inert(MODEL)} …",
    lambda: _trace(ui.stamp(study), MODEL, INDEX, LAYERS, K, study),
    done=f"Followed test image {NUMBER} through {len(LAYERS)} layer(s)")
if not ok or trace is None:
    st.stop()
ref = None
if REFERENCE and REFERENCE != MODEL:
    ok_ref, ref = ui.run_with_status(f"Asking the reference {ui.inert(REFERENCE)} …",
                                     lambda: _trace(ui.stamp(study), REFERENCE, INDEX, (), K, study),
                                     done=f"Asked the reference {ui.inert(REFERENCE)}")

image, mask = trace["image"], trace["mask"]
st.header(f"Test image {NUMBER}: labelled {name(trace['label'])}")
c1, c2, c3 = st.columns([1, 1, 2])
with c1:
    ui.image(ui.tinted(image, mask, SCALE) if mask is not None else ui.picture(image, SCALE),
             caption=f"label {name(trace['label'])}" + (f" · the {REGION} shaded red" if mask is not None
                                                        and REGION else ""),
             about=f"test image {NUMBER}")
with c2:
    ui.image(ui.heatmap(trace["attribution"], SCALE), about=f"test image {NUMBER}, heatmap",
             caption=f"what {ui.inert(MODEL)}'s answer rests on (Integrated Gradients of "
                     f"{name(trace['pred'])})")
with c3:
    verdict = "right" if trace["correct"] else "wrong"
    st.markdown(f"**{ui.plain(label_of(MODEL))}** predicts **{ui.plain(name(trace['pred']))}** "
                f"({ui.pct(trace['probs'][trace['pred']])}): **{verdict}**.")
    if ref is not None:
        rv = "right" if ref["correct"] else "wrong"
        st.markdown(f"The reference **{ui.plain(label_of(REFERENCE))}** predicts "
                    f"**{ui.plain(name(ref['pred']))}** ({ui.pct(ref['probs'][ref['pred']])}): **{rv}**.")
    table = {"class": [name(c) for c in range(len(trace["probs"]))], MODEL: trace["probs"]}
    if ref is not None:
        table[REFERENCE] = ref["probs"]
    cfg = {m: st.column_config.ProgressColumn(
        m, min_value=0.0, max_value=1.0, format="percent",
        help=f"{label_of(m)}: its probability for each class (softmax of its outputs; they sum to 100%).")
        for m in table if m != "class"}
    # every class in view (the box grows with the rows; a fixed height scrolled after five)
    st.dataframe(pd.DataFrame(table), hide_index=True, column_config=cfg, height="content")
ui.image(ui.heat_legend(), caption=ui.HEAT_SCALE_NOTE, width=240,
         alt=ui.HEAT_LEGEND_ALT)

# -------------------------------------------------------------------------------------- the layers
st.header(f"Layer by layer: the experts for {name(trace['pred'])}")
st.markdown(
    f"For each layer, the top {K} **experts** of the predicted class — the units whose activation has the "
    "largest influence on its score (from the experts stage when it ranked this model and class, else "
    "ranked on this image alone) — and what each looks at here: the image kept where the expert's "
    "interpretation is strongest, and its signed heatmap.")
if mask is not None and REGION:
    chance = facts.get("chance")
    st.caption(f"**{REGION} mass**: the share of an expert's positive attribution on this image that falls "
               f"inside the {REGION} (0 = none, 1 = all of it)"
               + (f"; a map spread evenly would score {chance:.1%}." if chance is not None else "."))
for ly in trace["layers"]:
    st.subheader(f"{ly['layer']}")
    how = "ranked by the experts stage" if ly["source"] == "experts stage" else "ranked on this image alone"
    st.caption(f"experts {how} for class {name(ly['class'])}")
    if not ly["experts"]:
        st.info("No expert found in this layer.")
        continue
    cols = st.columns(len(ly["experts"]))
    for col, e in zip(cols, ly["experts"], strict=True):
        with col:
            both = np.concatenate([ui.masked(image, e["map"], SCALE), ui.heatmap(e["map"], SCALE)], axis=1)
            words = f"unit {e['unit']} · influence {e['score']:.3g}"
            if mask is not None and REGION:
                words += f" · {REGION} mass {ui.pct(e['region_mass'])}"
            ui.image(both, caption=words, about=f"{ly['layer']}, class {name(ly['class'])}, test image "
                                                f"{NUMBER}, mask and heatmap")
if not trace["layers"]:
    st.info("This case names no expert layers.")

nxt = ("chapters/representations.py", "Representations compared") if ui.stage_exists("representations") \
    else ("chapters/method.py", "Method")
ui.next_chapter(*nxt, "Next: the same question asked of popular explanation methods, and measured.")

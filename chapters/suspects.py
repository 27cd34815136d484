"""Chapter: shortcut suspects that no one marked (the ``discovery`` stage).

Drawn only from ``core.stages.discovery.build``: per model, the candidates the experts' maps
propose (a region per image, grouped SpRAy-like), each with its causal tests against a same-shape
control at random places, its verdict and the rule beside it; per candidate a grid of held-out
images with the region outlined, grouped by the model's prediction; and the TOML lines that make a
candidate the case's region. The page computes nothing; when the stage is missing it offers to
build it.
"""

from __future__ import annotations

from urllib.parse import urlencode

import altair as alt
import pandas as pd
import streamlit as st

import ui

SHOWN = 3  # candidates drawn in full (the table lists them all)
PER_ROW = 8

study = ui.current_study()
facts = ui.facts(study)
st.title("Suspects: shortcuts no one marked")
ui.model_warnings(study)  # a model at chance is said before anything is read
st.markdown(
    "The other chapters check a shortcut someone already drew as masks. This one looks for it "
    "without any: for each class, the images the model gives the class are grouped by what the "
    "class's **experts** look at (their interpretation maps, clustered with an eigengap, as in "
    "SpRAy); each group proposes a **region** per image. A region is then tested by cause, on "
    "held-out images, against a **control** of the same size and shape at random places: "
    "**necessity** — remove it: how many images lose the class; **sufficiency** — paste it onto "
    "images of other classes: how many become the class. A candidate is *suspected* only when both "
    "beat the control and the region is compact and recurs; otherwise it is a reason the model "
    "uses, not a suspect.")

if not ui.require(study, ["discovery"], "This chapter", key="build-discovery"):
    st.stop()
payload = ui.artifact("discovery", study, drop=()) or {}  # its report has a "models" key
rows = payload.get("rows") or []
summary = payload.get("report") or {}
gallery = payload.get("gallery") or {}
per_model = summary.get("models") or {}

names = [n for n in ui.model_names(study) if n in per_model] or list(per_model)
if not names:
    st.warning("The discovery stage ran on no model: "
               + "; ".join(ui.plain(r.get("reason"), 300) for r in rows if r.get("reason")))
    st.stop()
subject = summary.get("subject") or names[0]
model = ui.choice("Model", names, param="smodel", default=subject,
                  format_func=lambda n: ui.model_label(n, facts=facts))
mine = [r for r in rows if r.get("model") == model and r.get("kind") == "candidate"]
notes = [r for r in rows if r.get("model") == model and r.get("kind") == "note"]
info = per_model.get(model) or {}

# ------------------------------------------------------------------------------------- headline
alarms = summary.get("false_alarms") or {}
others = alarms.get("models") or []
head = info.get("headline") or "no suspected shortcut"
line = (f"**{ui.plain(ui.model_label(model, facts=facts))}**: {ui.plain(head)} — "
        f"{info.get('n_suspected', 0)} suspected of {info.get('n_candidates', 0)} candidates "
        f"({info.get('n_tested', 0)} tested).")
if others:
    line += (f" On the other models (the controls): {alarms.get('n_flagged', 0)} of "
             f"{len(others)} have a suspect.")
(st.success if info.get("n_suspected") else st.info)(line)
if summary.get("rule"):
    st.caption(f"The rule: {ui.plain(summary['rule'], limit=1200)}. Layer of the experts: "
               f"{ui.plain(summary.get('layer') or 'the class logit')}.")
if notes:  # classes (or the whole model) that could not be tested, each with its reason
    st.caption("Not tested: " + "; ".join(
        f"class {ui.plain(n.get('class') or '—')} — {ui.plain(n.get('reason'), 300)}"
        for n in notes) + ".")
if not mine:
    st.stop()


def _ci(r: dict, name: str) -> str:
    lo, hi = (r.get(f"{name}_ci") or [None, None])[:2]
    v = r.get(name)
    if v is None:
        return "—"
    return f"{v:.2f}" + (f" ({lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else "")


table = pd.DataFrame([{
    "rank": r.get("rank"), "class": ui.class_name(r.get("class"), facts), "verdict": r.get("verdict"),
    "necessity": _ci(r, "necessity"), "control (nec.)": _ci(r, "control_necessity"),
    "sufficiency": _ci(r, "sufficiency"), "control (suf.)": _ci(r, "control_sufficiency"),
    "p": r.get("p_value"), "share of image": r.get("share_of_image"),
    "images": r.get("n_images"), "group": r.get("group"), "region": r.get("mode"),
    **({"IoU with the case's region": r.get("region_iou")} if "region_iou" in r else {}),
    "why": r.get("reason")} for r in mine])
st.dataframe(table, hide_index=True, column_config={
    "p": st.column_config.NumberColumn(format="%.2g", help="The larger of the two one-sided exact "
                                       "McNemar p-values (region vs control, same images)."),
    "share of image": st.column_config.NumberColumn(format="percent"),
    "IoU with the case's region": st.column_config.NumberColumn(
        format="%.2f", help="Median IoU with the masks the case provides (not used to find it)."),
    "necessity": st.column_config.TextColumn(help="Share of the group's held-out images that lose "
                                             "the class when the region is removed (95% Wilson)."),
    "sufficiency": st.column_config.TextColumn(help="Share of other classes' images that become "
                                               "the class when the region is pasted (95% Wilson)."),
})
ui.download_csv(table, f"suspects_{model}.csv", "Download the candidates (CSV)", key="dl-suspects")

# ------------------------------------------------------------------------------ candidate by candidate
try:
    asked = int(ui.qp_get("suspect") or 0)
except ValueError:
    asked = 0
order = sorted(mine, key=lambda r: (r.get("rank") != asked, r.get("rank") or 0))
classes = facts.get("classes") or []
scale = ui.scale_for(facts.get("size") or (32, 32), 96)
for r in order[:SHOWN]:
    rank, cls = r.get("rank"), ui.class_name(r.get("class"), facts)
    st.header(f"#{rank} · class {cls}: {r.get('verdict')}")
    st.markdown(f"**Why:** {ui.plain(r.get('reason'), 400)}. A {ui.plain(r.get('mode'))} region "
                f"from {ui.plain(r.get('group'))}, covering {r.get('share_of_image', 0):.1%} of "
                f"the image, tested on {r.get('n_images')} held-out images "
                f"(necessity) and {r.get('sufficiency_n')} of other classes (sufficiency); "
                f"α after Bonferroni {r.get('alpha_corrected', 0):.2g}.")
    left, right = st.columns([3, 2])
    g = gallery.get(f"{model}/{rank}") or {}
    with left:
        imgs, masks, preds = g.get("image"), g.get("mask"), list(g.get("pred") or [])
        if imgs is None or not len(preds):
            st.caption("No held-out image carries this region.")
        else:
            groups: dict[int, list] = {}
            for i, p in enumerate(preds):
                groups.setdefault(int(p), []).append(ui.outlined(imgs[i], masks[i], scale))
            labels = [f"predicted {ui.class_name(classes[p] if p < len(classes) else p, facts)}"
                      for p in groups]
            grid = ui.labelled_grid([v[:PER_ROW] for v in groups.values()], labels,
                                    title=f"Candidate #{rank} (class {cls}): held-out images, "
                                          "region outlined, grouped by the model's prediction")
            st.image(grid)
    with right:
        bars = []
        for test in ("necessity", "sufficiency"):
            for who, key in (("region", test), ("control", f"control_{test}")):
                lo, hi = (r.get(f"{key}_ci") or [None, None])[:2]
                bars.append({"test": test, "who": who, "share": r.get(key), "low": lo, "high": hi})
        df = pd.DataFrame(bars)
        base = alt.Chart(df).encode(x=alt.X("who:N", title=None), color=alt.Color(
            "who:N", scale=alt.Scale(domain=["region", "control"], range=["#B4412E", "#8C959F"]),
            legend=None))
        chart = alt.layer(base.mark_bar().encode(y=alt.Y("share:Q", scale=alt.Scale(domain=[0, 1]),
                                                         title="share of images")),
                          base.mark_rule(color="#1F2328").encode(y="low:Q", y2="high:Q")
                          ).properties(width=90, height=180).facet(column=alt.Column("test:N",
                                                                                     title=None))
        st.altair_chart(chart)
        st.caption("Bars: the share; lines: 95% Wilson intervals. The control is a region of the "
                   "same size and shape at a random place on the same images: removed there "
                   "(necessity), or the content found there pasted there (sufficiency).")
    case = study.config.name
    # the names are URL-encoded: a case or model name cannot close the link or add markup
    query = urlencode({"case": case, "smodel": model, "suspect": rank})
    st.markdown(f"[Link to this candidate](suspects?{query})")
    with st.expander("Use as the case's region"):
        st.markdown("Write this candidate's masks (PNG, same relative paths as the images; no file "
                    "= no region on that image), then point the case's `[region]` at them. The "
                    "verdicts, localisation metrics and corrections are then built on it. Nothing "
                    "is written into your folders from here.")
        st.code(f"python -m core discover {case} --model {model} --top {rank} --out suspects\n",
                language="sh")
        raw_cls = str(r.get("class")).replace('"', "'")  # a code block draws no markup
        st.code(f'[region]\nmasks = "suspects/{rank}"\nname = "suspect {rank} (class {raw_cls})"\n',
                language="toml")

ui.next_chapter("chapters/one_image.py", "One image, end to end",
                "Follow one test image from the input through every layer's experts.")

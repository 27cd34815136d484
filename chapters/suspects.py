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
ui.chapter(
    ["discovery"], "Suspects: shortcuts no one marked",
    "The other chapters check a shortcut someone already drew as masks. This one looks for it "
    "without any: for each class, the images the model gives the class are grouped by what the "
    "class's **experts** look at (their interpretation maps, clustered with an eigengap, as in "
    "SpRAy); each group proposes a **region** per image, and groups whose regions hold alike "
    "content at different places are pooled into one candidate (one mark, several places). A "
    "region is then tested by cause, on held-out images, against a **control** of the same size "
    "and shape at random places: **necessity** — remove it: how many images lose the class; "
    "**sufficiency** — paste it onto images of other classes: how many become the class. A "
    "region whose place varies has a third control, its content's **specificity**: what another "
    "image of the class holds at the same place, pasted there. A candidate is *suspected* only "
    "when both effects beat their controls and the region is compact and recurs; otherwise it is "
    "a reason the model uses, not a suspect — or, when only the images were too few, undecided.",
    study=study, what="This chapter", key="build-discovery")
QUICK = ((getattr(study, "budget", None) or {}).get("preset") == "quick")
UNDECIDED = "quick build: too few images to decide" if QUICK else "too few images to decide"
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


def shown_verdict(r: dict) -> str:
    """The verdict as the chapter says it: a candidate that only lacked images is undecided,
    never a plain "not suspected" (which would read as a clean bill)."""
    return UNDECIDED if r.get("reason_kind") == "power" else str(r.get("verdict"))


# ------------------------------------------------------------------------------------- headline
alarms = summary.get("false_alarms") or {}
others = alarms.get("models") or []
head = info.get("headline") or "no suspected shortcut"
n_undecided = sum(1 for r in mine if r.get("reason_kind") == "power")
line = (f"**{ui.plain(ui.model_label(model, facts=facts))}**: {ui.plain(head)} — "
        f"{info.get('n_suspected', 0)} suspected of {info.get('n_candidates', 0)} candidates "
        f"({info.get('n_tested', 0)} tested)")
if n_undecided and not info.get("n_suspected"):
    line += f"; {n_undecided} {UNDECIDED}"
line += "."
if others:
    line += (f" False alarms on the other models (the controls): {alarms.get('n_flagged', 0)} of "
             f"{len(others)} have a suspect.")
if info.get("n_suspected"):
    st.success(line)
elif not mine or n_undecided:  # nothing tested, or candidates left undecided: no clean bill
    st.warning(line)
else:
    st.info(line)
if summary.get("rule"):
    st.caption(f"The rule: {ui.plain(summary['rule'], limit=1200)}. Layer of the experts: "
               f"{ui.plain(summary.get('layer') or 'the class logit')}.")
for n in notes:  # classes (or the whole model) that could not be tested, each with its reason
    who = f"class {ui.plain(str(n['class']))}" if n.get("class") is not None else "model"
    st.warning(f"Not tested ({who}): {ui.plain(n.get('reason'), 300)}.")
if not mine:
    st.stop()


def _ci(r: dict, name: str) -> str:
    lo, hi = (r.get(f"{name}_ci") or [None, None])[:2]
    v = r.get(name)
    if v is None:
        return "—"
    return f"{v:.2f}" + (f" ({lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else "")


table = pd.DataFrame([{
    "rank": r.get("rank"), "class": ui.inert(str(r.get("class"))),  # rows carry the name
    "verdict": shown_verdict(r),
    "necessity": _ci(r, "necessity"), "control (nec.)": _ci(r, "control_necessity"),
    "sufficiency": _ci(r, "sufficiency"), "control (suf.)": _ci(r, "control_sufficiency"),
    "specificity control": _ci(r, "control_same_place"),
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
    "specificity control": st.column_config.TextColumn(
        help="A region whose place varies: the share that become the class when what another "
             "image of the class holds at the same place is pasted there (— for one place)."),
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
BAR_COLOURS = {"region": "#B4412E", "random place": "#8C959F", "same place, other image": "#3B6EA8"}


def _thresholds(r: dict) -> str:
    t = r.get("thresholds") or {}
    return ", ".join(f"{ui.plain(str(k).replace('_', ' '))} = {v:g}" for k, v in t.items()
                     if isinstance(v, int | float))


def _bars(r: dict) -> pd.DataFrame:
    """The shares the chart draws: per test the region and each of its controls (random place;
    for sufficiency of a region whose place varies, the content-specificity control too)."""
    out = []
    for test in ("necessity", "sufficiency"):
        pairs = [("region", test), ("random place", f"control_{test}")]
        if test == "sufficiency" and r.get("control_same_place") is not None:
            pairs.append(("same place, other image", "control_same_place"))
        for who, key in pairs:
            lo, hi = (r.get(f"{key}_ci") or [None, None])[:2]
            out.append({"test": test, "who": who, "share": r.get(key), "low": lo, "high": hi})
    return pd.DataFrame(out)


def _grid(r: dict, rank, cls: str) -> None:
    g = gallery.get(f"{model}/{rank}") or {}
    imgs, masks, preds = g.get("image"), g.get("mask"), list(g.get("pred") or [])
    if imgs is None or not len(preds):
        st.caption("No held-out image carries this region.")
        return
    groups: dict[int, list] = {}
    for i, p in enumerate(preds):
        groups.setdefault(int(p), []).append(ui.outlined(imgs[i], masks[i], scale))
    labels = [f"predicted {ui.class_name(classes[p] if p < len(classes) else p, facts)}"
              for p in groups]
    title = (f"Candidate #{rank} (class {cls}): held-out images, region outlined, grouped by "
             "the model's prediction")
    grid = ui.labelled_grid([v[:PER_ROW] for v in groups.values()], labels, title=title)
    counts = ", ".join(f"{lab} ({min(len(v), PER_ROW)})" for lab, v in zip(labels, groups.values(),
                                                                              strict=True))
    ui.image(grid, alt=ui.alt_text(title, f"the region outlined in red; rows: {counts}"))


for r in order[:SHOWN]:
    rank, cls = r.get("rank"), ui.inert(str(r.get("class")))  # rows carry the class's name
    st.header(f"#{rank} · class {cls}: {shown_verdict(r)}")
    why = ui.plain(r.get("reason"), 400)
    if r.get("reason_kind") == "power":
        why += (" — more images (a full build, or a larger max_heldout / max_targets) could "
                "decide it" if QUICK else " — more images could decide it")
    st.markdown(f"**Verdict: {shown_verdict(r)}.** {why}.")
    st.caption(f"The rule beside it: {ui.plain(r.get('rule') or summary.get('rule') or '', 1200)}."
               f" Thresholds: {_thresholds(r)}; α after Bonferroni "
               f"{r.get('alpha_corrected', 0):.2g}.")
    st.markdown(f"A {ui.plain(r.get('mode'))} region from {ui.plain(r.get('group'))}, covering "
                f"{r.get('share_of_image', 0):.1%} of the image, tested on {r.get('n_images')} "
                f"held-out images (necessity) and {r.get('sufficiency_n')} of other classes "
                "(sufficiency).")
    left, right = st.columns([3, 2])
    with left:
        _grid(r, rank, cls)
    with right:
        df = _bars(r)
        base = alt.Chart(df).encode(x=alt.X("who:N", title=None, sort=list(BAR_COLOURS)),
                                    color=alt.Color("who:N", scale=alt.Scale(
                                        domain=list(BAR_COLOURS), range=list(BAR_COLOURS.values())),
                                        legend=None))
        chart = alt.layer(base.mark_bar().encode(y=alt.Y("share:Q", scale=alt.Scale(domain=[0, 1]),
                                                         title="share of images")),
                          base.mark_rule(color="#1F2328").encode(y="low:Q", y2="high:Q")
                          ).properties(width=110, height=180).facet(column=alt.Column("test:N",
                                                                                      title=None))
        ui.chart(chart, f"Candidate #{rank} (class {cls}): necessity and sufficiency of the region "
                 "beside its controls", data=df)
        st.caption("Bars: the share; lines: 95% Wilson intervals. Random place: a region of the "
                   "same size and shape at a random place on the same images, removed there "
                   "(necessity), or the content found there pasted there (sufficiency). Same "
                   "place, other image (a region whose place varies): what another image of the "
                   "class holds under the region, pasted at the same place.")
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

"""Overview: where the shortcut lives — class × layer × model, read from the report alone (issue 13).

For every model the experts stage ranked (the model under study, the reference, and the control
model when the case names one), a matrix with the classes as rows and the ranked layers as columns:
each cell says how many of the class's top experts at that layer carry the shortcut (n/k) and their
mean region mass, coloured by that share. Each cell of the tables is a deep link to the influence
chapter on that model, class and layer. Beside the matrix: each layer's threshold, the rule and the
control model's false-alarm rate. A case without a region has no verdicts: only the counts are shown.
Nothing is computed here; everything comes from ``ui.report()``.
"""

from __future__ import annotations

from urllib.parse import urlencode

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

import ui

INFLUENCE = "influence"  # the influence chapter's url_path (app.py)

study = ui.current_study()


def _intro() -> None:
    st.markdown(
        "The headline finding in one view: for each class and each layer, how many of the class's top "
        "**experts** (the units with the largest distributional influence on the class) carry the "
        "shortcut — most of their interpretation falls on the suspected region — in the model under "
        "study and in the reference. Click a cell to open those experts in the influence chapter.")
    found = ui.discovery_headline(study)  # what discovery found with no mask at all
    if found:
        st.info(found, icon=":material/search:")
        try:
            st.page_link("chapters/suspects.py", label="The suspects, tested by cause",
                         icon=":material/arrow_forward:")
        except Exception:  # noqa: BLE001 - a chapter run on its own (no navigation)
            pass


# Without the experts stage there is nothing to summarise: the gate offers it (or shows its build).
ui.chapter(["experts"], "Where the shortcut lives", _intro, study=study,
           what="This summary of the experts")
rep = ui.report(study)
E = rep.get("experts") or {}
top = [dict(r) for r in E.get("top") or []]
if not top:
    st.info("The experts stage holds no ranked experts for this case study.")
    st.stop()

cf = rep.get("case_facts") or {}
CLASS_NAMES = [ui.inert(c) for c in cf.get("classes") or []]
REGION = ui.region_name(cf)
CHANCE = cf.get("chance")
SUBJECT, REFERENCE = rep.get("subject"), rep.get("reference")
LAYERS = [str(x) for x in E.get("layers") or []]
LAYERS += sorted({str(r["layer"]) for r in top} - set(LAYERS))
CLASSES = [int(c) for c in E.get("classes") or []]
CLASSES += sorted({int(r["class"]) for r in top} - set(CLASSES))
THRESHOLDS = {str(k): v for k, v in (E.get("shortcut_thresholds") or {}).items()}
RULE = E.get("shortcut_rule")
ALARMS = E.get("false_alarms") or {}
CONTROL = next((a.get("model") for a in ALARMS.values() if isinstance(a, dict) and a.get("model")), None)
HAS_VERDICT = bool(REGION) and any(isinstance(r.get("shortcut"), bool) for r in top)
MASS = f"{REGION} mass" if REGION else "region mass"
CASE = ui.current_case()

seen = list(dict.fromkeys(str(r["model"]) for r in top))
MODELS = list(dict.fromkeys(m for m in (SUBJECT, REFERENCE, CONTROL) if m and m in seen)) or seen


def cname(c: int) -> str:
    return CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else str(c)


def role(m: str) -> str:
    roles = [w for w, name in (("under study", SUBJECT), ("reference", REFERENCE), ("control", CONTROL))
             if m == name]
    return f"{ui.inert(m)} ({', '.join(roles)})" if roles else ui.inert(m)


def link(model: str, cls: int, layer: str) -> str:
    """The influence chapter on ``model``, class ``cls`` and ``layer`` (the query parameters it reads)."""
    return f"{INFLUENCE}?" + urlencode({"case": CASE, "model": model, "cls": int(cls), "layer": layer})


def _mass(r: dict) -> float | None:
    v = r.get("region_mass")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


# One row per model × class × layer: n experts, how many carry the shortcut, their mean region mass.
cells = []
for m in MODELS:
    for c in CLASSES:
        for layer in LAYERS:
            rows = [r for r in top
                    if str(r["model"]) == m and int(r["class"]) == c and str(r["layer"]) == layer]
            if not rows:
                continue
            masses = [v for v in map(_mass, rows) if v is not None]
            n_short = sum(bool(r.get("shortcut")) for r in rows) if HAS_VERDICT else None
            cells.append({"model": m, "role": role(m), "class": c, "class name": cname(c), "layer": layer,
                          "k": len(rows), "n_shortcut": n_short,
                          "share": None if n_short is None else n_short / len(rows),
                          "mean_mass": float(np.mean(masses)) if masses else None,
                          "link": link(m, c, layer)})
df = pd.DataFrame(cells)
if df.empty:
    st.info("No expert rows match the case's models, classes and layers.")
    st.stop()


def _cell_text(row) -> str:
    if not HAS_VERDICT:
        return f"{row['k']} experts"
    mass = "" if row["mean_mass"] is None or pd.isna(row["mean_mass"]) else f" · {row['mean_mass']:.0%}"
    return f"{int(row['n_shortcut'])}/{row['k']}{mass}"


def link_table(m: str) -> str:
    """A Markdown table, classes × layers, each cell a link to the influence chapter."""
    sub = df[df["model"] == m]
    head = "| class | " + " | ".join(ui.plain(x) for x in LAYERS) + " |"
    lines = [head, "|---" * (len(LAYERS) + 1) + "|"]
    for c in CLASSES:
        out = []
        for layer in LAYERS:
            hit = sub[(sub["class"] == c) & (sub["layer"] == layer)]
            out.append("—" if hit.empty else f"[{_cell_text(hit.iloc[0])}]({hit.iloc[0]['link']})")
        if any(x != "—" for x in out):
            lines.append(f"| {ui.plain(cname(c))} | " + " | ".join(out) + " |")
    return "\n".join(lines)


# The page's main column at 1400 px (the sidebar open) and the gap between columns, in pixels; a
# Markdown table's column is about its longest text wide (bold headers ~7.6 px a character, cells
# ~5.9: mostly digits) plus 28 px of padding (measured in Chromium).
MAIN_WIDTH, GAP = 940, 16


def _table_width(m: str) -> float:
    """About how wide ``link_table(m)`` draws, in pixels."""
    sub = df[df["model"] == m]
    cells = [_cell_text(r) for _, r in sub.iterrows()] or [""]
    names = [ui.plain(cname(c)) for c in CLASSES] or [""]
    first = 28 + max(6.4 * len("class"), 5.9 * max(len(x) for x in names))
    per_cell = 5.9 * max(len(x) for x in cells)
    return first + sum(28 + max(7.6 * len(ui.plain(x)), per_cell) for x in LAYERS)


def _link_rows(models: list[str]) -> list[list[str]]:
    """The models' link tables in rows: all in one row when each fits its column, else one a row."""
    share = (MAIN_WIDTH - GAP * (len(models) - 1)) / max(1, len(models))
    if all(_table_width(m) <= 1.02 * share for m in models):
        return [list(models)]
    return [[m] for m in models]


def _layer_totals(m: str, layer: str) -> tuple[int, int]:
    sub = df[(df["model"] == m) & (df["layer"] == layer)]
    return int(sub["n_shortcut"].fillna(0).sum()), int(sub["k"].sum())


# ------------------------------------------------------------------------------------------ no region
if not HAS_VERDICT:
    st.info(ui.no_region_note() if not REGION else
            f"The report holds no shortcut verdicts for the {REGION} (no layer thresholds).")
    st.caption(f"This case {'names no region' if not REGION else 'has no verdicts'}, so there are no "
               "shortcut verdicts: below, only how many top experts the stage ranked per class and "
               "layer. Each cell opens them in the influence chapter.")
    cols = st.columns(len(MODELS))
    for col, m in zip(cols, MODELS, strict=True):
        with col:
            st.subheader(role(m))
            st.markdown(link_table(m))
    st.stop()

# ------------------------------------------------------------------------------------------ headline
lines = []
for layer in LAYERS:
    parts = []
    for m in MODELS:
        n, k = _layer_totals(m, layer)
        if k:
            parts.append(f"**{ui.plain(m)}** {n} of {k}")
    if parts:
        lines.append(f"- **{ui.plain(layer)}**: " + ", ".join(parts) + " top experts carry the shortcut.")
st.markdown("\n".join(lines))

# ------------------------------------------------------------------------------------------ matrix
chart_df = df.assign(
    cell=df.apply(lambda r: f"{int(r['n_shortcut'])}/{r['k']}", axis=1),
    mass_text=df["mean_mass"].map(lambda v: "—" if v is None or pd.isna(v) else f"{v:.0%}"),
    threshold=df["layer"].map(lambda x: THRESHOLDS.get(x)))
class_order = [cname(c) for c in CLASSES]
role_order = [role(m) for m in MODELS]
base = alt.Chart(chart_df).encode(
    x=alt.X("layer:N", sort=LAYERS, title="layer", axis=alt.Axis(labelAngle=0, orient="top")),
    y=alt.Y("class name:N", sort=class_order, title="class"))
rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
    color=alt.Color("share:Q", title="share carrying the shortcut",
                    scale=alt.Scale(domain=[0, 1], range=["#F4F1EA", "#B4412E"]),
                    legend=alt.Legend(format=".0%", orient="bottom")),
    tooltip=[alt.Tooltip("role:N", title="model"), alt.Tooltip("class name:N", title="class"),
             "layer:N", alt.Tooltip("cell:N", title="experts carrying the shortcut"),
             alt.Tooltip("share:Q", format=".0%", title="share"),
             alt.Tooltip("mean_mass:Q", format=".1%", title=f"mean {MASS}"),
             alt.Tooltip("threshold:Q", format=".1%", title="layer threshold")])
text = base.mark_text(fontSize=11).encode(
    text="cell:N",
    color=alt.condition("datum.share > 0.5", alt.value("white"), alt.value("#1F2328")))
chart = alt.layer(rect, text, data=chart_df).properties(
    width=alt.Step(56), height=alt.Step(24)).facet(
    column=alt.Column("role:N", sort=role_order, title=None, header=alt.Header(labelFontWeight="bold")))

ui.chart(chart, f"Experts that carry the shortcut, per class and layer ({MASS})", chart_df,
         width="content")
st.caption(f"Each cell: how many of the class's top experts at that layer carry the shortcut "
           f"(n/k); colour: that share; hover for the experts' mean {MASS} and the layer's threshold.")
# The thresholds table below the matrix, wide enough for every column at 1400 px (beside the
# matrix, in a quarter of the page, its last columns were cut off).
left, right = st.columns([2, 1])
with left:
    st.markdown("**Layer thresholds**")
    th = pd.DataFrame({"layer": LAYERS, "threshold": [THRESHOLDS.get(x) for x in LAYERS]})
    terms = [ui.threshold_term(E, x) for x in LAYERS]
    if any(terms):  # which term of the rule won, per layer
        th["set by"] = [("—" if t is None else "reference's quantile" if t["term"] == "quantile"
                         else "floor (factor × chance)") for t in terms]
    cfg = {"threshold": st.column_config.NumberColumn(
        f"{MASS} above", format="percent",
        help=f"An expert carries the shortcut when its {MASS} — the share of its interpretation's positive "
             f"attribution that falls inside the {REGION}, averaged over the class's test images — is "
             "above this layer's threshold.")}
    if CONTROL:
        th["false alarms"] = [(ALARMS.get(x) or {}).get("rate") for x in LAYERS]
        th["flagged"] = [f"{a.get('n_flagged', '—')}/{a.get('n', '—')}"
                         for a in (ALARMS.get(x) or {} for x in LAYERS)]
        cfg["false alarms"] = st.column_config.NumberColumn(
            f"{ui.inert(CONTROL)} flagged", format="percent",
            help=f"{ui.inert(CONTROL)}, a model that does not use the {REGION}: the share of its top "
                 f"experts the "
                 "rule flags anyway (how often the rule cries wolf).")
    cfg["layer"] = st.column_config.TextColumn("layer", pinned=True)
    st.dataframe(th, hide_index=True, column_config=cfg)
with right:
    if RULE:
        st.caption(f"The rule: {ui.plain(RULE, limit=800)}.")
        if any(terms):
            st.caption("Per layer (percent): " + "; ".join(ui.plain(t["text"]) for t in terms if t)
                       + ".")
        caveat = ui.rule_caveat(study)  # no reference: say that the false-alarm check is gone
        if caveat:
            st.warning(caveat, icon=":material/report:")
    if CHANCE is not None:
        st.caption(f"Chance: the {ui.plain(REGION)} covers {CHANCE:.1%} of the image.")
    if CONTROL:
        rates = [a.get("rate") for a in ALARMS.values() if isinstance(a, dict) and a.get("rate") is not None]
        if rates:
            st.caption(f"False alarms: the rule flags {min(rates):.0%}–{max(rates):.0%} of the control model "
                       f"{ui.plain(CONTROL)}'s top experts, depending on the layer; read the verdicts "
                       "against that rate.")

# ------------------------------------------------------------------------------------------ deep links
st.header("Open a cell")
st.caption(f"n/k experts carrying the shortcut · their mean {MASS}. Each cell opens the influence "
           "chapter on that model, class and layer.")
# Side by side when every model's table fits its share of a 1400 px page, else one under another
# (faces' five layers: side by side, each table ran under its neighbour and hid the last layer).
for row in _link_rows(MODELS):
    for col, m in zip(st.columns(len(row)), row, strict=True):
        with col:
            st.subheader(role(m))
            st.markdown(link_table(m))

export = df.drop(columns=["link"]).rename(columns={"mean_mass": f"mean {MASS}"})
ui.download_csv(export, f"overview_{CASE}.csv", "Download the matrix (CSV)", key="dl-overview")
ui.next_chapter("chapters/one_image.py", "One image, end to end",
                "Pick any cell above to see its experts in the influence chapter, or follow one test "
                "image through every layer.")

"""Chapter: essence and causal check — do the experts really carry the class?

Drawn only from the ``essence`` stage (``core.stages.essence.build``): for pairs of related classes,
the binary accuracy when a layer keeps only k units chosen by each rule (top experts, random units,
bottom units), the smallest k per rule, and the ablation of every class's experts against random
units and another class's experts; with a region, the ablation of the shortcut-carrying experts.
This page computes nothing; when the stage is missing it offers to build it.
"""

from __future__ import annotations

import math

import altair as alt
import pandas as pd
import streamlit as st

import ui

RULES = {"top": "top experts", "random": "random units (median)", "bottom": "bottom units"}
COLORS = {"top experts": "#B4412E", "random units (median)": "#6C8EAD", "bottom units": "#9C9C9C"}

study = ui.current_study()
facts = ui.facts(study)
ui.chapter(
    ["essence"], "Essence & causal check",
    "Two claims of the influence paper, measured. **Essence**: for two related classes, keep only "
    "the k units of a layer with the largest comparative influence (every other unit set to its mean "
    "activation, or to zero) — does the network still tell the two classes apart? Compared with k "
    "random units and with the k *least* influential ones. **Causality**: remove a class's top "
    "experts — does that class's accuracy fall more than when as many random units are removed?",
    study=study, what="This chapter", key="build-essence")
payload = ui.artifact("essence", study) or {}
rows = payload.get("rows") or []
curves = payload.get("curves") or []
ablation = payload.get("ablation") or []
regions = payload.get("region") or []
summary = payload.get("summary") or []
cfg = payload.get("config") or {}
missing = [k for k in ("rows", "curves", "ablation", "summary") if k not in payload]
if missing:
    st.caption(f"The essence payload has no {', '.join(missing)}: those parts are not drawn.")
if not rows and not curves and not ablation:
    st.warning("The essence stage is built but holds no results (no pair, layer or model configured?).")
    st.stop()


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _name(c) -> str:
    return ui.class_name(c, facts)


# ------------------------------------------------------------------------------------ choices
models = list(dict.fromkeys([r.get("model") for r in rows + curves + ablation if r.get("model")]))
layers = list(dict.fromkeys([r.get("layer") for r in rows + curves + ablation if r.get("layer")]))
fills = list(dict.fromkeys([r.get("fill") for r in rows + curves + ablation if r.get("fill") is not None]))
c1, c2, c3 = st.columns(3)
with c1:
    model = (ui.choice("Model tested", models, param="emodel", default=facts.get("subject"),
                       format_func=lambda m: ui.model_label(m, facts=facts)) if len(models) > 1
             else (models[0] if models else None))
    if len(models) == 1:
        st.caption(f"Model tested: **{ui.model_label(model, facts=facts)}**")
with c2:
    layer = ui.choice("Layer", layers, param="elayer",
                      help="The layer whose units are kept or removed.") if layers else None
with c3:
    fill = ui.choice("Removed units are set to", fills, param="efill", widget="radio", horizontal=True,
                     format_func=lambda f: {"mean": "their mean", "zero": "zero"}.get(str(f), str(f)),
                     help="What a removed unit outputs instead of its own activation: its mean activation "
                          "over the images (position by position for a channel), or zero.") \
        if fills else None


def _mine(items: list[dict]) -> list[dict]:
    return [r for r in items if (model is None or r.get("model") == model)
            and (layer is None or r.get("layer") == layer) and (fill is None or r.get("fill") == fill)]


# ------------------------------------------------------------------------------------ essence curves
st.header("Essence: how few units separate two classes?")
mine_curves = _mine(curves)
if not mine_curves:
    st.info("No essence curve for this model, layer and fill.")
else:
    def _pair(c: dict) -> str:
        return (f"{ui.inert(c.get('a_name', _name(c.get('a'))))} vs "
                f"{ui.inert(c.get('b_name', _name(c.get('b'))))}")

    pairs = list(dict.fromkeys(_pair(c) for c in mine_curves))
    pair = ui.choice("Pair of classes", pairs, param="epair",
                     help="Two related classes A and B. The layer's units are ranked by comparative "
                          "influence — on the difference of the two classes' scores, A's minus B's — and "
                          "only the top k are kept to tell A from B.")
    curve = next(c for c in mine_curves if _pair(c) == pair)
    ks = list(curve.get("ks") or [])
    recs = []
    for rule, label in RULES.items():
        values = curve.get(rule)
        if isinstance(values, dict):  # random: {"median", "low", "high", "mean"}
            low, high, values = values.get("low"), values.get("high"), values.get("median")
        else:
            low = high = None
        for i, k in enumerate(ks):
            if values is None or i >= len(values):
                continue
            recs.append({"k": int(k), "rule": label, "accuracy": _f(values[i]),
                         "low": _f(low[i]) if low else None, "high": _f(high[i]) if high else None})
    df = pd.DataFrame(recs)
    xscale = alt.Scale(type="log", base=2) if ks and min(ks) >= 1 else alt.Scale()
    base = alt.Chart(df).encode(x=alt.X("k:Q", scale=xscale, title="units kept (k, log scale)"))
    lines_ = base.mark_line(point=True).encode(
        y=alt.Y("accuracy:Q", title=f"binary accuracy ({pair})", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("rule:N", title="units kept", sort=list(COLORS),
                        scale=alt.Scale(domain=list(COLORS), range=list(COLORS.values()))),
        tooltip=["rule", "k", alt.Tooltip("accuracy:Q", format=".1%")])
    layers_ = [lines_]
    band = df.dropna(subset=["low", "high"]) if not df.empty else df
    if not band.empty:
        layers_.insert(0, alt.Chart(band).mark_area(opacity=0.2, color=COLORS["random units (median)"])
                       .encode(x=alt.X("k:Q", scale=xscale), y="low:Q", y2="high:Q"))
    if curve.get("full") is not None:
        layers_.append(alt.Chart(pd.DataFrame({"y": [_f(curve["full"])]})).mark_rule(
            strokeDash=[4, 4], color="#1F2328").encode(y="y:Q"))
    ui.chart(alt.layer(*layers_).properties(height=320),
             f"Binary accuracy ({pair}) against the number of units kept, per rule", df, width="stretch")
    st.caption(
        f"Binary accuracy of {pair} on {curve.get('n_eval', '?')} held-out images of the two classes "
        f"({ui.set_label(curve.get('eval_set') or cfg.get('eval_set') or 'evaluation set')}) when "
        f"{ui.inert(layer)} keeps only k of its {curve.get('width', '?')} units. Band: the "
        f"{_f(curve.get('confidence', cfg.get('confidence', 0.9))):.0%} interval of "
        f"{curve.get('random_draws', cfg.get('random_draws', '?'))} random draws; dashed: the whole layer.")

    st.subheader("Smallest k per rule")
    share = _f(cfg.get("share", 0.95))
    table = pd.DataFrame([{
        "pair": f"{r.get('a_name', _name(r.get('a')))} vs {r.get('b_name', _name(r.get('b')))}",
        "source": r.get("pair_source"), "layer width": r.get("width"),
        "whole layer": _f(r.get("full_acc")), "top experts": r.get("k_top"),
        "random (median)": r.get("k_random"), "random (lucky draw)": r.get("k_random_high"),
        "bottom units": r.get("k_bottom"), "top-1 accuracy": _f(r.get("top1_acc")),
        "random-1 accuracy": _f(r.get("random1_acc")),
        "reading": ui.cannot_tell("degenerate: " + r["degenerate"]) if r.get("degenerate")
        else ("top < random" if r.get("k_top") is not None
              and (r.get("k_random") is None or r["k_top"] < r["k_random"]) else "top ≥ random"),
    } for r in _mine(rows)])
    if not table.empty:
        st.dataframe(table, hide_index=True, column_config={
            **{c: st.column_config.NumberColumn(c, format="percent")
               for c in ("whole layer", "top-1 accuracy", "random-1 accuracy")},
            "whole layer": st.column_config.NumberColumn(
                "whole layer", format="percent",
                help="Binary accuracy (A vs B on held-out images) with every unit of the layer kept."),
            "top experts": st.column_config.NumberColumn(
                "top experts", help="The smallest k of top-ranked units (by comparative influence) whose "
                                    "binary accuracy reaches the target share of the whole layer's."),
            "random (median)": st.column_config.NumberColumn(
                "random (median)", help="The same smallest k for randomly drawn units: the median over the "
                                        "seeded draws."),
            "bottom units": st.column_config.NumberColumn(
                "bottom units", help="The same smallest k for the lowest-ranked units."),
            "reading": st.column_config.TextColumn(
                "reading", width="large",
                help="Cannot tell where the test is degenerate (the stage's own check: every rule "
                     "reaches the target at k = 1, or the whole layer is near chance on these "
                     "images); else whether fewer top experts than random units reach the target.")})
        st.caption(f"The smallest k whose binary accuracy reaches {share:.0%} of the whole layer's, for "
                   "each way of choosing the units (the lucky draw: the upper end of the random "
                   "interval). Empty: never reached before the whole layer.")
        ui.download_csv(table, f"essence_{model}_{layer}_{fill}.csv", "Download the "
                                                                                          "table (CSV)",
                        key="dl-essence")
        flat = [r for r in _mine(rows) if r.get("degenerate")]
        wins = [(r.get("k_top"), r.get("k_random")) for r in _mine(rows) if not r.get("degenerate")]
        beat = sum(1 for t, rnd in wins if t is not None and rnd is not None and t < rnd)
        if flat:
            why = "; ".join(dict.fromkeys(ui.plain(r["degenerate"]) for r in flat))
            st.info(f"**{ui.cannot_tell('degenerate: ' + why)}** for "
                    + ("every pair" if not wins else f"{len(flat)} of {len(flat) + len(wins)} pairs")
                    + f" on {ui.inert(layer)}: one unit of any kind reaches the target, or the whole "
                    "layer barely tells the two classes apart on these images, so this test cannot "
                    "say whether the layer's essence is concentrated in its top experts.",
                    icon=":material/help:")
        if wins and beat == 0:
            st.warning(f"On {ui.inert(layer)}, the top experts do **not** beat random units: for no "
                       f"pair do fewer "
                       "top experts than random units reach the target accuracy. Here the layer's "
                       "essence is not concentrated in its most influential units.")
        elif wins:
            st.markdown(f"For **{beat} of {len(wins)}** pairs"
                        + (" that the test can tell" if flat else "")
                        + f", fewer top experts than random units reach "
                        f"{share:.0%} of the whole layer's accuracy.")

# ------------------------------------------------------------------------------------ ablation
st.header("Causal check: remove a class's experts")
mine_abl = _mine(ablation)
if not mine_abl:
    st.info("No ablation for this model, layer and fill.")
else:
    def _rng(d: dict | None) -> str:
        if not d:
            return "—"
        return f"{ui.pp(d.get('median'))} [{ui.pp(d.get('low'))}, {ui.pp(d.get('high'))}]"

    atable = pd.DataFrame([{
        "class": r.get("class_name") or _name(r.get("class")), "k": r.get("k"),
        "experts": ", ".join(str(u) for u in r.get("units") or []),
        "accuracy drop (experts)": 100 * _f((r.get("experts") or {}).get("acc_drop")),
        "accuracy drop (random k)": _rng((r.get("random") or {}).get("acc_drop")),
        "logit drop (experts)": _f((r.get("experts") or {}).get("logit_drop")),
        "logit drop (random k)": (lambda d: "—" if not d else
                                  f"{_f(d.get('median')):.3g} [{_f(d.get('low')):.3g}, "
                                  f"{_f(d.get('high')):.3g}]")((r.get("random") or {}).get("logit_drop")),
        "other class": "—" if r.get("other_class") is None else _name(r.get("other_class")),
        "accuracy drop (other's experts)": 100 * _f((r.get("other") or {}).get("acc_drop")),
        "beats random": {True: "yes", False: "no", None: "—"}[r.get("beats_random")],
    } for r in mine_abl])
    st.dataframe(atable, hide_index=True, column_config={
        "accuracy drop (experts)": st.column_config.NumberColumn(
            format="%+.1f pp", help="The class's accuracy on its own images before minus after its top "
                                   "experts are removed (set to the fill)."),
        "accuracy drop (other's experts)": st.column_config.NumberColumn(
            format="%+.1f pp", help="The same drop when another class's top experts are removed instead."),
        "logit drop (experts)": st.column_config.NumberColumn(
            format="%.3g", help="The class's mean score (logit) on its own images before minus after its "
                                "top experts are removed."),
        "beats random": st.column_config.TextColumn(
            help="Yes when the experts' logit drop is above the random units' interval and their accuracy "
                 "drop is at least the random median.")})
    st.caption("Each class's top experts of the layer are removed (set to the fill) and the class's "
               "accuracy (drops in percentage points, pp) and mean logit on its own images are "
               "measured before and after; the same for "
               "as many random units (median [interval] over the draws) and for another class's "
               "experts. *Beats random*: the experts' logit drop is above the random interval and "
               "their accuracy drop at least the random median.")
    ui.download_csv(atable, f"ablation_{model}_{layer}_{fill}.csv", "Download the "
                                                                                        "ablation (CSV)",
                    key="dl-ablation")
    beats = [r.get("beats_random") for r in mine_abl if r.get("beats_random") is not None]
    n_beat = sum(bool(b) for b in beats)
    if beats and n_beat <= len(beats) / 2:
        st.warning(f"The experts do **not** beat random units here: removing them hurts their class more "
                   f"than removing as many random units for only {n_beat} of {len(beats)} classes. "
                   "On this layer, influence does not single out the units the class depends on.")
    elif beats:
        st.markdown(f"Removing a class's experts hurts it more than removing as many random units for "
                    f"**{n_beat} of {len(beats)}** classes: the experts are causal for their class.")

# ------------------------------------------------------------------------------------ region check
mine_reg = _mine(regions)
if facts.get("region") and mine_reg:
    st.header(f"Removing the experts that carry the {ui.region_name(facts)}")
    for rc in mine_reg:
        if not rc.get("units"):
            st.caption(ui.plain(rc.get("note") or "No expert of this layer carries the shortcut."))
            continue
        st.markdown(f"Units removed on **{ui.inert(layer)}**: {', '.join(str(u) for u in rc['units'])}.")
        rtable = pd.DataFrame([{
            "evaluation set": ui.set_label(s.get("name")),
            f"has the {ui.region_name(facts)}": s.get("region"),
            "images": s.get("n"), "accuracy before": _f(s.get("acc_before")),
            "accuracy after": _f(s.get("acc_after")), "drop": 100 * _f(s.get("acc_drop")),
            "random drop (median)": 100 * _f((s.get("random_acc_drop") or {}).get("median")),
        } for s in rc.get("sets") or []])
        st.dataframe(rtable, hide_index=True, column_config={  # accuracies in %, drops in pp
            **{c: st.column_config.NumberColumn(c, format="percent")
               for c in ("accuracy before", "accuracy after")},
            **{c: st.column_config.NumberColumn(c, format="%+.1f pp")
               for c in ("drop", "random drop (median)")}})
        diff = rc.get("region_minus_clean")
        if diff is not None and math.isfinite(_f(diff)):
            st.markdown(f"The drop is **{ui.pp(diff)}** larger on the sets with the "
                        f"{ui.region_name(facts)} than "
                        "on those without it: "
                        + ("those experts carry the shortcut." if _f(diff) > 0.02 else
                           "removing them does not specifically hurt the shortcut."))
elif not facts.get("region"):
    st.caption(ui.no_region_note(facts))

ui.next_chapter("chapters/detection.py" if ui.stage_exists("detection") else "chapters/method.py",
                "Attacks & detection" if ui.stage_exists("detection") else "Method",
                "Next: can influence tell an attacked image from a clean one?"
                if ui.stage_exists("detection") else "")

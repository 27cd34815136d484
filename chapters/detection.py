"""Chapter: attacks and their detection from influence alone.

Drawn only from the ``detection`` stage (``core.stages.detection.build``): what the attacker knows,
how often the attack succeeds, and for every detector its ROC curve, its true-positive rate at 1%,
5% and 25% false positives and its AUC. This page computes nothing; when the stage is missing it
offers to build it. A payload that lacks a part is drawn as far as it goes, and the page says what
is missing.
"""

from __future__ import annotations

import math

import altair as alt
import pandas as pd
import streamlit as st

import ui

FPR_POINTS = (0.01, 0.05, 0.25)
INFLUENCE = ("influence_naive", "influence_path", "expert_concentration", "influence_combined")
KNOWS = ("The attacker works in the white box: it knows the classifier's weights and gradients, places "
         "a small square patch in each image and optimises its pixels (projected sign-gradient steps) "
         "towards a target class. It does not know the detector, except in the adaptive attack, which "
         "also pushes the influence profile toward the target class's own.")

study = ui.current_study()
facts = ui.facts(study)
ui.chapter(
    ["detection"], "Attacks & detection",
    "An adversarial patch makes the model answer what the attacker wants. Can the model's own "
    "**influence** — which units and pixels drive the answer — tell an attacked image from a clean "
    "one? Each detector gives every image a score (higher: more likely attacked), fit on clean "
    "training images only, and is judged on held-out images by its ROC curve.",
    study=study, what="This chapter", key="build-detection")
payload = ui.artifact("detection", study) or {}
rows = payload.get("rows") or []
said_missing: list[str] = []


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _detector(r: dict) -> str:
    return str(r.get("detector") or r.get("name") or r.get("method") or "?")


def _label(r: dict) -> str:
    return str(r.get("label") or _detector(r).replace("_", " "))


def _tpr_at(r: dict, budget: float) -> float:
    """TPR at an FPR budget from ``tpr_at`` {0.01: t} / {"0.01": t} / {"1%": t} or a flat key."""
    d = r.get("tpr_at") or {}
    if isinstance(d, dict):
        for k in (budget, str(budget), f"{budget:g}", f"{round(100 * budget)}%", round(100 * budget),
                  str(round(100 * budget))):
            if k in d:
                return _f(d[k])
    pcent = round(100 * budget)
    for k in (f"tpr_at_{pcent}", f"tpr@{pcent}%", f"tpr_at_{budget:g}", f"tpr_{pcent}"):
        if k in r:
            return _f(r[k])
    return float("nan")


def _roc(r: dict) -> dict | None:
    if isinstance(r.get("roc"), dict):
        return r["roc"]
    if r.get("fpr") is not None and r.get("tpr") is not None:
        return {"fpr": r["fpr"], "tpr": r["tpr"]}
    curves = payload.get("roc") or payload.get("curves") or {}
    key = _detector(r)
    attack = r.get("attack")
    if isinstance(curves, dict):
        c = curves.get(key)
        if isinstance(c, dict) and attack is not None and attack in c:
            c = c[attack]
        if isinstance(c, dict) and "fpr" not in c and attack is not None:
            c = c.get(str(attack))
        if isinstance(c, dict) and "fpr" in c:
            return c
    return None


# ------------------------------------------------------------------------------------ the attacker
st.header("What the attacker knows")
attack = payload.get("attack") or payload.get("attacker") or payload.get("threat_model")
if isinstance(attack, dict) and attack:
    knows = attack.get("knows") or attack.get("description")
    st.markdown(ui.plain(knows) if knows else KNOWS)
    shown = {k: v for k, v in attack.items() if k not in ("knows", "description", "success")}
    if shown:
        st.dataframe(pd.DataFrame([{"setting": k, "value": str(v)} for k, v in shown.items()]),
                     hide_index=True)
elif isinstance(attack, str):
    st.markdown(ui.plain(attack))
else:
    st.markdown(KNOWS)
    said_missing.append("the attack's settings (payload['attack'])")
success = payload.get("attack_success")
if success is None and isinstance(attack, dict):
    success = attack.get("success")
if success is not None:
    if isinstance(success, dict):
        st.markdown("Attack success (the model answers the target class): " + ", ".join(
            f"{ui.plain(k)} **{ui.pct(v)}**" for k, v in success.items()))
    else:
        st.markdown(f"Attack success (the model answers the target class): **{ui.pct(success)}**.")

# ------------------------------------------------------------------------------------ the table
st.header("Detectors compared")
if not rows:
    st.warning("The detection stage is built but holds no detector rows.")
    st.stop()
adaptive = payload.get("adaptive") or {}
adaptive_attacks = [a for a in payload.get("adaptive_attacks") or [] if isinstance(a, dict)]
if any(r.get("attack") is not None for r in rows):  # rows that name their attack: one choice each
    sets = {k: [r for r in rows if str(r.get("attack")) == k]
            for k in dict.fromkeys(str(r["attack"]) for r in rows if r.get("attack") is not None)}
else:
    sets = {"patch attack": rows}
attacks_by_label: dict[str, dict] = {}
if adaptive_attacks:  # one choice per adaptive attack: whom it knows
    for a in adaptive_attacks:
        label = str(a.get("name") or f"adaptive: {a.get('against', '?')}")
        sets[label] = list(a.get("rows") or [])
        attacks_by_label[label] = a
elif adaptive.get("rows"):
    sets["adaptive attack"] = list(adaptive["rows"])
    attacks_by_label["adaptive attack"] = adaptive
chosen_attack = ui.choice("Attack", list(sets), param="attack", widget="radio", horizontal=True,
                          help="The patch attack optimises a small square patch to push the prediction to "
                               "a target class; an adaptive attack also knows a detector and pushes its "
                               "score toward the target class's clean images (the influence profile, the "
                               "Mahalanobis baseline, or both), to fool it.") \
    if len(sets) > 1 else next(iter(sets))
mine = sets[chosen_attack]
ADAPTIVE = chosen_attack in attacks_by_label
chosen = attacks_by_label.get(chosen_attack) or {}
if ADAPTIVE:
    knows_what = chosen.get("penalises") or (f"the influence profile at {chosen.get('layer', '?')} "
                                              "far from the target class's own")
    weight = chosen.get("weight")
    if weight is None:
        weight = ", ".join(f"{k} {v}" for k, v in (chosen.get("weights") or {}).items()) or "?"
    st.caption(f"This adaptive attack also penalises {ui.plain(str(knows_what))} (layer "
               f"{chosen.get('layer', '?')}, weight {weight}); it succeeds on "
               f"{ui.pct(chosen.get('success'))} of the attacks. The detectors are the same, fit before "
               "the attack.")


def _interval(r: dict, key: str, fmt: str) -> str:
    lo, hi = _f(r.get(f"{key}_low")), _f(r.get(f"{key}_high"))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f"{fmt.format(lo)}–{fmt.format(hi)}"


table = pd.DataFrame([{
    "detector": _label(r),
    "AUC": _f(r.get("auc")),
    "AUC 95% interval": _interval(r, "auc", "{:.3f}"),
    **{f"TPR at {round(100 * b)}% FPR": _tpr_at(r, b) for b in FPR_POINTS},
    "TPR at 25% FPR, 95% interval": _interval(r, "tpr_at_25", "{:.0%}"),
    "rank": (int(r["rank"]) if isinstance(r.get("rank"), int | float) else None),
    "uses influence": "yes" if (r.get("uses_influence") if r.get("uses_influence") is not None
                                else _detector(r) in INFLUENCE) else "no",
    "what it measures": str(r.get("what") or ""),
} for r in mine])
if table["rank"].isna().all():
    table = table.drop(columns=["rank"])
for col in ("AUC 95% interval", "TPR at 25% FPR, 95% interval"):
    if not table[col].astype(bool).any():
        table = table.drop(columns=[col])
# The columns the text quotes (AUC, TPR at 25% FPR) sit next to the detector, under short headers
# (the full name is each column's help), so that the table fits a 1400 px wide page unscrolled.
FIRST = ["detector", "AUC", "TPR at 25% FPR", "AUC 95% interval", "TPR at 25% FPR, 95% interval"]
st.dataframe(table, hide_index=True, column_order=ui.drawing.quoted_first(table, FIRST), column_config={
    "detector": st.column_config.TextColumn(width=150, pinned=True),
    **{f"TPR at {round(100 * b)}% FPR": st.column_config.NumberColumn(
        f"TPR @{round(100 * b)}%", format="percent", width=76,
        help=f"TPR at {round(100 * b)}% FPR — true-positive rate at {round(100 * b)}% false-positive rate: "
             f"the share of attacked images flagged when the threshold flags {round(100 * b)}% of "
             "clean images.") for b in FPR_POINTS},
    "AUC": st.column_config.NumberColumn(
        format="%.3f", width=60,
        help="Area under the ROC curve: the chance that a random attacked image scores higher "
             "than a random clean one (0.5: no better than a coin, 1: perfect)."),
    "AUC 95% interval": st.column_config.TextColumn(
        "AUC 95% CI", width=104,
        help="AUC 95% interval — 95% image-level bootstrap interval: held-out images are resampled with "
             "all their clean views and attacks, because those are correlated."),
    "TPR at 25% FPR, 95% interval": st.column_config.TextColumn(
        "TPR @25% CI", width=92, help="TPR at 25% FPR, 95% interval (the same bootstrap)."),
    "rank": st.column_config.NumberColumn(
        width=48,
        help="1 + the number of detectors whose AUC is above this one's beyond the bootstrap's 95% "
             "interval of the paired difference; equal ranks cannot be told apart."),
    "uses influence": st.column_config.TextColumn(
        "influence?", width=72,
        help="uses influence — whether the detector reads the model's influence (gradients) or only its "
             "outputs and activations."),
    "what it measures": st.column_config.TextColumn(
        width=120, help="What the detector's score measures (the whole text: hover or widen the cell)."),
})
n_clean = next((r.get("n_clean") for r in mine if r.get("n_clean")), None)
n_att = next((r.get("n_attacked") for r in mine if r.get("n_attacked")), None)
design = payload.get("evaluation") or {}
n_images = next((r.get("n_images") for r in mine if r.get("n_images")), None)
st.caption("True-positive rate (share of attacked images flagged) at the threshold where 1%, 5% and 25% "
           "of clean images are flagged, and the area under the ROC curve (0.5: chance)"
           + (f"; {n_clean} clean and {n_att} attacked held-out images" if n_clean and n_att else "")
           + (f", from {n_images} held-out images ({design.get('views', 1)} clean views each; patch sides "
              f"{', '.join(str(v) for v in design.get('patch_sizes') or [])} px × "
              f"{design.get('positions', 1)} place(s) per view). The intervals resample the held-out images "
              "with all their views and attacks (they are correlated)."
              if n_images and design else "."))
if table["TPR at 1% FPR"].isna().all():
    said_missing.append("TPR at fixed false-positive rates (rows' tpr_at)")
ui.download_csv(table, "detection.csv", "Download the table (CSV)", key="dl-detection")
ranking = chosen.get("ranking") if ADAPTIVE else payload.get("ranking")
ok = table.dropna(subset=["AUC"])
if isinstance(ranking, dict) and ranking.get("verdict"):
    verdict = str(ranking["verdict"])
    line = (f"**Ranking** ({ui.plain(str(ranking.get('method') or 'bootstrap'))}): "
            f"{ui.plain(verdict, limit=800)}.")
    versus = ranking.get("influence_vs_baselines") or {}
    if versus.get("verdict"):
        line += (f" Best influence detector ({ui.plain(str(versus.get('influence')))}) against the best "
                 f"baseline ({ui.plain(str(versus.get('baseline')))}): "
                 f"**{ui.plain(str(versus['verdict']))}** "
                 f"(AUC difference {_f(versus.get('difference')):+.3f}, 95% interval "
                 f"{_f(versus.get('low')):+.3f} to {_f(versus.get('high')):+.3f}).")
    if verdict.startswith("saturated"):
        st.warning(line)
    else:
        st.markdown(line)
elif not ok.empty:
    best = ok.sort_values("AUC", ascending=False).iloc[0]
    infl = ok[ok["uses influence"] == "yes"]
    base = ok[ok["uses influence"] == "no"]
    line = f"The best detector is **{best['detector']}** (AUC **{best['AUC']:.3f}**)."
    if not infl.empty and not base.empty:
        bi, bb = infl["AUC"].max(), base["AUC"].max()
        line += (" Influence-based detectors beat the baselines that use no influence"
                 if bi > bb + 0.01 else " Influence-based detectors do **not** beat the baselines"
                 if bi < bb - 0.01 else " Influence-based detectors and the baselines are level")
        line += f" (best AUC {bi:.3f} against {bb:.3f})."
    st.markdown(line)

# ------------------------------------------------------------------------------------ ROC curves


def _own_roc(r: dict) -> dict | None:
    """An adaptive row's own curve (its ``roc`` or ``fpr``/``tpr``), never the patch attack's."""
    if isinstance(r.get("roc"), dict):
        return r["roc"]
    if r.get("fpr") is not None and r.get("tpr") is not None:
        return {"fpr": r["fpr"], "tpr": r["tpr"]}
    return None


recs = []
for r in mine:
    roc = _own_roc(r) if ADAPTIVE else _roc(r)
    if not roc:
        continue
    for x, y in zip(roc.get("fpr") or [], roc.get("tpr") or [], strict=False):
        if math.isfinite(_f(x)) and math.isfinite(_f(y)):
            recs.append({"detector": _label(r), "false-positive rate": _f(x), "true-positive rate": _f(y)})
if recs:
    st.header("ROC curves")
    df = pd.DataFrame(recs)
    diag = alt.Chart(pd.DataFrame({"x": [0, 1], "y": [0, 1]})).mark_line(
        strokeDash=[4, 4], color="#9C9C9C").encode(x="x:Q", y="y:Q")
    curves = alt.Chart(df).mark_line(interpolate="step-after").encode(
        x=alt.X("false-positive rate:Q", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("true-positive rate:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("detector:N", sort=list(table["detector"])),
        tooltip=["detector", alt.Tooltip("false-positive rate:Q", format=".3f"),
                 alt.Tooltip("true-positive rate:Q", format=".3f")])
    rules = alt.Chart(pd.DataFrame({"x": list(FPR_POINTS)})).mark_rule(
        color="#C9C3B8", strokeDash=[2, 2]).encode(x="x:Q")
    ui.chart(alt.layer(diag, rules, curves).properties(height=380),
             "ROC curve of every detector: true-positive against false-positive rate", df, width="stretch")
    st.caption("One curve per detector over every threshold; dotted verticals at 1%, 5% and 25% false "
               "positives; dashed diagonal: a detector that guesses.")
elif ADAPTIVE:  # nothing of the patch attack stands in for the adaptive one's curves
    said_missing.append("this adaptive attack's ROC curves (its rows carry the summary above only)")
else:
    st.header("ROC curves")
    said_missing.append("the ROC curves (fpr/tpr per detector)")
    st.info("The payload carries no ROC curves to draw.")
if ADAPTIVE:
    # masking, the features and the attacked images below all come from the patch attack
    st.caption("The masking test, the influence features and the attacked images are the patch "
               f"attack's: choose {next(iter(sets))!r} above to see them.")

# ------------------------------------------------------------------------------------ masking
masking = None if ADAPTIVE else (payload.get("masking") or payload.get("mask_experts_region"))
if isinstance(masking, dict) and masking:
    st.header("Masking where the experts point")
    parts = [f"The {masking.get('window', '')}×{masking.get('window', '')} square the predicted class's "
             "experts point at most is masked, and the model asked again."]
    if masking.get("recovered") is not None:
        parts.append(f"On the {masking.get('n_attacked', '')} successfully attacked images the true class "
                     f"comes back for **{ui.pct(masking['recovered'])}**"
                     + (f"; the masked square covers the patch in **{ui.pct(masking['hits_patch'])}** of "
                        "them" if masking.get("hits_patch") is not None else "") + ".")
    if masking.get("clean_still_correct") is not None:
        parts.append(f"On clean images the same masking keeps **{ui.pct(masking['clean_still_correct'])}** "
                     f"correct (from {ui.pct(masking.get('clean_correct_before'))} unmasked).")
    st.markdown(" ".join(parts))

features = [] if ADAPTIVE else (payload.get("features") or [])
if features:
    with st.expander("Each influence feature alone (AUC) and its weight in the combined detector"):
        st.dataframe(pd.DataFrame(features), hide_index=True,
                     column_config={"auc": st.column_config.NumberColumn(
                                        "AUC", format="%.3f",
                                        help="The feature alone as a detector: the chance that a random "
                                             "attacked image scores higher than a random clean one."),
                                    "weight": st.column_config.NumberColumn(
                                        format="%.3g", help="Its coefficient in the combined detector's "
                                                            "logistic regression.")})

examples = {} if ADAPTIVE else (payload.get("examples") or {})
ex_x = examples.get("x")
if ex_x is not None and len(ex_x):
    import numpy as np

    xs = np.asarray(ex_x, dtype=float)
    if xs.min() >= -1e-6 and xs.max() <= 1 + 1e-6:  # [0, 1] pictures: drawable as they are
        SCALE = ui.scale_for(facts.get("size"))
        st.header("Attacked images")
        clean = examples.get("x_clean")
        patch = examples.get("patch")
        emap = examples.get("expert_map")
        pics, caps = [], []
        for i in range(len(xs)):
            y, pred = examples.get("y"), examples.get("pred")
            tag = (f"{ui.class_name(int(np.asarray(y)[i]), facts)} → "
                   f"{ui.class_name(int(np.asarray(pred)[i]), facts)}"
                   if y is not None and pred is not None else f"image {i + 1}")
            if clean is not None:
                pics.append(ui.picture(np.asarray(clean, dtype=float)[i], SCALE))
                caps.append(f"clean ({tag.split(' → ')[0]})")
            hw = tuple(facts.get("size") or xs.shape[-2:])
            pics.append(ui.tinted(xs[i], None if patch is None else np.asarray(patch)[i].reshape(
                hw).astype(bool), SCALE))
            caps.append(f"attacked, patch in red ({tag})")
            if emap is not None:
                pics.append(ui.overlay(xs[i], np.asarray(emap, dtype=float)[i], SCALE))
                caps.append("where the experts of the predicted class look")
        ui.image(pics, caption=caps, about="attacked examples")
    else:
        said_missing.append("display-ready attacked examples (examples are in the model's input scale)")

if said_missing:
    st.caption("Not in this build's detection payload (nothing drawn for it): "
               + "; ".join(said_missing) + ".")
ui.next_chapter("chapters/method.py", "Method", "The theory behind every measurement in this report.")

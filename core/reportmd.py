"""The report as Markdown, and the README's generated blocks (no number typed by hand).

    python -m core report decoy-mnist --markdown     # the block for one case, on stdout
    python -m core readme                            # rewrite every generated block of README.md
    python -m core readme --check                    # exit 1 when a block differs from the build

A generated block sits between ``<!-- report:CASE -->`` and ``<!-- /report:CASE -->``; everything
in it comes from :meth:`core.casestudy.CaseStudy.report` (which reads the cache, never computes).
Imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["BLOCK", "drift", "markdown", "readme_blocks", "stamped", "update_readme"]

BLOCK = re.compile(r"(<!-- report:(?P<case>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=case) -->)",
                   re.S)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(row: dict, key: str, digits: int = 3) -> str:
    v, sd = row.get(key), row.get(f"{key}_sd")
    if v is None:
        return "–"
    return f"{v:.{digits}f} ± {sd:.{digits}f}" if isinstance(sd, float) and row.get(
        "n_seeds", 1) > 1 else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _label(key: str) -> str:
    return key[:-4].replace("_", " ") if key.endswith("_acc") else key.replace("_", " ")


def _data(rep: dict) -> list[str]:
    d, facts = rep.get("data") or {}, rep.get("case_facts") or {}
    if not d:
        return []
    classes = facts.get("classes") or []
    shown = ", ".join(classes[:10]) + (", …" if len(classes) > 10 else "")
    line = (f"**Data** ({d.get('source')}): {d.get('n_train')} training, {d.get('n_val')} "
            f"validation and {d.get('n_test')} test images")
    if facts:
        line += (f" of {facts.get('channels')}×{facts['size'][0]}×{facts['size'][1]}, "
                 f"{len(classes)} classes ({shown})")
    if facts.get("region"):
        line += (f"; region: the {facts['region']} (chance share of the image "
                 f"{_f(facts.get('chance'), 4)})")
    elif facts:
        line += "; no region (no localisation metrics or shortcut verdicts)"
    return [line + "."]


def _models(rep: dict) -> list[str]:
    models = rep.get("models") or {}
    if not models:
        return []
    first = next(iter(models.values()))
    facts = rep.get("case_facts") or {}
    head = facts.get("headline")
    order = ["train", *([head] if head else []), *(facts.get("evaluation_sets") or [])]
    rank = {f"{name}_acc": i for i, name in reversed(list(enumerate(order)))}
    keys = sorted((k for k in first if k.endswith("_acc")), key=lambda k: (rank.get(k, 99), k))
    n = len(rep.get("seeds") or [0])
    roles = {rep.get("subject"): "under study", rep.get("reference"): "reference"}
    rows = [[f"{name}" + (f" ({roles[name]})" if name in roles and name else "")]
            + [_pm({**m, "n_seeds": n}, k) for k in keys] for name, m in models.items()]
    note = f" (mean ± sd over {n} seeds)" if n > 1 else " (one seed)"
    return [f"**Models**{note}, accuracy:", ""] + _table(["model", *map(_label, keys)], rows)


def _experts(rep: dict) -> list[str]:
    e = rep.get("experts")
    if not e:
        return []
    out = [f"**Experts**: top {e['k']} units per class by distributional influence (class logit, "
           f"DoI = the class's training images), {e['bootstrap']} bootstrap resamples, at "
           f"{', '.join(e['layers'])}."]
    top = e.get("top") or []
    rows = []
    for layer in e["layers"]:
        for model, layers in (e.get("summary") or {}).items():
            s = layers.get(layer)
            if s is None:
                continue
            cells = [r for r in top if r["model"] == model and r["layer"] == layer]
            flat = sum(1 for r in cells if r.get("ci_low") is not None and r["ci_low"] == r["ci_high"])
            th = (e.get("shortcut_thresholds") or {}).get(layer)
            rows.append([layer, model,
                         "–" if s.get("n_shortcut") is None else f"{s['n_shortcut']}/{s['n']}",
                         _f(th), _f(s.get("mean_region_mass")), f"{flat}/{s['n']}"])
    if e.get("shortcut_rule"):
        out.append("")
        out.append(f"Rule: {e['shortcut_rule']}.")
    out.append("")
    out += _table(["layer", "model", "experts carrying the shortcut", "threshold",
                   "mean region mass", "zero-width intervals"], rows)
    fa = e.get("false_alarms")
    if fa:
        model = next(iter(fa.values()))["model"]
        out.append("")
        out.append(f"False alarms of the rule: `{model}` is a model that does not use the region "
                   "(see its accuracies above); the share of its experts the rule flags, per "
                   "layer: " + ", ".join(f"{layer} {v['n_flagged']}/{v['n']}"
                                         for layer, v in fa.items()) + ".")
    out.append("")
    out.append("A zero-width bootstrap interval is degenerate evidence, not stability: at a layer "
               "whose influence is a fixed weight row times a gate, resampling the images cannot "
               "move the score.")
    return out


_DIRECTION = {
    "region_mass": "high on a model that uses the region (faithful), low on one that does not",
    "wrong_reason": "as region mass", "rank_accuracy": "as region mass",
    "deletion_auc": "↓ (faithful: deleting the top pixels drops the score fast)",
    "insertion_auc": "↑ (faithful)", "mprt_spearman": "↓ (the map depends on the weights)",
    "sparseness": "↑ (concentrated)",
}


def _representations(rep: dict) -> list[str]:
    rows = rep.get("representations") or []
    if not rows:
        return []
    metrics = [k for k in ("region_mass", "wrong_reason", "rank_accuracy", "deletion_auc",
                           "insertion_auc", "mprt_spearman", "sparseness") if k in rows[0]]
    out = ["**Representations compared** (what each column asks: " + "; ".join(
        f"{k.replace('_', ' ')} {_DIRECTION[k]}" for k in metrics) + "):", ""]
    out += _table(["model", "method", *[k.replace("_", " ") for k in metrics]],
                  [[r["model"], r.get("label", r["method"]), *[_f(r.get(k)) for k in metrics]]
                   for r in rows])
    return out


def _corrections(rep: dict) -> list[str]:
    rows = rep.get("corrections") or []
    if not rows:
        return []
    head = rows[0].get("headline", "decoy_test")
    hkey = f"{head}_acc"
    others = [k for k in rows[0] if k.endswith("_acc") and k != hkey and "val" not in k
              and k not in ("subject_acc", "reference_acc") and not k.startswith(
                  (f"{rep.get('subject')}_", f"{rep.get('reference')}_"))]
    n = rows[0].get("n_seeds", 1)
    out = [f"**Corrections** of the model under study ({'one seed' if n == 1 else f'{n} seeds'}; "
           "strengths chosen on the validation split, never the test set; Δ = paired "
           f"difference from the model under study on the {_label(hkey)} images ± its standard "
           "error" + (" (seed 0; every seed's verdict beside it)" if n > 1 else "")
           + "; a verdict is \"tie\" unless the exact McNemar p-value is below α):", ""]
    table = []
    for r in rows:
        alpha = r.get("paired_alpha")
        verdict = r.get("paired_verdict") or "–"
        if r.get("paired_p_value") is not None:
            verdict += f" (p {r['paired_p_value']:.2g}, α {alpha:g})"
        delta = "–" if r.get("paired_delta") is None else \
            f"{r['paired_delta']:+.3f} ± {r['paired_delta_se']:.3f}"
        if n > 1 and r.get("paired_delta_per_seed"):
            verdict += " · per seed: " + ", ".join(r.get("paired_verdict_per_seed") or [])
        ref = "–" if r.get("paired_reference_delta") is None else \
            f"{r['paired_reference_delta']:+.3f} ± {r['paired_reference_delta_se']:.3f} " \
            f"{r.get('paired_reference_verdict')} (p {r['paired_reference_p_value']:.2g})"
        table.append([r.get("label", r["method"]), _f(r.get("uses_mask")),
                      f"{r.get('strength_name') or ''} {_f(r.get('strength'), 3)}".strip(),
                      _pm(r, hkey), delta, verdict, ref, *[_pm(r, k) for k in others],
                      _f(r.get("gap_closed"), 2), _f(r.get("region_mass"))])
    out += _table(["method", "uses mask", "strength", _label(hkey), "Δ vs under study",
                   "verdict", "Δ vs reference", *map(_label, others), "gap closed",
                   "region mass after"], table)
    summary = rep.get("corrections_summary") or {}
    pair = summary.get("best_vs_runner_up")
    if pair and pair.get("delta") is not None:
        names = {r["method"]: r.get("label", r["method"]) for r in rows}
        line = (f"Best vs runner-up on the {_label(hkey)} images: **{names.get(summary['best'])}** "
                f"vs **{names.get(summary['runner_up'])}**, Δ {pair['delta']:+.3f} ± "
                f"{pair['delta_se']:.3f} (p {pair['p_value']:.2g})")
        per = summary.get("best_vs_runner_up_per_seed") or []
        if len(per) > 1:
            line += "; per seed " + ", ".join(f"{p['delta']:+.3f} {p['verdict']}" for p in per)
        out += ["", f"{line}: **{summary.get('verdict')}** ({summary.get('rule')})."]
    return out


COLUMNS = {
    "essence": (["model", "layer", "a_name", "b_name", "fill", "full_acc", "k_top", "k_random",
                 "k_bottom"],
                "accuracy of A vs B with only the top k units of a layer kept (the others at their "
                "mean or zero): the whole layer's binary accuracy, and the smallest k reaching 95% "
                "of it keeping the top experts by comparative influence, random units (median of "
                "the draws) and the bottom units; – where no k reaches it"),
    "detection": (["detector", "uses_influence", "layer", "auc", "tpr_at_1", "tpr_at_5",
                   "tpr_at_25", "n_clean", "n_attacked"],
                  "adversarial patches against the model, detected on held-out images; TPR at 1, "
                  "5 and 25% false-positive rate"),
}


def _summary_section(rep: dict, stage: str, title: str) -> list[str]:
    rows = rep.get(stage) or []
    if not rows:
        return []
    wanted, what = COLUMNS.get(stage, ([], ""))
    keys = [k for k in wanted if k in rows[0]] or \
        [k for k in rows[0] if not isinstance(rows[0][k], dict | list)][:9]
    head = f"**{title}** ({what}):" if what else f"**{title}**:"
    return [head, ""] + _table([k.replace("_", " ") for k in keys],
                               [[_f(r.get(k)) for k in keys] for r in rows[:48]])


def markdown(rep: dict) -> str:
    """The case's results as Markdown (tables and a few sentences), every number from ``rep``
    (:meth:`CaseStudy.report`)."""
    parts = [_data(rep), _models(rep), _experts(rep), _representations(rep), _corrections(rep),
             _summary_section(rep, "essence", "Essence and causal check"),
             _summary_section(rep, "detection", "Attacks and their detection")]
    # (no timings here: they change from run to run; bench/ measures them)
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


FINGERPRINT = re.compile(r"<!-- code and config: (\w+) -->")
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?")


def stamped(block: str, fingerprint: str) -> str:
    """The block with its code-and-config fingerprint on its first line."""
    return f"<!-- code and config: {fingerprint} -->\n{block}"


def drift(old: str, new: str, tolerance: float = 0.02) -> list[str]:
    """Why two generated blocks differ, or [] when they agree: the fingerprint must be equal
    (code or config changed without regenerating), the words equal, and every number within
    ``tolerance`` (absolute; relative above 1) — the tolerance absorbs floating-point
    differences between machines, never a typed or stale number from other code."""
    problems = []
    fo, fn = FINGERPRINT.search(old), FINGERPRINT.search(new)
    if (fo and fo.group(1)) != (fn and fn.group(1)):
        problems.append(f"fingerprint {fo and fo.group(1)} ≠ {fn and fn.group(1)} (code or config "
                        "changed since the block was generated)")
    if NUMBER.sub("#", old) != NUMBER.sub("#", new):
        problems.append("the text differs (rows, columns or words)")
        return problems
    for a, b in zip(NUMBER.findall(old), NUMBER.findall(new), strict=True):
        x, y = float(a.replace("−", "-")), float(b.replace("−", "-"))
        if abs(x - y) > tolerance * max(1.0, abs(y)):
            problems.append(f"{a} ≠ {b}")
    return problems


def readme_blocks(text: str) -> list[str]:
    """The case names of the generated blocks in a README text, in order."""
    return [m.group("case") for m in BLOCK.finditer(text)]


def update_readme(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- report:CASE -->`` block's body replaced by ``blocks[CASE]``."""
    def swap(m: re.Match) -> str:
        case = m.group("case")
        body = blocks.get(case, m.group("body"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(swap, text)


def readme_path() -> Path:
    return Path(__file__).resolve().parents[1] / "README.md"

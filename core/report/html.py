"""The report as one self-contained HTML file: every chapter's tables and figures, captions and
provenance; no external URL and no script, so it opens offline.

    python -m core export decoy-mnist --html report.html

The figures, chapter by chapter: the test images with their region; every model's accuracy
(inline SVG, ± one sd over seeds); the overview matrix (layers × classes per model: how many top
experts carry the shortcut, with Wilson intervals); the top experts of every class, interpreted
on that class's test images; discovery's top suspect; the representations; the corrections'
accuracies and gaps closed; the detectors' AUCs with their intervals. Image tables label every
row and column and carry the heatmap's colour scale (red raises, blue lowers); charts are drawn
by :mod:`core.report.svg`. Every ``<img>`` has an alt text, every ``<svg>`` a ``<title>``.

Reads only what is built (never trains or differentiates): the report JSON, the cached payloads of
the experts, discovery and representations stages, and sample images.
"""

from __future__ import annotations

import base64
import html
import io
import subprocess
from pathlib import Path

import numpy as np

from core.report import svg
from core.report.degenerate import study_report
from core.report.findings import CONFIDENCE, findings, wilson
from core.report.markdown import _ci, markdown

__all__ = ["html_report", "png_data_uri"]

REPO = Path(__file__).resolve().parents[2]
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.7em}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #bbb;padding:.25em .5em;text-align:left}th{background:#eef}
figure{margin:1em 0}figcaption{font-size:.9em;color:#333}
img{image-rendering:pixelated;max-width:100%}.prov{font-size:.85em;color:#333}
figure{overflow-x:auto}figure svg{display:block;margin:.4em 0;max-width:100%;height:auto}
table.grid{border-collapse:separate;border-spacing:3px;font-size:.8em}
table.grid td,table.grid th{border:none;padding:0 .3em;vertical-align:middle}
table.grid th{background:none;font-weight:600}table.grid th[scope=row]{text-align:right;max-width:16em}
table.grid td img{display:block}h3{font-size:1.12em;margin-top:1.4em}h4{margin:.6em 0 .2em}
"""


def png_data_uri(rgb: np.ndarray) -> str:
    """An RGB uint8 array as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rgb(image: np.ndarray, scale: int) -> np.ndarray:
    """A display image (H, W) or (H, W, 3) in [0, 1] → RGB uint8, each pixel ``scale``×."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    out = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return out.repeat(scale, 0).repeat(scale, 1)


def _overlay(image: np.ndarray, attr: np.ndarray, scale: int, alpha: float = 0.55) -> np.ndarray:
    """The signed heatmap (red positive, blue negative, normalised by this map's largest
    magnitude) blended over the image."""
    from core.methods.imaging import heatmap

    base = _rgb(image, 1).astype(np.float64) / 255
    gray = base.mean(-1, keepdims=True).repeat(3, -1)
    heat = heatmap(np.asarray(attr, dtype=np.float64)).astype(np.float64) / 255
    out = ((1 - alpha) * gray + alpha * heat) * 255
    return out.round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)


def _md_to_html(text: str) -> str:
    """The few Markdown forms :func:`core.report.markdown.markdown` writes: tables, bold, paragraphs."""
    out, table = [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        parts = s.split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    def flush():
        if not table:
            return
        rows = [r.strip().strip("|").split("|") for r in table if not set(r) <= set("|-: ")]
        head, body = rows[0], rows[1:]
        out.append("<table><tr>" + "".join(f"<th>{inline(c.strip())}</th>" for c in head)
                   + "</tr>" + "".join("<tr>" + "".join(f"<td>{inline(c.strip())}</td>"
                                                        for c in r) + "</tr>" for r in body)
                   + "</table>")
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------ figures
# Each chapter's figures: image tables (a row label left of every row, a column label over every
# column, one PNG per tile at the image's own resolution, enlarged by the browser) and charts as
# inline SVG (core.report.svg). Every number drawn is read from the report or a stage's payload.


def _tile(rgb: np.ndarray, alt: str, width: int) -> str:
    """One ``<img>``: the RGB array as an inline PNG shown ``width`` pixels wide, with ``alt``."""
    h, w = rgb.shape[:2]
    return (f'<img src="{png_data_uri(rgb)}" alt="{html.escape(alt)}" width="{width}" '
            f'height="{round(width * h / max(w, 1))}">')


def _figure(body: str, caption: str, legend: str = "") -> str:
    """A ``<figure>``: ``body``, an optional ``legend`` (an SVG) and the caption (escaped)."""
    return (f"<figure>{body}{legend}<figcaption>{html.escape(caption)}</figcaption></figure>")


def _image_table(rows: list[tuple[str, list[tuple[np.ndarray, str]], list[str]]],
                 columns: list[str], *, row_head: str, width: int, extra: list[str] = ()) -> str:
    """A table of images: ``rows`` of (row label, [(tile, alt), ...], [extra cell, ...]), the
    ``columns`` labels over the tiles and ``extra`` over the extra cells (all text, escaped)."""
    e = html.escape
    head = (f"<tr><th scope='col'>{e(row_head)}</th>"
            + "".join(f"<th scope='col'>{e(c)}</th>" for c in [*columns, *extra]) + "</tr>")
    body = "".join(
        f"<tr><th scope='row'>{e(label)}</th>"
        + "".join(f"<td>{_tile(t, alt, width)}</td>" for t, alt in tiles)
        + "<td></td>" * (len(columns) - len(tiles))
        + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"
        for label, tiles, cells in rows)
    return f"<table class='grid'>{head}{body}</table>"


def _heat_legend() -> str:
    """The heatmaps' colour scale, sampled from ``core.methods.imaging.heatmap`` itself."""
    from core.methods.imaging import heatmap

    ramp = heatmap(np.linspace(-1.0, 1.0, 41)[None, :])[0]
    return svg.heat_legend(["#" + "".join(f"{int(v):02X}" for v in c) for c in ramp])


def _names(rep: dict):
    classes = (rep.get("case_facts") or {}).get("classes") or []
    return lambda c: str(classes[int(c)]) if 0 <= int(c) < len(classes) else str(c)


def _role(rep: dict, model: str) -> str:
    """``model`` with its role in the case: under study, reference or control."""
    control = _control(rep)
    roles = [w for w, m in (("under study", rep.get("subject")), ("reference", rep.get("reference")),
                            ("control", control)) if m == model and w != model]
    return f"{model} ({', '.join(roles)})" if roles else str(model)


def _control(rep: dict) -> str | None:
    alarms = (rep.get("experts") or {}).get("false_alarms") or {}
    return next((a.get("model") for a in alarms.values() if isinstance(a, dict) and a.get("model")),
                None)


def _model_colors(rep: dict, names: list[str]) -> dict[str, str]:
    """One colour per model as on the app's pages: the model under study vermillion, its
    reference blue, the others the palette's next colours."""
    first = [m for m in (rep.get("subject"), rep.get("reference")) if m]
    ordered = list(dict.fromkeys([*first, *names]))
    return {m: svg.PALETTE[ordered.index(m) % len(svg.PALETTE)] for m in names}


def _samples_figure(study, rep: dict, scale: int, size: int) -> list[str]:
    """The case chapter: the first test images, their region and the same images without it."""
    facts = rep.get("case_facts") or {}
    region, name = facts.get("region") or "region", _names(rep)
    s = study.samples("test", 8)
    cols = [f"test #{i}, class {name(y)}" for i, y in enumerate(s["y"])]
    rows = [("image", [(_rgb(x, 1), f"test image {c}") for x, c in zip(s["x"], cols, strict=True)], [])]
    if s.get("mask") is not None:
        rows.append((f"{region} (red)", [(_outline(np.asarray(x) * 255, m, scale),
                                          f"test image {c} with the {region} outlined in red")
                                         for x, m, c in zip(s["x"], s["mask"], cols, strict=True)], []))
    if s.get("x_clean") is not None:
        rows.append((f"without the {region}", [(_rgb(x, 1), f"test image {c} without the {region}")
                                              for x, c in zip(s["x_clean"], cols, strict=True)], []))
    below = "; below, " + ", ".join(r[0] for r in rows[1:]) if len(rows) > 1 else ""
    return [_figure(_image_table(rows, cols, row_head="test image", width=size),
                    f"The first {len(cols)} test images, one per column with its class{below}.")]


def _accuracy_figure(rep: dict) -> list[str]:
    """What the models learned: every model's accuracy on its training images and each evaluation
    set, ± one standard deviation over the training seeds when there are several."""
    models = rep.get("models") or {}
    facts = rep.get("case_facts") or {}
    keys = list(dict.fromkeys(k for m in models.values() for k in m if k.endswith("_acc")))
    sets = [f"{x}_acc" for x in facts.get("evaluation_sets") or []]
    train = [k for k in keys if k.startswith("train") and k not in sets]
    keys = train + [k for k in sets if k in keys] + [k for k in keys if k not in train + sets]
    if not keys:
        return []
    names = list(models)
    n_seeds = max(int(m.get("n_seeds") or 1) for m in models.values())
    labels = {k: k[:-4].replace("_", " ") + (" (headline)" if k[:-4] == facts.get("headline") else "")
              for k in keys}
    values = {}
    for name, m in models.items():
        for k in keys:
            v, sd = m.get(k), m.get(f"{k}_sd")
            band = n_seeds > 1 and isinstance(sd, (int, float))
            values[(_role(rep, name), labels[k])] = (v, v - sd if band else None,
                                                     v + sd if band else None)
    series = [_role(rep, m) for m in names]
    colors = dict(zip(series, _model_colors(rep, names).values(), strict=True))
    interval = f"± 1 sd over {n_seeds} seeds" if n_seeds > 1 else ""
    chart = svg.grouped_bars([labels[k] for k in keys], series, colors, values,
                             title="Accuracy of every model on each set",
                             desc="Grouped bars: for each set (training images, then each evaluation "
                                  "set), one bar per model, its accuracy from 0% to 100%"
                                  + (f", with a whisker of {interval}." if interval else "."),
                             y_label="accuracy", interval=interval)
    return [_figure(chart, "Accuracy of every model (colours: the legend) on its training images and "
                    "each evaluation set; hover a bar for its number. "
                    + (f"Means over {n_seeds} training seeds; whiskers: ± one standard deviation."
                       if n_seeds > 1 else "One training seed: no interval over seeds to draw."))]


def _overview_figure(rep: dict) -> list[str]:
    """Where the shortcut lives: for each model, a matrix of layers (rows) × classes (columns):
    how many of the class's top experts at that layer carry the shortcut (n/k, coloured by that
    share) and their mean region mass; a last column, every class together with its Wilson
    interval."""
    e = rep.get("experts") or {}
    top = e.get("top") or []
    if not top:
        return []
    facts = rep.get("case_facts") or {}
    region, name = facts.get("region"), _names(rep)
    verdicts = bool(region) and any(isinstance(r.get("shortcut"), bool) for r in top)
    layers = [str(x) for x in e.get("layers") or []]
    layers += sorted({str(r["layer"]) for r in top} - set(layers))
    classes = [int(c) for c in e.get("classes") or []]
    classes += sorted({int(r["class"]) for r in top} - set(classes))
    seen = list(dict.fromkeys(str(r["model"]) for r in top))
    models = [m for m in dict.fromkeys((rep.get("subject"), rep.get("reference"), _control(rep)))
              if m in seen] or seen
    thresholds = e.get("shortcut_thresholds") or {}
    mass = f"{region} mass" if region else "region mass"
    svgs = []
    for m in models:
        cells, summary = [], (e.get("summary") or {}).get(m) or {}
        for layer in layers:
            row = []
            for c in classes:
                rows = [r for r in top if r["model"] == m and r["layer"] == layer and int(r["class"]) == c]
                masses = [r["region_mass"] for r in rows if isinstance(r.get("region_mass"), float)]
                mean = sum(masses) / len(masses) if masses else None
                if not rows:
                    row.append(None)
                elif verdicts:
                    n = sum(bool(r.get("shortcut")) for r in rows)
                    row.append((n / len(rows), f"{n}/{len(rows)}\n{svg.pct(mean, 0)}",
                                f"{m}, class {name(c)}, {layer}: {n} of {len(rows)} top experts carry "
                                f"the shortcut; their mean {mass} {svg.pct(mean)}"))
                else:
                    row.append((None, str(len(rows)), f"{m}, class {name(c)}, {layer}: {len(rows)} "
                                "top experts ranked (no region, no verdict)"))
            s = summary.get(layer) or {}
            k, n = s.get("n_shortcut"), s.get("n")
            if verdicts and k is not None and n:
                lo, hi = wilson(int(k), int(n))
                row.append((k / n, f"{k}/{n} ({svg.pct(lo, 0)}–{svg.pct(hi, 0)})\n"
                            f"{svg.pct(s.get('mean_region_mass'), 0)}",
                            f"{m}, {layer}, every class: {k} of {n} top experts "
                            f"carry the shortcut ({CONFIDENCE:.0%} Wilson interval {svg.pct(lo, 0)}–"
                            f"{svg.pct(hi, 0)}; {s.get('n_undecided') or 0} undecided); mean {mass} "
                            f"{svg.pct(s.get('mean_region_mass'))}"))
            else:
                row.append(None)
            cells.append(row)
        row_labels = [f"{x} (> {svg.pct(thresholds[x])})" if x in thresholds else x for x in layers]
        svgs.append(svg.matrix(
            row_labels, [name(c) for c in classes] + [f"all ({CONFIDENCE:.0%} interval)"], cells,
            heading=_role(rep, m),
            row_head="layer (threshold)" if thresholds else "layer", col_head="class",
            title=f"Experts carrying the shortcut in {m}, per layer and class",
            desc=f"Rows: the layers {', '.join(layers)}; columns: the classes, then all classes "
                 "together. Each cell: how many of the class's top experts at that layer carry "
                 f"the shortcut, as n/k, coloured by that share; hover for their mean {mass}."))
    if not verdicts:
        return [_figure("".join(svgs), "How many top experts the experts stage ranked per layer "
                        "(rows) and class (columns): the case has no region, so no verdicts.")]
    what = "share of the top experts carrying the shortcut"
    caption = (f"Where the shortcut lives: for each model, one row per layer and one column per class. "
               f"A cell reads n/k: n of the class's top experts at that layer put more of their "
               f"attribution on the {region} than the layer's threshold (in the row label) allows; "
               f"its colour is that share (legend); below it, the experts' mean {mass}. The last "
               f"column: every class together, with the share's {CONFIDENCE:.0%} Wilson interval.")
    return [_figure("".join(svgs), caption, svg.share_legend(what))]


def _fmt(v: float | None, lo: float | None = None, hi: float | None = None) -> str:
    """``v (lo–hi)`` with no digit the interval does not support (the README's rule,
    :func:`core.report.markdown._ci`); ``v`` to three significant digits without one."""
    if v is None:
        return "—"
    if lo is not None and hi is not None and hi > lo:
        return _ci(v, lo, hi)
    return f"{v:.3g}"


def _experts_figures(study, rep: dict, size: int) -> list[str]:
    """Influence & experts: for every class, the top experts of the model under study and of its
    reference at the case's experts layer, each interpreted on the class's test images."""
    e = rep.get("experts")
    payload = study.artifact("experts") if e else None
    if not payload:
        return []
    layer, name = e["layer"], _names(rep)
    region = (rep.get("case_facts") or {}).get("region")
    models = [m for m in (rep.get("subject"), rep.get("reference")) if m]
    n_show = 4
    legend, figs = _heat_legend(), []
    for c in e.get("classes") or []:
        results = [(m, payload["results"].get(f"{m}/{layer}/{c}")) for m in models]
        results = [(m, r) for m, r in results if r is not None]
        if not results:
            continue
        idx = [[int(i) for i in np.asarray(r["indices"])[:n_show]] for _, r in results]
        shared = all(i == idx[0] for i in idx)
        cols = ([f"test #{i}" for i in idx[0]] if shared
                else [f"image {j + 1}" for j in range(max(map(len, idx)))])
        rows = []
        for (m, r), ids in zip(results, idx, strict=True):
            images, maps = np.asarray(r["images"]), np.asarray(r["maps"])
            for k, ex in enumerate(r["rows"]):
                unit = ex.get("unit")
                tiles = [(_overlay(images[j], maps[k, j], 1),
                          f"{m}, class {name(c)}, {layer} unit {unit}: its Integrated Gradients "
                          f"heatmap on test image #{ids[j]}") for j in range(len(ids))]
                cells = [_fmt(ex.get("score"), ex.get("ci_low"), ex.get("ci_high"))]
                if region and ex.get("region_mass") is not None:
                    cells += [f"{svg.pct(ex['region_mass'], 0)} ({svg.pct(ex.get('mass_low'), 0)}–"
                              f"{svg.pct(ex.get('mass_high'), 0)})", str(ex.get("verdict") or "—")]
                rows.append((f"{m}: unit {unit} (rank {ex.get('rank', k + 1)})", tiles, cells))
        extra = ["influence (interval)"] + ([f"{region} mass (interval)", "shortcut?"] if region else [])
        table = _image_table(rows, cols, row_head=f"expert at {layer}", width=size, extra=extra)
        conf = e.get("confidence")
        figs.append(_figure(
            f"<h4>Class {html.escape(name(c))}</h4>" + table,
            f"Class {name(c)}: the top {e.get('k')} experts at {layer} (the units with the largest "
            f"distributional influence on the class's quantity) of "
            + " and of ".join(_role(rep, m) for m, _ in results)
            + f", one per row, each interpreted on the first {len(cols)} of the class's test images "
            "(Integrated Gradients of the unit; red raises it, blue lowers it, each map scaled by its "
            "largest magnitude). Right: the influence"
            + (f", its {region} mass and its verdict" if region else "")
            + (f", with their {conf:.0%} bootstrap intervals." if conf else "."), legend))
    return figs


def _representations_figures(study, rep: dict, scale: int, size: int) -> list[str]:
    """Representations: each model's interpretation of the same test images by every method."""
    rp = study.artifact("representations") if rep.get("representations") else None
    if not rp:
        return []
    name = _names(rep)
    region = (rep.get("case_facts") or {}).get("region")
    labels = {r["method"]: r.get("label") or r["method"] for r in rep.get("representations") or []}
    im = rp["images"]
    x = np.asarray(im["x"])
    ys = [int(v) for v in np.asarray(im["y"])]
    ids = [int(v) for v in np.asarray(im.get("index", range(len(x))))]
    cols = [f"test #{i}, class {name(y)}" for i, y in zip(ids, ys, strict=True)]
    mask = im.get("mask")
    first = ([(_outline(xi * 255, mi, scale), f"test image {c}, the {region} outlined in red")
              for xi, mi, c in zip(x, np.asarray(mask), cols, strict=True)]
             if mask is not None and region else
             [(_rgb(xi, 1), f"test image {c}") for xi, c in zip(x, cols, strict=True)])
    figs, legend = [], _heat_legend()
    for model, methods in rp["maps"].items():
        rows = [("image" + (f" ({region} in red)" if mask is not None and region else ""), first, [])]
        for meth, maps in methods.items():
            label = labels.get(meth, meth.replace("_", " "))
            rows.append((label, [(_overlay(x[i], np.asarray(maps)[i], 1),
                                  f"{label} of {model} on test image {cols[i]}")
                                 for i in range(len(x))], []))
        figs.append(_figure(f"<h4>{html.escape(_role(rep, model))}</h4>"
                            + _image_table(rows, cols, row_head="method", width=size),
                            f"Model {model}: the test images (top row), then one row per method "
                            f"({', '.join(r[0] for r in rows[1:])}), each map scaled by its largest "
                            "magnitude; red raises the class's score, blue lowers it.", legend))
    return figs


def _suspect_figures(study, rep: dict, scale: int, size: int) -> list[str]:
    """Suspects: the model under study's top discovery candidate, its held-out images with the
    region outlined, one row per predicted class (empty when discovery is not built)."""
    summary = rep.get("discovery_summary") or {}
    subject = summary.get("subject")
    top = [r for r in rep.get("discovery") or [] if r.get("model") == subject
           and r.get("kind") == "candidate"][:1]
    payload = study.artifact("discovery") if top else None
    if not payload:
        return []
    row, name = top[0], _names(rep)
    g = (payload.get("gallery") or {}).get(f"{subject}/{row['rank']}") or {}
    preds = list(g.get("pred") or [])
    if not preds:
        return []
    by_pred: dict[int, list] = {}
    for i, p in enumerate(preds):
        by_pred.setdefault(int(p), []).append(
            (_outline(np.asarray(g["image"][i]), np.asarray(g["mask"][i]), scale),
             f"held-out image predicted {name(p)}, the discovered region outlined in red"))
    rows = [(f"predicted {name(p)}", v[:8], []) for p, v in by_pred.items()]
    n = max(len(r[1]) for r in rows)
    table = _image_table(rows, [f"image {j + 1}" for j in range(n)], row_head="prediction", width=size)
    return [_figure(table, f"Model {subject}, discovery's top candidate (class {row.get('class')}, "
                    f"{row.get('verdict')}): held-out images with the region it found outlined in "
                    f"red, one row per predicted class.")]


def _corrections_figure(rep: dict) -> list[str]:
    """Corrections: each correction's accuracy on the headline set (± one sd over seeds), the
    model under study and the reference beside them, the gap each closes and its paired verdict."""
    rows = rep.get("corrections") or []
    head = (rep.get("corrections_summary") or {}).get("headline") or (
        rep.get("case_facts") or {}).get("headline")
    if not rows or not head:
        return []
    key, hname = f"{head}_acc", str(head).replace("_", " ")
    subject, reference = rep.get("subject"), rep.get("reference")
    kinds = {"under study": svg.PALETTE[0], "reference": svg.PALETTE[1],
             "uses pixel mask": svg.PALETTE[4], "uses location prior": svg.PALETTE[2],
             "uses nothing": svg.PALETTE[3], "control": "#999999"}
    n_seeds = max(int(r.get("n_seeds") or 1) for r in rows)
    bars = []
    s_acc = next((r["subject_acc"] for r in rows if r.get("subject_acc") is not None), None)
    r_acc = next((r["reference_acc"] for r in rows if r.get("reference_acc") is not None), None)
    if s_acc is not None:
        bars.append({"label": _role(rep, subject), "value": s_acc, "color": kinds["under study"],
                     "note": "the model to correct", "kind": "under study"})
    if r_acc is not None and reference:
        bars.append({"label": _role(rep, reference), "value": r_acc, "color": kinds["reference"],
                     "note": "gap closed = 1 here", "kind": "reference"})
    for r in rows:
        kind = "control" if r.get("control") else (
            f"uses {r.get('uses') or ('pixel mask' if r.get('uses_mask') else 'nothing')}")
        v, sd = r.get(key), r.get(f"{key}_sd")
        band = n_seeds > 1 and isinstance(sd, (int, float)) and v is not None
        g, gsd = r.get("gap_closed"), r.get("gap_closed_sd")
        note = ("" if g is None else f"gap closed {g:.2f}" + (f" ± {gsd:.2f}" if n_seeds > 1 and
                                                              isinstance(gsd, float) else ""))
        if r.get("paired_verdict"):
            seed = " (seed 0)" if n_seeds > 1 else ""
            note += ("; " if note else "") + f"vs {subject}{seed}: {r['paired_verdict']}"
        bars.append({"label": str(r.get("label") or r.get("method")), "value": v,
                     "low": v - sd if band else None, "high": v + sd if band else None,
                     "color": kinds.get(kind, svg.PALETTE[5]), "note": note, "kind": kind})
    used = list(dict.fromkeys(b["kind"] for b in bars))
    interval = f"± 1 sd over {n_seeds} seeds" if n_seeds > 1 else ""
    lines = [(r_acc, f"{_role(rep, reference)} on {hname}: {svg.pct(r_acc)}")] if reference else []
    chart = svg.interval_bars(
        bars, title=f"Accuracy of every corrected model on {hname}",
        desc=f"One horizontal bar per model, its accuracy on {hname} from 0% to 100%"
             + (f", with a whisker of {interval}" if interval else "")
             + "; the dashed line marks the reference's accuracy; right of each bar, the gap it "
               "closes and its paired test against the model under study.",
        x_label=f"accuracy on {hname}", legend=[(kinds.get(k, svg.PALETTE[5]), k) for k in used],
        lines=lines, interval=interval)
    summary = rep.get("corrections_summary") or {}
    label = {r.get("method"): r.get("label") or r.get("method") for r in rows}
    best = (f" Best: {label.get(summary['best'], summary['best'])}, against the runner-up "
            f"{label.get(summary.get('runner_up'), summary.get('runner_up'))}: "
            f"{summary.get('verdict')} ({summary.get('rule')})." if summary.get("best") else "")
    return [_figure(chart, f"Corrections on {hname}: each bar one corrected model (colour: what it "
                    f"uses to know where the shortcut is), beside {subject} and {reference}. Gap "
                    "closed: the share of the gap between them it closes (1: it reaches the "
                    "reference); the verdict is the exact McNemar test against the model under "
                    "study. " + (f"Means over {n_seeds} seeds, whiskers ± one standard deviation."
                                 if n_seeds > 1 else "One seed: no interval over seeds to draw.")
                    + best)]


def _essence_figures(rep: dict) -> list[str]:
    """Essence: per layer, the essence curve of the first pair for the model under study (first
    fill): binary accuracy with only k units kept — top k by comparative influence, bottom k,
    and k random units (median and interval of the draws) — and the target share of the whole
    layer's accuracy; a row the report calls degenerate says so in its caption."""
    es = rep.get("essence_summary") or {}
    curves = es.get("curves") or []
    rows = rep.get("essence") or []
    if not curves:
        return []
    subject = rep.get("subject")
    out = []
    for layer in dict.fromkeys(c.get("layer") for c in curves):
        mine = [c for c in curves if c.get("layer") == layer and c.get("model") == subject] or \
            [c for c in curves if c.get("layer") == layer]
        c = mine[0]
        row = next((r for r in rows if all(r.get(k) == c.get(k) for k in
                                           ("model", "layer", "a", "b", "fill"))), {})
        share = row.get("share") or (es.get("config") or {}).get("share")
        pair = f"{c.get('a_name', c.get('a'))} vs {c.get('b_name', c.get('b'))}"
        rnd = c.get("random") or {}
        conf = c.get("confidence")
        band_label = (f"random k units, {conf:.0%} interval of {c.get('random_draws')} draws"
                      if conf else "random k units, interval of the draws")
        target = (share * c["full"], f"{share:.0%} of the whole layer's accuracy") \
            if share and c.get("full") is not None else None
        chart = svg.curves(
            c["ks"], [{"label": "top k by comparative influence", "values": c["top"],
                       "color": svg.PALETTE[0]},
                      {"label": "random k (median)", "values": rnd.get("median") or [],
                       "color": "#555555"},
                      {"label": "bottom k", "values": c["bottom"], "color": svg.PALETTE[1]}],
            band={"label": band_label, "low": rnd.get("low") or [], "high": rnd.get("high") or [],
                  "color": "#BBBBBB"} if rnd.get("low") else None, target=target,
            title=f"Essence of {pair} at {layer} ({c.get('model')}, fill {c.get('fill')})",
            desc=f"Binary accuracy of {pair} on {c.get('n_eval')} held-out images when {layer} "
                 "keeps only k units, for k on a doubling grid up to the layer's width.",
            x_label=f"k units kept of {c.get('width')}", y_label="binary accuracy")
        ks = ", ".join(f"{rule} {row.get(f'k_{rule}')}" for rule in ("top", "random", "bottom")
                       if f"k_{rule}" in row)
        reading = (f" Cannot tell: {row['degenerate']}." if row.get("degenerate") else "")
        out.append(_figure(chart, f"Essence of {pair} at {layer} ({c.get('model')}, the removed "
                           f"units at their {c.get('fill')}): accuracy on {c.get('n_eval')} held-out "
                           f"images of the two classes (whole layer {svg.pct(c.get('full'))})"
                           + (f"; smallest k reaching {share:.0%} of it: {ks}" if ks and share
                              else "") + "." + reading))
    return out


def _detection_figure(rep: dict) -> list[str]:
    """Detection: every detector's AUC with its bootstrap interval, ranked."""
    rows = sorted(rep.get("detection") or [], key=lambda r: (r.get("rank") or 0))
    if not rows or all(r.get("auc") is None for r in rows):
        return []
    level = ((rep.get("detection_summary") or {}).get("evaluation") or {}).get("level")
    interval = f"{level:.0%} bootstrap interval" if level else "bootstrap interval"
    colors = {True: svg.PALETTE[2], False: "#777777"}
    dots = [{"label": str(r.get("detector")).replace("_", " "), "value": r.get("auc"),
             "low": r.get("auc_low"), "high": r.get("auc_high"),
             "text": f"AUC {r['auc']:.3f}" if r.get("auc") is not None else None,
             "interval_text": (f"{r['auc_low']:.3f}–{r['auc_high']:.3f}"
                               if r.get("auc_low") is not None else None),
             "color": colors[bool(r.get("uses_influence"))],
             "note": f"rank {r.get('rank')}" + (
                 ", tied with " + ", ".join(str(t).replace("_", " ") for t in r["tied_with"])
                 if r.get("tied_with") else "")} for r in rows]
    chart = svg.interval_bars(
        dots, title="AUC of every detector of the patch attack", dots=True,
        desc="One dot per detector, its AUC from 0 to 1, with a whisker of its " + interval + ".",
        x_label="AUC (attacked against clean held-out images)", interval=interval,
        legend=[(colors[True], "uses influence"), (colors[False], "baseline")],
        tick=lambda v: f"{v:.2f}")
    return [_figure(chart, "Detection: each detector's AUC at telling attacked from clean held-out "
                    f"images, with its {interval}; rank and ties as the report gives them.")]


def _figures(study, rep: dict, scale: int) -> list[str]:
    """Every chapter's figures, each under its chapter's heading (what is not built is absent)."""
    size = (rep.get("case_facts") or {}).get("size") or [32, 32]
    width = int(size[1]) * scale
    built = rep.get("built") or {}
    parts = [("The case", _samples_figure(study, rep, scale, width) if built.get("data") else []),
             ("What the models learned", _accuracy_figure(rep)),
             ("Where the shortcut lives", _overview_figure(rep)),
             ("Influence and experts, every class", _experts_figures(study, rep, width)),
             ("Suspects", _suspect_figures(study, rep, scale, width)),
             ("Representations", _representations_figures(study, rep, scale, width)),
             ("Corrections", _corrections_figure(rep)),
             ("Essence", _essence_figures(rep)),
             ("Detection", _detection_figure(rep))]
    out = []
    for title, figs in parts:
        if figs:
            out += [f"<h3>{html.escape(title)}</h3>", *figs]
    return out


def _findings_html(rep: dict) -> list[str]:
    """The findings box (``core.report.findings``): one item per finding, then what the study
    cannot tell; every text escaped. Empty when there is nothing to say."""
    found = findings(rep)
    if not found["items"] and not found["cannot_tell"]:
        return []
    out = ["<section id='findings'><h2>Findings</h2><ul>"]
    out += [f"<li>{html.escape(i['text'])} <a href='#results'>(results)</a></li>"
            for i in found["items"]]
    out.append("</ul>")
    if found["cannot_tell"]:
        out.append("<p><strong>What this study cannot tell:</strong> "
                   + " ".join(html.escape(t) for t in found["cannot_tell"]) + "</p>")
    out.append("</section>")
    return out


def _outline(image: np.ndarray, mask: np.ndarray, scale: int) -> np.ndarray:
    """``_rgb`` with the region's boundary (its pixels next to one outside it) drawn in red."""
    out = _rgb(np.asarray(image, dtype=np.float64) / 255, scale)
    m = np.asarray(mask, bool).repeat(scale, 0).repeat(scale, 1)
    pad = np.pad(m, 1, constant_values=False)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    out[m & ~inner] = (230, 40, 40)
    return out


def html_report(study, *, scale: int | None = None) -> str:
    """The case's report as a self-contained HTML page (tables, figures as embedded PNG,
    captions, provenance: commit, code-and-config fingerprint, torch, device, build dates,
    seeds). Never computes; what is not built is absent."""
    rep = study_report(study)
    facts = rep.get("case_facts") or {}
    size = (facts.get("size") or [32, 32])[0]
    scale = scale or max(1, 96 // max(size, 1))
    prov = rep.get("provenance") or {}
    built = {s: (p or {}).get("built_at") for s, p in (prov.get("stages") or {}).items()}
    rows = [("case", rep.get("case")), ("commit", _commit()),
            ("code and config", study.code_fingerprint()), ("torch", prov.get("torch")),
            ("python", prov.get("python")), ("device", prov.get("device")),
            ("seeds", ", ".join(map(str, rep.get("seeds") or []))),
            ("built", "; ".join(f"{s} {t}" for s, t in built.items() if t))]
    prov_html = "<table class='prov'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows) \
        + "</table>"
    body = [f"<h1>{html.escape(rep.get('title') or rep.get('case', ''))}</h1>",
            f"<p>{html.escape(rep.get('description') or '')}</p>",
            *_findings_html(rep),
            "<h2 id='results'>Results</h2>", _md_to_html(markdown(rep)),
            "<h2 id='figures'>Figures</h2>", *_figures(study, rep, scale),
            "<h2>Provenance</h2>", prov_html,
            "<p class='prov'>Influence Casebook: influence-directed explanations (Leino et al., "
            "ITC 2018). Every number above was computed by the pipeline; none was typed.</p>"]
    title = html.escape(f"Influence Casebook — {rep.get('title') or rep.get('case')}")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{title}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")

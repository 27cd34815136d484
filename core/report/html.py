"""The report as one self-contained HTML file: every chapter's tables, figures embedded as PNG,
captions and provenance; no external URL, so it opens offline.

    python -m core export decoy-mnist --html report.html

Reads only what is built (never trains or differentiates): the report JSON, the cached payloads of
the experts and representations stages, and sample images.
"""

from __future__ import annotations

import base64
import html
import io
import subprocess
from pathlib import Path

import numpy as np

from core.report.degenerate import study_report
from core.report.findings import findings
from core.report.markdown import markdown

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


def _grid(tiles: list[list[np.ndarray]], pad: int = 4) -> np.ndarray:
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    cols = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def _figure(rgb: np.ndarray, alt: str, caption: str) -> str:
    return (f'<figure><img src="{png_data_uri(rgb)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


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


def _figures(study, rep: dict, scale: int) -> list[str]:
    figs = []
    facts = rep.get("case_facts") or {}
    classes = facts.get("classes") or []
    name = lambda c: classes[c] if 0 <= c < len(classes) else str(c)  # noqa: E731
    if rep.get("built", {}).get("data"):
        s = study.samples("test", 8)
        tiles = [[_rgb(x, scale) for x in s["x"]]]
        if s.get("mask") is not None:
            tiles.append([_rgb(m.astype(float), scale) for m in s["mask"]])
        labels = ", ".join(name(int(y)) for y in s["y"])
        figs.append(_figure(_grid(tiles), f"test images: {labels}",
                            f"The first test images ({labels})"
                            + (f"; below, the {facts.get('region')} masks." if s.get("mask")
                               is not None else ".")))
    e = rep.get("experts")
    payload = study.artifact("experts") if e else None
    if payload:
        layer = e["layer"]
        for model in [rep.get("subject"), rep.get("reference")]:
            if not model:
                continue
            rows = []
            for c in (e.get("classes") or [])[:4]:
                r = payload["results"].get(f"{model}/{layer}/{c}")
                if r is None:
                    continue
                images, maps = np.asarray(r["images"]), np.asarray(r["maps"])
                for k in range(min(3, len(maps))):
                    rows.append([_overlay(images[i], maps[k, i], scale)
                                 for i in range(min(4, len(images)))])
            if rows:
                shown = ", ".join(map(name, (e.get("classes") or [])[:4]))
                figs.append(_figure(_grid(rows), f"experts of {model} at {layer}",
                                    f"Model {model}, layer {layer}: each row is one of the top "
                                    f"experts of a class (classes {shown}, "
                                    "three experts each), interpreted on test images of that "
                                    "class (Integrated Gradients of the unit; red positive, blue "
                                    "negative, each map scaled by its largest magnitude)."))
    rp = study.artifact("representations") if rep.get("representations") else None
    if rp:
        x = np.asarray(rp["images"]["x"])
        for model, methods in rp["maps"].items():
            rows = [[_rgb(xi, scale) for xi in x]]
            labels = []
            for meth, maps in methods.items():
                rows.append([_overlay(x[i], np.asarray(maps)[i], scale) for i in range(len(x))])
                labels.append(meth.replace("_", " "))
            figs.append(_figure(_grid(rows), f"representations of {model}",
                                f"Model {model}: the images (top row), then one row per method "
                                f"({', '.join(labels)}), each map scaled by its largest "
                                "magnitude; red positive, blue negative."))
    figs += _suspect_figures(study, rep, scale)
    return figs


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


def _suspect_figures(study, rep: dict, scale: int) -> list[str]:
    """The model under study's top discovery candidate: its held-out images with the region
    outlined, one row per predicted class (empty when discovery is not built)."""
    summary = rep.get("discovery_summary") or {}
    subject = summary.get("subject")
    top = [r for r in rep.get("discovery") or [] if r.get("model") == subject
           and r.get("kind") == "candidate"][:1]
    payload = study.artifact("discovery") if top else None
    if not payload:
        return []
    row = top[0]
    g = (payload.get("gallery") or {}).get(f"{subject}/{row['rank']}") or {}
    preds = list(g.get("pred") or [])
    if not preds:
        return []
    classes = (rep.get("case_facts") or {}).get("classes") or []
    by_pred: dict[int, list[np.ndarray]] = {}
    for i, p in enumerate(preds):
        by_pred.setdefault(int(p), []).append(_outline(np.asarray(g["image"][i]),
                                                       np.asarray(g["mask"][i]), scale))
    names = ", ".join(str(classes[p]) if p < len(classes) else str(p) for p in by_pred)
    return [_figure(_grid([v[:8] for v in by_pred.values()]), f"suspect {row['rank']} of {subject}",
                    f"Model {subject}, discovery's top candidate (class {row.get('class')}, "
                    f"{row.get('verdict')}): held-out images with the region outlined in red, one "
                    f"row per predicted class ({names}).")]


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

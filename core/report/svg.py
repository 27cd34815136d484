"""Charts as inline SVG for the HTML export: grouped bars, bars with intervals, a labelled matrix
and colour-ramp legends. Plain strings, no JavaScript, no external URL (not even an ``xmlns``:
an ``<svg>`` inside HTML needs none), so the page stays one file that opens offline.

Every chart starts with a ``<title>`` (its accessible name) and a ``<desc>``; every bar, dot and
cell carries its own ``<title>`` with its number and interval, shown on hover. The caller passes
the numbers (all from the report); nothing here computes beyond placing them.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence

__all__ = ["PALETTE", "curves", "grouped_bars", "heat_legend", "interval_bars", "matrix", "pct",
           "share_color", "share_legend"]

# Okabe & Ito's palette (as ui.figures.PALETTE): told apart with the common colour deficiencies.
PALETTE = ["#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
INK, GRID, FONT = "#1F2328", "#D0D7DE", "system-ui,-apple-system,'Segoe UI',sans-serif"
LOW, HIGH = (0xF4, 0xF1, 0xEA), (0xB4, 0x41, 0x2E)  # the overview's share ramp (as the app's)


def pct(v: float | None, digits: int = 1) -> str:
    """``v`` (a share) in percent, ``—`` when missing."""
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _width(s: str, size: float) -> float:
    """A rough width of ``s`` in pixels at font ``size`` (system sans, no measuring available)."""
    return 0.58 * size * len(str(s))


def _text(x: float, y: float, s, size: float = 12, anchor: str = "start", fill: str = INK,
          weight: str | None = None) -> str:
    w = f' font-weight="{weight}"' if weight else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{fill}"{w}>{_e(s)}</text>')


def _lines(x: float, y: float, s: str, width: int, size: float = 11, anchor: str = "middle") -> str:
    """``s`` wrapped at ``width`` characters, one ``<tspan>`` a line, the first at ``y``."""
    parts = textwrap.wrap(str(s), width) or [""]
    spans = "".join(f'<tspan x="{x:.1f}" dy="{0 if i == 0 else size + 2}">{_e(p)}</tspan>'
                    for i, p in enumerate(parts))
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{INK}">{spans}</text>')


def _svg(width: float, height: float, title: str, desc: str, body: Sequence[str]) -> str:
    return (f'<svg role="img" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">'
            f"<title>{_e(title)}</title><desc>{_e(desc)}</desc>" + "".join(body) + "</svg>")


def _swatches(x: float, y: float, items: Sequence[tuple[str, str]], max_width: float,
              whisker: str = "") -> tuple[list[str], float]:
    """A legend: one coloured square and its label per item, then a whisker named ``whisker``
    (when given), wrapped in rows; returns the parts and the y below them."""
    out, cx = [], x
    for color, label in [*items, *([("", whisker)] if whisker else [])]:
        w = 18 + _width(label, 11) + 14
        if cx > x and cx + w > x + max_width:
            cx, y = x, y + 18
        out.append(f'<rect x="{cx:.1f}" y="{y - 10:.1f}" width="12" height="12" fill="{color}">'
                   f"<title>{_e(label)}</title></rect>" if color else
                   f'<path d="M{cx:.1f} {y - 4:.1f}h12M{cx:.1f} {y - 8:.1f}v8M{cx + 12:.1f} '
                   f'{y - 8:.1f}v8" stroke="{INK}" stroke-width="1.2"><title>{_e(label)}</title></path>')
        out.append(_text(cx + 17, y, label, 11))
        cx += w
    return out, y + 12


def _axis(x0: float, y0: float, length: float, ticks: Sequence[float], vertical: bool,
          fmt=lambda t: f"{100 * t:.0f}%") -> list[str]:
    """Grid lines and tick labels of a [0, 1]-scaled axis of ``length`` pixels starting at (x0, y0)."""
    out = []
    for t in ticks:
        if vertical:
            y = y0 - t * length
            out.append(f'<line x1="{x0}" x2="{x0 + 6}" y1="{y:.1f}" y2="{y:.1f}" stroke="{INK}"/>')
            out.append(_text(x0 - 4, y + 4, fmt(t), 10, "end"))
        else:
            x = x0 + t * length
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + 5}" stroke="{INK}"/>')
            out.append(_text(x, y0 + 17, fmt(t), 10, "middle"))
    return out


def grouped_bars(groups: Sequence[str], series: Sequence[str], colors: dict[str, str],
                 values: dict[tuple[str, str], tuple[float, float | None, float | None]],
                 *, title: str, desc: str, y_label: str, interval: str = "") -> str:
    """Vertical bars in [0, 1]: one group per ``groups`` entry, one bar per ``series`` entry in
    its colour; ``values[(series, group)] = (value, low, high)`` (low/high None: no interval),
    drawn as a whisker named ``interval`` in the legend. Returns the ``<svg>`` element."""
    bar, gap, left, top = 16, 18, 56, 30
    group_w = bar * len(series) + gap
    plot_w = max(group_w * len(groups), 200)
    width = left + plot_w + 20
    legend, below = _swatches(left, top - 12, [(colors[s], s) for s in series], plot_w, interval)
    plot_top, plot_h = below + 10, 220
    base = plot_top + plot_h
    body = legend + [f'<line x1="{left}" x2="{left + plot_w}" y1="{plot_top + plot_h * (1 - t):.1f}" '
                     f'y2="{plot_top + plot_h * (1 - t):.1f}" stroke="{GRID}"/>' for t in (.25, .5, .75, 1)]
    body += _axis(left - 6, base, plot_h, (0, .25, .5, .75, 1), vertical=True)
    body.append(f'<text transform="translate(14 {plot_top + plot_h / 2:.0f}) rotate(-90)" '
                f'font-size="11" text-anchor="middle" fill="{INK}">{_e(y_label)}</text>')
    label_lines = 1
    for g_i, g in enumerate(groups):
        gx = left + g_i * group_w + gap / 2
        for s_i, s in enumerate(series):
            v = values.get((s, g))
            if v is None or v[0] is None:
                continue
            value, lo, hi = v
            x, h = gx + s_i * bar, max(0.0, min(1.0, value)) * plot_h
            tip = f"{s}, {g}: {pct(value)}" + (f" ({interval}: {pct(lo)}–{pct(hi)})"
                                               if lo is not None and hi is not None else "")
            body.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                        f'fill="{colors[s]}"><title>{_e(tip)}</title></rect>')
            if lo is not None and hi is not None:
                cx, y1, y2 = x + (bar - 2) / 2, base - lo * plot_h, base - hi * plot_h
                body.append(f'<path d="M{cx:.1f} {y1:.1f}V{y2:.1f}M{cx - 3:.1f} {y1:.1f}h6M{cx - 3:.1f} '
                            f'{y2:.1f}h6" stroke="{INK}" stroke-width="1.2"/>')
        chars = max(6, int(group_w / 6.5))
        label_lines = max(label_lines, len(textwrap.wrap(g, chars)))
        body.append(_lines(gx + group_w / 2 - gap / 2, base + 16, g, chars))
    body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="{INK}"/>')
    return _svg(width, base + 22 + 13 * label_lines, title, desc, body)


def interval_bars(rows: Sequence[dict], *, title: str, desc: str, x_label: str,
                  legend: Sequence[tuple[str, str]] = (), lines: Sequence[tuple[float, str]] = (),
                  interval: str = "", dots: bool = False, domain: tuple[float, float] = (0.0, 1.0),
                  tick=lambda v: f"{100 * v:.0f}%") -> str:
    """Horizontal bars (or ``dots``) on ``domain``, one row per ``rows`` entry: ``label``,
    ``value``, optional ``low``/``high`` (a whisker named ``interval``), ``color``, ``note``
    (text right of the row) and ``text``/``interval_text`` (the hover's words for the value and
    the interval; percent by default). ``lines``: dashed vertical lines (value, what it is), named
    in the legend; ``tick`` writes an axis value. Returns the ``<svg>`` element."""
    lo_d, hi_d = domain
    label_w = min(260, max([_width(r["label"], 12) for r in rows] or [60]) + 12)
    note_w = min(330, max([_width(r.get("note") or "", 11) for r in rows] or [0]) + 12)
    plot_w, row_h, top = 360, 24, 30
    width = label_w + plot_w + note_w + 16
    parts, below = _swatches(8, top - 12, list(legend), width - 16, interval)
    dash = [(v, w) for v, w in lines if v is not None]
    y_dash = below + 6
    for _, what in dash:
        parts.append(f'<path d="M8 {y_dash:.1f}h14" stroke="{INK}" stroke-dasharray="4 3"/>')
        parts.append(_text(28, y_dash + 4, what, 11))
        y_dash += 16
    plot_top = y_dash + 6
    base = plot_top + row_h * len(rows)

    def px(v: float) -> float:
        return label_w + (min(max(v, lo_d), hi_d) - lo_d) / (hi_d - lo_d) * plot_w

    body = parts + [f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{plot_top}" y2="{base}" stroke="{GRID}"/>'
                    for t in (lo_d + (hi_d - lo_d) * q for q in (.25, .5, .75, 1))]
    for i, r in enumerate(rows):
        y = plot_top + i * row_h
        body.append(_text(label_w - 8, y + row_h / 2 + 4, r["label"], 12, "end"))
        v, lo, hi = r.get("value"), r.get("low"), r.get("high")
        if v is None:
            body.append(_text(label_w + 4, y + row_h / 2 + 4, "not measured", 11))
            continue
        tip = f"{r['label']}: {r.get('text') or pct(v)}" + (
            f" ({interval}: {r.get('interval_text') or f'{pct(lo)}–{pct(hi)}'})"
            if lo is not None and hi is not None else "")
        if dots:
            body.append(f'<circle cx="{px(v):.1f}" cy="{y + row_h / 2:.1f}" r="5" fill="{r["color"]}">'
                        f"<title>{_e(tip)}</title></circle>")
        else:
            body.append(f'<rect x="{px(lo_d):.1f}" y="{y + 4:.1f}" width="{px(v) - px(lo_d):.1f}" '
                        f'height="{row_h - 8}" fill="{r["color"]}"><title>{_e(tip)}</title></rect>')
        if lo is not None and hi is not None:
            cy = y + row_h / 2
            body.append(f'<path d="M{px(lo):.1f} {cy:.1f}H{px(hi):.1f}M{px(lo):.1f} {cy - 4:.1f}v8'
                        f'M{px(hi):.1f} {cy - 4:.1f}v8" stroke="{INK}" stroke-width="1.2"/>')
        if r.get("note"):
            body.append(_text(label_w + plot_w + 10, y + row_h / 2 + 4, r["note"], 11))
    for v, what in dash:
        body.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{plot_top - 4}" y2="{base + 2}" '
                    f'stroke="{INK}" stroke-dasharray="4 3"><title>{_e(what)}</title></line>')
    body.append(f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{base}" y2="{base}" stroke="{INK}"/>')
    body += _axis(label_w, base, plot_w, (0, .25, .5, .75, 1), vertical=False,
                  fmt=lambda q: tick(lo_d + q * (hi_d - lo_d)))
    body.append(_text(label_w + plot_w / 2, base + 34, x_label, 11, "middle"))
    return _svg(width, base + 42, title, desc, body)


def curves(xs: Sequence[int], lines: Sequence[dict], *, title: str, desc: str, x_label: str,
           y_label: str, band: dict | None = None, target: tuple[float, str] | None = None) -> str:
    """Lines over the positions ``xs`` (equally spaced: a doubling grid such as 1, 2, 4, …),
    values in [0, 1]: each of ``lines`` is ``{"label", "values", "color"}`` (a value None leaves a
    gap); ``band`` ``{"label", "low", "high", "color"}`` a shaded interval behind them; ``target``
    (value, what it is) a dashed horizontal line. Every point carries its ``<title>``. Returns
    the ``<svg>`` element."""
    left, top, plot_w, plot_h = 56, 30, max(60 * (len(xs) - 1), 240), 200
    items = [(ln["color"], ln["label"]) for ln in lines] + ([(band["color"], band["label"])]
                                                           if band else [])
    legend, below = _swatches(left, top - 12, items, plot_w)
    if target is not None:
        legend.append(f'<path d="M{left} {below + 2:.1f}h14" stroke="{INK}" stroke-dasharray="4 3"/>')
        legend.append(_text(left + 20, below + 6, target[1], 11))
        below += 16
    plot_top = below + 10
    base = plot_top + plot_h

    def px(i: int) -> float:
        return left + (plot_w * i / (len(xs) - 1) if len(xs) > 1 else plot_w / 2)

    def py(v: float) -> float:
        return base - max(0.0, min(1.0, v)) * plot_h

    body = legend + [f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                     f'stroke="{GRID}"/>' for t in (.25, .5, .75, 1)]
    body += _axis(left - 6, base, plot_h, (0, .25, .5, .75, 1), vertical=True)
    if band:
        pts = [(px(i), py(h)) for i, h in enumerate(band["high"]) if h is not None]
        pts += [(px(i), py(lo)) for i, lo in reversed(list(enumerate(band["low"]))) if lo is not None]
        if pts:
            body.append(f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" '
                        f'fill="{band["color"]}" opacity="0.45"><title>{_e(band["label"])}</title>'
                        "</polygon>")
    if target is not None:
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(target[0]):.1f}" '
                    f'y2="{py(target[0]):.1f}" stroke="{INK}" stroke-dasharray="4 3">'
                    f"<title>{_e(target[1])}: {pct(target[0])}</title></line>")
    for ln in lines:
        pts = [(i, v) for i, v in enumerate(ln["values"]) if v is not None]
        if len(pts) > 1:
            d = "M" + "L".join(f"{px(i):.1f} {py(v):.1f}" for i, v in pts)
            body.append(f'<path d="{d}" fill="none" stroke="{ln["color"]}" stroke-width="2"/>')
        body += [f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3.5" fill="{ln["color"]}">'
                 f"<title>{_e(ln['label'])}, k = {xs[i]}: {pct(v)}</title></circle>" for i, v in pts]
    body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="{INK}"/>')
    body += [_text(px(i), base + 17, k, 10, "middle") for i, k in enumerate(xs)]
    body.append(_text(left + plot_w / 2, base + 34, x_label, 11, "middle"))
    body.append(f'<text transform="translate(14 {plot_top + plot_h / 2:.0f}) rotate(-90)" '
                f'font-size="11" text-anchor="middle" fill="{INK}">{_e(y_label)}</text>')
    return _svg(left + plot_w + 20, base + 42, title, desc, body)


def share_color(share: float | None) -> str:
    """The overview's fill for a share in [0, 1] (pale cream at 0, brick red at 1; grey if None)."""
    if share is None:
        return "#EEEEEE"
    s = max(0.0, min(1.0, share))
    return "#" + "".join(f"{round(a + s * (b - a)):02X}" for a, b in zip(LOW, HIGH, strict=True))


def matrix(row_labels: Sequence[str], col_labels: Sequence[str],
           cells: Sequence[Sequence[tuple[float | None, str, str] | None]], *, title: str, desc: str,
           heading: str = "", row_head: str = "", col_head: str = "") -> str:
    """A labelled matrix: ``cells[i][j] = (share, text, tip)`` filled by :func:`share_color`,
    ``text`` written in it (a newline: a second, smaller line) and ``tip`` on hover (None: an
    empty cell). ``heading`` above, ``row_head`` over the row labels, ``col_head`` over the
    columns; each column as wide as its widest label or text. Returns the ``<svg>``."""
    texts = [[(c[1] if c else "").split("\n") for c in row] for row in cells]
    widths = [max([46, _width(col, 11) + 10]
                  + [_width(t[0], 11) + 10 for row in texts for t in [row[j]] if j < len(row)]
                  + [_width(t[1], 10) + 10 for row in texts for t in [row[j]] if j < len(row) and
                     len(t) > 1]) for j, col in enumerate(col_labels)]
    xs = [sum(widths[:j]) for j in range(len(widths))]
    two = any(len(t) > 1 for row in texts for t in row)
    cell_h = 36 if two else 26
    label_w = max([_width(r, 12) for r in row_labels] + [_width(row_head, 11)]) + 14
    top = (22 if heading else 4) + (16 if col_head else 0) + 18
    body = [_text(4, 16, heading, 13, weight="bold")] if heading else []
    if col_head:
        body.append(_text(label_w + sum(widths) / 2, top - 22, col_head, 11, "middle"))
    if row_head:
        body.append(_text(4, top - 6, row_head, 11))
    for j, c in enumerate(col_labels):
        body.append(_text(label_w + xs[j] + widths[j] / 2, top - 6, c, 11, "middle"))
    for i, r in enumerate(row_labels):
        y = top + i * cell_h
        body.append(_text(4, y + cell_h / 2 + 4, r, 12))
        for j, cell in enumerate(cells[i]):
            if cell is None:
                continue
            share, _, tip = cell
            x, w = label_w + xs[j], widths[j] - 2
            ink = "#FFFFFF" if share is not None and share > 0.5 else INK
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{cell_h - 2}" '
                        f'fill="{share_color(share)}"><title>{_e(tip)}</title></rect>')
            lines = texts[i][j]
            if len(lines) > 1:
                body.append(_text(x + w / 2, y + 15, lines[0], 11, "middle", ink))
                body.append(_text(x + w / 2, y + 28, lines[1], 10, "middle", ink))
            else:
                body.append(_text(x + w / 2, y + cell_h / 2 + 3, lines[0], 11, "middle", ink))
    return _svg(label_w + sum(widths) + 6, top + cell_h * len(row_labels) + 4, title, desc, body)


def _ramp(colors: Sequence[str], labels: Sequence[tuple[float, str]], *, title: str, desc: str,
          caption: str, width: int = 240) -> str:
    """A colour ramp of ``colors`` (equally spaced, left to right) as adjacent rectangles (no
    gradient: no element id to collide in a page of many legends), ticks at ``labels``."""
    step = width / len(colors)
    body = [_text(4, 13, caption, 11)]
    body += [f'<rect x="{10 + i * step:.2f}" y="20" width="{step + 0.3:.2f}" height="12" fill="{c}"/>'
             for i, c in enumerate(colors)]
    body.append(f'<rect x="10" y="20" width="{width}" height="12" fill="none" stroke="{GRID}"/>')
    for o, s in labels:
        x = 10 + o * width
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="32" y2="36" stroke="{INK}"/>')
        body.append(_text(x, 48, s, 10, "start" if o == 0 else "end" if o == 1 else "middle"))
    return _svg(max(width + 20, _width(caption, 11) + 10), 54, title, desc, body)


def heat_legend(colors: Sequence[str]) -> str:
    """The signed heatmap's legend: ``colors`` sampled from the heatmap itself from −max to +max
    (blue, white at 0, red). Returns the ``<svg>``."""
    return _ramp(colors, [(0, "−max (lowers)"), (0.5, "0"), (1, "+max (raises)")],
                 title="Colour scale of the heatmaps",
                 desc="Blue on the left: attribution that lowers the quantity, at minus the map's "
                      "largest magnitude; white in the middle: 0; red on the right: attribution that "
                      "raises it, at plus the largest magnitude. Each map is scaled to its own largest "
                      "magnitude.",
                 caption="attribution: red raises the quantity, blue lowers it")


def share_legend(what: str) -> str:
    """The overview matrix's legend: ``what`` (a share), 0% to 100%. Returns the ``<svg>``."""
    return _ramp([share_color(q / 40) for q in range(41)], [(0, "0%"), (0.5, "50%"), (1, "100%")],
                 title=f"Colour scale of the matrix: {what}",
                 desc=f"Pale cream at 0% to brick red at 100%: {what}. Grey: no verdict.",
                 caption=what)

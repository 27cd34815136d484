"""Pictures for any case: grey (H, W) or colour (H, W, 3) images in [0, 1] (or 0-255) enlarged to a
readable size, the region tinted or outlined, interpretations as masks, heatmaps and overlays, image
grids with row labels and a legend, and one colour per model on every page. Returns uint8 RGB
arrays (NumPy); nothing here draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Pictures for any case: grey (H, W) or colour (H, W, 3) images in [0, 1]


def scale_for(size: Sequence[int] | None, target: int = 128) -> int:
    """How many screen pixels per image pixel make an image about ``target`` pixels wide."""
    if not size:
        return 4
    return max(1, int(round(target / max(int(s) for s in size))))


def tile_width(n: int, room: int = 776, gap: int = 4, lo: int = 84, hi: int = 128) -> int:
    """Screen width (px) of one tile in a row of ``n`` images that should fit on one line ``room``
    pixels wide (a wide page at 1400 px, the row's label beside it) with ``gap`` pixels between
    tiles, kept within ``lo``–``hi`` (a 28×28 digit stays readable; a row of a few images does not
    blow up to the page's width)."""
    n = max(1, int(n))
    return int(max(lo, min(hi, (room - gap * (n - 1)) // n)))


def tile_scale(size: Sequence[int] | None, n: int, room: int = 790, gap: int = 2, hi: int = 128) -> int:
    """The whole number of screen pixels per image pixel that draws ``n`` images of ``size`` on
    one line ``room`` pixels wide (about :func:`tile_width`), each at most ``hi`` pixels (unless
    one image pixel is already more): a whole number keeps every pixel square and sharp, and the
    image is drawn at its own width (never resized)."""
    side = max(int(s) for s in size) if size else 28
    n = max(1, int(n))
    scale = max(1, int(round(tile_width(n, room=room, gap=gap, hi=hi) / side)))
    while scale > 1 and (scale * side * n + gap * (n - 1) > room or scale * side > hi):
        scale -= 1
    return scale


def _rgb01(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) → (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size and np.nanmax(a) > 1.5:
        a = a / 255.0
    a = np.clip(np.nan_to_num(a), 0, 1)
    return np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]


def _enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    return rgb if scale <= 1 else rgb.repeat(scale, 0).repeat(scale, 1)


def picture(x, scale: int = 4) -> np.ndarray:
    """An image (H, W) or (H, W, 3) in [0, 1] (or 0–255) → enlarged uint8 RGB, shades kept."""
    return _enlarge((_rgb01(x) * 255).round().astype(np.uint8), int(scale))


def tinted(x, mask, scale: int = 4) -> np.ndarray:
    """The image with the region's pixels tinted red (visible on any background)."""
    rgb = _rgb01(x) * 255
    if mask is not None:
        m = np.asarray(mask, bool)
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([230.0, 40.0, 40.0])
    return _enlarge(rgb.round().astype(np.uint8), int(scale))


def outlined(x, mask, scale: int = 4, color: tuple[int, int, int] = (230, 40, 40)) -> np.ndarray:
    """The image enlarged by ``scale`` with the region's boundary drawn in ``color`` (the pixels of
    the region that touch a pixel outside it, after enlarging); the image itself is unchanged."""
    rgb = picture(x, scale)
    if mask is None:
        return rgb
    m = np.asarray(mask, bool)
    m = m.repeat(int(scale), 0).repeat(int(scale), 1)
    pad = np.pad(m, 1, constant_values=False)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = m & ~inner
    if int(scale) >= 4:  # a two-pixel line where the picture is large enough to carry it
        pe = np.pad(edge, 1, constant_values=False)
        edge = m & (pe[:-2, 1:-1] | pe[2:, 1:-1] | pe[1:-1, :-2] | pe[1:-1, 2:] | edge)
    out = rgb.copy()
    out[edge] = np.array(color, dtype=np.uint8)
    return out


def masked(x, attr, scale: int = 4, q: float = 95.0, dim: float = 0.25) -> np.ndarray:
    """The paper's view of an interpretation: the image kept where its attribution is above the
    ``q``-th percentile (softly blurred, tinted red), dimmed elsewhere; colour kept."""
    from core.methods import imaging

    m = imaging.percentile_mask(attr, q)[..., None]
    rgb = _rgb01(x) * (dim + (1 - dim) * m)
    rgb[..., 0] = np.clip(rgb[..., 0] + 0.6 * m[..., 0], 0, 1)
    return _enlarge((rgb * 255).round().astype(np.uint8), int(scale))


def heatmap(attr, scale: int = 4) -> np.ndarray:
    """Signed heatmap (red raises, blue lowers, white neutral), scaled to its largest magnitude."""
    from core.methods import imaging

    return imaging.heatmap(attr, scale=int(scale))


def overlay(x, attr, scale: int = 4, alpha: float = 0.55) -> np.ndarray:
    """The signed heatmap blended over the image (colour kept)."""
    from core.methods import imaging

    heat = imaging.heatmap(attr).astype(np.float64) / 255
    out = ((1 - alpha) * _rgb01(x) + alpha * heat) * 255
    return _enlarge(np.clip(out, 0, 255).round().astype(np.uint8), int(scale))


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 4, background: int = 255) -> np.ndarray:
    """Tile equally sized uint8 RGB images (a list of rows) into one RGB array with ``pad`` pixels."""
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        return np.full((1, 1, 3), background, np.uint8)
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = np.asarray(img, np.uint8)[..., :3] if img.ndim == 3 else img[..., None]
    return out


# Okabe & Ito's palette: told apart with the common colour-vision deficiencies.
PALETTE = ["#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]


def model_colors(names: Sequence[str], facts: dict | None = None) -> dict[str, str]:
    """One colour per model, the same on every page: the model under study vermillion, its
    reference blue, every other model (controls, corrections) the next colours in ``names``'s
    order."""
    facts = facts or {}
    first = [m for m in (facts.get("subject"), facts.get("reference")) if m]
    ordered = list(dict.fromkeys([*first, *[str(n) for n in names]]))
    if facts.get("subject") is None and facts.get("reference") is not None:
        ordered.insert(0, "\0")  # keep blue for the reference
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(ordered)}
    return {str(n): colors[str(n)] for n in names}


def heat_legend(width: int = 240, height: int = 12) -> np.ndarray:
    """The signed heatmap's colour ramp as an image (uint8 RGB, ``width`` × ``height``): blue at
    −max on the left, white at 0, red at +max on the right (core.methods.imaging.heatmap's colours)."""
    from core.methods import imaging

    ramp = np.linspace(-1.0, 1.0, int(width))[None, :].repeat(int(height), 0)
    ramp[0, 0], ramp[0, -1] = -1.0, 1.0  # the ramp's own max is 1: no rescaling
    return imaging.heatmap(ramp)


# The ramp's alt text (what heat_legend draws, in words).
HEAT_LEGEND_ALT = ("Colour scale: blue on the left (lowers the score), white in the middle (0), red on "
                   "the right (raises it)")
HEAT_SCALE_NOTE = ("Colour scale: blue lowers, white is 0, red raises; each tile is scaled to its own "
                   "largest |attribution| (full red = +max, full blue = −max of that tile).")


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], title: str,
                  footer: str = "", pad: int = 4) -> np.ndarray:
    """:func:`image_grid` with a title above, one label left of each row and a footer (the
    legend) below, drawn in Pillow's built-in font: a PNG that says what it shows on its own."""
    from PIL import Image, ImageDraw, ImageFont

    grid = image_grid(rows, pad=pad)
    font = ImageFont.load_default()
    line = 16
    labels = [_wrap(x, 10_000)[0] for x in row_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([int(measure.textlength(x, font=font)) for x in labels] or [0]) + 2 * pad
    footer_lines = _wrap(footer, max(40, (grid.shape[1] + label_w) // 7)) if footer else []
    title_lines = _wrap(title, max(40, (grid.shape[1] + label_w) // 7))
    h = grid.shape[0] + line * (len(title_lines) + len(footer_lines)) + 2 * pad
    w = grid.shape[1] + label_w
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    top = pad + line * len(title_lines)
    canvas.paste(Image.fromarray(grid), (label_w, top))
    draw = ImageDraw.Draw(canvas)
    ink = (31, 35, 40)
    for i, t in enumerate(title_lines):
        draw.text((pad, pad + i * line), t, fill=ink, font=font)
    if rows and len(rows[0]):
        row_h = rows[0][0].shape[0] + pad
        for i, t in enumerate(labels[:len(rows)]):
            draw.text((pad, top + pad + i * row_h + max(0, row_h // 2 - line // 2)), t, fill=ink,
                      font=font)
    for i, t in enumerate(footer_lines):
        draw.text((pad, top + grid.shape[0] + i * line), t, fill=ink, font=font)
    return np.asarray(canvas)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, with the few symbols the built-in font
    lacks spelled in ASCII."""
    import textwrap

    ascii_ = str(text).translate(str.maketrans({"−": "-", "→": ">", "≥": ">=", "≤": "<=", "·": "|"}))
    return textwrap.wrap(ascii_, width=width) or [""]


"""Drawing pictures accessibly: every image gets an alt text (what it shows: unit, class, image,
view), never the empty alt that makes a screen reader skip it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import streamlit as st

# Markdown's emphasis and code marks; the invisible word joiners inert() puts in a case's strings
# stay (a screen reader skips them, and they keep an address in a name from becoming a link).
_MARKUP = re.compile(r"[*`]")


def alt_text(*parts: Any) -> str:
    """The non-empty ``parts`` joined into one line of plain words (Markdown's ``*`` and `````
    marks removed): an image's alt text."""
    words = [" ".join(_MARKUP.sub("", str(p)).split()) for p in parts if p not in (None, "")]
    return ": ".join(w for w in words if w) or "image"


def image(images: Any, caption: str | Sequence[str] | None = None, *, about: str = "",
          alt: str | Sequence[str] | None = None, where: Any = None, **kwargs: Any) -> Any:
    """``st.image`` (or ``where.image``) with an alt text on every image: ``alt`` as given, else
    ``about`` (what the whole row shows: model, layer, view) and the image's own caption. Returns
    what ``st.image`` returns."""
    where = where if where is not None else st
    many = isinstance(images, (list, tuple))
    n = len(images) if many else 1
    caps = list(caption) if isinstance(caption, (list, tuple)) else [caption] * n
    if alt is None:
        alt = [alt_text(about, c) for c in caps]
    elif isinstance(alt, str):
        alt = [alt] * n
    return where.image(images, caption=caption, alt=list(alt) if many else alt[0], **kwargs)


def quoted_first(table: Any, first: Sequence[str]) -> list[str]:
    """A ``column_order`` for ``st.dataframe``: the columns of ``table`` named in ``first`` (those the
    page's text quotes, beside the row's label), in that order, then every other column in its own
    order. Names ``table`` lacks are left out; no column is hidden."""
    cols = [str(c) for c in getattr(table, "columns", [])]
    head = [c for c in dict.fromkeys(str(f) for f in first) if c in cols]
    return head + [c for c in cols if c not in head]


# Chart text on the white page: the theme's text colour (.streamlit/config.toml), at ≥ 15:1 contrast
# (Vega's and Streamlit's defaults draw axis labels in a faded grey at 3.7:1; WCAG AA asks 4.5:1).
CHART_INK = "#1F2328"


def contrast(fg: str, bg: str = "#FFFFFF") -> float:
    """WCAG contrast ratio of two ``#RRGGBB`` colours (1 to 21)."""
    def lum(hex_: str) -> float:
        rgb = [int(hex_.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def accessible(chart: Any, title: str) -> Any:
    """``chart`` (an Altair chart) with ``title`` as its accessible description (the ARIA label
    Vega gives the drawing) and its axis, legend and title text in :data:`CHART_INK`."""
    return (chart.properties(description=alt_text(title))
            .configure_axis(labelColor=CHART_INK, titleColor=CHART_INK)
            .configure_legend(labelColor=CHART_INK, titleColor=CHART_INK)
            .configure_title(color=CHART_INK))


def chart(chart_: Any, title: str, data: Any = None, *, where: Any = None, **kwargs: Any) -> Any:
    """Draw an Altair chart accessibly (:func:`accessible`) with, below it, its table alternative:
    ``data`` (a DataFrame: what the chart plots) as a plain HTML table (``st.table``: read by a
    screen reader cell by cell) in an expander "Table: <title>". ``kwargs`` go to
    ``st.altair_chart``; returns what it returns."""
    where = where if where is not None else st
    out = where.altair_chart(accessible(chart_, title), **kwargs)
    if data is not None:
        with where.expander(f"Table: {alt_text(title)}"):
            st.table(data.reset_index(drop=True) if hasattr(data, "reset_index") else data)
    return out

"""Plain text for Markdown elements and the formatting of numbers: ``plain`` (a case's string shown
literally), ``inert`` (the same string safe in Markdown and in plain widgets alike), ``pct``, ``pp``,
``set_label``, ``no_region_note``, ``cannot_tell`` (a test that cannot discriminate, in words).
Pure functions: no Streamlit call, no state."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import numpy as np

from core.report.degenerate import cannot_tell  # noqa: F401 — the pages' words for it

# ----------------------------------------------------------------------------------------------
# Plain text


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>$:~])")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/,;]+){2,}")


_WJ = "\u2060"  # WORD JOINER: invisible; between two characters it keeps them from forming markup
# what Markdown (GitHub-flavoured, as Streamlit draws it) turns into a live link or image even
# with its punctuation escaped: bare web addresses and e-mail addresses, found in the text after
# the escapes are resolved; and, for inert(), a ] that closes a link's text, an image's !, a <
_AUTOLINK = re.compile(r"(?i)(?<=www)(?=\.)|(?<=[@:])(?=\S)")
_INERT = re.compile(r"(?i)(?<=www)(?=\.)|(?<=[@:<$])(?=\S)|(?<=!)(?=\[)|(?<=\])(?=[(\[:])")


def _one_line(text: Any) -> str:
    """``text`` on one line, without Unicode format (Cf) or control (Cc) characters: a
    right-to-left override cannot reorder what follows it."""
    return "".join(ch for ch in " ".join(str(text).split())
                   if unicodedata.category(ch) not in ("Cf", "Cc"))


def plain(text: Any, limit: int = 300) -> str:
    """``text`` as one line that Markdown shows literally: no links (not even a bare web or e-mail
    address), images, emphasis, directives or LaTeX; no format or control characters; file paths
    shortened to their last part; at most ``limit`` characters. For a Markdown element (markdown,
    caption, title, alerts, metric, tab and expander labels)."""
    s = _one_line(text)
    s = _PATH.sub(lambda m: "…/" + re.split(r"[\\/]", m.group(0))[-1], s)
    if len(s) > limit:
        s = s[:limit - 1] + "…"
    return _AUTOLINK.sub(_WJ, _MD_SPECIAL.sub(r"\\\1", s))


def inert(text: Any) -> str:
    """``text`` as it reads, on one line and without format or control characters, with an
    invisible word joiner inside ``](``, ``][``, ``]:``, ``![`` and ``www.``, and after a ``<``,
    ``:``, ``@`` or ``$`` that a space does not follow (plain prose is left as it is):
    the same string in a Markdown element cannot become a link, an image, an address, HTML, a
    directive or math, and it reads unchanged where text is drawn as it is (selectbox options,
    table cells, chart labels). For a case's names in helpers that serve both (class and model
    names, the region's name)."""
    return _INERT.sub(_WJ, _one_line(text))


# ----------------------------------------------------------------------------------------------
# Formatting


def _missing(x: Any) -> bool:
    try:
        return x is None or not np.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if _missing(x) else f"{100 * float(x):.{digits}f}%"


def pp(x: float | None, digits: int = 1) -> str:
    """A difference of two shares in percentage points."""
    return "—" if _missing(x) else f"{100 * float(x):+.{digits}f} pp"


def set_label(name: str) -> str:
    """An evaluation or training set's key as words: ``decoy_test`` → ``decoy test``."""
    return str(name).replace("_", " ")


def no_region_note(facts: dict | None = None) -> str:
    return ("This case names no region (no per-image mask of a suspected shortcut), so there are no "
            "localisation measures and no shortcut verdicts here; the influence views still show "
            "where each model looks.")


"""Downloads, deferred: the bytes are made only when the reader clicks (CSV, JSON, PNG and the HTML
report)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import streamlit as st

from .state import current_case
from .text import _PATH

# ----------------------------------------------------------------------------------------------
# Downloads (deferred: bytes are made when the reader clicks)


def _to_json(obj: Any) -> str:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.dumps(obj, indent=2, default=default)


def case_file_name(file_name: str, case: str | None = None) -> str:
    """``file_name`` prefixed with the case's name (default: the sidebar's case), in the characters a
    file name keeps everywhere (``A-Za-z0-9_.-``): ``decoy-mnist-experts.csv``. A name that already
    starts with it is returned as it is."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(case if case is not None else current_case())).strip("-.")
    safe = safe or "case"
    return file_name if file_name.startswith(f"{safe}-") else f"{safe}-{file_name}"


def download_csv(df, file_name: str, label: str = "Download CSV", key: str | None = None, where=None):
    """A CSV download of ``df`` (made on click) named ``<case>-<file_name>``."""
    where = where if where is not None else st
    return where.download_button(label, data=lambda: df.to_csv(index=False).encode(),
                                 file_name=case_file_name(file_name),
                                 mime="text/csv", key=key or f"dl-{file_name}", on_click="ignore",
                                 icon=":material/download:")


def download_json(obj: Any, file_name: str, label: str = "Download JSON", key: str | None = None,
                  where=None):
    """A JSON download of ``obj`` (made on click) named ``<case>-<file_name>``."""
    where = where if where is not None else st
    return where.download_button(label, data=lambda: _to_json(obj).encode(),
                                 file_name=case_file_name(file_name),
                                 mime="application/json", key=key or f"dl-{file_name}",
                                 on_click="ignore", icon=":material/download:")


def png_bytes(image) -> bytes:
    """PNG bytes of a uint8 RGB array (or a PIL image)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def download_png(make: Callable[[], Any] | Any, file_name: str, label: str = "Download PNG",
                 key: str | None = None, where=None):
    """A PNG download named ``<case>-<file_name>``: ``make`` is an RGB array / PIL image or a
    callable returning one (called on click)."""
    where = where if where is not None else st
    data = (lambda: png_bytes(make())) if callable(make) else png_bytes(make)
    return where.download_button(label, data=data, file_name=case_file_name(file_name), mime="image/png",
                                 key=key or f"dl-{file_name}", on_click="ignore",
                                 icon=":material/download:")


def report_html_bytes(study) -> bytes:
    """``core.report.html.html_report(study)`` as UTF-8 bytes; on failure, a page whose body is one
    escaped line saying why (the download never raises in the reader's face)."""
    import html

    try:
        from core.report.html import html_report

        return html_report(study).encode()
    except Exception as exc:  # noqa: BLE001 - any failure becomes one readable line
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        text = _PATH.sub(lambda m: "…/" + re.split(r"[\\/]", m.group(0))[-1], text)  # no server paths
        line = html.escape(text[:300])
        return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report not "
                f"available</title></head><body><p>Could not make the report: {line}</p></body></html>\n"
                ).encode()


def download_report(study, label: str = "Download the report (HTML)", key: str = "dl-report-html",
                    where=None):
    """The case's self-contained HTML report (tables, figures, provenance), made only on click, as
    ``<case>-report.html``."""
    where = where if where is not None else st
    name = case_file_name("report.html", getattr(study, "name", None) or None)
    return where.download_button(label, data=lambda: report_html_bytes(study), file_name=name,
                                 mime="text/html", key=key,
                                 on_click="ignore", icon=":material/description:",
                                 help="One HTML file with every built table and figure (embedded) "
                                      "and the provenance; it opens offline.")


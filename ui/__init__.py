# ruff: noqa: F401  (the package re-exports its modules' names: chapters and tests use ui.<name>)
"""Shared helpers for every chapter of the report (this package imports Streamlit; ``core`` never
does). Chapters ``import ui`` and use the names below; each lives in one module:

- ``ui.opening``: ``chapter(stages, title, intro)``, the one opening every chapter uses (title,
  introduction, the model and budget warnings, the gate for its stages: live progress of the
  background build, or an offer to build here); ``model_warnings``, ``budget_note``,
  ``draw_findings`` and ``next_chapter`` (the "next" link at a chapter's end).
- ``ui.state``: the open :class:`core.casestudy.CaseStudy` (``current_study()``; ``st.cache_resource``
  on the case name, cache folder and device, shared across sessions, so chapters never mutate its
  models; a case is named, never a path: ``allow_path=False``); the sidebar's state
  (``current_case()``, ``current_model()``, ``current_device()``); deep links (``qp_get`` /
  ``qp_set`` and ``choice(...)``, a widget whose default is read from ``st.query_params`` and whose
  value is written back there, so a copied URL reopens the same view); ``STAGES``.
- ``ui.readers``: cached readers keyed on strings, never on tensors, all made by one factory
  (``cached_reader``): ``report()``, ``status()``, ``artifact(stage)``, ``samples(split, n)``,
  ``experts(model, layer, cls)``, ``experts_for(model, layer, qoi, doi)``, ``facts(study)``
  (``study.case_facts()``: chapters read every case-specific word from it), ``model_names``.
- ``ui.words``: class, model and region names as a chapter shows them, accuracy columns, held-out
  sets, correction labels, the discovery headline and the rule's caveat.
- ``ui.text``: ``plain(text)`` (safe in a Markdown element: no links, no formatting, no paths),
  ``inert(text)`` (a case's name, safe in Markdown and in plain widgets), ``pct``, ``pp``.
- ``ui.progress``: ``build_missing(study, stages)`` (``study.build`` inside ``st.status`` with a
  progress bar and a readable error), ``require(study, stages, what)``, ``run_with_status``, and the
  background build's live progress (``progress_panel``).
- ``ui.figures``: pictures for any case (``picture``, ``tinted``, ``outlined``, ``masked``,
  ``overlay``, ``heatmap``), grids with row labels, one colour per model.
- ``ui.drawing``: ``image`` (``st.image`` with an alt text on every image) and ``chart`` (an Altair
  chart with an accessible title, text at ≥ 4.5:1 contrast and a table alternative).
- ``ui.downloads``: ``download_csv``, ``download_json``, ``download_png``, ``download_report`` (the
  HTML report); deferred: the bytes are made only when the reader clicks.

A test's stand-in for ``ui.current_study`` (``monkeypatch.setattr(ui, "current_study", ...)``) is
seen by every reader: they look it up on this package when called without a study.
"""

from __future__ import annotations

from .downloads import (
    _to_json,
    case_file_name,
    download_csv,
    download_json,
    download_png,
    download_report,
    png_bytes,
    report_html_bytes,
)
from .drawing import CHART_INK, accessible, alt_text, chart, contrast, image
from .figures import (
    HEAT_LEGEND_ALT,
    HEAT_SCALE_NOTE,
    PALETTE,
    heat_legend,
    heatmap,
    image_grid,
    labelled_grid,
    masked,
    model_colors,
    outlined,
    overlay,
    picture,
    scale_for,
    tinted,
)
from .opening import budget_note, chapter, draw_findings, model_warnings, next_chapter
from .progress import (
    background_enabled,
    background_state,
    build_missing,
    compute_experts_for,
    ensure_background_build,
    missing,
    progress_panel,
    require,
    run_with_status,
)
from .readers import (
    _GENERATION,
    _LAST_FACTS,
    Reader,
    _artifact,
    _correction_models,
    _experts,
    _experts_for,
    _facts,
    _has_experts_for,
    _report,
    _samples,
    _status,
    artifact,
    cached_reader,
    experts,
    experts_for,
    facts,
    has_experts_for,
    invalidate,
    model_names,
    report,
    samples,
    stamp,
    status,
)
from .state import (
    DEFAULT_CASE,
    HOME_PAGE,
    STAGES,
    _open_study,
    asked_case,
    available_devices,
    choice,
    current_case,
    current_device,
    current_model,
    current_study,
    default_case,
    list_cases,
    open_study,
    page_url,
    qp_get,
    qp_set,
    stage_exists,
    study_key,
)
from .text import _PATH, cannot_tell, inert, no_region_note, pct, plain, pp, set_label
from .words import (
    accuracy_columns,
    class_name,
    correction_labels,
    discovery_headline,
    held_out_sets,
    model_label,
    region_name,
    rule_caveat,
    threshold_term,
)

__all__ = [n for n in dir() if not n.startswith("__") and n != "annotations"]

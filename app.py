"""Influence Casebook: the report's entrypoint (page config, navigation, the shared sidebar).

Run with ``streamlit run app.py`` (``make run`` builds the default case's data first; the rest is
built behind the report by one background worker per cache, whose progress the sidebar shows). The chapters
in ``chapters/`` only read what ``core`` computed; the sidebar picks the case (every built-in case
and every case under ``$CASEBOOK_CASES``, by name: never a path), the model and the device, and
shows which stages of the case are built. A chapter whose stage module does not exist yet is left
out of the navigation.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import ui

ROOT = Path(__file__).resolve().parent

# The favicon ships with the app (a Material or emoji icon is fetched from a font CDN, and the app
# runs offline).
FAVICON = str(ROOT / ".streamlit" / "favicon.png")
st.set_page_config(page_title="Influence Casebook", page_icon=FAVICON, layout="wide")


def _page(file: str, title: str, icon: str, url_path: str, default: bool = False):
    return st.Page(f"chapters/{file}", title=title, icon=icon, url_path=url_path, default=default)


sections: dict[str, list] = {
    "Case study": [
        # Streamlit serves the default page at the root only ("/case-study" popped "Page not
        # found"): the first chapter is the root, and its own path opens it too (hidden alias)
        _page("case_study.py", "The shortcut", ":material/science:", "the-shortcut", default=True),
        st.Page("chapters/case_study.py", title="The shortcut", icon=":material/science:",
                url_path=ui.HOME_PAGE, visibility="hidden"),
        _page("influence.py", "Influence & experts", ":material/hub:", "influence"),
        _page("overview.py", "Where the shortcut lives", ":material/grid_on:", "overview"),
        _page("one_image.py", "One image, end to end", ":material/timeline:", "one-image"),
    ],
}
if ui.stage_exists("discovery"):  # the shortcut no one marked, found and tested without masks
    sections["Case study"].insert(3, _page("suspects.py", "Suspects", ":material/search:",
                                           "suspects"))
# Chapters drawn from a stage join the navigation once the stage's module exists.
OPTIONAL = [("representations", "representations.py", "Representations compared", ":material/compare:",
             "representations"),
            ("corrections", "corrections.py", "Corrections", ":material/healing:", "corrections"),
            ("essence", "essence.py", "Essence & causal check", ":material/filter_alt:", "essence"),
            ("detection", "detection.py", "Attacks & detection", ":material/shield:", "detection")]
compare = [_page(*spec[1:]) for spec in OPTIONAL
           if ui.stage_exists(spec[0]) and (ROOT / "chapters" / spec[1]).exists()]
if compare:
    sections["Compare & correct"] = compare
sections["Background"] = [_page("method.py", "Method", ":material/menu_book:", "method")]

page = st.navigation(sections)
# The chapters that explain one model at a time (the sidebar's Model choice drives them).
MODEL_PAGES = {"influence": "Influence & experts", "one-image": "One image, end to end"}
# Each chapter's own title in the browser tab (and in bookmarks and history).
st.set_page_config(page_title=f"{page.title} · Influence Casebook")

# ---------------------------------------------------------------------------------------------- sidebar
with st.sidebar:
    st.caption("INFLUENCE CASEBOOK")
    cases = ui.list_cases()
    asked = ui.asked_case()
    if asked is not None and asked not in cases and "qp-case" not in st.session_state:
        # A URL names a case by its name only; anything else is said in one plain line (no path is
        # read, nothing of the server is revealed) and the default case opens.
        st.error(f"Unknown case {ui.plain(repr(asked[:60]))}; showing {ui.plain(ui.default_case(cases))}.")
    ui.choice("Case study", cases or [ui.default_case(cases)], param="case", default=ui.default_case(cases),
              help="Built-in cases and the cases in the folder named by $CASEBOOK_CASES.")
    try:
        study = ui.open_study()
    except Exception as exc:  # a malformed case: say so in one line, keep the app usable
        study = None
        st.error(f"Could not open {ui.plain(repr(ui.current_case()))}: {ui.plain(exc)}")
    devices = ui.available_devices()
    ui.choice("Device", devices, param="device", disabled=len(devices) == 1,
              format_func=lambda d: {"cuda": "CUDA (GPU)", "cpu": "CPU"}.get(d, d),
              help="Where models run when something must be computed. CUDA is offered when present.")
    if study is not None:
        try:
            built = ui.status(study)
            facts = ui.facts(study)
            models = ui.model_names(study)
            labels = ui.correction_labels(study) if built.get("corrections") else {}
        except Exception as exc:  # a broken cache must not take the sidebar down
            built, facts, labels = {}, {}, {}
            models = list(getattr(study, "model_names", None) or [])
            st.warning(f"Could not read the cache: {ui.plain(exc)}")
        if models:
            # The choice drives only the chapters that explain one model; elsewhere it is greyed
            # out (every model is shown there) but kept, so it is still set on the way back.
            explains_one = page.url_path in MODEL_PAGES
            ui.choice("Model to explain", models, param="model", default=facts.get("subject"),
                      format_func=lambda m: ui.model_label(m, labels, facts),
                      disabled=not explains_one,
                      help="The model the influence views explain: one of the case's models or a "
                           "correction of the model under study. It applies to "
                           + " and ".join(MODEL_PAGES.values())
                           + ("." if explains_one else "; this chapter shows every model."))
        st.markdown("**Cache**")
        done, todo = ":green[:material/check_circle:]", ":gray[:material/radio_button_unchecked:]"
        st.markdown("  \n".join(f"{done if built.get(s) else todo} {s}" for s in ui.STAGES))
        # What is not built is built behind the report (one background worker per cache); the
        # panel shows its live progress and the page fills in as stages land.
        if ui.progress_panel(study) is None:
            st.caption(f"{sum(map(bool, built.values()))}/{len(ui.STAGES)} stages built"
                       + (" · chapters offer to build what they need."
                          if not all(built.values()) else "."))
        if any(built.values()):
            ui.download_report(study)

page.run()

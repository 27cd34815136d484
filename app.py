"""Influence Casebook: the report's entrypoint (page config, navigation, the shared sidebar).

Run with ``streamlit run app.py`` (``make run`` builds the default case study first). The pages in
``pages/`` only read what ``core`` computed; the sidebar picks the case study, the model and the
device, and shows which stages of the case study are built.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import ui

ROOT = Path(__file__).resolve().parent

st.set_page_config(page_title="Influence Casebook", page_icon=":material/biotech:", layout="wide")


def _page(file: str, title: str, icon: str, url_path: str, default: bool = False):
    return st.Page(f"pages/{file}", title=title, icon=icon, url_path=url_path, default=default)


sections: dict[str, list] = {
    "Case study": [
        _page("case_study.py", "The shortcut", ":material/science:", "case-study", default=True),
        _page("influence.py", "Influence & experts", ":material/hub:", "influence"),
    ],
}
# Pages other engineers own join the navigation once their files exist.
OPTIONAL = [("representations.py", "Representations compared", ":material/compare:", "representations"),
            ("corrections.py", "Corrections", ":material/healing:", "corrections")]
compare = [_page(*spec) for spec in OPTIONAL if (ROOT / "pages" / spec[0]).exists()]
if compare:
    sections["Compare & correct"] = compare
sections["Background"] = [_page("method.py", "Method", ":material/menu_book:", "method")]

page = st.navigation(sections)

# ---------------------------------------------------------------------------------------------- sidebar
with st.sidebar:
    st.caption("INFLUENCE CASEBOOK")
    ui.choice("Case study", ui.list_cases(), param="case", default=ui.current_case(),
              help="Built-in case studies (cases/*.toml).")
    try:
        study = ui.open_study()
    except Exception as exc:  # an unknown or malformed case: say so, keep the app usable
        study = None
        st.error(f"Could not open {ui.current_case()!r}: {exc}")
    devices = ui.available_devices()
    ui.choice("Device", devices, param="device", disabled=len(devices) == 1,
              format_func=lambda d: {"cuda": "CUDA (GPU)", "cpu": "CPU"}.get(d, d),
              help="Where models run when something must be computed. CUDA is offered when present.")
    if study is not None:
        try:
            built = ui.status(study)
            models = ui.model_names(study) if built.get("models") else list(ui.BASE_MODELS)
            labels = ui.correction_labels(study) if built.get("corrections") else {}
        except Exception as exc:  # a broken cache must not take the sidebar down
            built, models, labels = {}, list(ui.BASE_MODELS), {}
            st.warning(f"Could not read the cache: {exc}")
        ui.choice("Model", models, param="model", format_func=lambda m: ui.model_label(m, labels),
                  help="The model the influence views explain: trained with the decoy (vanilla), "
                       "without it (clean), or a correction of the vanilla model.")
        st.markdown("**Cache**")
        done, todo = ":green[:material/check_circle:]", ":gray[:material/radio_button_unchecked:]"
        st.markdown("  \n".join(f"{done if built.get(s) else todo} {s}" for s in ui.STAGES))
        st.caption(f"{sum(map(bool, built.values()))}/{len(ui.STAGES)} stages built · pages offer "
                   "to build what they need.")

page.run()

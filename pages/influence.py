"""Chapter 2: influence and experts (being written)."""

import streamlit as st

import ui

study = ui.current_study()
st.title("Influence & experts")

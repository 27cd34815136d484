"""Issue 23 items 10–12: a case's own strings (title, description, region, class and model names)
are drawn as text, never as live Markdown. Every page of the app runs under Streamlit's AppTest
on a small tensors case whose strings are hostile, and no element it draws holds a link, an
image or a bare address to an external host; the report's Markdown keeps each name on its line
and in its table cell."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

import ui
from core.casestudy import CaseStudy
from core.report.markdown import markdown

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 180
HOST = "evil.example"
NAME = "hostile-strings"
# every chapter but the Suspects one (its own tests cover it)
CHAPTERS = ["chapters/case_study.py", "chapters/influence.py", "chapters/overview.py",
            "chapters/one_image.py", "chapters/representations.py", "chapters/corrections.py",
            "chapters/essence.py", "chapters/detection.py", "chapters/method.py",
            "chapters/suspects.py"]

NETS = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.flatten(self.relu1(self.conv1(x))))
'''
TOML = f'''
title = "[Download the corrected model](https://{HOST}/t) ![t](http://{HOST}/t.png)"
description = "See ![p](http://{HOST}/d.png) and www.{HOST} or <https://{HOST}/a> or me@{HOST}"

[dataset]
source = "tensors"
path = "data.pt"
classes = ["[cat](https://{HOST}/c)", "![dog](http://{HOST}/i.png)"]

[region]
name = "[patch](https://{HOST}/r)"

[experts]
layers = ["conv1"]
bootstrap = 4
n_images = 2
resolution = 2

[representations]
n_images = 8
n_mprt = 2
methods = ["saliency", "integrated_gradients"]

[essence]
random_draws = 2
n_rank = 5
fills = ["mean"]
n_confused = 1

[corrections]
methods = ["suppression", "pclarc"]
n_explain = 8
explain_resolution = 2

[corrections.suppression]
n_units = [1]
damping = [0.0]
candidates = 1
n_images = 4
resolution = 2

[detection]
steps = 1
n_fit = 10
n_attack_fit = 4
n_eval = 6
resolution = 2
k = 2
n_examples = 1
adaptive = false

[models."www.{HOST}"]
factory = "nets:Net"
training = {{ epochs = 1 }}

[models.clean]
factory = "nets:Net"
training = {{ epochs = 1 }}
'''


# ------------------------------------------------------------------ what a live link looks like

def _resolve(text: str) -> list[tuple[str, bool]]:
    """``text`` as (character, escaped) pairs: a backslash before ASCII punctuation escapes it."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~""":
            out.append((text[i + 1], True))
            i += 2
        else:
            out.append((text[i], False))
            i += 1
    return out


# GFM's literal autolinks: www. after the start, a space or one of *_~( ; http(s):// after no
# letter; an e-mail address anywhere (each found in the text once its escapes are resolved)
_BARE = re.compile(r"(?i)(?:(?:^|(?<=[\s*_~(]))www\.|(?<![a-z])https?://)[^\s<]*"
                   + re.escape(HOST) + r"|[\w.+-]@" + re.escape(HOST))
_EXTERNAL = re.compile(r"(?i)\s*<?(?:[a-z][a-z0-9+.-]*:|//)")  # a destination with a scheme


def live_links(text: str) -> list[str]:
    """The links, images and addresses to :data:`HOST` that GitHub-flavoured Markdown (what
    Streamlit draws) would make live in ``text``: ``[x](url)`` / ``![x](url)`` with unescaped
    brackets and a destination on another host (a relative link stays in the app),
    ``<scheme:…>`` autolinks, and bare web or e-mail addresses in the text once its escapes are
    resolved (the autolink extension finds those in the resolved text)."""
    chars = _resolve(text)
    plain_text = "".join(c for c, _ in chars)
    found, inside = [], []
    for i, (c, esc) in enumerate(chars[:-1]):
        nxt, nesc = chars[i + 1]
        if esc or nesc:
            continue
        if c == "]" and nxt in "([:":  # an inline or reference link, a definition
            rest = plain_text[i + 2:]
            end = rest.find(")") if nxt == "(" else len(rest)
            target = rest[:end if end >= 0 else len(rest)]
            if nxt == "(" and not _EXTERNAL.match(target):
                inside.append((i + 2, i + 2 + len(target)))  # relative: in the app
                continue
            found.append(plain_text[i:i + 60])
        elif c == "<" and re.match(r"[A-Za-z][A-Za-z0-9+.-]{1,31}:", plain_text[i + 1:]):
            found.append(plain_text[i:i + 60])
    found += [m.group(0) for m in _BARE.finditer(plain_text)
              if not any(a <= m.start() < b for a, b in inside)]
    return [f for f in found if HOST in f]


def test_the_checker_finds_what_markdown_would_link():
    assert live_links(f"[x](https://{HOST}/a)") and live_links(f"![p](http://{HOST}/p.png)")
    assert live_links(f"see www.{HOST} now") and live_links(f"me@{HOST}")
    assert live_links(f"<https://{HOST}>") and live_links(f"https\\://{HOST}")  # escapes resolve
    assert live_links(f"[x](//{HOST}/a)") and live_links(f"(www.{HOST})")
    assert not live_links(f"[x](influence?model=www.{HOST})") and not live_links(f"a=www.{HOST}")
    assert not live_links(f"\\[x\\]\\(https\\:\u2060//{HOST}\\)")
    assert not live_links(f"[x]\u2060(https:\u2060//{HOST})") and not live_links(f"www\u2060.{HOST}")
    for text in (f"[x](https://{HOST}/a)", f"![p](http://{HOST}/p.png)", f"www.{HOST}",
                 f"me@{HOST}", f"<https://{HOST}>"):
        assert not live_links(ui.plain(text)), ui.plain(text)
        assert not live_links(ui.inert(text)), ui.inert(text)
        assert ui.inert(text).replace("\u2060", "") == text  # inert text reads the same


def test_plain_and_inert_drop_format_characters():
    assert ui.plain("ab\u202ecd\u200b") == "abcd" and ui.inert("ab\u202ecd\nx") == "abcd x"


# ------------------------------------------------------------------ the hostile case, on every page

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The hostile case in its own folder (listed through $CASEBOOK_CASES) with every stage its
    pages read built in its own cache, on small settings."""
    folder = tmp_path_factory.mktemp("hostile-cases") / NAME
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.rand(60, 1, 8, 8, generator=g) * 0.5 + y[:, None, None, None] * 0.4
    mask = torch.zeros(60, 8, 8, dtype=torch.bool)
    mask[:, :2, :2] = True
    torch.save({"x": x, "y": y, "mask": mask}, folder / "data.pt")
    (folder / "nets.py").write_text(NETS)
    (folder / "case.toml").write_text(textwrap.dedent(TOML))
    cache = tmp_path_factory.mktemp("hostile-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASEBOOK_CASES", str(folder.parent))
        study = CaseStudy.open(NAME, cache_dir=cache, device="cpu", allow_path=False)
        results = study.build(stages=["data", "models", "experts", "discovery",
                                      "representations", "essence", "corrections", "detection"])
        assert all(r["status"] in ("built", "cached") for r in results.values()), results
    return folder.parent, cache, study


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


def _nodes(node):
    yield node
    for child in (getattr(node, "children", None) or {}).values():
        yield from _nodes(child)


_NOT_MARKDOWN = ("arrow_data_frame", "vega_lite_chart", "arrow_vega_lite_chart", "json",
                 "download_button", "code", "dataframe", "table")


def _strings(msg) -> list[str]:
    """Every string field of a protobuf message, recursively."""
    out = []
    for field, value in msg.ListFields():
        values = list(value) if field.is_repeated else [value]
        for v in values:
            if isinstance(v, str):
                out.append(v)
            elif hasattr(v, "ListFields"):
                out += _strings(v)
    return out


def drawn_strings(at: AppTest) -> list[str]:
    """The strings of every element the run drew (main area and sidebar) that Streamlit draws as
    Markdown or as a label: bodies, captions, labels, options, help texts, tab names (tables and
    charts are drawn as text, not Markdown, and are left out)."""
    out = []
    for node in _nodes(at._tree):
        proto = getattr(node, "proto", None)
        kind = getattr(node, "type", "")
        if proto is None or kind in _NOT_MARKDOWN or not hasattr(proto, "ListFields"):
            continue
        which = proto.WhichOneof("type") if "type" in proto.DESCRIPTOR.oneofs_by_name else None
        if which in _NOT_MARKDOWN:
            continue
        out += _strings(proto)
    return out


@pytest.fixture
def hostile_app(hostile, monkeypatch):
    folder, cache, study = hostile
    monkeypatch.setenv("CASEBOOK_CASES", str(folder))
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", NAME)
    _clear()

    def make(page: str | None = None) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()
        if page is not None:
            at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield make, study
    _clear()


def test_the_hostile_case_opens_with_its_strings(hostile):
    _, _, study = hostile
    facts = study.case_facts()
    assert facts["classes"][0].startswith("[cat]") and facts["region"].startswith("[patch]")
    assert study.subject == f"www.{HOST}" and study.config.title.startswith("[Download")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_page_draws_a_live_link_from_a_case_string(hostile_app, chapter):
    make, _ = hostile_app
    at = make(chapter)
    strings = drawn_strings(at)
    assert strings, "nothing drawn"
    leaks = [(s[:120], live_links(s)) for s in strings if live_links(s)]
    assert not leaks, leaks
    if chapter == "chapters/case_study.py":  # the title, the description and the classes are there
        text = "\n".join(strings)
        assert "Download the corrected model" in text and "cat" in text and "patch" in text


# ------------------------------------------------------------------ 12. the report's Markdown

def test_a_newline_or_a_pipe_in_a_name_splits_no_line_or_cell(hostile):
    _, _, study = hostile
    rep = study.report()
    assert not live_links(markdown(rep))  # the hostile strings as they are: inert
    rep["case_facts"] = {**rep["case_facts"], "classes": ["a\n| b |", "c|d"],
                         "region": "pa\ntch | x"}
    rep["models"] = {"m\n|x": next(iter(rep["models"].values()))}
    text = markdown(rep)
    data_line = next(line for line in text.splitlines() if line.startswith("**Data**"))
    assert "a \\| b \\|" in data_line and "c\\|d" in data_line and "pa tch \\| x" in data_line
    assert not any(line.startswith("| b") for line in text.splitlines())  # no line split off
    rows = [line for line in text.splitlines() if line.startswith("| m ")]
    assert rows, text
    header = next(line for line in text.splitlines() if line.startswith("| model |"))

    def cells(line: str) -> int:
        return len(re.findall(r"(?<!\\)\|", line))

    assert all(cells(r) == cells(header) for r in rows), (header, rows)

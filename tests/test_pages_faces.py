"""Every chapter draws for a small variant of the faces case (real 48×48 RGB photographs, a
pretrained detector, two classes named "face" and "non-face"), listed by name through
``$CASEBOOK_CASES`` as a reader's own case would be.

The variant is core/cases/faces/faces.toml with the edits tests/test_faces_case.py makes (one copy
of each image, one epoch, two layers, small expert settings) and a small representations stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("skimage")

import streamlit as st  # noqa: E402
from faces_small import small_faces_toml  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import ui  # noqa: E402
from core.cases.faces.onet import onet_weights_path  # noqa: E402
from core.casestudy import CaseStudy  # noqa: E402

try:
    onet_weights_path()
except ValueError:  # facenet-pytorch not installed: the case says how to install it
    pytest.skip("facenet-pytorch's onet.pt is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 300
NAME = "faces-small"
CHAPTERS = ["chapters/case_study.py", "chapters/influence.py", "chapters/one_image.py",
            "chapters/representations.py", "chapters/corrections.py", "chapters/essence.py",
            "chapters/detection.py", "chapters/method.py", "chapters/suspects.py"]
# Chapters whose results are built here, so they must draw pictures of the case's images.
DRAWS_IMAGES = {"chapters/case_study.py", "chapters/influence.py", "chapters/one_image.py",
                "chapters/representations.py"}


def small_pages_faces_toml() -> str:
    text = small_faces_toml()
    head, sep, rest = text.partition("[representations]")
    assert sep, "faces.toml has no [representations] table"
    _, sep2, tail = rest.partition("\n[")
    text = (head + '[representations]\nn_images = 8\nn_mprt = 2\n'
            'methods = ["saliency", "integrated_gradients"]\n\n' + (sep2.lstrip("\n") + tail if sep2 else ""))
    return text


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """The small faces case in its own folder (listed through $CASEBOOK_CASES) and cache, with
    data, models, experts and representations built."""
    folder = tmp_path_factory.mktemp("faces-cases")
    (folder / f"{NAME}.toml").write_text(small_pages_faces_toml())
    cache = tmp_path_factory.mktemp("faces-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASEBOOK_CASES", str(folder))
        study = CaseStudy.open(NAME, cache_dir=cache, device="cpu", allow_path=False)
        study.build(stages=["data", "models", "experts", "representations"])
    return folder, cache, study


@pytest.fixture
def faces_app(faces, monkeypatch):
    folder, cache, study = faces
    monkeypatch.setenv("CASEBOOK_CASES", str(folder))
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", NAME)
    _clear()

    def make(page: str | None = None, **params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        for key, value in params.items():
            at.query_params[key] = str(value)
        at.run()
        if page is not None:
            at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield make, study
    _clear()


def _texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption)


def test_the_small_faces_case_is_listed_by_name(faces_app):
    make, study = faces_app
    at = make()
    case = at.sidebar.selectbox(key="qp-case")
    assert case.value == NAME and {NAME, "faces"} <= set(case.options)
    facts = study.case_facts()
    assert facts["classes"] == ["face", "non-face"] and facts["size"] == [48, 48]
    assert facts["channels"] == 3
    assert at.sidebar.selectbox(key="qp-model").value == "watermarked"  # the model under study


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_draws_for_the_faces_case(faces_app, chapter):
    make, _ = faces_app
    at = make(chapter)
    assert at.title[0].value
    assert not at.error, [e.value for e in at.error]
    if chapter in DRAWS_IMAGES:
        assert len(at.image) > 0, f"{chapter} draws no image"
    text = _texts(at)
    for word in ("vanilla (trained with the decoy)", "16/784", "digit"):
        assert word not in text


def _image_bytes(stores: list, url: str) -> bytes:
    if url.startswith("data:"):
        import base64

        return base64.b64decode(url.split(",", 1)[1])
    name = url.rsplit("/", 1)[-1]
    for store in reversed(stores):
        try:
            return bytes(store.get_file(name).content)
        except Exception:  # noqa: BLE001 - another run's store
            continue
    raise AssertionError(f"image {url} not found in the test's media stores")


def test_faces_are_shown_upscaled_in_colour_with_their_class_names(faces_app, monkeypatch):
    import io

    from PIL import Image
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.testing.v1 import app_test

    stores: list = []

    class Recorded(MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recorded)
    make, study = faces_app
    at = make("chapters/influence.py")
    assert at.header[0].value == f"Experts of {study.report()['experts']['layer']} for class face"
    assert at.selectbox(key="qp-cls").options == ["face", "non-face"]
    # The close-up's first row (the images, the region shaded): the case's own 48×48 RGB images,
    # enlarged by a whole number to a grid tile (issue 22: the grid's tiles, about 96–144 pixels).
    close_up = next(im for im in at.image if im.proto.imgs[0].caption.startswith("face image 1")
                    and "shaded red" in im.proto.imgs[0].caption)
    pic = Image.open(io.BytesIO(_image_bytes(stores, close_up.proto.imgs[0].url)))
    scale = pic.size[0] // 48
    assert scale > 1
    assert pic.size == (48 * scale, 48 * scale) and pic.mode == "RGB"
    import numpy as np

    # The pixels are the case's first image of the view, each shown as scale × scale pixels.
    view = study.experts("watermarked", study.report()["experts"]["layer"], 0)
    assert view["images"].shape[1:] == (48, 48, 3)
    diff = np.abs(np.asarray(pic).astype(int) - ui.picture(view["images"][0], scale).astype(int))
    assert diff.mean() < 3  # Streamlit may send it as JPEG (lossy): close, not equal
    at2 = make("chapters/case_study.py")
    assert len(at2.image) > 0
    captions = [i.caption for im in at2.image for i in im.proto.imgs]
    text = _texts(at2) + "\n".join(captions) + "\n".join(str(d.value) for d in at2.dataframe)
    assert "face" in text and "non-face" in text

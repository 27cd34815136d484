"""A small variant of the faces case for tests (one copy of each image, one epoch, two layers, a
few images per expert), shared by tests/test_faces_case.py and tests/test_pages_faces.py."""

from __future__ import annotations

from core.casestudy import case_files


def small_faces_toml() -> str:
    """core/cases/faces/faces.toml's text with the test-sized settings."""
    text = case_files()["faces"].read_text()
    text = text.replace("seed = 0\n", "seed = 0\naugment = 1\n", 1)
    text = text.replace("epochs = 3", "epochs = 1")
    text = text.replace('layers = ["onet.conv1", "onet.conv2", "onet.conv3", "onet.conv4", '
                        '"onet.dense5"]', 'layers = ["onet.conv4", "onet.dense5"]')
    text = text.replace("bootstrap = 100", "bootstrap = 10").replace("n_images = 8", "n_images = 3")
    return text.replace("resolution = 16", "resolution = 4")

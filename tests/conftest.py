"""Shared fixtures: every test runs against a temporary artifact cache, never the repo's .cache.

``small_study`` is the small DecoyMNIST case (``core/cases/decoy_mnist/decoy-mnist-small.toml``)
with its data, models and experts built once per session into that cache (a few seconds). Tests that need the
representations or corrections stage build it on the fixture (``small_study.build([...])``);
the stage then stays cached for the rest of the session.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def casebook_cache(tmp_path_factory):
    """A session-wide temporary cache directory, exported as ``CASEBOOK_CACHE``. Background builds
    are off (``CASEBOOK_BACKGROUND=0``): a page test must not start a worker that builds stages
    other tests expect unbuilt; tests/test_worker.py turns them on for its own caches."""
    root = tmp_path_factory.mktemp("casebook-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASEBOOK_CACHE", str(root))
        mp.setenv("CASEBOOK_BACKGROUND", "0")
        yield root


@pytest.fixture(scope="session")
def small_study(casebook_cache):
    """``CaseStudy`` of ``decoy-mnist-small`` on the CPU with data, models and experts built."""
    from core.casestudy import CaseStudy

    study = CaseStudy.open("decoy-mnist-small", cache_dir=casebook_cache, device="cpu")
    study.build(stages=["data", "models", "experts"])
    return study

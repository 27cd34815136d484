"""The background build (core.casestudy.worker): one real ``python -m core build`` process per cache
and case, joined by a second caller, restarted after a kill without a half entry, and the pages
that wait for it.

Each test builds the small case's later stages in its own copy of the shared small cache (data,
models and experts are built there by the ``small_study`` fixture), so nothing here changes what
other tests expect to find built.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui
from core.casestudy import CaseStudy, worker

ROOT = Path(__file__).resolve().parents[1]
CASE = "decoy-mnist-small"


@pytest.fixture
def cache(small_study, tmp_path):
    """A copy of the small case's cache (data, models, experts built; the later stages not)."""
    root = tmp_path / "cache"
    shutil.copytree(small_study.cache.root, root, ignore=shutil.ignore_patterns("workers"))
    yield root
    record = worker.running(CASE, root)  # never leave a worker behind
    if record:
        os.killpg(record["pid"], signal.SIGKILL)


def _open(root) -> CaseStudy:
    return CaseStudy.open(CASE, cache_dir=root, device="cpu")


def _wait_for(predicate, timeout: float = 120.0, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out")


def test_start_builds_every_stage_and_a_second_start_joins(cache):
    assert not all(_open(cache).status().values())
    first = worker.start(CASE, cache, device="cpu")
    assert first["joined"] is False and first["running"] and isinstance(first["pid"], int)
    again = worker.start(CASE, cache, device="cpu")  # a second session / server joins
    assert again["joined"] is True and again["pid"] == first["pid"]
    seen = _wait_for(lambda: (s := worker.state(CASE, cache))["stage"] and s)
    assert seen["running"] and seen["total"] >= 1 and 0 <= seen["done"] <= seen["total"]
    end = worker.wait(CASE, cache, timeout=300)
    assert end["finished"] and not end["running"] and end["error"] is None and not end["killed"]
    assert set(end["stages"]) == set(_open(cache).status())
    assert all(r["status"] in ("cached", "built") for r in end["stages"].values()), end["stages"]
    assert all(_open(cache).status().values())
    # The progress file is plain JSON, written whole.
    payload = json.loads(worker.paths(CASE, cache)["progress"].read_text())
    assert payload["finished"] is True and payload["pid"] == first["pid"]
    # Nothing left to build: a new start runs a build that finds everything cached.
    assert worker.start(CASE, cache, device="cpu")["joined"] is False
    end = worker.wait(CASE, cache, timeout=120)
    assert {r["status"] for r in end["stages"].values()} == {"cached"}, end["stages"]


def test_racing_starts_start_one_process(cache):
    results, barrier = [], threading.Barrier(6)

    def go():
        barrier.wait()
        results.append(worker.start(CASE, cache, device="cpu"))

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if not r["joined"]]
    assert len(started) == 1, results
    assert {r["pid"] for r in results if r["pid"] is not None} == {started[0]["pid"]}
    # (the fixture kills it: the build itself is the first test's business)


def test_a_killed_worker_leaves_no_half_entry_and_the_next_start_resumes(cache):
    first = worker.start(CASE, cache, device="cpu")
    # Kill it while it works on a stage after the upstream ones.
    _wait_for(lambda: worker.state(CASE, cache)["stage"] not in (None, "data", "models",
                                                                  "experts"))
    os.killpg(first["pid"], signal.SIGKILL)
    dead = _wait_for(lambda: (s := worker.state(CASE, cache))["killed"] and s, timeout=30)
    assert not dead["running"] and not dead["finished"]
    assert worker.running(CASE, cache) is None
    cache_obj = _open(cache).cache
    for entry in cache_obj.entries():  # every entry on disk is whole and loads
        assert cache_obj.has(entry.key), entry
    second = worker.start(CASE, cache, device="cpu")
    assert second["joined"] is False and second["pid"] != first["pid"]
    end = worker.wait(CASE, cache, timeout=300)
    assert end["finished"] and end["error"] is None
    assert all(_open(cache).status().values())
    # What the killed worker finished is reused (data, models and experts were cached anyway).
    assert end["stages"]["models"]["status"] == "cached"


def test_one_worker_per_cache(cache, tmp_path):
    # Another case's worker holds the cache: a live process whose command line carries that
    # worker's progress path, as a real worker's does.
    other = worker.paths("another-case", cache)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             str(other["progress"])], start_new_session=True)
    try:
        worker.write_json_atomic(other["record"], {"pid": proc.pid, "case": "another-case"})
        waiting = worker.start(CASE, cache, device="cpu")
        assert waiting["waiting_for"] == "another-case" and not waiting["running"]
        assert worker.running(CASE, cache) is None
    finally:
        proc.kill()
        proc.wait()
    assert worker.running("another-case", cache) is None
    assert worker.start(CASE, cache, device="cpu")["joined"] is False


def test_a_dead_or_recycled_pid_is_not_a_worker(cache):
    p = worker.paths(CASE, cache)
    worker.write_json_atomic(p["record"], {"pid": os.getpid(), "case": CASE})  # alive, not ours
    assert worker.running(CASE, cache) is None
    worker.write_json_atomic(p["record"], {"pid": 2**22 + 12345, "case": CASE})
    assert worker.running(CASE, cache) is None and worker.state(CASE, cache)["killed"]
    p["record"].write_text("{not json")
    assert worker.running(CASE, cache) is None


def test_cli_background_starts_then_joins(cache):
    env = {**os.environ, "CASEBOOK_BACKGROUND": "1"}
    cmd = [sys.executable, "-m", "core", "build", CASE, "--cache", str(cache), "--background"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "started a background build" in first.stderr, first.stderr
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "joined the running background build" in second.stderr
    bad = subprocess.run(cmd + ["--stages", "data"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_chapter_waits_for_the_background_build_then_draws(cache, monkeypatch):
    monkeypatch.setenv("CASEBOOK_BACKGROUND", "1")
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", CASE)
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.run()  # opening the report starts the worker for what is missing
    assert not at.exception, [e.value for e in at.exception]
    assert worker.running(CASE, cache) is not None
    at.switch_page("chapters/suspects.py").run()
    assert not at.exception, [e.value for e in at.exception]
    if worker.running(CASE, cache):  # still building: the page says so and offers no 2nd build
        assert any("built in the background" in i.value for i in at.info), [i.value for i in at.info]
        assert not [b for b in at.button if b.label.startswith("Build")]
    end = worker.wait(CASE, cache, timeout=300)
    assert end["finished"] and end["error"] is None
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not any("built in the background" in i.value for i in at.info)
    assert at.get("vega_lite_chart"), "the Suspects chapter draws once discovery is built"

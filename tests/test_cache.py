"""core.storage.cache: keys, hits and misses, corrupt entries recomputed, concurrent writers."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from core.storage.cache import MAGIC, Cache, canonical_json, default_root, key_of

BASE = {"stage": "models", "version": "1:abc", "config": {"epochs": 10, "lr": 0.001},
        "data": "d" * 64, "models": {"vanilla": "a" * 64}, "seed": 0}


# ------------------------------------------------------------------------------------------ keys

def test_key_is_stable_and_ignores_dict_order():
    k = key_of(**BASE)
    assert k == key_of(**BASE)
    assert len(k) == 64 and all(c in "0123456789abcdef" for c in k)
    shuffled = {"seed": 0, "models": {"vanilla": "a" * 64}, "data": "d" * 64,
                "config": {"lr": 0.001, "epochs": 10}, "version": "1:abc", "stage": "models"}
    assert key_of(**shuffled) == k
    assert canonical_json({"b": (1, 2), "a": Path("x")}) == '{"a":"x","b":[1,2]}'


@pytest.mark.parametrize("part, value", [
    ("stage", "experts"),
    ("version", "2:abc"),
    ("config", {"epochs": 11, "lr": 0.001}),
    ("config", {"epochs": 10, "lr": 0.002}),
    ("config", {"epochs": 10, "lr": 0.001, "batch_size": 64}),
    ("data", "e" * 64),
    ("models", {"vanilla": "b" * 64}),
    ("seed", 1),
])
def test_key_changes_with_every_part(part, value):
    assert key_of(**{**BASE, part: value}) != key_of(**BASE)


def test_key_rejects_values_without_a_canonical_form():
    with pytest.raises(TypeError):
        key_of(model=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError):
        key_of(lr=float("nan"))
    with pytest.raises(ValueError):
        Cache("/tmp").path("../../etc/passwd")


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CASEBOOK_CACHE", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c"
    assert Cache().root == tmp_path / "c"
    monkeypatch.delenv("CASEBOOK_CACHE")
    assert default_root().name == ".cache"


# ------------------------------------------------------------------------------------ hit / miss

def test_put_get_round_trip_and_miss(tmp_path):
    cache = Cache(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # creating a Cache touches nothing
    key = key_of(**BASE)
    assert cache.get(key) is None and cache.get(key, "absent") == "absent"
    assert not cache.has(key)
    payload = {"w": torch.arange(6.0).view(2, 3), "rows": [{"a": 1, "b": None}], "s": "x"}
    path = cache.put(key, payload, meta={"stage": "models", "case": "t"})
    assert path.is_file() and path.read_bytes().startswith(MAGIC)
    got = cache.get(key)
    assert torch.equal(got["w"], payload["w"]) and got["rows"] == payload["rows"]
    assert cache.has(key)
    assert cache.meta(key)["stage"] == "models"
    assert [e.key for e in cache.entries()] == [key]
    assert cache.entries()[0].meta["case"] == "t"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # no temp file left


def test_meta_only_entries_are_read_by_meta_and_invisible_to_get(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = key_of(stage="facts", arch="x")
    cache.put_meta(key, {"stage": "facts", "layers": ["conv1", "fc1"]})
    assert cache.meta(key)["layers"] == ["conv1", "fc1"] and cache.has(key)
    with caplog.at_level(logging.WARNING, logger="core.storage.cache"):
        assert cache.get(key, "none") == "none"
    assert caplog.text == ""
    _corrupt(cache.path(key), "flip-meta")
    assert cache.meta(key) is None


def test_get_or_compute_computes_once(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def fn():
        calls.append(1)
        return {"x": torch.ones(3)}

    key = key_of(**BASE)
    out, hit = cache.get_or_compute(key, fn)
    assert not hit and len(calls) == 1
    out, hit = cache.get_or_compute(key, fn)
    assert hit and len(calls) == 1 and torch.equal(out["x"], torch.ones(3))
    out, hit = cache.get_or_compute(key, fn, force=True)
    assert not hit and len(calls) == 2


def test_a_payload_torch_cannot_read_back_is_refused(tmp_path):
    cache = Cache(tmp_path)
    key = key_of(**BASE)
    with pytest.raises(TypeError, match="weights_only"):
        cache.put(key, {"model": torch.nn.Linear(2, 2)})
    assert not cache.has(key) and cache.entries() == []


# --------------------------------------------------------------------------------- corrupt entries

def _corrupt(path: Path, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "flip-payload":
        blob[-10] ^= 0xFF
    elif how == "flip-meta":
        start = blob.index(b"\n") + 3
        blob[start] ^= 0x01
    elif how == "truncate":
        blob = blob[: len(blob) * 2 // 3]
    elif how == "header":
        blob[:5] = b"XXXXX"
    elif how == "empty":
        blob = bytearray()
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["flip-payload", "flip-meta", "truncate", "header", "empty"])
def test_a_corrupt_entry_is_missing_and_recomputed(tmp_path, caplog, how):
    cache = Cache(tmp_path)
    key = key_of(**BASE)
    good = {"w": torch.randn(64, 64)}
    cache.put(key, good)
    _corrupt(cache.path(key), how)
    with caplog.at_level(logging.WARNING, logger="core.storage.cache"):
        assert cache.get(key) is None
        assert not cache.has(key)
    assert "corrupt" in caplog.text or "could not" in caplog.text
    calls = []
    out, hit = cache.get_or_compute(key, lambda: calls.append(1) or good)
    assert not hit and calls == [1] and torch.equal(out["w"], good["w"])
    assert torch.equal(cache.get(key)["w"], good["w"])  # the recomputed entry is valid


def test_has_notices_a_file_changed_after_it_was_verified(tmp_path):
    cache = Cache(tmp_path)
    key = key_of(**BASE)
    cache.put(key, {"w": torch.randn(32, 32)})
    assert cache.has(key) and cache.has(key)  # the second answer comes from the memo
    time.sleep(0.05)  # past the file system's timestamp tick
    _corrupt(cache.path(key), "flip-payload")  # in place: same size, same inode, new mtime
    assert not cache.has(key) and cache.meta(key) is None
    assert Cache(tmp_path).get(key) is None


def test_entries_are_ordinary_files(tmp_path):
    cache = Cache(tmp_path)
    path = cache.put(key_of(**BASE), {"x": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    from core.storage.cache import _UMASK

    return _UMASK


def test_a_checksummed_entry_that_is_not_a_torch_file_is_missing(tmp_path, caplog):
    import hashlib

    cache = Cache(tmp_path)
    key = key_of(**BASE)
    body = f'{{"key":"{key}","stage":"x"}}\n'.encode() + b"not a torch file at all"  # bound to key
    path = cache.path(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(MAGIC + f" {hashlib.sha256(body).hexdigest()} {len(body)}\n".encode() + body)
    assert cache.meta(key) is not None  # the checksum holds ...
    with caplog.at_level(logging.WARNING, logger="core.storage.cache"):
        assert not cache.has(key)  # ... but it is missing (issue 23: a build recomputes it) ...
        assert cache.get(key, "missing") == "missing"  # ... and never returned
    assert "unpickled" in caplog.text


# ------------------------------------------------------------------------------------ concurrency

def _compute_in_child(start, root: str, key: str, log_path: str, value: float) -> None:
    cache = Cache(root)
    start.wait()  # both children race from here

    def slow():
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.6)
        return {"v": torch.full((256, 256), value)}

    out, _ = cache.get_or_compute(key, slow)
    assert out["v"].shape == (256, 256)


def _put_in_child(start, root: str, key: str, value: float, rounds: int) -> None:
    cache = Cache(root)
    start.wait()
    for i in range(rounds):
        cache.put(key, {"v": torch.full((200 + i, 50), value), "who": value})


def _spawn(target, args_list):
    # spawn, not fork: a child forked after this process ran torch's OpenMP threads can hang
    # (its children start slowly: a barrier lines them up once torch is imported)
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(args_list))
    procs = [ctx.Process(target=target, args=(start, *args)) for args in args_list]
    for p in procs:
        p.barrier = start  # the children unpickle it after this returns: keep it alive
        p.start()
    return procs


def test_two_processes_computing_one_key_compute_once(tmp_path):
    key = key_of(**BASE)
    log_path = tmp_path / "computed.log"
    procs = _spawn(_compute_in_child, [(str(tmp_path / "c"), key, str(log_path), 1.0),
                                       (str(tmp_path / "c"), key, str(log_path), 2.0)])
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(log_path.read_text().split()) == 1  # the second waited on the lock, then read
    got = Cache(tmp_path / "c").get(key)
    assert got is not None and float(got["v"][0, 0]) in (1.0, 2.0)


def test_concurrent_writers_leave_a_valid_entry_and_readers_never_see_a_torn_one(tmp_path):
    root = str(tmp_path / "c")
    key = key_of(**BASE)
    procs = _spawn(_put_in_child, [(root, key, 1.0, 25), (root, key, 2.0, 25)])
    cache = Cache(root)
    seen = 0
    while any(p.is_alive() for p in procs):
        got = cache.get(key)  # either missing (not written yet) or a whole payload
        if got is not None:
            assert float(got["v"].unique()[0]) == got["who"]
            seen += 1
        time.sleep(0.005)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    final = cache.get(key)
    assert seen > 0
    assert final is not None and final["who"] in (1.0, 2.0)
    assert final["v"].shape == (224, 50)  # the last round of whichever writer finished last
    assert not [p for p in cache.path(key).parent.iterdir() if p.suffix == ".tmp"]

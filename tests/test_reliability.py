"""Reliability: each finding of issue 11 replayed against real files and real processes.

The cache part: a tampered payload, two entries swapped (each bound to the other's key), a payload
that passes its checksum but does not load, a writer killed with SIGKILL mid-write, and a cache
directory that is a file, read-only or full. None of them may ever serve a wrong result.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from core.storage.cache import MAGIC, Cache, CacheError, key_of

REPO = Path(__file__).resolve().parents[1]


def _key(name: str) -> str:
    return key_of(stage="reliability", name=name)


def _bad_files(cache: Cache, key: str) -> list[Path]:
    path = cache.path(key)
    return sorted(path.parent.glob(f"{path.name}.bad-*"))


def _tmp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(".*.tmp")) if directory.is_dir() else []


def _raw_entry(path: Path, meta: dict, payload: bytes) -> bytes:
    """Write a well-formed entry (right header, length and checksum) with any meta and payload."""
    body = json.dumps(meta).encode() + b"\n" + payload
    blob = MAGIC + f" {hashlib.sha256(body).hexdigest()} {len(body)}\n".encode() + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return blob


# ------------------------------------------------------------------------------- entries that lie

def test_a_tampered_payload_is_never_served_and_is_moved_aside(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = _key("tampered")
    cache.put(key, {"acc": torch.tensor([0.91, 0.92])})
    path = cache.path(key)
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0xFF
    path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="core.storage.cache"):
        assert cache.get(key) is None
    assert "corrupt" in caplog.text and "moved aside" in caplog.text
    assert not path.exists()
    [bad] = _bad_files(cache, key)
    assert bad.read_bytes() == bytes(blob)  # kept for a post-mortem, never deleted
    out, hit = cache.get_or_compute(key, lambda: {"acc": torch.tensor([0.5])})
    assert not hit and torch.equal(out["acc"], torch.tensor([0.5]))
    assert torch.equal(cache.get(key)["acc"], torch.tensor([0.5]))


def test_swapped_entries_are_misses_not_the_other_configs_numbers(tmp_path, caplog):
    cache = Cache(tmp_path)
    ka, kb = _key("config-a"), _key("config-b")
    cache.put(ka, {"acc": 0.91}, meta={"stage": "models", "config": "a"})
    cache.put(kb, {"acc": 0.55}, meta={"stage": "models", "config": "b"})
    assert cache.has(ka) and cache.has(kb)  # both verdicts now sit in the memo
    pa, pb = cache.path(ka), cache.path(kb)
    swap = pa.with_name("swap")
    os.rename(pa, swap)
    os.rename(pb, pa)
    os.rename(swap, pb)
    with caplog.at_level(logging.WARNING, logger="core.storage.cache"):
        assert not cache.has(ka) and cache.meta(kb) is None
        assert cache.get(ka, "miss") == "miss" and Cache(tmp_path).get(kb, "miss") == "miss"
    assert "another key" in caplog.text
    assert len(_bad_files(cache, ka)) == 1 and len(_bad_files(cache, kb)) == 1
    out, hit = cache.get_or_compute(ka, lambda: {"acc": 0.91})
    assert not hit and out == {"acc": 0.91}
    assert cache.get(ka) == {"acc": 0.91} and cache.meta(ka)["key"] == ka


def test_an_entry_copied_under_another_key_is_a_miss_for_a_fresh_reader(tmp_path):
    cache = Cache(tmp_path)
    ka, kb = _key("copy-a"), _key("copy-b")
    cache.put(ka, {"acc": 0.91})
    cache.path(kb).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache.path(ka), cache.path(kb))
    fresh = Cache(tmp_path)
    assert not fresh.has(kb) and fresh.get(kb) is None
    assert fresh.get(ka) == {"acc": 0.91}  # the original is untouched


def test_a_meta_line_cannot_rebind_an_entry_to_another_key(tmp_path):
    cache = Cache(tmp_path)
    ka, kb = _key("rebind-a"), _key("rebind-b")
    cache.put(ka, {"x": 1}, meta={"key": kb})  # a caller's "key" never overrides the entry's own
    assert cache.meta(ka)["key"] == ka and cache.get(ka) == {"x": 1}


def test_a_payload_that_does_not_load_is_recomputed_and_the_bad_file_moved_aside(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = _key("unloadable")
    blob = _raw_entry(cache.path(key), {"key": key, "stage": "x"}, b"PK\x03\x04 not really a torch zip")
    assert cache.meta(key) is not None  # the checksum holds ...
    with caplog.at_level(logging.WARNING, logger="core.storage.cache"):
        assert not cache.has(key)  # ... but it will not load: missing at once (issue 23)
        assert cache.get(key, "miss") == "miss"
    assert caplog.text.count("could not be unpickled") == 1  # logged once
    [bad] = _bad_files(cache, key)
    assert bad.read_bytes() == blob
    calls = []
    out, hit = cache.get_or_compute(key, lambda: calls.append(1) or {"w": torch.ones(2)})
    assert not hit and calls == [1] and torch.equal(out["w"], torch.ones(2))
    out, hit = cache.get_or_compute(key, lambda: calls.append(1) or {"w": torch.zeros(2)})
    assert hit and calls == [1] and torch.equal(out["w"], torch.ones(2))
    assert _bad_files(cache, key) == [bad]


def test_get_or_compute_rebuilds_an_unloadable_entry_found_on_its_first_read(tmp_path):
    cache = Cache(tmp_path)
    key = _key("unloadable-2")
    _raw_entry(cache.path(key), {"key": key}, b"garbage")
    out, hit = cache.get_or_compute(key, lambda: {"v": 3})
    assert (out, hit) == ({"v": 3}, False) and cache.get(key) == {"v": 3}
    assert len(_bad_files(cache, key)) == 1


def test_a_payload_that_loads_as_another_type_than_was_stored_is_a_miss(tmp_path):
    cache = Cache(tmp_path)
    key = _key("garbage")
    cache.put(key, {"rows": [1, 2]})
    meta = cache.meta(key)
    assert meta["payload_type"] == "dict"
    buf = io.BytesIO()
    torch.save("not the rows", buf)  # loads fine under weights_only, but is not what was stored
    _raw_entry(cache.path(key), meta, buf.getvalue())
    assert cache.get(key, "miss") == "miss"
    assert len(_bad_files(cache, key)) == 1
    assert cache.get_or_compute(key, lambda: {"rows": [1, 2]}) == ({"rows": [1, 2]}, False)


# --------------------------------------------------------------------------- kill -9 mid-write

_WRITER = """
import sys, torch
from core.storage.cache import Cache
Cache(sys.argv[1]).put(sys.argv[2], {"w": torch.ones(int(sys.argv[3]))})
"""


def _stop_mid_write(root: Path, key: str, numel: int) -> tuple[subprocess.Popen, Path | None]:
    """Start a writer of a ``numel``-float payload; SIGSTOP it as soon as its temp file has bytes.
    Returns the stopped process and its temp file, or (finished process, None) when it won the race."""
    shard = Cache(root).path(key).parent
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), key, str(numel)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120  # a budget for torch's import, not a timing assertion
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            names = [e for e in os.scandir(shard) if e.name.endswith(".tmp")]
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        if names and names[0].stat().st_size > 0:  # the writer locks its temp file before a byte
            proc.send_signal(signal.SIGSTOP)
            tmp = Path(names[0].path)
            if tmp.exists():
                return proc, tmp
            proc.send_signal(signal.SIGCONT)
            break
    proc.wait(120)
    return proc, None


def _same_shard(key: str, tag: str) -> str:
    """Another key whose entry lives in the same directory as ``key``'s (where writers sweep)."""
    return next(k for k in (_key(f"{tag}-{i}") for i in range(100_000)) if k[:2] == key[:2] and k != key)


def test_a_writer_killed_mid_write_leaves_an_orphan_the_next_writer_cleans(tmp_path):
    root = tmp_path / "c"
    cache = Cache(root)
    for attempt in range(6):  # the writer may finish before it is caught mid-write: try bigger
        key = _key(f"killed-{attempt}")
        proc, tmp = _stop_mid_write(root, key, (8 << 20) << attempt)
        if tmp is not None:
            break
        assert proc.returncode == 0
    else:
        pytest.skip("the writer always finished before it could be stopped mid-write")
    other = _same_shard(key, "neighbour")
    old = time.time() - 3600
    try:
        # a live writer's temp file is never removed, young or old: it holds the file's lock
        cache.put(other, {"n": 1})
        assert tmp.exists()
        os.utime(tmp, (old, old))
        cache.put(other, {"n": 2})
        assert tmp.exists()
    finally:
        proc.kill()  # SIGKILL, still stopped: it never reaches its rename
        proc.wait(60)
    assert tmp.exists() and not cache.has(key) and cache.get(key) is None
    os.utime(tmp, None)  # a fresh orphan is spared for a while (a writer of an older version?)
    cache.put(other, {"n": 3})
    assert tmp.exists()
    os.utime(tmp, (old, old))
    cache.put(key, {"w": torch.full((4,), 2.0)})  # the next writer works ...
    assert not tmp.exists() and _tmp_files(tmp.parent) == []  # ... and removed the orphan
    assert torch.equal(Cache(root).get(key)["w"], torch.full((4,), 2.0))
    assert Cache(root).get(other) == {"n": 3}


def test_clean_orphans_removes_only_old_temp_files_nobody_holds(tmp_path):
    import fcntl

    cache = Cache(tmp_path)
    key = _key("sweep")
    cache.put(key, {"x": 1})
    shard = cache.path(key).parent
    old = time.time() - 3600
    orphan, young, held = (shard / f".{key[:16]}.{n}.tmp" for n in ("orphan", "young", "held"))
    for p in (orphan, young, held):
        p.write_bytes(b"partial")
    for p in (orphan, held):
        os.utime(p, (old, old))
    with open(held, "rb") as f:  # another open file description: as good as another process
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert cache.clean_orphans() == [orphan]
    assert not orphan.exists() and young.exists() and held.exists()
    assert cache.get(key) == {"x": 1} and Cache(tmp_path / "absent").clean_orphans() == []


# ----------------------------------------------------------------- unusable cache directories

def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_a_cache_directory_that_is_a_file_raises_one_clear_error(tmp_path):
    root = tmp_path / "cache"
    root.write_text("not a directory")
    cache = Cache(root)
    key = _key("file")
    for call in (lambda: cache.put(key, {"x": 1}), lambda: cache.put_meta(key, {"x": 1}),
                 lambda: cache.get_or_compute(key, lambda: {"x": 1}), lambda: cache.has(key),
                 lambda: cache.get(key)):
        with pytest.raises(CacheError) as info:
            call()
        assert isinstance(info.value, ValueError)
        msg = _one_line(info.value)
        assert f"'{root}' is a file" in msg and "--cache" in msg and "CASEBOOK_CACHE" in msg
    assert root.read_text() == "not a directory"


def test_a_file_inside_the_cache_directory_is_named(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "artifacts").write_text("x")
    with pytest.raises(CacheError) as info:
        Cache(root).put(_key("inner"), {"x": 1})
    assert f"'{root / 'artifacts'}' is a file" in _one_line(info.value)


_READ_ONLY = textwrap.dedent("""
    import json, os, sys
    from core.storage.cache import Cache, CacheError
    cache, kept, new, out = Cache(sys.argv[1]), sys.argv[2], sys.argv[3], {}
    out["writable"] = os.access(cache.root / "artifacts", os.W_OK)
    out["read"] = cache.get(kept)
    calls = []
    for name, fn in (("compute", lambda: cache.get_or_compute(new, lambda: calls.append(1) or {"x": 2})),
                     ("put", lambda: cache.put(new, {"x": 2}))):
        try:
            fn()
            out[name] = ["ok", ""]
        except CacheError as exc:
            out[name] = ["CacheError", str(exc)]
        except Exception as exc:
            out[name] = [type(exc).__name__, str(exc)]
    out["calls"] = len(calls)
    print(json.dumps(out))
""")


def test_a_read_only_cache_directory_raises_one_clear_error(tmp_path):
    root = tmp_path / "cache"
    kept, new = _key("kept"), _key("new")
    Cache(root).put(kept, {"x": 1})
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)
    try:
        prefix = []
        if os.access(root / "artifacts", os.W_OK):  # root ignores permissions: drop it in a user
            prefix = ["unshare", "-U"]              # namespace, where they hold again
            if not shutil.which("unshare") or subprocess.run(prefix + ["true"]).returncode != 0:
                pytest.skip("permissions are not enforced for this user (root) and unshare -U is unavailable")
        run = subprocess.run([*prefix, sys.executable, "-c", _READ_ONLY, str(root), kept, new],
                             capture_output=True, text=True, cwd=REPO, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["writable"] is False and out["read"] == {"x": 1}  # reading still works
    for name in ("compute", "put"):
        kind, msg = out[name]
        assert kind == "CacheError", msg
        assert "is not writable" in _one_line(msg) and "CASEBOOK_CACHE" in msg
    assert out["calls"] == 0  # it failed before spending the computation
    assert not Cache(root).has(new)


# A tiny tmpfs in a private user+mount namespace: a real full disk and a real read-only mount,
# without root on the host. Skipped where unprivileged namespaces are not allowed.
_IN_NAMESPACE = textwrap.dedent("""
    import hashlib, json, os, subprocess, sys, torch
    from core.storage.cache import MAGIC, Cache, CacheError, key_of
    mnt = sys.argv[1]
    cache, out = Cache(os.path.join(mnt, "c")), {}
    k = lambda n: key_of(stage="ns", name=n)
    def attempt(name, fn):
        try:
            out[name] = ["ok", repr(fn())[:80]]
        except CacheError as exc:
            out[name] = ["CacheError", str(exc)]
        except Exception as exc:
            out[name] = [type(exc).__name__, str(exc)]
    attempt("full", lambda: cache.put(k("big"), {"w": torch.ones(1 << 20)}))
    out["full_tmp_left"] = [n for n in os.listdir(cache.path(k("big")).parent) if n.endswith(".tmp")]
    attempt("small_after_full", lambda: cache.put(k("small"), {"w": torch.ones(4)}) and
            cache.get(k("small"))["w"].tolist())
    calls = []
    bad = cache.path(k("unloadable"))  # a whole entry of its key whose payload torch cannot read
    body = json.dumps({"key": k("unloadable")}).encode() + b"\\n" + b"not torch"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(MAGIC + f" {hashlib.sha256(body).hexdigest()} {len(body)}\\n".encode() + body)
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    attempt("ro_unloadable", lambda: [cache.has(k("unloadable")), cache.get(k("unloadable"), "miss"),
                                      cache.has(k("unloadable")), bad.exists()])
    attempt("ro_read", lambda: cache.get_or_compute(k("small"), lambda: calls.append(1))[1])
    attempt("ro_compute", lambda: cache.get_or_compute(k("new"), lambda: calls.append(1) or {"x": 1}))
    attempt("ro_put", lambda: cache.put(k("small"), {"w": torch.zeros(4)}))
    out["ro_calls"] = len(calls)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def in_namespace(tmp_path_factory):
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-r", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged user and mount namespaces are not available here")
    mnt = tmp_path_factory.mktemp("mnt")
    script = 'mount -t tmpfs -o size=512k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    run = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", str(mnt), sys.executable,
                          _IN_NAMESPACE], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_full_disk_raises_one_clear_error_and_leaves_no_temp_file(in_namespace):
    kind, msg = in_namespace["full"]
    assert kind == "CacheError", msg
    assert "no space left" in _one_line(msg) and "CASEBOOK_CACHE" in msg
    assert in_namespace["full_tmp_left"] == []  # the half-written temp file is gone: space is back
    assert in_namespace["small_after_full"] == ["ok", "[1.0, 1.0, 1.0, 1.0]"]


def test_a_read_only_mount_reads_and_raises_one_clear_error_before_computing(in_namespace):
    assert in_namespace["ro_read"] == ["ok", "True"]  # an existing entry is still a hit
    for name in ("ro_compute", "ro_put"):
        kind, msg = in_namespace[name]
        assert kind == "CacheError", msg
        assert "read-only file system" in _one_line(msg) and "CASEBOOK_CACHE" in msg
    assert in_namespace["ro_calls"] == 0  # it failed before spending the computation
    # an unusable entry that cannot be moved aside is still a miss, for has() as for get(), and
    # for has() from the first ask (issue 23)
    assert in_namespace["ro_unloadable"] == ["ok", "[False, 'miss', False, True]"]

"""Content-addressed artifact store: one checksummed file per result, written atomically.

A result's key is the sha256 of a canonical JSON of everything that determines it (stage name, the
stage's code version, its config section, the data digest, model digests, the seed): see
:func:`key_of`. Same key → the stored payload is read back, nothing is recomputed.

On disk (``root`` defaults to ``$CASEBOOK_CACHE`` or ``<repo>/.cache``)::

    <root>/artifacts/<key[:2]>/<key>.entry     the entry
    <root>/locks/<key>.lock                    a per-key lock file (fcntl.flock), left in place

An entry is three parts::

    CASEBOOK-ENTRY 1 <sha256 hex> <size>\\n     header: checksum and length of what follows
    {"stage": ..., ...}\\n                      meta: a one-line JSON (small, readable without torch)
    <torch.save bytes>                          payload: read back with torch.load(weights_only=True)

The checksum covers the meta line and the payload; the meta line names the entry's own key, so an
entry is bound to its key: a file copied or moved under another key's name is not that key's entry.
A truncated or corrupt entry (bad header, wrong length, wrong checksum), an entry bound to another
key, or one whose payload torch cannot read back (or reads back as another type than was stored)
counts as *missing* — for :meth:`Cache.has` too, so a build recomputes it at once: ``has`` checks
that the payload is one ``torch.load(weights_only=True)`` reads (a scan of its pickle, without
torch, for the plain payloads this cache writes; a real load, once per file, for anything else) —
it is moved aside to ``<name>.bad-<time>`` in the same directory (never
deleted), a warning is logged once, and the caller recomputes; such a payload is never returned.

Writes go to a temp file in the same directory (``.<key[:16]>.<random>.tmp``), which the writer
holds under an ``fcntl.flock`` until it is fsynced and ``os.replace``d over the entry, so a reader
sees either the old entry or the new one, never half of one. A temp file that no process holds and
that is older than :attr:`Cache.TMP_GRACE_S` is an orphan (its writer was killed): the next write in
that directory removes it. :meth:`Cache.get_or_compute` holds the key's lock while it computes, so a
second process asking for the same key waits and then reads the first one's entry instead of
computing it again.

A cache directory that cannot be used (a file is in the way, it is read-only or not readable, its
disk is full) raises :class:`CacheError` (a ``ValueError``) with a one-line message that says what
to change; a missing directory is only an empty cache.

Payloads hold only what ``torch.load(weights_only=True)`` reads: dicts, lists, tuples, str, numbers,
bools, None and tensors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import pickletools
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAGIC", "Cache", "CacheEntry", "CacheError", "canonical_json", "default_root", "key_of"]

log = logging.getLogger(__name__)
_WARNED: set[tuple] = set()


def _warn_once(path: Path, message: str, *args) -> None:
    """Log a bad entry once per (path, size, mtime) and process: status checks read it often."""
    try:
        st = path.stat()
        ident = (str(path), st.st_size, st.st_mtime_ns, message)
    except OSError:
        ident = (str(path), message)
    if ident not in _WARNED:
        _WARNED.add(ident)
        log.warning(message, path, *args)

MAGIC = b"CASEBOOK-ENTRY 1"
REPO = Path(__file__).resolve().parents[2]
_MISSING = object()


def default_root() -> Path:
    """``$CASEBOOK_CACHE`` when set (and not empty), else ``<repo>/.cache``."""
    env = os.environ.get("CASEBOOK_CACHE")
    return Path(env).expanduser() if env else REPO / ".cache"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide, not thread-safe


# ------------------------------------------------------------------------------------------- keys

def _canonical(value: Any, where: str = "key") -> Any:
    """Plain JSON values only; tuples → lists, Paths → str, numpy scalars → Python numbers."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        return float(value)  # JSON keeps 1.0 and 1 apart, as TOML does
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str, got {k!r}")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _canonical(item(), where)
    raise TypeError(f"{where}: {type(value).__name__} has no canonical JSON form; pass plain "
                    "values (str, numbers, bools, lists, dicts) or a digest string")


def canonical_json(parts: dict) -> str:
    """Sorted keys, no whitespace, plain JSON values: equal inputs give equal bytes."""
    return json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def key_of(**parts: Any) -> str:
    """sha256 hex of the canonical JSON of ``parts`` (e.g. stage, version, config, data, models, seed)."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"cache keys are lowercase hex digests (see key_of), got {key!r}")
    return key


# ----------------------------------------------------------------------------------------- errors

class CacheError(ValueError):
    """The cache directory cannot be used: a file is in its way, it is read-only or unreadable, or its
    disk is full. The message is one line that says what to change (the CLI exits 2 on it)."""


_FIX = "pass --cache DIR or set CASEBOOK_CACHE"


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing component of ``path`` (from the top) that is not a directory, or None."""
    for p in [*reversed(path.parents), path]:
        try:
            if p.exists() and not p.is_dir():
                return p
        except OSError:
            return None
    return None


def _cache_error(root: Path, exc: OSError, target: Path, doing: str) -> CacheError:
    """One-line :class:`CacheError` for an ``OSError`` met while ``doing`` (reading / writing)
    ``target`` under the cache directory ``root``."""
    code = exc.errno
    if isinstance(exc, NotADirectoryError | FileExistsError) or code in (errno.ENOTDIR, errno.EEXIST):
        bad = _file_in_the_way(target)
        if bad is None or bad == root:
            return CacheError(f"cache directory '{root}' is a file; {_FIX}")
        return CacheError(f"cache directory '{root}' cannot be used: '{bad}' is a file, not a "
                          f"directory; remove it, or {_FIX}")
    if code == errno.EROFS:
        return CacheError(f"cache directory '{root}' is on a read-only file system; {_FIX}")
    if code in (errno.EACCES, errno.EPERM):
        adj = "readable" if doing == "reading" else "writable"
        return CacheError(f"cache directory '{root}' is not {adj} (permission denied on '{target}'); "
                          f"make it {adj}, or {_FIX}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(f"no space left for the cache in '{root}' ({exc.strerror}); free some space "
                          f"there, or {_FIX}")
    if code == errno.EFBIG:
        return CacheError(f"cache entry too large for '{root}' (file size limit: {exc.strerror}); raise "
                          f"the limit (ulimit -f), or {_FIX}")
    return CacheError(f"cache directory '{root}' failed while {doing} '{target}' "
                      f"({exc.strerror or type(exc).__name__}); {_FIX}")


# ------------------------------------------------------------------------------------------ store

@dataclass(frozen=True)
class CacheEntry:
    """One stored entry as :meth:`Cache.entries` lists it (header and meta only, not verified)."""

    key: str
    path: Path
    size: int
    modified: float
    meta: dict


# the globals a payload of this cache's own kind pickles (torch.save of dicts, lists and tensors);
# torch.load(weights_only=True) allows each of them
_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16", "complex64", "complex128", "uint8",
                     "int8", "int16", "int32", "int64", "bool"})


def _plain_global(module: str, name: str) -> bool:
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module == "torch":
        return name.endswith("Storage") or name in ("Size", "device") or name in _DTYPES
    return (module, name) == ("collections", "OrderedDict")


def _plainly_loadable(payload: bytes) -> bool:
    """True when ``payload`` is a zip-format ``torch.save`` whose pickle names only globals that
    ``torch.load(weights_only=True)`` always allows (tensors, storages, OrderedDict, dtypes)
    and whose storage records are all in the archive; False when unsure (then torch decides).
    Needs no torch."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            names = z.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                return False
            prefix = pkl[0][:-len("data.pkl")]
            stored = {n[len(prefix) + 5:] for n in names if n.startswith(prefix + "data/")}
            for op, arg, _ in pickletools.genops(z.read(pkl[0])):
                if op.name == "GLOBAL":
                    module, _, name = str(arg).partition(" ")
                    if not _plain_global(module, name):
                        return False
                elif op.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4",
                                 "PERSID"):
                    return False
            # every storage the pickle refers to (its persistent ids name them) must be there
            if not all(k in stored for k in _storage_keys(z.read(pkl[0]))):
                return False
    except Exception:  # not a zip, a truncated pickle, …: unsure
        return False
    return True


def _storage_keys(pkl: bytes) -> list[str]:
    """The storage keys of ``("storage", type, key, location, numel)`` persistent ids: the string
    pushed right after each ``"storage"`` tag (memo references resolved)."""
    memo: dict[int, object] = {}
    last: object = None
    keys, after_tag = [], False
    for op, arg, _ in pickletools.genops(pkl):
        value = _MISSING
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8"):
            value = arg
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(arg), None)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
            continue
        elif op.name == "GLOBAL":
            value = ("global", arg)
        if value is _MISSING:
            after_tag = False if op.name not in ("BINPUT", "LONG_BINPUT", "PUT") else after_tag
            last = None
            continue
        if after_tag and isinstance(value, tuple):  # the storage type, then the key
            last = value
            continue
        if after_tag and isinstance(value, str):
            keys.append(value)
            after_tag = False
        elif value == "storage":
            after_tag = True
        last = value
    return keys


class _Rejected(Exception):
    """An entry that exists but must not be used (corrupt, bound to another key, unreadable)."""


class Cache:
    """A directory of checksummed entries. Creating one touches nothing on disk; the first write
    creates the directories."""

    #: a temp file no process holds is removed as an orphan once it is older than this (seconds);
    #: the age spares writers of older versions that took no lock on their temp file
    TMP_GRACE_S = 60.0

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._memo: dict[Path, tuple[tuple, dict | None]] = {}  # path → (file identity, meta or rejected)
        self._loads: dict[Path, tuple] = {}  # path → identity of a file whose payload is known to load

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # paths
    def path(self, key: str) -> Path:
        """The entry file for ``key`` (``<root>/artifacts/<key[:2]>/<key>.entry``); it may not exist."""
        key = _check_key(key)
        return self.root / "artifacts" / key[:2] / f"{key}.entry"

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{_check_key(key)}.lock"

    # reading
    def _open_read(self, path: Path) -> tuple[bytes, os.stat_result] | None:
        """(bytes, fstat) of ``path``; None when it does not exist; CacheError when the directory
        cannot be read (a file in the way, no permission); other read errors warn and count as missing."""
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except (NotADirectoryError, PermissionError) as exc:
            raise _cache_error(self.root, exc, path, "reading") from None
        except OSError as exc:
            _warn_once(path, "cache entry %s could not be read (%s); treating it as missing", exc)
            return None

    @staticmethod
    def _verify(key: str, blob: bytes) -> tuple[dict, bytes]:
        """(meta, payload bytes) of an entry's bytes; _Rejected with the reason when they are not a
        whole entry of ``key``."""
        head, sep, body = blob.partition(b"\n")
        fields = head.split(b" ")
        try:
            if not sep or head[:len(MAGIC)] != MAGIC or len(fields) != 4:
                raise ValueError("bad header")
            digest, size = fields[2].decode(), int(fields[3])
            if len(body) != size:
                raise ValueError(f"length {len(body)} instead of {size} (truncated?)")
            if hashlib.sha256(body).hexdigest() != digest:
                raise ValueError("checksum mismatch")
            meta_line, sep, payload = body.partition(b"\n")
            meta = json.loads(meta_line.decode())
            if not sep or not isinstance(meta, dict):
                raise ValueError("bad meta line")
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Rejected(f"is corrupt ({exc})") from None
        if meta.get("key") != key:
            raise _Rejected(f"belongs to another key ({str(meta.get('key'))[:16]}…, copied or moved "
                            "under this name?)")
        return meta, payload

    def _move_aside(self, path: Path, st: os.stat_result | None, why: str) -> None:
        """Rename a rejected entry to ``<name>.bad-<time>`` (only if ``path`` is still the file that was
        read: a writer may have replaced it meanwhile) and log it once. While it stays (a read-only
        cache), :meth:`meta` remembers the verdict for that file, so ``has()`` agrees with ``get()``."""
        if st is not None:
            self._memo[path] = ((st.st_size, st.st_mtime_ns, st.st_ino), None)
        moved = None
        if st is not None:
            try:
                now = path.stat()
                if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                    moved = path.with_name(f"{path.name}.bad-{stamp}-{time.time_ns() % 10**9:09d}")
                    os.rename(path, moved)
            except FileNotFoundError:
                return  # someone else moved or replaced it
            except OSError as exc:
                _warn_once(path, "cache entry %s %s; treating it as missing (could not move it aside: %s)",
                           why, exc.strerror)
                return
        if moved is None:
            _warn_once(path, "cache entry %s %s; treating it as missing", why)
        else:
            log.warning("cache entry %s %s; moved aside to %s and treating it as missing", path, why,
                        moved.name)

    def _read_verified(self, key: str) -> tuple[dict, bytes, os.stat_result] | None:
        """(meta, payload bytes, fstat) when the entry exists, is whole and belongs to ``key``; else
        None (a rejected entry is moved aside)."""
        path = self.path(key)
        found = self._open_read(path)
        if found is None:
            return None
        blob, st = found
        try:
            meta, payload = self._verify(key, blob)
        except _Rejected as exc:
            self._move_aside(path, st, str(exc))
            return None
        return meta, payload, st

    def has(self, key: str) -> bool:
        """True when a usable entry of ``key`` exists: checksum and key verified, and its payload
        one that ``torch.load(weights_only=True)`` reads (:meth:`get` would return it). A payload
        of the plain kind this cache writes is checked by scanning its pickle (no torch);
        anything else is loaded once. An entry that will not load is moved aside and is missing
        here and for :meth:`meta` (so a build recomputes it in the same run). Remembered per file
        identity (size, mtime, inode)."""
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        except (NotADirectoryError, PermissionError) as exc:
            raise _cache_error(self.root, exc, path, "reading") from None
        except OSError:
            return False
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._memo.get(path)
        if known is not None and known[0] == ident:
            if known[1] is None:
                return False
            if known[1].get("payload") is False or self._loads.get(path) == ident:
                return True
        found = self._read_verified(key)  # one read: checksum, key and the payload's scan
        if found is None:
            return False
        meta, payload, st = found
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        self._memo[path] = (ident, meta)
        if meta.get("payload") is False:
            return True
        if not (_plainly_loadable(payload) or self.get(key, _MISSING) is not _MISSING):
            return False
        self._loads[path] = ident
        return True

    def meta(self, key: str) -> dict | None:
        """The entry's meta dict (checksum and key verified, payload not unpickled), or None.

        The verdict is remembered per file identity (size, mtime, inode): asking again about an
        unchanged file costs a ``stat``. :meth:`get` always verifies the bytes it returns.
        """
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except (NotADirectoryError, PermissionError) as exc:
            raise _cache_error(self.root, exc, path, "reading") from None
        except OSError:
            return None
        known = self._memo.get(path)
        if known is not None and known[0] == (st.st_size, st.st_mtime_ns, st.st_ino):
            return known[1]
        found = self._read_verified(key)
        if found is None:
            return None
        meta, payload, st = found
        self._memo[path] = ((st.st_size, st.st_mtime_ns, st.st_ino), meta)
        if meta.get("payload") is not False and _plainly_loadable(payload):  # bytes at hand: has()
            self._loads[path] = (st.st_size, st.st_mtime_ns, st.st_ino)  # need not read them again
        return meta

    def get(self, key: str, default: Any = None) -> Any:
        """The payload stored under ``key``, or ``default`` when missing, corrupt, bound to another
        key, meta-only, or unreadable (a bad entry is moved aside, so the next build recomputes it)."""
        found = self._read_verified(key)
        if found is None:
            return default
        meta, payload, st = found
        if not payload and meta.get("payload") is False:
            return default  # a meta-only entry
        import torch

        try:
            value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # checksum held but torch cannot read it: a foreign/old format
            why = str(exc).splitlines()[0][:160] if str(exc) else ""
            self._move_aside(self.path(key), st, f"could not be unpickled ({type(exc).__name__}: {why})")
            return default
        stored = meta.get("payload_type")
        if stored is not None and type(value).__name__ != stored:
            self._move_aside(self.path(key), st, f"was unpickled as a {type(value).__name__}, not the "
                             f"{stored} that was stored")
            return default
        return value

    # writing
    def _tmp_files(self, directory: Path) -> list[Path]:
        try:
            return [directory / n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".tmp")]
        except OSError:
            return []

    def _remove_if_orphan(self, tmp: Path, now: float) -> bool:
        """Remove ``tmp`` when no process holds its flock and it is older than TMP_GRACE_S; True if
        removed. A live writer holds the lock from creation until after its rename."""
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a live writer holds it
            st = os.fstat(fd)
            if now - st.st_mtime < self.TMP_GRACE_S:
                return False
            try:  # still the same file under that name (a finished writer renamed it away)
                same = os.stat(tmp, follow_symlinks=False).st_ino == st.st_ino
            except OSError:
                return False
            if same:
                os.unlink(tmp)
                log.info("removed orphan cache temp file %s (its writer died)", tmp)
                return True
            return False
        except OSError:
            return False
        finally:
            os.close(fd)

    def clean_orphans(self) -> list[Path]:
        """Remove the orphan temp files (left by writers killed mid-write) under ``artifacts/``;
        returns the removed paths. A temp file a live process is writing is never removed."""
        base = self.root / "artifacts"
        now = time.time()
        try:
            shards = [base / n for n in os.listdir(base)]
        except OSError:
            return []
        return [t for d in shards for t in self._tmp_files(d) if self._remove_if_orphan(t, now)]

    def _write(self, key: str, body: bytes) -> Path:
        path = self.path(key)
        header = MAGIC + f" {hashlib.sha256(body).hexdigest()} {len(body)}\n".encode()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            now = time.time()
            for orphan in self._tmp_files(path.parent):
                self._remove_if_orphan(orphan, now)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:  # the flock is held until the rename: not an orphan
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; entries are ordinary files
                f.write(header)
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)
                tmp = None
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _cache_error(self.root, exc, path, "writing") from None
            raise
        self._memo.pop(path, None)
        return path

    @staticmethod
    def _meta_line(key: str, meta: dict | None, **own: Any) -> bytes:
        meta = {"created": time.time(), **(meta or {}), **own, "key": key}  # the key binds the entry
        line = json.dumps(_canonical(meta, "meta"), sort_keys=True, separators=(",", ":"))
        if "\n" in line:
            raise ValueError("meta must serialise to one line")
        return line.encode() + b"\n"

    def put_meta(self, key: str, meta: dict) -> Path:
        """Store a meta-only entry (no payload; :meth:`meta` reads it, :meth:`get` sees nothing):
        small facts that must be read without importing torch. Returns the entry's path."""
        _check_key(key)
        return self._write(key, self._meta_line(key, {**meta, "payload": False}))

    def put(self, key: str, payload: Any, meta: dict | None = None) -> Path:
        """Store ``payload`` (torch.save) under ``key`` atomically; return the entry's path."""
        import torch

        _check_key(key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        try:  # refuse what could not be read back: a stored entry must always load
            back = torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
        except Exception as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
            why = lines[0] if lines else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise TypeError(f"cache payload for {meta.get('stage', key[:12]) if meta else key[:12]} "
                            f"cannot be read back with torch.load(weights_only=True) ({why}); store "
                            "only dicts, lists, str, numbers, bools, None and tensors") from None
        line = self._meta_line(key, meta, payload_type=type(back).__name__)
        return self._write(key, line + buf.getvalue())

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the key's exclusive lock (blocks while another process holds it); yields None.
        CacheError when the lock file cannot be created (the cache directory is not writable)."""
        path = self._lock_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+b")
        except OSError as exc:
            raise _cache_error(self.root, exc, path, "writing") from None
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get_or_compute(self, key: str, fn: Callable[[], Any], *, force: bool = False,
                       meta: dict | None = None) -> tuple[Any, bool]:
        """``(payload, hit)``: the stored payload (hit=True), or ``fn()`` stored and returned.

        Computes under the key's lock and looks again once it holds it, so of two processes asking
        for the same missing key one computes and the other reads the result. An entry that cannot
        be used (corrupt, another key's, unreadable) is a miss: moved aside and recomputed.
        ``force`` recomputes (and overwrites) even when an entry exists. ``meta`` (one-line JSON
        values) goes to the entry's meta line.
        """
        if not force:
            found = self.get(key, _MISSING)
            if found is not _MISSING:
                return found, True
        with self.lock(key):
            if not force:
                found = self.get(key, _MISSING)
                if found is not _MISSING:
                    return found, True
            payload = fn()
            self.put(key, payload, meta)
            return payload, False

    # listing
    def entries(self) -> list[CacheEntry]:
        """Every entry on disk with its meta (headers only: not checksum-verified), oldest first."""
        out = []
        base = self.root / "artifacts"
        if not base.is_dir():
            return out
        for path in base.glob("*/*.entry"):
            try:
                with open(path, "rb") as f:
                    head = f.readline(256)
                    meta_line = f.readline(1 << 20)
                st = path.stat()
                meta = json.loads(meta_line.decode()) if head.startswith(MAGIC) else {}
            except (OSError, ValueError, UnicodeDecodeError):
                meta, st = {}, None
            if st is None:
                continue
            out.append(CacheEntry(key=path.stem, path=path, size=st.st_size, modified=st.st_mtime,
                                  meta=meta if isinstance(meta, dict) else {}))
        out.sort(key=lambda e: e.modified)
        return out

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

The checksum covers the meta line and the payload. A missing, truncated or corrupt entry (bad
header, wrong length, wrong checksum, payload torch cannot read) counts as *missing*: a warning is
logged and the caller recomputes; a corrupt payload is never returned. Writes go to a temp file in
the same directory, are fsynced and then ``os.replace``d over the entry, so a reader sees either the
old entry or the new one, never half of one. :meth:`Cache.get_or_compute` holds the key's lock while
it computes, so a second process asking for the same key waits and then reads the first one's entry
instead of computing it again.

Payloads hold only what ``torch.load(weights_only=True)`` reads: dicts, lists, tuples, str, numbers,
bools, None and tensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAGIC", "Cache", "CacheEntry", "canonical_json", "default_root", "key_of"]

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
REPO = Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------------------------------ store

@dataclass(frozen=True)
class CacheEntry:
    """One stored entry as :meth:`Cache.entries` lists it (header and meta only, not verified)."""

    key: str
    path: Path
    size: int
    modified: float
    meta: dict


class Cache:
    """A directory of checksummed entries. Creating one touches nothing on disk; the first write
    creates the directories."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._memo: dict[Path, tuple[tuple, dict]] = {}  # path → (file identity, verified meta)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # paths
    def path(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / "artifacts" / key[:2] / f"{key}.entry"

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{_check_key(key)}.lock"

    # reading
    def _read_verified(self, key: str) -> tuple[dict, bytes] | None:
        """(meta, payload bytes) when the entry exists and its checksum holds; else None."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn_once(path, "cache entry %s could not be read (%s); recomputing", exc)
            return None
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
            _warn_once(path, "cache entry %s is corrupt (%s); treating it as missing", exc)
            return None
        return meta, payload

    def has(self, key: str) -> bool:
        """True when a valid entry (checksum verified; payload not unpickled) exists for ``key``."""
        return self.meta(key) is not None

    def meta(self, key: str) -> dict | None:
        """The entry's meta dict (checksum verified, payload not unpickled), or None.

        The verdict is remembered per file identity (size, mtime, inode): asking again about an
        unchanged file costs a ``stat``. :meth:`get` always verifies the bytes it returns.
        """
        path = self.path(key)
        try:
            st = path.stat()
        except OSError:
            return None
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._memo.get(path)
        if known is not None and known[0] == ident:
            return known[1]
        found = self._read_verified(key)
        if found is None:
            return None
        self._memo[path] = (ident, found[0])
        return found[0]

    def get(self, key: str, default: Any = None) -> Any:
        """The payload stored under ``key``, or ``default`` when missing or corrupt."""
        found = self._read_verified(key)
        if found is None or (not found[1] and found[0].get("payload") is False):
            return default  # missing, corrupt, or a meta-only entry
        import torch

        try:
            return torch.load(io.BytesIO(found[1]), map_location="cpu", weights_only=True)
        except Exception as exc:  # checksum held but torch cannot read it: a foreign/old format
            _warn_once(self.path(key), "cache entry %s could not be unpickled (%s: %s); treating "
                       "it as missing", type(exc).__name__,
                       str(exc).splitlines()[0][:160] if str(exc) else "")
            return default

    # writing
    def _write(self, key: str, body: bytes) -> Path:
        path = self.path(key)
        header = MAGIC + f" {hashlib.sha256(body).hexdigest()} {len(body)}\n".encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; entries are ordinary files
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    @staticmethod
    def _meta_line(key: str, meta: dict | None) -> bytes:
        meta = {"key": key, "created": time.time(), **(meta or {})}
        line = json.dumps(_canonical(meta, "meta"), sort_keys=True, separators=(",", ":"))
        if "\n" in line:
            raise ValueError("meta must serialise to one line")
        return line.encode() + b"\n"

    def put_meta(self, key: str, meta: dict) -> Path:
        """Store a meta-only entry (no payload; :meth:`meta` reads it, :meth:`get` sees nothing):
        small facts that must be read without importing torch."""
        return self._write(key, self._meta_line(key, {**meta, "payload": False}))

    def put(self, key: str, payload: Any, meta: dict | None = None) -> Path:
        """Store ``payload`` (torch.save) under ``key`` atomically; return the entry's path."""
        import torch

        _check_key(key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        try:  # refuse what could not be read back: a stored entry must always load
            torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
        except Exception as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
            why = lines[0] if lines else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise TypeError(f"cache payload for {meta.get('stage', key[:12]) if meta else key[:12]} "
                            f"cannot be read back with torch.load(weights_only=True) ({why}); store "
                            "only dicts, lists, str, numbers, bools, None and tensors") from None
        return self._write(key, self._meta_line(key, meta) + buf.getvalue())

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the key's exclusive lock (blocks while another process holds it)."""
        path = self._lock_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get_or_compute(self, key: str, fn: Callable[[], Any], *, force: bool = False,
                       meta: dict | None = None) -> tuple[Any, bool]:
        """``(payload, hit)``: the stored payload (hit=True), or ``fn()`` stored and returned.

        Computes under the key's lock and looks again once it holds it, so of two processes asking
        for the same missing key one computes and the other reads the result. ``force`` recomputes
        (and overwrites) even when an entry exists. ``meta`` (one-line JSON values) goes to the
        entry's meta line.
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

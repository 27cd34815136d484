"""Reading a file a case names without hanging: checked to be a regular file within a size bound
before a byte is read (``/dev/zero``, a FIFO or a symlink to either is one line, never a hang).

Needs no torch and imports nothing from ``core``, so the torch-free warm path (status, keys) can
use it and the stages that import it do not pull more code into their cache keys.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["MAX_CHECKPOINT_BYTES", "check_checkpoint", "checkpoint_digest", "open_checkpoint",
           "sha256_of"]

MAX_CHECKPOINT_BYTES = 16 * 2**30  # a checkpoint larger than this is refused before it is read


def check_checkpoint(path: str | Path, where: str, error: type = ValueError) -> os.stat_result:
    """The ``stat`` of checkpoint ``path`` once it is known to be a regular file (symlinks
    followed) of at most :data:`MAX_CHECKPOINT_BYTES`: checked before a byte is read, so
    ``/dev/zero``, a FIFO or a symlink to either is a one-line ``error`` (prefixed with
    ``where``), never a hang. Needs no torch."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"{where} cannot be read ({exc.strerror or type(exc).__name__}; paths "
                    "are relative to the TOML)") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if (
            stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else "a folder" if \
            stat.S_ISDIR(st.st_mode) else "not a file"
        raise error(f"{where} is {kind}, not a regular file; give a state dict saved with "
                    "torch.save(model.state_dict(), path)")
    if st.st_size > MAX_CHECKPOINT_BYTES:
        raise error(f"{where} is {st.st_size / 2**30:.1f} GiB, over the "
                    f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB limit for a checkpoint")
    return st


def open_checkpoint(path: str | Path, where: str, error: type = ValueError):
    """``path`` opened for reading without blocking (a FIFO swapped in after the check cannot
    hang the open) and checked again on the open file; (file, stat)."""
    check_checkpoint(path, where, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"{where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CHECKPOINT_BYTES:
        f.close()
        raise error(f"{where} changed into something that is not a regular file of at most "
                    f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB while being opened")
    return f, st


def checkpoint_digest(path: str | Path, where: str = "checkpoint", error: type = ValueError) -> str:
    """``"<size>:<sha256 hex[:24]>"`` of the checkpoint's bytes (its content, not where it lies),
    after :func:`check_checkpoint`; reads no more than the size it found. One-line
    ``error`` for a missing, non-regular, oversized or unreadable file."""
    f, st = open_checkpoint(path, f"{where} {str(path)!r}", error)
    with f:
        return f"{st.st_size}:{sha256_of(f, st.st_size)[0][:24]}"


def sha256_of(f, limit: int) -> tuple[str, int]:
    """``(sha256 hex, bytes read)`` of an open binary file's content from its position, reading
    at most ``limit`` bytes in 1 MiB blocks (a file that grows while it is read, or never ends,
    costs no more than that)."""
    h, left = hashlib.sha256(), limit
    while left > 0:
        block = f.read(min(1 << 20, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest(), limit - left


"""Build behind the report: one background worker process per cache and case.

The report opens as soon as a case's data can be read and asks for the rest to be built here:
:func:`start` launches ``python -m core build CASE --cache DIR --progress-file P`` as a detached
process (its own session, so a server's Ctrl-C or a closed browser does not stop it half way),
unless a live worker for the same cache and case is already running, which it then *joins*.
Every server and browser session that shares the cache reads the same record, so a second one
never starts a second build. The build writes its live state — stage, step, rate, ETA, and each
finished stage's result — to the progress file atomically (:class:`ProgressFile`), and
:func:`state` reads it back. A killed worker leaves no half entry (cache entries are written
atomically) and no live record: the next :func:`start` restarts it, and the cache makes it
resume from the last finished stage.

Everything lives under ``<cache>/workers/``: ``<case>.json`` (the record: pid, command, start
time), ``<case>.progress.json``, ``<case>.log`` (the build's own output) and a short-lived
``<case>.lock`` that makes two starts racing each other start one process. Core never imports
Streamlit; the pages draw what :func:`state` returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

WORKERS = "workers"
REPO = Path(__file__).resolve().parents[2]
LOCK_STALE_S = 30.0


def _safe(case: str) -> str:
    """A file name for ``case``: its readable part plus a short hash, so that two case names
    never share a record even when they differ only in characters a file name cannot hold."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", case)[:60].lstrip(".") or "case"
    return f"{readable}-{hashlib.sha256(case.encode()).hexdigest()[:8]}"


def paths(case: str, cache_root: str | Path) -> dict[str, Path]:
    """The worker files of ``case`` in the cache at ``cache_root``: ``record``, ``progress``,
    ``log`` and ``lock`` (paths; none of them need exist)."""
    base = Path(cache_root) / WORKERS / _safe(case)
    return {"record": base.with_suffix(".json"), "progress": base.with_suffix(".progress.json"),
            "log": base.with_suffix(".log"), "lock": base.with_suffix(".lock")}


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and ``os.replace``: a reader
    sees the old content or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, allow_nan=False))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(pid: int, token: str) -> bool:
    """True when process ``pid`` runs and is our worker (its command line holds ``token``, so a
    recycled pid is not taken for it). A finished child of this process is reaped, not counted."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our own child, just finished
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no procfs (macOS): the signal check is all there is
        return True
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = (proc / "status").read_text(errors="replace")
    except OSError:
        return False
    if "\nState:\tZ" in status:
        return False
    # An empty command line: the process is between fork and exec (a start a moment ago).
    return token in cmdline or not cmdline.strip()


def running(case: str, cache_root: str | Path) -> dict | None:
    """The live worker's record for ``case`` in this cache (``pid``, ``case``, ``started``,
    ``command``, ``progress``, ``log``), or None when no worker runs."""
    p = paths(case, cache_root)
    record = _read(p["record"])
    if record and _alive(record.get("pid"), str(p["progress"])):
        return record
    return None


def running_other(case: str, cache_root: str | Path) -> str | None:
    """The name of another case whose worker runs in this cache, or None. One worker per cache:
    builds of two cases on two shared cores would only slow each other down."""
    for record_path in sorted((Path(cache_root) / WORKERS).glob("*.json")):
        if record_path.name.endswith(".progress.json"):
            continue
        record = _read(record_path) or {}
        other = record.get("case")
        if isinstance(other, str) and other != case and running(other, cache_root):
            return other
    return None


def state(case: str, cache_root: str | Path) -> dict:
    """What the background build of ``case`` is doing, for a page to draw.

    Returns ``running`` (a live worker), ``pid``, ``stage``, ``done``, ``total``, ``message``,
    ``rate`` (steps per second in the current stage), ``eta_s`` (seconds left in the current
    stage, from that rate), ``updated`` (epoch seconds of the last step), ``stages`` (each
    finished stage's ``{"status", "seconds", "message"}`` in build order), ``finished`` (the
    build ended and said so), ``error`` (its one-line error, if it stopped on one) and
    ``killed`` (a record exists but its process died before finishing), and ``waiting_for``
    (the case whose worker holds this cache, when it is not this one). Unknown fields are None.
    """
    p = paths(case, cache_root)
    live = running(case, cache_root)
    record = _read(p["record"])
    progress = _read(p["progress"]) or {}
    out = {k: progress.get(k) for k in ("stage", "done", "total", "message", "rate", "eta_s",
                                        "updated", "error")}
    out.update(running=live is not None, pid=(record or {}).get("pid"),
               stages=progress.get("stages") or {}, finished=bool(progress.get("finished")))
    out["killed"] = bool(record) and live is None and not out["finished"]
    out["waiting_for"] = None if live else running_other(case, cache_root)
    return out


def _command(case: str, cache_root: Path, progress: Path, device: str | None,
             quick: bool = False) -> list[str]:
    # A case given as a file path is made absolute: the worker runs from the repository root.
    target = str(Path(case).resolve()) if case.endswith(".toml") and Path(case).is_file() else case
    cmd = [sys.executable, "-m", "core", "build", target, "--cache", str(cache_root),
           "--progress-file", str(progress)]
    return cmd + (["--device", device] if device else []) + (["--quick"] if quick else [])


@contextlib.contextmanager
def _start_lock(lock: Path):
    """Exclusive creation of ``lock`` for the few milliseconds a start takes; yields False when
    another start holds it (a lock older than LOCK_STALE_S is a crashed start's: taken over)."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime < LOCK_STALE_S:
                    yield False
                    return
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        try:
            yield True
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        return
    yield False


def start(case: str, cache_root: str | Path, device: str | None = None,
          quick: bool = False) -> dict:
    """Start the background build of ``case`` in the cache at ``cache_root``, or join the one
    that runs. Returns :func:`state` plus ``joined`` (True: a worker was already running, or
    another caller is starting one right now; nothing new was started). While another case's
    worker holds the cache, nothing starts: the state's ``waiting_for`` names that case (call
    again later). ``quick``: the worker builds with the quick budget; otherwise with the case's
    own budget or ``$CASEBOOK_BUDGET``, which the worker inherits.

    Raises OSError when the cache cannot be written (a read-only shipped cache): the caller
    says so and builds nothing."""
    cache_root = Path(cache_root)
    p = paths(case, cache_root)
    if running(case, cache_root):
        return {**state(case, cache_root), "joined": True}
    if running_other(case, cache_root):
        return {**state(case, cache_root), "joined": False}
    p["record"].parent.mkdir(parents=True, exist_ok=True)
    with _start_lock(p["lock"]) as mine:
        if not mine or running(case, cache_root):
            return {**state(case, cache_root), "joined": True}
        with contextlib.suppress(FileNotFoundError):
            p["progress"].unlink()
        cmd = _command(case, cache_root, p["progress"], device, quick)
        with open(p["log"], "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        write_json_atomic(p["record"], {"pid": proc.pid, "case": case, "started": time.time(),
                                        "command": cmd, "progress": str(p["progress"]),
                                        "log": str(p["log"])})
    return {**state(case, cache_root), "joined": False}


def wait(case: str, cache_root: str | Path, timeout: float = 600.0, poll: float = 0.5) -> dict:
    """Block until the worker of ``case`` is no longer running (or ``timeout`` seconds passed);
    returns the last :func:`state`."""
    deadline = time.monotonic() + timeout
    while running(case, cache_root) and time.monotonic() < deadline:
        time.sleep(poll)
    return state(case, cache_root)


def log_tail(case: str, cache_root: str | Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of the worker's log (tqdm's carriage returns as newlines)."""
    try:
        with open(paths(case, cache_root)["log"], "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return text.replace("\r", "\n")


class ProgressFile:
    """The build's progress sink ``(stage, done, total, message)`` that writes what :func:`state`
    reads, at most every ``every`` seconds (and on every stage change and stage end).

    ``stage_done(stage, result)`` records a finished stage's result; ``finish(error=None)`` marks
    the build over (with its one-line error, if any)."""

    def __init__(self, path: str | Path, every: float = 0.5):
        self.path, self.every = Path(path), every
        self.stage: str | None = None
        self.stage_t0 = self.last = 0.0
        self.payload: dict = {"pid": os.getpid(), "stage": None, "done": None, "total": None,
                              "message": None, "rate": None, "eta_s": None,
                              "updated": time.time(), "stages": {}, "finished": False,
                              "error": None}
        self._flush()

    def _flush(self) -> None:
        with contextlib.suppress(OSError):  # progress is advisory: never fail a build for it
            write_json_atomic(self.path, self.payload)

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        now = time.time()
        new = stage != self.stage
        if new:
            self.stage, self.stage_t0 = stage, now
        elapsed = now - self.stage_t0
        rate = done / elapsed if done and elapsed > 0 else None
        self.payload.update(stage=stage, done=int(done), total=int(total), message=str(message),
                            rate=rate, eta_s=(total - done) / rate if rate and total else None,
                            updated=now)
        if new or done >= total or now - self.last >= self.every:
            self.last = now
            self._flush()

    def stage_done(self, stage: str, result: dict) -> None:
        self.payload["stages"][stage] = {k: result.get(k) for k in ("status", "seconds", "message")}
        self._flush()

    def finish(self, error: str | None = None) -> None:
        self.payload.update(finished=True, error=error, updated=time.time())
        self._flush()

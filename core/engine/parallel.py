"""Independent tasks of a build in worker processes, one thread each, results in task order.

A build runs torch with one intra-op thread (:func:`~core.engine.devices.build_threads`: on a
small model a second thread buys little and a busy machine makes it much slower), so on a CPU
with several cores the other cores sit idle. :func:`process_map` runs tasks that do not depend on
each other (say, every seed × correction of the corrections stage) in forked workers: each task
runs the same code, on the same thread count and deterministic settings, as it would in the
calling process, so the results are the same numbers, in the same order. The workers are forked
(they inherit the tasks and their data; nothing is pickled on the way in, only results come
back), so a user's model loaded from a file next to a case works there too.

One worker (run in the calling process, in order) on CUDA, where ``fork`` is unavailable, for a
single task, or when ``$CASEBOOK_WORKERS`` says 1; otherwise ``$CASEBOOK_WORKERS`` workers, by
default the CPUs this process may use divided by ``$CASEBOOK_THREADS`` (at most 4). A worker that
dies (killed, out of memory) leaves its tasks to the calling process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from core.engine.devices import build_threads

__all__ = ["process_map", "worker_count"]

_SHARED: dict = {}  # what the forked workers inherit: the function, its tasks, the device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    try:
        return max(1, int(value)) if value else None
    except ValueError:
        return None


def worker_count(device, n_tasks: int) -> int:
    """How many worker processes :func:`process_map` uses for ``n_tasks`` tasks on ``device``
    (see the module docstring); 1 means the calling process runs them in order."""
    if (str(device).startswith("cuda") or n_tasks < 2 or mp.current_process().daemon
            or "fork" not in mp.get_all_start_methods()):
        return 1  # a daemonic process may not have children
    asked = _env_int("CASEBOOK_WORKERS")
    if asked is not None:
        return min(asked, n_tasks)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus // (_env_int("CASEBOOK_THREADS") or 1), 4, n_tasks))


def _run(index: int):
    fn, tasks, device = _SHARED["fn"], _SHARED["tasks"], _SHARED["device"]
    with build_threads(device):
        return fn(*tasks[index])


def process_map(fn: Callable[..., Any], tasks: Sequence[tuple], *, device, workers: int | None = None,
                done: Callable[[int, Any], None] | None = None) -> list:
    """``[fn(*task) for task in tasks]``, computed by ``workers`` processes (default
    :func:`worker_count`), returned in task order. ``done(i, result)`` is called in the calling
    process as task ``i`` finishes (in finishing order). An exception ``fn`` raises is raised here
    (a task that must fail alone catches its own). With one worker the tasks run here, in order,
    inside whatever thread settings the caller holds."""
    n = worker_count(device, len(tasks)) if workers is None else max(1, int(workers))
    results: list = [None] * len(tasks)
    pending = list(range(len(tasks)))
    if n > 1:
        _SHARED.update(fn=fn, tasks=tasks, device=device)
        try:
            with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as pool:
                try:
                    futures = {pool.submit(_run, i): i for i in pending}
                except OSError:  # no process could be forked (a process limit, no memory)
                    futures = {}
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    pending.remove(i)
                    if done is not None:
                        done(i, results[i])
        except BrokenProcessPool:
            pass  # a worker died: what it left runs below, here
        finally:
            _SHARED.clear()
    for i in list(pending):
        results[i] = fn(*tasks[i])
        if done is not None:
            done(i, results[i])
    return results

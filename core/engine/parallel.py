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
single task, in a daemonic process, when ``$CASEBOOK_THREADS`` asks for more than one thread (an
OpenMP team cannot be used after a fork), or when ``$CASEBOOK_WORKERS`` says 1; otherwise
``$CASEBOOK_WORKERS`` workers, by default the CPUs this process may use (at most 4). Workers run
on one thread for their whole life, and return their results pickled as bytes. A worker that
dies (killed, out of memory) leaves its tasks to the calling process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

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
    if (_env_int("CASEBOOK_THREADS") or 1) > 1:
        return 1  # OpenMP teams of several threads hang in a forked child: never fork then
    asked = _env_int("CASEBOOK_WORKERS")
    if asked is not None:
        return min(asked, n_tasks)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4, n_tasks))


def _start_worker() -> None:
    # One thread for the worker's whole life: after a fork, an OpenMP region with several
    # threads (the parent's pool is gone) waits forever at its barrier.
    torch.set_num_threads(1)


def _run(index: int) -> bytes:
    """Task ``index`` in a worker, its result pickled there, on one thread (plain pickle: the
    tensors travel as bytes, not through torch's shared-memory reductions, which copy storages
    with the intra-op pool)."""
    fn, tasks, device = _SHARED["fn"], _SHARED["tasks"], _SHARED["device"]
    with build_threads(device):
        return pickle.dumps(fn(*tasks[index]), protocol=pickle.HIGHEST_PROTOCOL)


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
            with ProcessPoolExecutor(n, mp_context=mp.get_context("fork"),
                                     initializer=_start_worker) as pool:
                try:
                    futures = {pool.submit(_run, i): i for i in pending}
                except OSError:  # no process could be forked (a process limit, no memory)
                    futures = {}
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = pickle.loads(future.result())  # what our own worker pickled
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

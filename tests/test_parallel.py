"""Worker processes for independent build tasks: the same results, in task order, as in one
process; a task's exception reaches the caller; a dead worker's tasks run in the caller; the
corrections stage gives the same payload, bit for bit, with one worker or two."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch

from core.cases.decoy_mnist.data import decoy_mnist
from core.cases.decoy_mnist.net import build_model
from core.engine import parallel
from core.engine.devices import build_threads
from core.methods.training import set_seed, train_model
from core.stages import corrections as C
from core.stages.base import StageContext


def _square_and_pid(k):
    return k * k, os.getpid()


def _fail_on_three(k):
    if k == 3:
        raise ValueError("three")
    return k


def _die_on_two(k):
    if k == 2 and os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return k + 100


PARENT = os.getpid()


def test_results_come_back_in_task_order_from_other_processes():
    seen = []
    out = parallel.process_map(_square_and_pid, [(k,) for k in range(8)], device="cpu", workers=2,
                               done=lambda i, r: seen.append(i))
    assert [r[0] for r in out] == [k * k for k in range(8)]
    assert {r[1] for r in out} - {os.getpid()}, "no task ran in a worker process"
    assert sorted(seen) == list(range(8))


def test_one_worker_runs_here_in_order():
    seen = []
    out = parallel.process_map(_square_and_pid, [(k,) for k in range(4)], device="cpu", workers=1,
                               done=lambda i, r: seen.append(i))
    assert {r[1] for r in out} == {os.getpid()} and seen == [0, 1, 2, 3]


def test_a_task_exception_reaches_the_caller():
    with pytest.raises(ValueError, match="three"):
        parallel.process_map(_fail_on_three, [(k,) for k in range(5)], device="cpu", workers=2)


def test_a_dead_worker_leaves_its_tasks_to_the_caller():
    out = parallel.process_map(_die_on_two, [(k,) for k in range(5)], device="cpu", workers=2)
    assert out == [100, 101, 102, 103, 104]


def test_worker_count_follows_the_device_and_the_environment(monkeypatch):
    monkeypatch.setenv("CASEBOOK_WORKERS", "3")
    assert parallel.worker_count("cpu", 10) == 3
    assert parallel.worker_count("cpu", 2) == 2
    assert parallel.worker_count("cpu", 1) == 1
    assert parallel.worker_count("cuda:0", 10) == 1
    monkeypatch.setenv("CASEBOOK_WORKERS", "1")
    assert parallel.worker_count("cpu", 10) == 1
    monkeypatch.delenv("CASEBOOK_WORKERS")
    assert 1 <= parallel.worker_count("cpu", 10) <= 4


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


def test_corrections_stage_is_the_same_with_one_worker_or_two(monkeypatch):
    data = decoy_mnist(seed=0, subset=20)
    models = {}
    with build_threads("cpu"):
        for name in ("vanilla", "clean"):
            for seed in (0, 1):
                set_seed(seed)
                m = build_model("decoy-cnn")
                train_model(m, data.train.x_clean if name == "clean" else data.train.x,
                            data.train.y, epochs=1, lr=3e-3, batch_size=32, seed=seed,
                            device="cpu")
                models[(name, seed)] = m.eval()
    section = {"methods": ["suppression", "rrr", "counterexamples", "finetune"], "seeds": 2,
               "suppression": {"n_units": [1], "damping": [0.0], "candidates": 2,
                               "n_images": 6, "resolution": 2},
               "rrr": {"lambdas": [0.1], "epochs": 1, "batch_size": 64},
               "counterexamples": {"fractions": [0.5], "epochs": 1, "batch_size": 64},
               "finetune": {"epochs": 1, "batch_size": 64},
               "n_explain": 10, "explain_resolution": 2}
    payloads = []
    for workers in ("1", "2"):
        monkeypatch.setenv("CASEBOOK_WORKERS", workers)
        ctx = StageContext.standalone(
            "corrections", data, {"vanilla": models[("vanilla", 0)],
                                  "clean": models[("clean", 0)]},
            section=copy.deepcopy(section), experts={"layers": ["conv1", "fc1"]},
            subject="vanilla", reference="clean", seeds=2)
        object.__setattr__(ctx, "load_model", lambda n, s: copy.deepcopy(models[(n, s)]))
        with build_threads("cpu"):
            payloads.append(_strip(C.build(ctx)))
    assert [r["method"] for r in payloads[0]["rows"]] == section["methods"]
    assert _equal(payloads[0], payloads[1])


def test_detection_adaptive_attacks_are_the_same_with_one_worker_or_two(monkeypatch):
    from test_detection_eval import _Tiny, _tiny_data  # tests/ is on sys.path

    from core.stages import detection

    torch.manual_seed(0)
    data, net = _tiny_data(), _Tiny()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data.train.x), data.train.y).backward()
        opt.step()
    net.eval()
    section = {"layers": ["act1", "act2"], "layer": "act2", "steps": 10, "n_fit": 30,
               "n_attack_fit": 20, "resolution": 2, "k": 2, "n_examples": 2, "bootstrap": 30,
               "views": 3, "view_shift": 1, "patch_sizes": [4, 6], "positions": 2,
               "adaptive_to": ["influence", "mahalanobis", "both"]}
    payloads = []
    for workers in ("1", "2"):
        monkeypatch.setenv("CASEBOOK_WORKERS", workers)
        ctx = StageContext.standalone("detection", data, {"net": net}, section=dict(section),
                                      device=torch.device("cpu"))
        with build_threads("cpu"):
            payloads.append(_strip(detection.build(ctx)))
    assert [a["against"] for a in payloads[0]["adaptive_attacks"]] == section["adaptive_to"]
    assert _equal(payloads[0]["adaptive_attacks"], payloads[1]["adaptive_attacks"])
    assert _equal(payloads[0], payloads[1])


def test_workers_do_not_hang_after_the_parent_used_several_threads():
    """A forked child cannot use an OpenMP team (the parent's threads are gone): it waited forever
    at the barrier when a worker copied a result tensor with two threads. Run in a fresh
    interpreter with a deadline, so a hang fails the test instead of stalling the suite."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from core.engine.parallel import process_map
        torch.set_num_threads(2)
        big = torch.rand(4096, 4096)
        (big @ big).sum()                       # the parent's OpenMP team exists
        out = process_map(lambda k: torch.full((2_000_000,), float(k)) * (big[0, 0] * 0 + 1),
                          [(k,) for k in range(4)], device="cpu", workers=2)
        assert [float(t[-1]) for t in out] == [0.0, 1.0, 2.0, 3.0]
        print("ok")
    """)
    env = {**os.environ, "CASEBOOK_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(parallel.__file__).rsplit("/core/", 1)[0])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

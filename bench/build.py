"""Time a case-study build: cold (empty temp cache), then warm (everything cached), as the CLI runs it.

    .venv/bin/python bench/build.py [--case decoy-mnist] [--stages data,models,experts] [--seeds 1]
                                    [--device cpu] [--keep DIR] [--profile K]

Each build runs as its own ``python -m core build`` subprocess (so the warm figure includes the
interpreter start and any import, as a user sees it) and the per-stage seconds come from the
report's provenance. Prints the cold and warm wall seconds and their ratio, the cold build's CPU
time and the load average (the machine is shared: wall time depends on the neighbours), and the
accuracies and shortcut experts of the cold build's models. ``--device cuda`` validates CUDA at
open, which imports torch: its warm figure includes that import.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.casestudy.estimate import parse_estimate  # noqa: E402  (no torch: a text parser)


def _run(args: list[str], env: dict, profile_to: str | None = None
         ) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    prefix = ["-m", "cProfile", "-o", profile_to] if profile_to else []
    proc = subprocess.run([sys.executable, *prefix, "-m", "core", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t0, proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decoy-mnist")
    ap.add_argument("--stages", default="data,models,experts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", default=None, help="use (and keep) this cache dir instead of a temp one")
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="run the cold build under cProfile and print its top K functions by "
                         "cumulative time (the profile's overhead inflates the cold figure)")
    args = ap.parse_args(argv)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="casebook-bench-"))
    if args.keep and root.exists() and any(root.iterdir()):
        print(f"--keep {root} is not empty: the cold figure needs an empty cache", file=sys.stderr)
        return 2
    env = {**os.environ, "CASEBOOK_CACHE": str(root)}
    build = ["build", args.case, "--stages", args.stages, "--seeds", str(args.seeds),
             "--device", args.device, "--cache", str(root)]
    try:
        prof_path = (tempfile.mkstemp(prefix="casebook-build-", suffix=".prof")[1]
                     if args.profile else None)
        cold, proc = _run(build, env, prof_path)
        if prof_path:
            import pstats

            pstats.Stats(prof_path).sort_stats("cumulative").print_stats(args.profile)
        cold_cpu = proc.cpu_seconds
        guess = parse_estimate(proc.stdout)  # what the cold build printed before it started
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        warms = []
        for _ in range(args.warm_runs):
            warm, proc = _run(build, env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            warms.append(warm)
        _, rep = _run(["report", args.case, "--json", "--cache", str(root)], env)
        report = json.loads(rep.stdout)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    warms.sort()
    warm = warms[len(warms) // 2]
    prov = report.get("provenance", {})
    print(f"case {args.case}, stages {args.stages}, seeds {args.seeds}, device {args.device}, "
          f"torch {prov.get('torch')}, {os.cpu_count()} CPUs, "
          f"CASEBOOK_THREADS={os.environ.get('CASEBOOK_THREADS', '1 (default)')}")
    print("cold build  {:7.2f} s  (stages: {}; CPU time {:.1f} s, load average {:.1f})".format(
        cold, ", ".join(f"{k} {v:.1f} s" for k, v in prov.get("seconds", {}).items()
                        if v is not None), cold_cpu, os.getloadavg()[0]))
    real = prov.get("seconds", {})
    if guess:
        print("estimate / real per stage (the build's estimate from its timed probe): " + ", ".join(
            f"{k} {guess[k]:.0f}/{v:.0f} s = {guess[k] / v:.2f}" for k, v in real.items()
            if v and k in guess))
    print(f"warm build  {warm:7.2f} s  (median of {len(warms)}: "
          + ", ".join(f"{w:.2f}" for w in warms) + ")")
    print(f"cold / warm {cold / warm:7.1f}×")
    for name, m in report.get("models", {}).items():
        print(f"{name:8} train {m['train_acc']:.3f}  decoy-test {m['decoy_test_acc']:.3f}  "
              f"clean-test {m['clean_test_acc']:.3f}  (decoy-val {m['decoy_val_acc']:.3f}, "
              f"clean-val {m['clean_val_acc']:.3f})")
    summary = report.get("experts", {}).get("summary", {})
    for model, layers in summary.items():
        print(f"{model:8} shortcut experts: " + ", ".join(
            f"{layer} {s['n_shortcut']}/{s['n']} (mean decoy mass {s['mean_decoy_mass']:.3f})"
            for layer, s in layers.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

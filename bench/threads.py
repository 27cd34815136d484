"""What still varies between thread counts: build a case with N torch threads into an empty cache
and compare every claim of its report with the 1-thread build in the default cache.

    .venv/bin/python bench/threads.py [--case decoy-mnist] [--threads 2] [--keep DIR]

The default cache must hold the 1-thread build (``python -m core build CASE``). Prints, per kind
of claim (numbers, intervals, verdicts, grids, exact values), how many the two builds make, how
many differ at all, the largest difference of the numbers and intervals' values (absolute, and as
a share of the claim's own tolerance or interval half-width), and every claim the N-thread build
breaks (what ``python -m core readme --check`` would fail on). The builds are as deterministic as
torch allows on one machine; a second thread changes the order of floating-point sums (BLAS and
OpenMP reductions), so the weights differ in their last bits and the claims show how far that
carries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.report.claims import claims, compare  # noqa: E402  (no torch)


def _report(case: str, cache: str | None, env: dict) -> dict:
    args = [sys.executable, "-m", "core", "report", case, "--json"] + (["--cache", cache] if cache else [])
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _scale(c: dict) -> float | None:
    """The claim's own tolerance: a number's ``tol``, an interval's half-width."""
    if c["kind"] == "number":
        return c.get("tol")
    if c["kind"] == "interval" and c.get("low") is not None and c.get("high") is not None:
        return (c["high"] - c["low"]) / 2
    return None


def spread(one: list[dict], other: list[dict]) -> dict:
    """Per kind of claim: ``{"n", "differ", "max_abs", "max_rel"}`` over the claims both lists make
    (``max_rel``: the largest difference over the claim's own tolerance or half-width)."""
    by = {c["key"]: c for c in other}
    out: dict = defaultdict(lambda: {"n": 0, "differ": 0, "max_abs": 0.0, "max_rel": 0.0})
    for c in one:
        d = by.get(c["key"])
        if d is None:
            continue
        row = out[c["kind"]]
        row["n"] += 1
        a, b = c.get("value"), d.get("value")
        if a == b:
            continue
        row["differ"] += 1
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            diff = abs(float(a) - float(b))
            row["max_abs"] = max(row["max_abs"], diff)
            s = _scale(c)
            if s:
                row["max_rel"] = max(row["max_rel"], diff / s)
    return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decoy-mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="build into this folder and keep it (default: a temp folder)")
    a = ap.parse_args()
    env = dict(os.environ)
    base = _report(a.case, None, env)
    if not all(base.get("built", {}).values()):
        print(f"the default cache does not hold a full build of {a.case}: run "
              f"python -m core build {a.case} first", file=sys.stderr)
        return 2
    tmp = a.keep or tempfile.mkdtemp(prefix="casebook-threads-")
    env_n = {**env, "CASEBOOK_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "core", "build", a.case, "--cache", tmp, "--no-estimate"],
                   cwd=REPO, env=env_n, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    other = _report(a.case, tmp, env_n)
    one, two = claims(base), claims(other)
    problems, counts = compare(one, two)
    print(f"{a.case}: 1 thread (default cache) vs {a.threads} threads ({seconds:.0f} s build, "
          f"load {os.getloadavg()[0]:.1f}): {counts['compared']} claims compared, "
          f"{len(problems)} broken, {counts['fragile']} fragile verdicts not held to")
    for kind, row in sorted(spread(one, two).items()):
        rel = f", largest / its own tolerance {row['max_rel']:.2f}" if row["max_rel"] else ""
        size = f", largest |Δ| {row['max_abs']:.4g}" if row["max_abs"] else ""
        print(f"  {kind:>9}: {row['n']} claims, {row['differ']} differ{size}{rel}")
    for p in problems:
        print(f"  broken: {p}")
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

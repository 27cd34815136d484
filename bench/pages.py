"""Warm page times: each page's script time under AppTest with every cache warm.

    .venv/bin/python bench/pages.py                      # the case in $CASEBOOK_CASE, else decoy-mnist
    .venv/bin/python bench/pages.py --case decoy-mnist-small --repeat 7

Builds the case first when needed (cached on disk). For each page: one cold run (fills
st.cache_data / st.cache_resource), then ``--repeat`` warm reruns of the same view; prints the
median and the worst warm time in seconds and the ratio to the 0.5 s budget. The times include
AppTest's own overhead, so they slightly overstate what a browser session waits for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET = 0.5
PAGES = ["chapters/case_study.py", "chapters/influence.py", "chapters/method.py",
         "chapters/representations.py", "chapters/corrections.py", "chapters/essence.py",
         "chapters/detection.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=os.environ.get("CASEBOOK_CASE") or "decoy-mnist")
    ap.add_argument("--cache", default=os.environ.get("CASEBOOK_CACHE"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-build", action="store_true", help="measure what is built; build nothing")
    args = ap.parse_args()
    os.environ["CASEBOOK_CASE"] = args.case
    if args.cache:
        os.environ["CASEBOOK_CACHE"] = args.cache

    from streamlit.testing.v1 import AppTest

    from core.casestudy import CaseStudy

    study = CaseStudy.open(args.case, cache_dir=args.cache, allow_path=False)
    if not args.no_build:
        t0 = time.perf_counter()
        study.build(progress=None)
        print(f"# build (cached stages are only checked): {time.perf_counter() - t0:.1f} s")
    print(f"# case {args.case}, status {study.status()}")
    print(f"{'page':<28} {'cold s':>8} {'warm median s':>14} {'warm max s':>11} {'÷ budget':>9}")
    worst = 0.0
    for page in PAGES:
        if not (ROOT / page).exists():
            continue
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.run()
        t0 = time.perf_counter()
        at.switch_page(page).run()
        cold = time.perf_counter() - t0
        if at.exception:
            print(f"{page:<28} raised: {at.exception[0].value}")
            continue
        warm = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t0)
        med = statistics.median(warm)
        worst = max(worst, med)
        print(f"{page:<28} {cold:8.3f} {med:14.3f} {max(warm):11.3f} {med / BUDGET:9.2f}")
    verdict = "within" if worst <= BUDGET else "over"
    print(f"# slowest warm page: {worst:.3f} s ({verdict} the {BUDGET} s budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time (and optionally profile) the corrections stage alone on a case whose upstream is built.

    .venv/bin/python bench/corrections.py --cache DIR [--case decoy-mnist] [--seeds N]
        [--methods rrr,finetune] [--profile 25] [--json OUT.json] [--device cpu]

Runs ``core.stages.corrections.build`` on the case's context (data, models, experts read from
``DIR``, which must hold them for every seed asked for; nothing is written to the cache) and
prints the stage's seconds, each method's seconds per seed and its headline accuracy. With
``--profile K`` the run is under cProfile and the top K functions by cumulative time are printed.
``--json`` writes the rows (method, accuracies, region mass, strength, seconds) for a comparison
of two runs (``--compare A.json B.json``: each method's headline accuracy and strength side by
side, with the seeds' sd). Seconds depend on the machine's load: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _rows(payload: dict) -> list[dict]:
    keep = ("method", "strength", "seconds", "val_acc", "region_mass", "gap_closed")
    out = []
    for r in payload["rows"]:
        row = {k: r.get(k) for k in keep}
        for k, v in r.items():
            if k.endswith("_acc") and not k.startswith(("paired", "subject", "reference")) \
                    or k.endswith(("_acc_sd", "_per_seed")) and "paired" not in k:
                row[k] = v
        out.append(row)
    return out


def _compare(a_path: str, b_path: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    head = a["headline"] + "_acc"
    print(f"stage seconds: {a['seconds']:.1f} → {b['seconds']:.1f}")
    bm = {r["method"]: r for r in b["rows"]}
    for r in a["rows"]:
        s = bm.get(r["method"])
        if s is None:
            print(f"{r['method']:18} missing in {b_path}")
            continue
        print(f"{r['method']:18} {head} {r[head]:.4f} ± {r.get(head + '_sd') or 0:.4f} → "
              f"{s[head]:.4f} ± {s.get(head + '_sd') or 0:.4f}   region_mass "
              f"{r['region_mass']:.4f} → {s['region_mass']:.4f}   strength "
              f"{r['strength']} → {s['strength']}   per seed {r.get('strength_per_seed')} → "
              f"{s.get('strength_per_seed')}   seconds {r['seconds']:.1f} → {s['seconds']:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decoy-mnist")
    ap.add_argument("--cache", help="a cache holding the case's data, models and experts")
    ap.add_argument("--seeds", type=int, default=None, help="corrections.seeds (default: the case's)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", type=int, default=0, metavar="K")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        return _compare(*args.compare)
    if not args.cache:
        ap.error("--cache is required")

    from core.casestudy import CaseStudy
    from core.stages import corrections

    study = CaseStudy.open(args.case, cache_dir=args.cache, device=args.device)
    ctx = study.context("corrections")
    section = dict(ctx.section)
    if args.seeds is not None:
        section["seeds"] = args.seeds
    if args.methods:
        section["methods"] = args.methods.split(",")
    ctx = type(ctx)(**{**ctx.__dict__, "section": section})
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    payload = corrections.build(ctx)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    head = payload["headline"] + "_acc"
    print(f"corrections on {args.case}: {wall:.1f} s ({payload['n_seeds']} seed(s))")
    for r in payload["rows"]:
        print(f"  {r['method']:18} {head} {r[head]:.4f}  strength {r['strength']}  "
              f"seconds {r['seconds']:.1f} per seed")
    for s in payload["skipped"]:
        print(f"  skipped {s['method']}: {s['reason']}")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"case": args.case, "headline": payload["headline"], "seconds": wall,
             "rows": _rows(payload)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

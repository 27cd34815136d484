"""The planted-shortcut suite of the discovery stage: found@1, found@3 and false alarms.

    .venv/bin/python bench/planted.py [--seeds 0,1] [--json FILE]

Five kinds of planted mark on the bundled digits (corner patch, border frame, glyph, a texture
patch at a random place, a backdoor trigger on a few % of images), each with a model that relies
on it and two clean twins (trained without the mark; the mark present but independent of the
label). Prints one line per model and the suite's figures with 95% Wilson intervals; ``--json``
also writes them (the README quotes that run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.methods import planted  # noqa: E402
from core.methods.discovery import wilson  # noqa: E402


def _share(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({lo:.2f}–{hi:.2f})" if n else "–"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    t0 = time.perf_counter()
    result = planted.run_suite(seeds=seeds)
    for p in result["per_model"]:
        print(f"{p['kind']:13} {p['variant']:12} seed {p['seed']}  found at {p['found_at']!s:4} "
              f"iou {p['iou'] or 0:.2f}  suspected {p['suspected']}  drop {p['drop']:+.2f}  "
              f"{p['seconds']:.0f} s")
    short = [p for p in result["per_model"] if p["variant"] == "shortcut"]
    twins = [p for p in result["per_model"] if p["variant"] != "shortcut"]
    at1 = sum(p["found_at"] == 1 for p in short)
    at3 = sum(p["found_at"] is not None and p["found_at"] <= 3 for p in short)
    alarms = sum(p["suspected"] > 0 for p in twins)
    print(f"found@1 {_share(at1, len(short))}  found@3 {_share(at3, len(short))}  "
          f"false alarms {_share(alarms, len(twins))}  ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        slim = {k: v for k, v in result.items() if k != "per_model"}
        slim["per_model"] = [{k: v for k, v in p.items() if k != "suspects"}
                             for p in result["per_model"]]
        args.json.write_text(json.dumps(slim, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

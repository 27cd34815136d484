"""The planted-shortcut suite of the discovery stage: found@1, found@3 and false alarms.

    .venv/bin/python bench/planted.py [--seeds 3 | --seeds 0,2] [--json FILE]

Five kinds of planted mark on the bundled digits (corner patch, border frame, glyph, a texture
patch at a random place, a backdoor trigger on a few % of images), each with a model that relies
on it and two clean twins (trained without the mark; the mark present but independent of the
label), per seed: ``--seeds N`` runs seeds 0 … N − 1 (5 N shortcut models, 10 N twins), a
comma-separated list runs those seeds. Prints one line per model (the best-matching candidate of
the target class: its rank when found, median IoU with the planted masks, consistency, and its
reason when not suspected), one line per kind, and the suite's figures with 95% Wilson
intervals; ``--json`` also writes them (the README quotes that run).
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


def seeds_of(text: str) -> tuple[int, ...]:
    """``"3"`` → (0, 1, 2) (a count); ``"0,2"`` → (0, 2) (a list)."""
    if "," in text:
        return tuple(int(s) for s in text.split(",") if s.strip())
    return tuple(range(int(text)))


def _model_line(p: dict) -> str:
    cons = "–" if p.get("consistency") is None else f"{p['consistency']:.2f}"
    why = "" if p["found_at"] is not None or not p.get("reason") else f"  ({p['reason'][:70]})"
    return (f"{p['kind']:13} {p['variant']:12} seed {p['seed']}  found at {p['found_at']!s:4} "
            f"iou {p['iou'] or 0:.2f}  consistency {cons:5}  suspected {p['suspected']}  "
            f"drop {p['drop']:+.2f}  {p['seconds']:.0f} s{why}")


def _kind_line(kind: str, per: list[dict]) -> str:
    short = [p for p in per if p["kind"] == kind and p["variant"] == "shortcut"]
    twins = [p for p in per if p["kind"] == kind and p["variant"] != "shortcut"]
    at3 = sum(p["found_at"] is not None and p["found_at"] <= 3 for p in short)
    ious = sorted(p["iou"] or 0.0 for p in short)
    cons = sorted(p["consistency"] for p in short if p.get("consistency") is not None)
    mid = (lambda v: f"{v[len(v) // 2]:.2f}" if v else "–")
    return (f"  {kind:13} found@3 {_share(at3, len(short))}  median iou {mid(ious)}  "
            f"median consistency {mid(cons)}  false alarms "
            f"{_share(sum(p['suspected'] > 0 for p in twins), len(twins))}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1",
                    help="a count N (seeds 0 … N − 1) or a comma-separated list (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = planted.run_suite(seeds=seeds_of(args.seeds),
                               on_model=lambda p: print(_model_line(p), flush=True))
    per = result["per_model"]
    for kind in dict.fromkeys(p["kind"] for p in per):
        print(_kind_line(kind, per))
    short = [p for p in per if p["variant"] == "shortcut"]
    twins = [p for p in per if p["variant"] != "shortcut"]
    at1 = sum(p["found_at"] == 1 for p in short)
    at3 = sum(p["found_at"] is not None and p["found_at"] <= 3 for p in short)
    alarms = sum(p["suspected"] > 0 for p in twins)
    print(f"found@1 {_share(at1, len(short))}  found@3 {_share(at3, len(short))}  "
          f"false alarms {_share(alarms, len(twins))}  ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        slim = {k: v for k, v in result.items() if k != "per_model"}
        slim["per_model"] = [{k: v for k, v in p.items() if k != "suspects"} for p in per]
        args.json.write_text(json.dumps(slim, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

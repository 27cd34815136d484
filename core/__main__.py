"""Command line: build a case study, print its report, list the cases.

    python -m core build decoy-mnist [--force] [--device cpu|cuda] [--seeds N] [--stages a,b]
                                     [--cache DIR]
    python -m core report decoy-mnist [--json] [--seeds N] [--cache DIR]
    python -m core list [--cache DIR]

A case is a built-in name (``cases/<name>.toml``) or a path to a TOML file. Bad input (unknown
case, malformed TOML, unknown layer or stage, CUDA without CUDA) prints one line on stderr and
exits with code 2, before anything in the cache is touched. A build whose delegated stage
(representations, corrections) failed exits with code 1 after building the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention too)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m core", description="Influence Casebook: build and report case "
                 "studies of influence-directed explanations.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p):
        p.add_argument("--cache", metavar="DIR", default=None,
                       help="cache directory (default $CASEBOOK_CACHE or <repo>/.cache)")

    b = sub.add_parser("build", help="train and compute every stage of a case study (cached)")
    b.add_argument("case", help="a built-in case name or a path to a .toml file")
    b.add_argument("--force", action="store_true", help="recompute the stages even if cached")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train the models for seeds 0..N-1 (default 1)")
    b.add_argument("--stages", default=None, metavar="A,B",
                   help="only these stages (and what they need): data, models, experts, "
                        "representations, corrections")
    common(b)

    r = sub.add_parser("report", help="print a case study's results (never computes)")
    r.add_argument("case")
    r.add_argument("--json", action="store_true", help="the full report as JSON on stdout")
    r.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="report seeds 0..N-1 (default: every seed built)")
    common(r)

    ls = sub.add_parser("list", help="list the built-in cases and which stages are built")
    common(ls)
    return ap


class _Bars:
    """One tqdm bar per stage on stderr; a timing line when a stage ends."""

    def __init__(self):
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if stage != self.stage:
            self.close()
            if message == "cached" and done == total:  # nothing to draw: the summary line says it
                return
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=max(total, 1), desc=f"{stage:>15}", unit="step", leave=True,
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.25)
        if self.bar.total != max(total, 1):
            self.bar.total = max(total, 1)
        self.bar.n = min(done, self.bar.total)
        if message:
            self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _summary(rep: dict) -> str:
    lines = [f"{rep['case']}: {rep.get('title', '')}"]
    built = rep.get("built", {})
    lines.append("built: " + "  ".join(f"{k} {'✓' if v else '–'}" for k, v in built.items()))
    if "data" in rep:
        d = rep["data"]
        lines.append(f"data: {d.get('source')} train {d.get('n_train')} / val {d.get('n_val')} / "
                     f"test {d.get('n_test')}")
    if "models" in rep:
        n = len(rep.get("seeds", [0]))
        lines.append(f"models ({n} seed{'s' if n != 1 else ''}; mean ± sd):")
        lines.append(f"  {'model':8} {'train':>13} {'decoy test':>13} {'clean test':>13}")
        for name, m in rep["models"].items():
            cells = [f"{_fmt(m.get(k))} ± {_fmt(m.get(k + '_sd'))}"
                     for k in ("train_acc", "decoy_test_acc", "clean_test_acc")]
            lines.append(f"  {name:8} " + " ".join(f"{c:>13}" for c in cells))
    if "experts" in rep:
        e = rep["experts"]
        th = e.get("shortcut_thresholds") or {}
        lines.append(f"experts: top {e['k']} per class of {', '.join(e['layers'])}; shortcut when "
                     "decoy_mass > " + ", ".join(f"{k} {v:.3f}" for k, v in th.items()))
        for model, layers in e["summary"].items():
            parts = [f"{layer} {s['n_shortcut']}/{s['n']} (mass {_fmt(s['mean_decoy_mass'])})"
                     for layer, s in layers.items()]
            lines.append(f"  {model:8} shortcut experts: " + ", ".join(parts))
    for stage in ("representations", "corrections"):
        if stage in rep:
            lines.append(f"{stage}: {len(rep[stage])} rows")
            for row in rep[stage][:12]:
                keys = [k for k in row if isinstance(row[k], float)][:4]
                label = row.get("method", "?") + (f" [{row['model']}]" if "model" in row else "")
                lines.append(f"  {label:36} " + "  ".join(f"{k} {_fmt(row[k])}" for k in keys))
    secs = rep.get("provenance", {}).get("seconds", {})
    if secs:
        lines.append("seconds: " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in secs.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    from core.casestudy import CaseError, CaseStudy, list_cases

    try:
        if args.command == "list":
            return _list(args, CaseStudy, CaseError, list_cases)
        if args.seeds is not None and args.seeds < 1:
            raise CaseError(f"--seeds must be at least 1, got {args.seeds}")
        stages = _stages(args, CaseError) if args.command == "build" else None
        study = CaseStudy.open(args.case, cache_dir=args.cache,
                               device=getattr(args, "device", None), seeds=args.seeds)
        if args.command == "build":
            return _build(args, study, stages)
        rep = study.report()
        text = json.dumps(rep, indent=1, allow_nan=False) if args.json else _summary(rep)
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _stages(args, CaseError) -> list[str] | None:
    from core.casestudy import STAGES

    if args.stages is None:
        return None
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise CaseError(f"unknown stage {bad[0] if bad else args.stages!r}; stages: "
                        f"{', '.join(STAGES)}")
    return stages


def _build(args, study, stages: list[str] | None) -> int:
    bars = _Bars()
    t0 = time.perf_counter()
    try:
        results = study.build(stages=stages, force=args.force, progress=bars, seeds=args.seeds)
    finally:
        bars.close()
    failed = 0
    for stage, r in results.items():
        note = f" ({r['message']})" if r["message"] else ""
        print(f"{stage:>15}: {r['status']:7} {r['seconds']:7.2f} s{note}", file=sys.stderr)
        failed += r["status"] == "failed"
    print(f"{study.name}: built in {time.perf_counter() - t0:.2f} s; cache {study.cache.root}",
          file=sys.stderr)
    return 1 if failed else 0


def _list(args, CaseStudy, CaseError, list_cases) -> int:
    from core.cache import Cache

    cache = Cache(args.cache)
    names = list_cases()
    width = max([len(n) for n in names] + [4])
    print(f"{'case':{width}}  stages built (data models experts representations corrections)")
    for name in names:
        try:
            status = CaseStudy.open(name, cache_dir=args.cache, device="cpu").status()
            marks = "  ".join(f"{k} {'✓' if v else '–'}" for k, v in status.items())
        except CaseError as exc:
            marks = f"invalid: {exc}"
        print(f"{name:{width}}  {marks}")
    entries = cache.entries()
    size = sum(e.size for e in entries)
    print(f"cache {cache.root}: {len(entries)} entries, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

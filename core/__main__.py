"""Command line: build a case study, print its report, list the cases, start a new case.

    python -m core build decoy-mnist [--force] [--device cpu|cuda] [--seeds N] [--stages a,b]
                                     [--cache DIR] [--background]
    python -m core report decoy-mnist [--json] [--seeds N] [--cache DIR]
    python -m core list [--cache DIR]
    python -m core new-case DIR       # a working example of your own case to start from
    python -m core export decoy-mnist --html report.html   # one self-contained HTML file
    python -m core readme [--check]   # README's generated blocks from the built cases
    python -m core discover decoy-mnist [--model NAME] [--top K] --out DIR   # shortcut suspects

A case is a known name (the built-ins under ``core/cases/``, and the TOML files under
``$CASEBOOK_CASES``) or a path to a TOML file. Bad input (unknown case, malformed TOML, unknown
layer or stage, a device that is not there) prints one line on stderr and exits with code 2,
before anything in the cache is touched. A build whose delegated stage (representations,
corrections, essence, detection) failed exits with code 1 after building the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from core.casestudy import DELEGATED, STAGES, CaseError, CaseStudy, list_cases, worker
from core.casestudy import estimate as est
from core.casestudy.facts import FactsNotCached, no_user_code
from core.casestudy.worker import ProgressFile
from core.report.markdown import markdown
from core.report.readme import check_readme, write_readme
from core.storage import cache
from core.storage.cache import Cache

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

    def quick(p):
        p.add_argument("--quick", action="store_true",
                       help="the quick budget: every stage with fewer images, draws, steps and "
                            "seeds (a first look at a real model); keyed apart from a full build")

    b = sub.add_parser("build", help="train and compute every stage of a case study (cached)")
    b.add_argument("case", help="a built-in case name or a path to a .toml file")
    b.add_argument("--force", action="store_true", help="recompute the stages even if cached")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when "
                   "available)")
    b.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train the models for seeds 0..N-1 (default 1)")
    b.add_argument("--stages", default=None, metavar="A,B",
                   help="only these stages (and what they read): " + ", ".join(STAGES))
    b.add_argument("--background", action="store_true",
                   help="start the build as a background worker and return at once (or join the "
                        "one that runs for this cache and case); the app shows its progress")
    b.add_argument("--progress-file", default=None, metavar="PATH", help=argparse.SUPPRESS)
    b.add_argument("--no-estimate", action="store_true",
                   help="skip the estimate per stage printed before a build (a timed probe of "
                        "the model; printed only when a stage is to be computed)")
    common(b)
    quick(b)

    r = sub.add_parser("report", help="print a case study's results (never computes)")
    r.add_argument("case")
    r.add_argument("--json", action="store_true", help="the full report as JSON on stdout")
    r.add_argument("--markdown", action="store_true",
                   help="the report as Markdown tables (the README's generated blocks)")
    r.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="report seeds 0..N-1 (default: every seed built)")
    common(r)
    quick(r)

    ls = sub.add_parser("list", help="list the known cases and which stages are built")
    common(ls)

    n = sub.add_parser("new-case", help="write a working example case to start your own from")
    n.add_argument("dir", help="an empty or new folder")

    ex = sub.add_parser("export", help="the report as one self-contained HTML file (never computes)")
    ex.add_argument("case")
    ex.add_argument("--html", required=True, metavar="FILE", help="where to write it")
    common(ex)
    quick(ex)

    dc = sub.add_parser("discover", help="mask-free shortcut suspects of a model: DIR/candidates"
                        ".json and DIR/<masks>/ PNG masks at the images' relative paths")
    dc.add_argument("case", help="a built-in case name or a path to a .toml file")
    dc.add_argument("--model", default=None, help="one of the case's models (default: the model "
                    "under study)")
    dc.add_argument("--top", type=int, default=3, metavar="K",
                    help="write masks for the K best candidates (default 3)")
    dc.add_argument("--out", required=True, metavar="DIR", help="where to write them")
    dc.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    common(dc)
    quick(dc)

    rd = sub.add_parser("readme", help="rewrite README.md's generated blocks from the built cases")
    rd.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when a claim of a block (a number beyond its "
                         "tolerance, a verdict, a count outside its interval) differs from the build")
    rd.add_argument("--strict", action="store_true",
                    help="with --check: the blocks must equal the build's bit for bit (same machine)")
    common(rd)
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


# The numbers a stage's row is read by, first (the rest of its floats fill up to four).
_ROW_KEYS = {
    "discovery": ("necessity", "control_necessity", "sufficiency", "control_sufficiency",
                  "p_value"),
    "corrections": ("{headline}_acc", "paired_delta", "gap_closed"),
}


def _row_keys(stage: str, row: dict) -> list[str]:
    """The (at most five) float fields of ``row`` the CLI summary shows: the stage's own reading
    keys (:data:`_ROW_KEYS`) when present, then its other floats in the row's order."""
    first = [k.format(headline=row.get("headline", "")) for k in _ROW_KEYS.get(stage, ())]
    first = [k for k in first if isinstance(row.get(k), float)]
    rest = [k for k in row if isinstance(row[k], float) and k not in first]
    return (first + rest)[: max(len(first), 4)]


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
        first = next(iter(rep["models"].values()))
        keys = [k for k in first if k.endswith("_acc")]
        lines.append(f"models ({n} seeds; mean ± sd):" if n > 1 else  # one seed has no spread
                     "models (1 seed):")
        width = max([len(m) for m in rep["models"]] + [8])
        lines.append(f"  {'model':{width}} " + " ".join(
            f"{k[:-4].replace('_', ' '):>13}" for k in keys))
        for name, m in rep["models"].items():
            cells = [f"{_fmt(m.get(k))} ± {_fmt(m.get(k + '_sd'))}" if n > 1 else _fmt(m.get(k))
                     for k in keys]
            lines.append(f"  {name:{width}} " + " ".join(f"{c:>13}" for c in cells))
    if "experts" in rep:
        e = rep["experts"]
        th = e.get("shortcut_thresholds") or {}
        if th:
            lines.append(f"experts: top {e['k']} per class of {', '.join(e['layers'])}; shortcut "
                         "when region mass > " + ", ".join(f"{k} {v:.3f}" for k, v in th.items()))
        else:
            lines.append(f"experts: top {e['k']} per class of {', '.join(e['layers'])} (the case "
                         "has no region: no shortcut verdicts)")
        for model, layers in e["summary"].items():
            if th:
                parts = [f"{layer} {s['n_shortcut']}/{s['n']} (mass "
                         f"{_fmt(s.get('mean_region_mass'))})" for layer, s in layers.items()]
                lines.append(f"  {model:8} shortcut experts: " + ", ".join(parts))
            else:
                lines.append(f"  {model:8} experts: " + ", ".join(
                    f"{layer} {s['n']}" for layer, s in layers.items()))

    for stage in DELEGATED:
        if stage in rep:
            lines.append(f"{stage}: {len(rep[stage])} rows")
            for row in rep[stage][:12]:
                keys = _row_keys(stage, row)
                # what names a row: a method (representations, corrections), a detector, or for
                # essence the layer, the class pair and the fill
                name = row.get("method") or row.get("detector") or row.get("label")
                if name is None and "a" in row and "b" in row:
                    name = (f"{row.get('layer', '')} {row.get('a_name', row['a'])} vs "
                            f"{row.get('b_name', row['b'])}" +
                            (f" ({row['fill']})" if row.get("fill") else "")).strip()
                if name is None and row.get("kind") in ("candidate", "note"):  # discovery
                    name = (f"#{row.get('rank', '-')} class {row.get('class')}: "
                            f"{row.get('verdict')}")
                if name is None:
                    name = row.get("layer") or row.get("stage") or "row"
                label = str(name) + (f" [{row['model']}]" if "model" in row else "")
                if row.get("detector") and row.get("layer"):
                    label += f" @ {row['layer']}"
                lines.append(f"  {label:36} " + "  ".join(f"{k} {_fmt(row[k])}" for k in keys))
    secs = rep.get("provenance", {}).get("seconds", {})
    if secs:
        lines.append("seconds: " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in secs.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)

    try:
        if args.command == "list":
            return _list(args, CaseStudy, CaseError, list_cases)
        if args.command == "new-case":
            return _new_case(args, CaseError)
        if args.command == "readme":
            return _readme(args, CaseStudy)
        if args.command == "export":
            return _export(args, CaseStudy, CaseError)
        if args.command == "discover":
            return _discover(args, CaseStudy, CaseError)
        if args.seeds is not None and args.seeds < 1:
            raise CaseError(f"--seeds must be at least 1, got {args.seeds}")
        if args.seeds is not None and args.seeds > 64:
            raise CaseError(f"--seeds must be at most 64, got {args.seeds}")
        device = getattr(args, "device", None)
        if device is not None and not _valid_device(device):
            raise CaseError(f"--device must be cpu, cuda or cuda:N, got {device[:40]!r}")
        stages = _stages(args, CaseError) if args.command == "build" else None
        study = CaseStudy.open(args.case, cache_dir=args.cache, device=device, seeds=args.seeds,
                               budget="quick" if args.quick else None)
        if args.command == "build":
            return _build(args, study, stages)
        rep = study.report()
        if args.markdown:
            text = markdown(rep).rstrip("\n")
        else:
            text = json.dumps(rep, indent=1, allow_nan=False) if args.json else _summary(rep)
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CaseError, _cache_error()) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: {first}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _cache_error():
    """The cache's own error class for an unusable cache directory (a ValueError subclass)."""
    return getattr(cache, "CacheError", _Never)


class _Never(Exception):
    pass


def _valid_device(text: str) -> bool:
    return bool(re.fullmatch(r"cpu|cuda(:\d{1,2})?", text))


def _readme(args, CaseStudy) -> int:
    if args.check:
        return check_readme(CaseStudy, args.cache, strict=args.strict)
    return write_readme(CaseStudy, args.cache)


def _export(args, CaseStudy, CaseError) -> int:
    from core.report.html import html_report

    study = CaseStudy.open(args.case, cache_dir=args.cache, budget="quick" if args.quick else None)
    if not study.status().get("data"):
        raise CaseError(f"{study.name} is not built; run python -m core build {args.case}")
    text = html_report(study)
    out = Path(args.html)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CaseError(f"cannot write {out.name}: {exc.strerror}") from None
    print(f"{out}: {len(text) / 1024:.0f} KiB, self-contained", file=sys.stderr)
    return 0


def _discover(args, CaseStudy, CaseError) -> int:
    """``discover CASE [--model NAME] [--top K] --out DIR`` (issue 20's output contract)."""
    if args.top < 0 or args.top > 1000:
        raise CaseError(f"--top must be between 0 and 1000, got {args.top}")
    if args.device is not None and not _valid_device(args.device):
        raise CaseError(f"--device must be cpu, cuda or cuda:N, got {args.device[:40]!r}")
    study = CaseStudy.open(args.case, cache_dir=args.cache, device=args.device,
                           budget="quick" if args.quick else None)
    if args.model is not None and args.model not in study.model_names:
        raise CaseError(f"--model {args.model[:40]!r} is not one of the case's models "
                        f"({', '.join(study.model_names)})")
    from core.queries.discovery import discover_to_folder

    rows = discover_to_folder(study, args.out, args.model, args.top)
    for r in rows:
        print(f"{r['rank']:>3}  {r['class']!s:16} {r['verdict']:14} necessity {r['necessity']:.2f}"
              f" (control {r['control_necessity']:.2f})  sufficiency {r['sufficiency']:.2f}"
              f" (control {r['control_sufficiency']:.2f})  masks {args.out}/{r['masks']}")
    if not rows:
        print("no candidate (see report --json under discovery for the reasons)")
    return 0


def _new_case(args, CaseError) -> int:
    from core.cases.newcase import write_example

    try:
        written = write_example(Path(args.dir))
    except ValueError as exc:
        raise CaseError(str(exc).splitlines()[0]) from None
    except OSError as exc:  # /proc/x, a read-only folder, a full disk: one line, exit 2
        raise CaseError(f"cannot write the example case into {args.dir[:80]!r}: "
                        f"{exc.strerror or type(exc).__name__}") from None
    for p in written:
        print(p)
    print(f"next: python {Path(args.dir) / 'make_images.py'} && python -m core build "
          f"{Path(args.dir) / 'case.toml'}", file=sys.stderr)
    return 0


def _stages(args, CaseError) -> list[str] | None:
    if args.stages is None:
        return None
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise CaseError(f"unknown stage {bad[0] if bad else args.stages!r}; stages: "
                        f"{', '.join(STAGES)}")
    return stages


def _background(args, study) -> int:
    if args.stages or args.force or args.seeds is not None:
        raise CaseError("--background builds every stage of the case as configured: it takes "
                        "no --stages, --force or --seeds")
    try:
        st = worker.start(args.case, study.cache.root, device=args.device,
                          quick=study.budget["preset"] == "quick")
    except OSError as exc:
        raise CaseError(f"cannot start a background build in {study.cache.root}: "
                        f"{exc.strerror or exc}") from None
    what = "joined the running" if st["joined"] else "started a"
    log = worker.paths(args.case, study.cache.root)["log"]
    print(f"{study.name}: {what} background build (pid {st['pid']}); log {log}", file=sys.stderr)
    return 0


def _build(args, study, stages: list[str] | None) -> int:
    if args.background:
        return _background(args, study)
    bars = _Bars()
    sink = bars
    if args.progress_file:  # a background worker: the app reads this file (core.casestudy.worker)
        live = ProgressFile(args.progress_file)

        def sink(stage, done, total, message=""):
            bars(stage, done, total, message)
            live(stage, done, total, message)
    if not args.no_estimate and not args.progress_file:  # a background worker starts at once
        _print_estimate(study, stages, args.force)
    t0 = time.perf_counter()
    try:
        results = study.build(stages=stages, force=args.force, progress=sink, seeds=args.seeds)
    except BaseException as exc:
        if args.progress_file:
            first = (str(exc).strip().splitlines() or [""])[0]
            live.finish(error=f"{type(exc).__name__}: {first}"[:300])
        raise
    finally:
        bars.close()
    if args.progress_file:
        for stage, r in results.items():
            live.stage_done(stage, r)
        live.finish()
    failed = 0
    for stage, r in results.items():
        note = f" ({r['message']})" if r["message"] else ""
        print(f"{stage:>15}: {r['status']:7} {r['seconds']:7.2f} s{note}", file=sys.stderr)
        failed += r["status"] == "failed"
    print(f"{study.name}: built in {time.perf_counter() - t0:.2f} s; cache {study.cache.root}",
          file=sys.stderr)
    return 1 if failed else 0


def _print_estimate(study, stages: list[str] | None, force: bool) -> None:
    """Print (stdout) the estimate per stage of what this build computes
    (``core.casestudy.estimate``); nothing when everything is cached. An estimate that cannot be
    made says why in one line and the build goes on."""
    todo = est.to_build(study, stages, force)
    if not todo:
        return
    try:
        rows, probe = est.estimate(study, todo)
    except CaseError:
        return  # the case itself is wrong: the build says so, in its one line
    except Exception as exc:  # noqa: BLE001 — an estimate never stops a build
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"estimate unavailable: {type(exc).__name__}: {first}"[:300], flush=True)
        return
    # on stdout: information, where stderr carries the progress and a bad case's one line
    print(est.format_estimate(rows, probe), flush=True)


def _list(args, CaseStudy, CaseError, list_cases) -> int:
    cache = Cache(args.cache)
    names = list_cases()
    width = max([len(n) for n in names] + [4])
    print(f"{'case':{width}}  stages built")
    for name in names:
        try:
            with no_user_code():  # listing reads TOML and cached facts: no case's code runs
                status = CaseStudy.open(name, cache_dir=args.cache, device="cpu").status()
            marks = "  ".join(f"{k} {'✓' if v else '–'}" for k, v in status.items())
        except FactsNotCached:
            marks = "not built (its model facts are not cached yet)"
        except CaseError as exc:
            marks = f"invalid: {exc}"
        print(f"{name:{width}}  {marks}")
    entries = cache.entries()
    size = sum(e.size for e in entries)
    print(f"cache {cache.root}: {len(entries)} entries, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

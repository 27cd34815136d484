"""The README's generated blocks and their claims file.

    python -m core readme                 # rewrite the blocks and README.claims.json from the build
    python -m core readme --check         # exit 1 when a claim changed (tolerances, not bits)
    python -m core readme --check --strict  # exit 1 when a block differs at all (same machine)

Each ``<!-- report:CASE -->`` block is the Markdown of the case's report
(:func:`core.report.markdown.markdown`); beside the README, ``README.claims.json`` keeps, per case, the
block's code-and-config fingerprint, a hash of the block's text, and the block's claims with their
tolerances (:mod:`core.report.claims`). ``--check`` fails when

- the code or config changed since the blocks were written (the fingerprint; exact),
- a block's text is not the one its claims were written with (a hand edit; exact),
- the build breaks a claim: a number beyond its tolerance, a different verdict word (a verdict
  within a factor of ten of its α, or whose seeds disagree, is counted but not held to), a count
  outside its interval, a row that came or went.

It passes when only floating-point bits moved, as they do between CPUs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from pathlib import Path

from core.report.claims import claims, compare
from core.report.degenerate import study_report
from core.report.markdown import BLOCK, markdown, readme_blocks, readme_path, stamped, update_readme

__all__ = ["check_readme", "claims_path", "write_readme"]

REQUIRED = ("data", "models", "experts")


def claims_path(readme: Path | None = None) -> Path:
    """``README.claims.json`` beside the README."""
    return (readme or readme_path()).with_name("README.claims.json")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _built(CaseStudy, cache, text: str) -> dict | None:
    """Per case of the README: (block, fingerprint, claims) from the build; None (after a
    one-line message) when a case is not built."""
    out = {}
    for case in readme_blocks(text):
        study = CaseStudy.open(case, cache_dir=cache, allow_path=False)
        rep = study_report(study)
        missing = [s for s in REQUIRED if not rep["built"].get(s)]
        if missing:
            print(f"error: {case} is not built ({', '.join(missing)} missing); run "
                  f"python -m core build {case}", file=sys.stderr)
            return None
        fp = study.code_fingerprint()
        out[case] = {"block": stamped(markdown(rep), fp), "fingerprint": fp,
                     "claims": claims(rep)}
    return out


def write_readme(CaseStudy, cache=None, path: Path | None = None) -> int:
    """Rewrite the README's generated blocks and its claims file from the built cases.
    Returns the exit code (0, or 1 when a case is not built)."""
    path = path or readme_path()
    text = path.read_text()
    built = _built(CaseStudy, cache, text)
    if built is None:
        return 1
    new = update_readme(text, {c: b["block"] for c, b in built.items()})
    if new != text:
        path.write_text(new)
    record = {c: {"fingerprint": b["fingerprint"], "block_sha256": _sha(b["block"]),
                  "claims": b["claims"]} for c, b in built.items()}
    claims_path(path).write_text(dump_record(record))
    n = sum(len(b["claims"]) for b in built.values())
    print(f"README.md: {len(built)} generated block(s) written, {n} claims with their "
          f"tolerances in {claims_path(path).name}", file=sys.stderr)
    return 0


def dump_record(record: dict) -> str:
    """The claims file's text: one claim per line, so that a diff shows which claims moved."""
    out = ["{"]
    for i, (case, r) in enumerate(record.items()):
        head = {k: v for k, v in r.items() if k != "claims"}
        out.append(f"{json.dumps(case)}: {{" + ", ".join(
            f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()) + ', "claims": [')
        out += [" " + json.dumps(c, ensure_ascii=False) + ("," if j < len(r["claims"]) - 1 else "")
                for j, c in enumerate(r["claims"])]
        out.append("]}" + ("," if i < len(record) - 1 else ""))
    return "\n".join(out + ["}"]) + "\n"


def check_claims(record: dict, blocks: dict[str, str], built: dict) -> list[str]:
    """Problems (one line each) of the README's blocks and claims ``record`` against ``built``
    (from :func:`_built`); [] when every claim holds. Prints a summary of what was compared."""
    problems = []
    for case, b in built.items():
        old = record.get(case)
        if old is None:
            problems.append(f"{case}: no claims recorded; run python -m core readme")
            continue
        if old["fingerprint"] != b["fingerprint"]:
            problems.append(f"{case}: fingerprint {old['fingerprint']} ≠ {b['fingerprint']} (code "
                            "or config changed since the block was generated)")
        if _sha(blocks.get(case, "")) != old["block_sha256"]:
            problems.append(f"{case}: the README block is not the one its claims were written "
                            "with (edited by hand?)")
        found, counts = compare(old["claims"], b["claims"])
        problems += [f"{case}: {p}" for p in found]
        print(f"{case}: {counts['compared']} claims compared, {len(found)} broken; "
              f"{counts['fragile']} verdicts too close to their α (or with seeds that disagree) "
              f"to hold to; {counts['data_driven']} data-driven rows", file=sys.stderr)
    return problems


def check_readme(CaseStudy, cache=None, *, strict: bool = False, path: Path | None = None) -> int:
    """Exit code of ``readme --check``: 0 when the README's claims hold for the build (or, with
    ``strict``, when its blocks equal the build's bit for bit), 1 otherwise (the reasons on
    stderr)."""
    path = path or readme_path()
    text = path.read_text()
    built = _built(CaseStudy, cache, text)
    if built is None:
        return 1
    blocks = {m.group("case"): m.group("body") for m in BLOCK.finditer(text)}
    new = update_readme(text, {c: b["block"] for c, b in built.items()})
    if strict:
        problems = [] if new == text else ["the blocks differ from the build (--strict)"]
    else:
        try:
            record = json.loads(claims_path(path).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {claims_path(path).name} ({exc}); run python -m core readme",
                  file=sys.stderr)
            return 1
        problems = check_claims(record, blocks, built)
    if problems:
        for p in problems[:40]:
            print(p, file=sys.stderr)
        if len(problems) > 40:
            print(f"… and {len(problems) - 40} more", file=sys.stderr)
        diff = difflib.unified_diff(text.splitlines(), new.splitlines(), "README.md",
                                    "README.md (from the build)", lineterm="", n=0)
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        print("error: README.md's claims differ from the build; run python -m core readme",
              file=sys.stderr)
        return 1
    if new != text:
        print("README.md: the build moved numbers only within their tolerances", file=sys.stderr)
    print(f"README.md: {len(built)} generated block(s) hold for the build", file=sys.stderr)
    return 0

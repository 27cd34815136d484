"""``python -m core``: build / report / list as subprocesses, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.__main__ import main

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "core" / "cases" / "decoy_mnist" / "decoy-mnist-small.toml"


def _cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASEBOOK_CACHE": str(cache) if cache else os.environ["CASEBOOK_CACHE"]}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cache(small_study, tmp_path) -> Path:
    """A copy of the small study's cache (data, models, experts built)."""
    dst = tmp_path / "cache"
    shutil.copytree(small_study.cache_dir, dst)
    return dst


def test_build_report_and_list_as_subprocesses(cache, small_study, tmp_path):
    # a fresh cache: the data and models stages are built and timed
    fresh = tmp_path / "fresh"
    proc = _cli("build", "decoy-mnist-small", "--stages", "models", "--device", "cpu",
                "--cache", str(fresh))
    assert proc.returncode == 0, proc.stderr
    assert "models: built" in proc.stderr and "data: built" in proc.stderr
    assert "experts" not in proc.stderr.split("built in")[0].split("models: built")[1]
    # the prebuilt copy: everything asked for is a cache hit
    proc = _cli("build", "decoy-mnist-small", "--stages", "data,models,experts",
                "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    for stage in ("data", "models", "experts"):
        assert f"{stage}: cached" in proc.stderr
    proc = _cli("report", "decoy-mnist-small", "--json", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["case"] == "decoy-mnist-small"
    assert {"data", "models", "experts", "built", "provenance"} <= set(rep)
    assert rep["models"]["vanilla"]["decoy_test_acc"] == \
        small_study.report()["models"]["vanilla"]["decoy_test_acc"]
    assert rep["experts"]["top"] and rep["experts"]["shortcut_rule"]
    proc = _cli("list", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("decoy-mnist-small "))
    assert "experts ✓" in line and "corrections –" in line
    assert any(ln.startswith("decoy-mnist ") for ln in proc.stdout.splitlines())


def test_a_warm_build_and_the_report_do_not_import_torch(cache):
    """Nothing to compute: the keys come from checksummed meta lines, the config's model facts
    from the cache, the delegated stages' versions from their source, the report's numbers and
    rows from the meta lines; torch stays unimported (its import is most of a warm build)."""
    code = ("import sys; from core.__main__ import main; "
            f"a = main(['build', 'decoy-mnist-small', '--stages', 'data,models,experts', "
            f"'--cache', {str(cache)!r}]); "
            f"b = main(['report', 'decoy-mnist-small', '--json', '--cache', {str(cache)!r}]); "
            "print(a, b, 'torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "0 0 False", proc.stderr
    assert "experts: cached" in proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["experts"]["top"] and rep["models"]["vanilla"]["decoy_test_acc"] > 0


def test_report_without_json_is_a_short_summary(cache, capsys):
    assert main(["report", "decoy-mnist-small", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "decoy test" in out and "shortcut experts" in out
    assert not out.lstrip().startswith("{")


def test_an_unknown_case_exits_2_with_one_line_and_touches_no_cache(tmp_path):
    cache = tmp_path / "never"
    proc = _cli("build", "no-such-case", "--cache", str(cache))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: unknown case")
    assert proc.stdout == ""
    assert not cache.exists()


def _bad(tmp_path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["build", "no-such-case"], "unknown case 'no-such-case'"),
    (["report", "no-such-case", "--json"], "unknown case"),
    (["build", "BAD:[dataset\nseed = 1"], "malformed TOML"),
    (["build", "BAD:layer"], "unknown layer 'conv7'"),
    (["build", "decoy-mnist-small", "--stages", "models,nope"], "unknown stage 'nope'"),
    (["build", "decoy-mnist-small", "--seeds", "0"], "--seeds must be at least 1"),
    (["build", "decoy-mnist-small", "--seeds", "two"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path, capsys, argv, message):
    if len(argv) > 1 and argv[1].startswith("BAD:"):
        spec = argv[1][4:]
        text = SMALL.read_text()
        if spec == "layer":
            text = text.replace('layers = ["conv1", "conv2", "fc1"]', 'layers = ["conv1", "conv7"]')
        else:
            text = spec
        argv = [argv[0], _bad(tmp_path, text), *argv[2:]]
    cache = tmp_path / "untouched"
    code = _main([*argv, "--cache", str(cache)] if argv[0] != "frobnicate" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not cache.exists()


def _main(argv: list[str]) -> int:
    """core.__main__.main in-process (argparse errors raise SystemExit: return its code)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    assert _main(["build", "decoy-mnist-small", "--device", "cuda", "--cache",
                  str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_summary_rows_show_what_each_stage_is_read_by():
    from core.__main__ import _row_keys

    cand = {"alpha_corrected": 0.001, "components": 1.0, "necessity": 0.6, "control_necessity": 0.0,
            "sufficiency": 0.8, "control_sufficiency": 0.02, "p_value": 0.004}
    assert _row_keys("discovery", cand) == ["necessity", "control_necessity", "sufficiency",
                                            "control_sufficiency", "p_value"]
    corr = {"cpu_seconds": 1.5, "headline": "decoy", "decoy_acc": 0.7, "paired_delta": 0.1}
    assert _row_keys("corrections", corr)[:2] == ["decoy_acc", "paired_delta"]
    assert _row_keys("essence", {"a": 1, "x": 0.1, "y": 0.2}) == ["x", "y"]  # the row's own floats

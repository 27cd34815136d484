"""Issue 11, the command line: every bad input ends in exit 2 and one line that says what to change,
before anything is trained or written; bounds a user would accept, stated in the error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.__main__ import main
from core.casestudy import CaseError, CaseStudy, case_files

SMALL = case_files()["decoy-mnist-small"]
GOOD = SMALL.read_text()


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _case(tmp_path: Path, text: str) -> str:
    path = tmp_path / "probe.toml"
    path.write_text(text)
    return str(path)


PROBES = [
    ("TOML inf", GOOD.replace("lr = 0.003", "lr = inf"), "finite"),
    ("TOML nan", GOOD.replace("lr = 0.003", "lr = nan"), "finite"),
    ("kwargs the model rejects", GOOD.replace("padding = 2", "padding = 2\nwidth = 3"),
     "cannot be built"),
    ("kwargs of the wrong type", GOOD.replace("padding = 2", 'padding = "two"'),
     "cannot be built"),
    ("a 400-character title", f'title = "{"x" * 400}"\n' + GOOD.split("\n", 3)[-1], "300"),
    ("epochs far too many", GOOD.replace("epochs = 2", "epochs = 100000"), "1–1000"),
    ("a huge bootstrap", GOOD.replace("bootstrap = 20", "bootstrap = 10000000"), "0–10000"),
    ("a huge resolution", GOOD.replace("resolution = 12", "resolution = 100000"), "1–1000"),
    ("lr too large", GOOD.replace("lr = 0.003", "lr = 1e6"), "at most 10"),
    ("unknown key in [representations]", GOOD.replace("[representations]\n",
                                                      "[representations]\nn_imagez = 3\n"),
     "n_imagez"),
    ("unknown method in [corrections]", GOOD.replace("[corrections]", "[corrections]\nmethods = "
                                                     '["rrr", "magic"]'), "magic"),
    ("bad value in [representations]", GOOD.replace("[representations]\n",
                                                    "[representations]\nn_images = -4\n"),
     "n_images"),
    ("a model name with a slash", GOOD + '\n[models."a/b"]\ntrain_on = "train"\n', "model name"),
    ("reference that is no model", 'reference = "ghost"\n' + GOOD, "ghost"),
    ("train_on a set the data lacks", GOOD + '\n[models.vanilla]\ntrain_on = "nowhere"\n',
     "nowhere"),
    ("a factory that is not module:callable", GOOD + '\n[models.vanilla]\nfactory = "x y"\n',
     "module:callable"),
]


@pytest.mark.parametrize("what, text, message", PROBES, ids=[p[0] for p in PROBES])
def test_bad_configs_exit_2_with_one_line_and_touch_no_cache(tmp_path, capsys, what, text,
                                                              message):
    cache = tmp_path / "untouched"
    code = _run(["build", _case(tmp_path, text), "--cache", str(cache), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not cache.exists()


@pytest.mark.parametrize("argv, message", [
    (["build", "decoy-mnist-small", "--device", "mps"], "--device must be"),
    (["build", "decoy-mnist-small", "--device", "meta"], "--device must be"),
    (["build", "decoy-mnist-small", "--seeds", "1000"], "at most 64"),
    (["build", "x" * 400], "unknown case"),
    (["report", "../../etc/passwd"], "unknown case"),
    (["build", "decoy-mnist-small", "--stages", "modelz"], "unknown stage"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    code = _run([*argv, "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_a_cache_directory_that_is_a_file_exits_2(tmp_path, capsys):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    code = _run(["build", "decoy-mnist-small", "--stages", "data", "--cache", str(blocker)])
    err = capsys.readouterr().err
    assert code == 2 and "cache" in err and err.strip().count("\n") == 0, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_cache_directory_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = _run(["build", "decoy-mnist-small", "--stages", "data", "--cache", str(ro)])
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "read-only" in err, err


def test_case_files_that_are_not_regular_small_files_are_refused(tmp_path):
    with pytest.raises(CaseError, match="unknown case"):
        CaseStudy.open("/dev/zero")  # a path names a .toml file, nothing else
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(CaseError, match="not a regular file"):
        CaseStudy.open(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(CaseError, match="at most"):
        CaseStudy.open(big)
    with pytest.raises(CaseError) as info:
        CaseStudy.open(str(tmp_path / "absent.toml"))
    assert str(tmp_path) not in str(info.value)  # no server path in a message


def test_editing_a_module_rebuilds_exactly_the_stages_that_import_it(tmp_path):
    """Stage keys follow what each stage's module imports (issue 11: the corrections stage used
    to ignore core/stages/representations.py and served stale results after an edit)."""
    import json
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "core", tmp_path / "core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json; from core.casestudy.registry import STAGES, stage_code; "
            "print(json.dumps({s: stage_code(s) for s in STAGES}))")

    def versions() -> dict:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    before = versions()
    with open(tmp_path / "core" / "stages" / "representations.py", "a") as f:
        f.write("\n_EDITED = 1  # an edit\n")
    after = versions()
    changed = {s for s in before if before[s] != after[s]}
    assert "representations" in changed
    assert not changed & {"data", "models", "experts", "corrections"}  # no stage imports it
    with open(tmp_path / "core" / "methods" / "attribution.py", "a") as f:
        f.write("\n_EDITED = 1  # an edit of the attribution methods\n")
    methods = versions()
    # both stages run the attribution methods (corrections: its models' Integrated Gradients)
    assert {"representations", "corrections"} <= {s for s in after if after[s] != methods[s]}
    assert not {s for s in after if after[s] != methods[s]} & {"data", "models", "experts"}
    after = methods
    with open(tmp_path / "core" / "engine" / "influence.py", "a") as f:
        f.write("\n_EDITED = 1  # an edit of the engine\n")
    engine = versions()
    assert {"experts", "representations", "corrections"} <= {s for s in after
                                                             if after[s] != engine[s]}
    assert after["data"] == engine["data"] and after["models"] == engine["models"]

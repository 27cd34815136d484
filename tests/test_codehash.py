"""core.storage.codehash: stage code versions follow what a module actually imports (ast, never importing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.storage.codehash import code_hash, module_closure

REPO = Path(__file__).resolve().parents[1]

# every import form the closure must follow, and a few it must ignore
TREE = {
    "core/__init__.py": '"""the package"""\n',
    "core/a.py": "import json\nimport numpy as np\nimport core.b\nfrom core import c\n",
    "core/b.py": "from core.pkg import inner_fn\nfrom core.d import not_a_module\n",
    "core/c.py": "def later():\n    from . import e\n    return e\n",
    "core/d.py": "from .e import VALUE\nfrom .shared import *\nnot_a_module = 1\n",
    "core/e.py": "VALUE = 1\n",
    "core/shared.py": "X = 1\n",
    "core/pkg/__init__.py": "from .inner import inner_fn\n",
    "core/pkg/inner.py": "def inner_fn():\n    return 1\n",
    "core/cases/__init__.py": "",
    "core/cases/demo/__init__.py": "from . import adapter\n",
    "core/cases/demo/adapter.py": ("import importlib\nfrom ...e import VALUE\nfrom ..other import x\n"
                                   "def lazy():\n    return importlib.import_module('core.lazy')\n"),
    "core/cases/other.py": "x = 1\n",
    "core/lazy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import core.typing_only\n",
    "core/typing_only.py": "",
    "core/solo.py": "import os\nimport coreutils\nfrom corex import y\n",
    "core/cycle1.py": "import core.cycle2\n",
    "core/cycle2.py": "from . import cycle1\n",
    "core/bad.py": "def broken(:\n",
    "other/__init__.py": "",
    "other/m.py": "import core.solo\n",
}


def _write_tree(root: Path, files: dict[str, str] = TREE) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _write_tree(tmp_path / "src")


def test_every_import_form_is_followed_and_outside_imports_ignored(tree):
    assert module_closure(["core.a"], root=tree) == [
        "core", "core.a", "core.b", "core.c", "core.d", "core.e", "core.pkg", "core.pkg.inner",
        "core.shared"]
    assert module_closure(["core.cases.demo.adapter"], root=tree) == [
        "core", "core.cases", "core.cases.demo", "core.cases.demo.adapter", "core.cases.other",
        "core.e", "core.lazy", "core.typing_only"]
    assert module_closure(["core.solo"], root=tree) == ["core", "core.solo"]
    assert module_closure(["core.pkg"], root=tree) == ["core", "core.pkg", "core.pkg.inner"]
    assert module_closure(["core.cycle1"], root=tree) == ["core", "core.cycle1", "core.cycle2"]


def test_the_closure_ignores_order_and_duplicates(tree):
    one = module_closure(["core.solo", "core.c", "core.solo"], root=tree)
    assert one == module_closure(["core.c", "core.solo"], root=tree) == sorted(one)
    assert module_closure("core.c", root=tree) == ["core", "core.c", "core.e"]  # one name is one module
    assert code_hash(["core.solo", "core.c"], root=tree) == code_hash(["core.c", "core.solo", "core.c"],
                                                                      root=tree)


def test_a_package_wins_over_a_module_beside_it(tree):
    (tree / "core" / "pkg.py").write_text("import core.solo\n")  # shadowed, as Python shadows it
    assert module_closure(["core.pkg"], root=tree) == ["core", "core.pkg", "core.pkg.inner"]


def test_unknown_outside_or_unparsable_modules_are_one_line_errors(tree):
    for names, match in ((["core.nope"], "no module 'core.nope'"), (["other.m"], "no module 'other.m'"),
                         (["core.bad"], r"cannot read the imports of .*bad\.py: .*line 1")):
        with pytest.raises(ValueError, match=match) as info:
            module_closure(names, root=tree)
        assert "\n" not in str(info.value)


def test_an_edit_changes_the_hash_of_every_dependent_and_of_no_independent(tree):
    names = ["core.a", "core.b", "core.c", "core.d", "core.e", "core.solo", "core.pkg", "core.cases.demo"]
    before = {n: code_hash([n], root=tree) for n in names}
    assert len(set(before.values())) == len(names)
    (tree / "core" / "e.py").write_text("VALUE = 2  # an edit\n")  # read without fresh=True
    after = {n: code_hash([n], root=tree) for n in names}
    changed = {n for n in names if after[n] != before[n]}
    assert changed == {n for n in names if "core.e" in module_closure([n], root=tree)}
    assert changed == {"core.a", "core.b", "core.c", "core.d", "core.e", "core.cases.demo"}
    assert after["core.solo"] == before["core.solo"] and after["core.pkg"] == before["core.pkg"]


def test_a_new_import_grows_the_closure_and_changes_the_hash(tree):
    before = code_hash(["core.solo"], root=tree)
    (tree / "core" / "solo.py").write_text("import os\nfrom core.pkg import inner\n")
    assert module_closure(["core.solo"], root=tree) == ["core", "core.pkg", "core.pkg.inner", "core.solo"]
    mid = code_hash(["core.solo"], root=tree)
    assert mid != before
    (tree / "core" / "pkg" / "inner.py").write_text("def inner_fn():\n    return 2\n")
    assert code_hash(["core.solo"], root=tree) != mid
    (tree / "core" / "pkg" / "inner.py").unlink()  # a module that goes away changes it too
    assert module_closure(["core.solo"], root=tree) == ["core", "core.pkg", "core.solo"]


def test_fresh_rereads_what_the_per_process_memo_holds(tree):
    import core.storage.codehash as ch

    path = (tree / "core" / "e.py").resolve()
    old = code_hash(["core.e"], root=tree)
    path.write_text("VALUE = 9\n")  # same size; an edit within one timestamp tick looks like this:
    with ch._lock:  # the memo still holds the old digest under the file's current identity
        ch._digest_memo[path] = (ch._identity(path), ch._digest_memo[path][1])
    assert code_hash(["core.e"], root=tree) == old  # what the memo says ...
    new = code_hash(["core.e"], root=tree, fresh=True)  # ... and what the file says
    assert new != old and code_hash(["core.e"], root=tree) == new


def test_the_hash_is_names_and_bytes_not_where_the_tree_lives(tree, tmp_path):
    copy = shutil.copytree(tree, tmp_path / "elsewhere")
    assert code_hash(["core.a"], root=tree) == code_hash(["core.a"], root=copy)
    assert len(code_hash(["core.a"], root=tree)) == 16 and len(code_hash(["core.a"], root=tree,
                                                                         length=64)) == 64
    (copy / "core" / "__init__.py").write_text('"""the package"""\nFLAG = 1\n')  # runs before every module
    assert code_hash(["core.solo"], root=tree) != code_hash(["core.solo"], root=copy)


def test_docstrings_comments_and_layout_do_not_count_and_code_does(tree):
    before = code_hash(["core.a"], root=tree)
    pkg = tree / "core" / "pkg" / "inner.py"
    pkg.write_text('"""A module docstring."""\n\n\n# a comment\ndef inner_fn( ):\n'
                   '    """What it returns."""\n    return (1)  # one\n')
    assert code_hash(["core.a"], root=tree) == before  # docstrings, a comment, blank lines, parens
    pkg.write_text("def inner_fn():\n    return 2\n")
    changed = code_hash(["core.a"], root=tree)
    assert changed != before
    # a string statement that is not the first of its body is not a docstring: it counts
    pkg.write_text('def inner_fn():\n    return 2\n    "unreachable"\n')
    assert code_hash(["core.a"], root=tree) != changed


# ------------------------------------------------------------------------------ the real package

def test_the_real_closure_of_corrections_follows_its_imports():
    closure = module_closure(["core.stages.corrections"])
    assert {"core", "core.stages.corrections", "core.methods.attribution",
            "core.methods.corrections.rrr", "core.methods.corrections.common",
            "core.engine.influence", "core.engine.experts", "core.engine.parallel",
            "core.methods.metrics", "core.methods.training"} <= set(closure)
    # the attribution methods live in core.methods: the stage no longer reaches another stage
    assert "core.stages.representations" not in closure
    assert "core.storage.cache" not in closure and "core.storage.codehash" not in closure
    assert module_closure(["core.storage.cache"]) == ["core", "core.storage", "core.storage.cache"]
    assert code_hash(["core.stages.corrections"]) != code_hash(["core.stages.representations"])


def test_the_closure_holds_every_core_module_python_really_imports():
    """The oracle: import the module in a fresh interpreter and list the core modules it loaded."""
    code = textwrap.dedent("""
        import importlib, json, sys
        before = set(sys.modules)
        importlib.import_module(sys.argv[1])
        loaded = sorted(m for m in set(sys.modules) - before if m == "core" or m.startswith("core."))
        print(json.dumps({"loaded": loaded, "torch_before": "torch" in before}))
    """)
    for name in ("core.stages.corrections", "core.storage.codehash"):
        run = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        loaded = json.loads(run.stdout.strip().splitlines()[-1])["loaded"]
        assert name in loaded and set(loaded) <= set(module_closure([name])), name


def test_codehash_imports_no_torch():
    code = ("import sys, core.storage.codehash as c; c.code_hash(['core.stages.corrections']); "
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-2000:]

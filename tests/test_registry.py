"""Tests generated from the stage registry (the one list of stages), for every stage:

- its key changes when its config section changes, or a section it reads does (``reads``,
  transitively; every stage after ``models`` also reads ``[experts]``: the case's layers), and
  only then;
- its code version changes when a module in its import closure changes, and only then;
- it builds on the tiny case and its report rows are plain JSON dicts.

A stage added to the registry without an entry in :data:`PERTURB` fails here: say how its
section can change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import core.casestudy as cs
from core.casestudy import CaseStudy
from core.casestudy.registry import BY_NAME, DELEGATED, REGISTRY, STAGES
from core.storage.codehash import ROOT, code_hash, module_closure

SMALL = cs.case_files()["decoy-mnist-small"]

# per stage: (text in the small case's TOML, what it becomes): one valid change of its section
PERTURB = {
    "data": ("seed = 0\n", "seed = 1\n"),
    "models": ("epochs = 2\n", "epochs = 3\n"),
    "experts": ("k = 3\n", "k = 2\n"),
    "discovery": ("[representations]\n", "[discovery]\nthreshold = 0.4\n\n[representations]\n"),
    "representations": ("[representations]\n", "[representations]\nn_images = 7\n"),
    "corrections": ("[corrections]\n", "[corrections]\nepochs = 2\n"),
    "essence": ("[representations]\n", "[essence]\nn_rank = 7\n\n[representations]\n"),
    "detection": ("[representations]\n", "[detection]\nseed = 3\n\n[representations]\n"),
}


def _reads(stage: str) -> set[str]:
    """Every stage ``stage`` reads, transitively."""
    out, todo = set(), list(BY_NAME[stage].reads)
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(BY_NAME[s].reads)
    return out


def _affected(changed: str) -> set[str]:
    """The stages whose key must change when ``changed``'s section does."""
    out = {changed} | {s for s in STAGES if changed in _reads(s)}
    if changed == "experts":  # every stage's context carries [experts] (layers, primary layer)
        out |= set(DELEGATED)
    return out


def test_every_registered_stage_has_a_perturbation_and_a_module():
    assert set(PERTURB) == set(STAGES)
    for s in REGISTRY:
        assert s.modules, s.name
        if s.delegated:
            assert s.delegated in s.modules


@pytest.fixture(scope="module")
def keyed(small_study, tmp_path_factory):
    """A copy of the small case's cache and the keys of every stage on it."""
    tmp = tmp_path_factory.mktemp("registry")
    cache = tmp / "cache"
    shutil.copytree(small_study.cache_dir, cache)
    base = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    return tmp, cache, {s: base._key(s) for s in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_a_section_change_changes_exactly_the_stages_that_read_it(keyed, stage):
    tmp, cache, before = keyed
    old, new = PERTURB[stage]
    text = SMALL.read_text()
    assert old in text
    path = tmp / f"perturbed-{stage}.toml"
    path.write_text(text.replace(old, new, 1))
    study = CaseStudy.open(path, cache_dir=cache, device="cpu")
    after = {s: study._key(s) for s in STAGES}
    assert before[stage] is not None
    changed = {s for s in STAGES if after[s] != before[s]}
    assert changed == _affected(stage)


def test_primary_layer_reaches_the_stages_that_read_it(keyed):
    """The headline layer changes what discovery and representations compute (their default
    layer), so it is in their keys, though not in the experts stage's (presentation only)."""
    tmp, cache, before = keyed
    path = tmp / "primary.toml"
    path.write_text(SMALL.read_text().replace("k = 3\n", 'k = 3\nprimary_layer = "conv2"\n'))
    study = CaseStudy.open(path, cache_dir=cache, device="cpu")
    assert study._key("experts") == before["experts"]
    assert study._key("discovery") != before["discovery"]
    assert study._key("representations") != before["representations"]


def _code_versions(root: Path) -> dict[str, str]:
    return {s.name: code_hash(s.modules, root=root, fresh=True) for s in REGISTRY}


@pytest.mark.parametrize("edited", sorted({m for s in REGISTRY for m in s.modules}))
def test_a_code_change_changes_exactly_the_stages_whose_closure_holds_it(tmp_path, edited):
    shutil.copytree(ROOT / "core", tmp_path / "core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = _code_versions(tmp_path)
    path = tmp_path / Path(*edited.split(".")).with_suffix(".py")
    if not path.is_file():
        path = tmp_path / Path(*edited.split(".")) / "__init__.py"
    path.write_text(path.read_text() + "\n_EDITED = 1  # what runs changes (a comment would not)\n")
    after = _code_versions(tmp_path)
    changed = {s for s in before if after[s] != before[s]}
    holding = {s.name for s in REGISTRY if edited in module_closure(s.modules, root=tmp_path)}
    assert changed == holding and BY_NAME_OWNER(edited) <= changed


def BY_NAME_OWNER(module: str) -> set[str]:  # noqa: N802 — reads as a set in the assertion
    """The stages that list ``module`` themselves."""
    return {s.name for s in REGISTRY if module in s.modules}


def test_a_stage_does_not_hold_another_stages_module_it_does_not_need():
    """Keys are not over-broad: the essence stage's code is not the detection stage's."""
    essence = set(module_closure(BY_NAME["essence"].modules))
    assert "core.stages.detection" not in essence and "core.stages.discovery" not in essence
    assert "core.stages.essence" not in set(module_closure(BY_NAME["detection"].modules))


def _plain_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("stage", DELEGATED)
def test_every_stage_builds_on_the_tiny_case_and_its_rows_validate(keyed, stage):
    _tmp, cache, _keys = keyed  # a copy: the shared small case keeps what other tests expect
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    result = study.build([stage])[stage]
    assert result["status"] in ("built", "cached"), result
    rows = study.report()[stage]
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    assert _plain_json(rows)


# ---------------------------------------------------------------------------------------------- declarations


def test_every_stage_module_owns_its_declaration_and_the_registry_reads_it_without_importing():
    import subprocess
    import sys

    from core.casestudy.registry import MODULES, declared

    assert STAGES == tuple(declared(m).name for m in MODULES)
    for s in REGISTRY:
        assert s.module in MODULES and s.declaration == declared(s.module)
        for r in s.reads:  # a stage reads only stages built before it
            assert STAGES.index(r) < STAGES.index(s.name)
    # listing the stages (what `python -m core list` and the app's sidebar do) imports no stage
    # module and no torch
    probe = ("import sys, core.casestudy.registry as r; "
             "print(sorted(m for m in sys.modules if m.startswith('core.stages.') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['core.stages.base']", out


def test_a_declaration_must_be_literal_and_present(tmp_path, monkeypatch):
    import core.casestudy.registry as registry
    from core.stages.base import Stage

    pkg = tmp_path / "core" / "stages"
    pkg.mkdir(parents=True)
    (pkg / "lit.py").write_text('from core.stages.base import Stage\n'
                                'STAGE = Stage("lit", reads=["data"], sections=("lit",))\n')
    (pkg / "computed.py").write_text('NAME = "x"\nSTAGE = Stage(NAME)\n')
    (pkg / "none.py").write_text("X = 1\n")
    monkeypatch.setattr(registry, "REPO", tmp_path)
    assert registry.declared("core.stages.lit") == Stage("lit", reads=("data",), sections=("lit",))
    with pytest.raises(ValueError, match="literal arguments only"):
        registry.declared("core.stages.computed")
    with pytest.raises(ValueError, match="no STAGE"):
        registry.declared("core.stages.none")
    with pytest.raises(ValueError, match="unknown input"):
        Stage("bad", inputs=("weather",))


@pytest.mark.parametrize("stage", [s.name for s in REGISTRY if "roles" in s.inputs])
def test_a_declared_input_changes_the_key_of_exactly_the_stages_that_declare_it(keyed, stage):
    """The reference model is an input ("roles") of the stages that declare it: naming none
    changes their keys, and the keys of the stages that do not declare it stay."""
    tmp, cache, before = keyed
    path = tmp / "no-reference.toml"
    text = SMALL.read_text()
    assert "\nreference =" not in text and "\ntitle = " in text  # the default: the second model
    path.write_text(text.replace("\ntitle = ", '\nreference = ""\ntitle = ', 1))
    study = CaseStudy.open(path, cache_dir=cache, device="cpu")
    assert study._key(stage) != before[stage]
    for s in REGISTRY:
        if "roles" not in s.inputs and not set(s.reads) & {r.name for r in REGISTRY
                                                          if "roles" in r.inputs}:
            assert study._key(s.name) == before[s.name], s.name

"""Issue 23, hardening the case path: the case's own code in the cache key, data keyed by its
bytes, an entry that will not load is missing in the same build, no hang on a checkpoint that
never ends, factories only from the case's folder or a known model zoo, opening without running
a factory. Every test runs the real parts (files, caches, imports, torch.load), nothing mocked."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cases import factories
from core.cases.factories import check_checkpoint, checkpoint_digest, load_weights, make_model
from core.cases.seam import SourceError
from core.cases.sources import source_fingerprint
from core.casestudy import CaseError, CaseStudy
from core.casestudy import facts as case_facts
from core.storage.cache import MAGIC, Cache
from core.storage.codehash import local_closure, user_code_hash

NETS = '''
from torch import nn

from helper import Act


class Net(nn.Module):
    def __init__(self, n_classes=2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = Act()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.act(self.conv1(x))))
'''
HELPER = "from torch import nn\n\nAct = nn.ReLU\n"


@contextmanager
def no_hang(seconds: int = 20):
    """Turn a hang (reading /dev/zero or a FIFO to its end) into a test failure."""
    def fail(*_):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


def _case(folder: Path, *, model: str = 'factory = "nets:Net"\ntraining = { epochs = 1 }\n',
          extra: str = "") -> Path:
    """A tiny tensors case (60 8×8 grey images, 2 classes) in ``folder``; returns its TOML."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "data.pt").exists():
        g = torch.Generator().manual_seed(0)
        y = torch.arange(60) % 2
        x = torch.rand(60, 1, 8, 8, generator=g) * 0.5 + y[:, None, None, None] * 0.4
        torch.save({"x": x, "y": y}, folder / "data.pt")
    toml = folder / "case.toml"
    toml.write_text(textwrap.dedent('''
        title = "tiny"
        [dataset]
        source = "tensors"
        path = "data.pt"
        [experts]
        layers = ["conv1"]
        [models.vanilla]
        ''') + model + extra)
    return toml


def _user_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nets.py").write_text(NETS)
    (folder / "helper.py").write_text(HELPER)
    return folder


# ------------------------------------------------------------------ 1. user code in the cache key

def test_the_factory_modules_local_imports_are_in_its_hash(tmp_path):
    d = _user_dir(tmp_path / "case")
    (d / "unrelated.py").write_text("X = 1\n")
    assert set(local_closure("nets", d)) == {"nets", "helper"}  # torch is not followed
    before = user_code_hash("nets", d)
    (d / "unrelated.py").write_text("X = 2\n")
    assert user_code_hash("nets", d) == before  # a file it does not import
    (d / "helper.py").write_text(HELPER.replace("nn.ReLU", "nn.Tanh"))
    assert user_code_hash("nets", d) != before
    assert user_code_hash("nosuch", d) is None


def test_a_factory_package_hashes_every_module_it_imports(tmp_path):
    d = tmp_path / "case"
    (d / "nets").mkdir(parents=True)
    (d / "nets" / "__init__.py").write_text("from .blocks import Net\n")
    (d / "nets" / "blocks.py").write_text("from . import acts\nfrom torch import nn\n"
                                          "def Net():\n    return nn.Sequential(acts.ACT())\n")
    (d / "nets" / "acts.py").write_text("from torch import nn\nACT = nn.ReLU\n")
    assert set(local_closure("nets", d)) == {"nets", "nets.blocks", "nets.acts"}
    before = user_code_hash("nets", d)
    (d / "nets" / "acts.py").write_text("from torch import nn\nACT = nn.Tanh\n")
    assert user_code_hash("nets", d) != before
    model = make_model("nets:Net", {}, d)
    assert type(model[0]).__name__ == "Tanh"


def test_editing_a_helper_reloads_the_factory_and_rebuilds_the_models(tmp_path):
    d = _user_dir(tmp_path / "case")
    assert type(make_model("nets:Net", {}, d).act).__name__ == "ReLU"
    assert "helper" not in sys.modules  # the sibling it imported leaves no trace
    cache = tmp_path / "cache"
    study = CaseStudy.open(_case(d), cache_dir=cache, device="cpu")
    first = study.build(["data", "models"])
    assert first["models"]["status"] == "built", first
    again = CaseStudy.open(_case(d), cache_dir=cache, device="cpu")
    assert again.status()["models"]
    (d / "helper.py").write_text(HELPER.replace("nn.ReLU", "nn.Tanh"))
    assert type(make_model("nets:Net", {}, d).act).__name__ == "Tanh"  # same process, new code
    edited = CaseStudy.open(_case(d), cache_dir=cache, device="cpu")
    assert edited.status() == {**edited.status(), "data": True, "models": False}
    result = edited.build(["data", "models"])
    assert result["data"]["status"] == "cached" and result["models"]["status"] == "built", result
    assert type(edited.model("vanilla").act).__name__ == "Tanh"


# --------------------------------------------------------------------- 2. data keyed by its bytes

def test_an_image_replaced_with_the_same_size_and_mtime_changes_the_data_key(tmp_path):
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i + (c == "b") * 100, np.uint8)).save(
                root / c / f"{i}.png")
    dataset = {"source": "folder", "root": "images"}
    before = source_fingerprint(dataset, None, tmp_path)
    target = root / "a" / "1.png"
    st = target.stat()
    blob = bytearray(target.read_bytes())
    blob[-13] ^= 0xFF  # same size, other bytes (as `cp -p` of another image would leave)
    target.write_bytes(bytes(blob))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored, as rsync -t does
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert source_fingerprint(dataset, None, tmp_path) != before
    # a warm call reads no bytes again: the same answer, from the per-process memo
    t0 = time.perf_counter()
    assert source_fingerprint(dataset, None, tmp_path) == source_fingerprint(dataset, None, tmp_path)
    assert time.perf_counter() - t0 < 1.0


def test_a_tensors_file_is_keyed_by_its_bytes_and_a_fifo_is_refused(tmp_path):
    torch.save({"x": torch.zeros(4, 1, 2, 2), "y": torch.tensor([0, 1, 0, 1])}, tmp_path / "t.pt")
    dataset = {"source": "tensors", "path": "t.pt"}
    before = source_fingerprint(dataset, None, tmp_path)
    st = (tmp_path / "t.pt").stat()
    torch.save({"x": torch.ones(4, 1, 2, 2), "y": torch.tensor([0, 1, 0, 1])}, tmp_path / "t.pt")
    assert (tmp_path / "t.pt").stat().st_size == st.st_size
    os.utime(tmp_path / "t.pt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source_fingerprint(dataset, None, tmp_path) != before
    os.mkfifo(tmp_path / "fifo.pt")
    with no_hang(), pytest.raises(SourceError) as info:
        source_fingerprint({"source": "tensors", "path": "fifo.pt"}, None, tmp_path)
    assert "not a regular file" in _one_line(info)


# ------------------------------------------------------- 3. an entry that will not load is missing

def _forge(cache: Cache, key: str, payload: bytes, meta: dict) -> None:
    """Write a checksum-valid entry for ``key`` holding ``payload`` (as another tool might)."""
    body = json.dumps({**meta, "key": key}).encode() + b"\n" + payload
    path = cache.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + f" {hashlib.sha256(body).hexdigest()} {len(body)}\n".encode() + body)


def test_has_is_false_for_a_checksum_valid_payload_weights_only_refuses(tmp_path):
    from pathlib import PurePosixPath

    cache = Cache(tmp_path)
    good, bad = "a" * 64, "b" * 64
    cache.put(good, {"w": torch.ones(3), "n": [1, 2.0, "x", None]})
    assert cache.has(good)
    buf = io.BytesIO()
    torch.save({"w": PurePosixPath("x")}, buf)  # a pickled object: weights_only refuses it
    _forge(cache, bad, buf.getvalue(), {"stage": "x"})
    assert cache.meta(bad) is not None  # the checksum holds
    assert not cache.has(bad)  # but it is missing, and moved aside
    assert cache.meta(bad) is None and cache.get(bad, "gone") == "gone"
    assert any(".bad-" in p.name for p in cache.path(bad).parent.iterdir())


def test_a_stage_whose_entry_will_not_load_is_rebuilt_in_the_same_build(tmp_path):
    d = _user_dir(tmp_path / "case")
    cache_dir = tmp_path / "cache"
    study = CaseStudy.open(_case(d), cache_dir=cache_dir, device="cpu")
    assert study.build(["data"])["data"]["status"] == "built"
    key = study._key("data")
    meta = Cache(cache_dir).meta(key)
    buf = io.BytesIO()
    torch.save({"x": np.zeros(3)}, buf)  # a numpy array: refused by weights_only
    _forge(Cache(cache_dir), key, buf.getvalue(), {k: v for k, v in meta.items() if k != "key"})
    fresh = CaseStudy.open(_case(d), cache_dir=cache_dir, device="cpu")
    assert fresh.status()["data"] is False
    assert fresh.build(["data"])["data"]["status"] == "built"
    assert CaseStudy.open(_case(d), cache_dir=cache_dir, device="cpu").status()["data"]


# ----------------------------------------------------------------- 4. no hang on a checkpoint

@pytest.fixture
def endless(tmp_path) -> dict[str, Path]:
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    return {"dev": Path("/dev/zero"), "fifo": tmp_path / "fifo.pt", "link": tmp_path / "zero.pt",
            "dir": tmp_path}


def test_a_checkpoint_that_never_ends_is_one_line_before_any_read(endless):
    model = torch.nn.Linear(2, 2)
    for kind, path in endless.items():
        with no_hang():
            for call, args in ((check_checkpoint, (path, "model 'm': checkpoint")),
                               (checkpoint_digest, (path, "model 'm': checkpoint")),
                               (load_weights, (model, path, "m"))):
                with pytest.raises(SourceError) as info:
                    call(*args)
                msg = _one_line(info)
                assert "not a regular file" in msg, (kind, msg)


def test_a_case_with_an_endless_checkpoint_says_so_in_status_and_build(tmp_path, endless):
    d = _user_dir(tmp_path / "case")
    for kind in ("dev", "fifo", "link"):
        toml = _case(d, model=f'factory = "nets:Net"\ncheckpoint = "{endless[kind]}"\n')
        with no_hang():
            study = CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
            with pytest.raises(CaseError) as info:
                study.build(["data", "models"])  # the models' key reads the checkpoint
            assert "not a regular file" in _one_line(info)
            with pytest.raises(CaseError) as info:  # the data is built: status keys the models
                CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu").status()
            assert "not a regular file" in _one_line(info)


def test_an_oversized_checkpoint_is_refused_by_its_size(tmp_path, monkeypatch):
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(2 * 2**20)  # sparse: nothing to read
    from core.storage import safeio

    monkeypatch.setattr(safeio, "MAX_CHECKPOINT_BYTES", 2**20)
    with pytest.raises(SourceError) as info:
        checkpoint_digest(big)
    assert "over the" in _one_line(info)


# ------------------------------------------------------------------ 5. which factories may run

@pytest.mark.parametrize("factory, kwargs", [
    ("os:system", {"command": "touch MARK"}),
    ("subprocess:Popen", {"args": ["touch", "MARK"]}),
    ("shutil:rmtree", {"path": "KEEP"}),
    ("builtins:exec", {"source": "open('MARK', 'w')"}),
    ("posixpath:join", {}),
])
def test_the_standard_library_is_refused_before_it_is_called(tmp_path, monkeypatch, factory, kwargs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "KEEP").mkdir()
    kwargs = {k: (str(tmp_path / v) if k == "path" else v) for k, v in kwargs.items()}
    with pytest.raises(SourceError) as info:
        make_model(factory, kwargs, tmp_path)
    assert "refused" in _one_line(info) and "standard library" in str(info.value)
    time.sleep(0.2)  # a Popen would have run by now
    assert not (tmp_path / "MARK").exists() and (tmp_path / "KEEP").is_dir()


def test_a_case_toml_naming_os_system_is_refused_at_open(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = _case(tmp_path / "case", model='factory = "os:system"\nkwargs = { command = "touch MARK" }\n')
    with pytest.raises(CaseError) as info:
        CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    assert "refused" in _one_line(info)
    assert not (tmp_path / "MARK").exists()


def test_a_dot_free_module_comes_only_from_the_case_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "sneaky.py").write_text(f"open({str(tmp_path / 'MARK')!r}, 'w')\n"
                                         "def Net():\n    return None\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.chdir(elsewhere)
    (tmp_path / "case").mkdir()
    with pytest.raises(SourceError) as info:
        make_model("sneaky:Net", {}, tmp_path / "case")
    assert "next to the TOML" in _one_line(info)
    assert not (tmp_path / "MARK").exists() and "sneaky" not in sys.modules


def test_dotted_modules_need_a_zoo_or_the_setting(tmp_path, monkeypatch):
    pkg = tmp_path / "lib" / "myzoo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from torch import nn\ndef Net():\n    return nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.delenv(factories.ZOO_SETTING, raising=False)
    with pytest.raises(SourceError) as info:
        make_model("myzoo.nets:Net", {}, tmp_path)
    assert factories.ZOO_SETTING in _one_line(info) and "myzoo.nets" not in sys.modules
    monkeypatch.setenv(factories.ZOO_SETTING, "timm, myzoo")
    assert isinstance(make_model("myzoo.nets:Net", {}, tmp_path), torch.nn.Linear)
    monkeypatch.setenv(factories.ZOO_SETTING, "os,subprocess")  # never the standard library
    with pytest.raises(SourceError, match="standard library"):
        make_model("os:system", {"command": "true"}, tmp_path)
    # a zoo module cannot be used to reach the standard library through its attributes
    with pytest.raises(SourceError, match="refused"):
        make_model("core.cases.factories:importlib.import_module", {"name": "os"}, tmp_path)
    with pytest.raises(SourceError, match="private"):
        make_model("core.cases.factories:_private", {}, tmp_path)


def test_a_factory_module_that_exits_or_interrupts_at_import_is_one_line(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "stops.py").write_text("raise KeyboardInterrupt\n")
    with pytest.raises(SourceError) as info:
        make_model("quits:Net", {}, tmp_path)
    assert "sys.exit(3)" in _one_line(info)
    with pytest.raises(SourceError) as info:
        make_model("stops:Net", {}, tmp_path)
    assert "KeyboardInterrupt" in _one_line(info)


# ------------------------------------------------------- 6. opening without running a factory

def test_under_no_user_code_open_reads_cached_facts_and_never_runs_the_factory(tmp_path):
    d = _user_dir(tmp_path / "case")
    marker = tmp_path / "RAN"
    (d / "nets.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n" + NETS)
    toml, cache = _case(d), tmp_path / "cache"
    with case_facts.no_user_code():
        with pytest.raises(case_facts.FactsNotCached) as info:
            CaseStudy.open(toml, cache_dir=cache, device="cpu")
    assert "not built" in _one_line(info) and not marker.exists()
    CaseStudy.open(toml, cache_dir=cache, device="cpu").build(["data"])  # stores the facts
    assert marker.exists()
    marker.unlink()
    factories._LOADED.clear()  # a new process: nothing loaded
    with case_facts.no_user_code():
        status = CaseStudy.open(toml, cache_dir=cache, device="cpu").status()
    assert status["data"] and not status["models"] and not marker.exists()


def test_python_m_core_list_runs_no_factory(tmp_path):
    import subprocess

    cases = tmp_path / "cases"
    d = _user_dir(cases / "mine")
    marker = tmp_path / "RAN"
    (d / "nets.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n" + NETS)
    _case(d)
    env = {**os.environ, "CASEBOOK_CASES": str(cases), "CASEBOOK_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "core", "list"], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mine" in proc.stdout
    assert not marker.exists(), proc.stdout


# ------------------------------------------------------- 5. a factory that never returns

def test_listing_never_waits_on_a_factory_that_sleeps_forever(tmp_path):
    """``python -m core list`` and the app's case discovery read the TOML and cached facts only:
    a case whose factory module sleeps forever at import is listed, as not built, at once."""
    import subprocess

    from core.casestudy import config as case_config

    cases = tmp_path / "cases"
    d = _user_dir(cases / "sleeper")
    (d / "nets.py").write_text("import time\ntime.sleep(10 ** 6)\n" + NETS)
    _case(d, model='factory = "nets:Net"\ntraining = { epochs = 1 }\n')
    env = {**os.environ, "CASEBOOK_CASES": str(cases), "CASEBOOK_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "core", "list"], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("sleeper"))
    assert "not built" in line, proc.stdout
    with no_hang(20):  # the app's case choice: ui.list_cases() → core's case_files()
        os.environ["CASEBOOK_CASES"] = str(cases)
        try:
            assert "sleeper" in case_config.list_cases()
        finally:
            del os.environ["CASEBOOK_CASES"]


# ------------------------------------------------------- 11. format characters in names

@pytest.mark.parametrize("where, text", [
    ("title", 'title = "a\u202eb"\n'),
    ("dataset.classes", None),
    ("region.name", None),
])
def test_a_format_character_in_a_case_string_is_refused_at_open(tmp_path, where, text):
    d = _user_dir(tmp_path / "case")
    toml = _case(d)
    body = toml.read_text()
    if where == "title":
        body = body.replace('title = "tiny"\n', text)
    elif where == "dataset.classes":
        body = body.replace('path = "data.pt"\n', 'path = "data.pt"\nclasses = ["cat\u202e", "dog"]\n')
    else:
        body += '\n[region]\nname = "pa\u200btch"\n'
    toml.write_text(body)
    with pytest.raises(CaseError) as info:
        CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    msg = _one_line(info)
    assert where in msg and ("U+202E" in msg or "U+200B" in msg), msg


def test_a_class_folder_named_with_a_right_to_left_override_is_refused(tmp_path):
    root = tmp_path / "case" / "images"
    for c in ("cat\u202egod", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(root / c / f"{i}.png")
    d = _user_dir(tmp_path / "case")
    toml = d / "case.toml"
    toml.write_text('[dataset]\nsource = "folder"\nroot = "images"\n[experts]\nlayers = ["conv1"]\n'
                    '[models.vanilla]\nfactory = "nets:Net"\ntraining = { epochs = 1 }\n')
    study = CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(CaseError) as info:
        study.build(["data"])
    assert "U+202E" in _one_line(info) and "RIGHT-TO-LEFT OVERRIDE" in str(info.value)
    assert not Cache(tmp_path / "cache").entries()  # refused before anything was written


# ------------------------------------------------------- 13. the model's input shape at open

RGB_NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels=3, n_classes=2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(torch.relu(self.conv1(x))))


class NoMeta(Net):
    """A forward the meta device cannot run (it reads a value): checked on the CPU instead."""

    def forward(self, x):
        if float(x.abs().sum().item()) < 0:
            raise AssertionError
        return super().forward(x)
'''


def _rgb_case(folder: Path, model: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.rand(60, 3, 8, 8, generator=g), "y": torch.arange(60) % 2},
               folder / "data.pt")
    (folder / "nets.py").write_text(RGB_NETS)
    toml = folder / "case.toml"
    toml.write_text('[dataset]\nsource = "tensors"\npath = "data.pt"\n[experts]\nlayers = ["conv1"]\n'
                    "[models.vanilla]\n" + model)
    return toml


def test_a_model_built_for_grey_images_on_rgb_data_is_one_line_before_training(tmp_path):
    toml = _rgb_case(tmp_path / "case", 'factory = "nets:Net"\nkwargs = { in_channels = 1 }\n'
                                        "training = { epochs = 1 }\n")
    study = CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(CaseError) as info:
        study.build()
    msg = _one_line(info)
    assert "model 'vanilla' cannot run on the data's 3×8×8" in msg, msg
    assert not Cache(tmp_path / "cache").entries()  # nothing trained, nothing written


def test_a_forward_without_a_meta_kernel_is_checked_on_the_cpu(tmp_path):
    toml = _rgb_case(tmp_path / "case", 'factory = "nets:NoMeta"\nkwargs = { n_classes = 3 }\n'
                                        "training = { epochs = 1 }\n")
    study = CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    state = torch.random.get_rng_state()
    with pytest.raises(CaseError) as info:  # its width, found on the CPU, disagrees with the data
        study.data()
    assert "gives 3 outputs" in _one_line(info)
    assert torch.equal(state, torch.random.get_rng_state())  # the check drew nothing
    toml = _rgb_case(tmp_path / "ok", 'factory = "nets:NoMeta"\ntraining = { epochs = 1 }\n')
    assert CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu").data().n_classes == 2


# ------------------------------------------------------- 14. names in the stages' sections

@pytest.mark.parametrize("section, where", [
    ('[essence]\nlayers = ["nosuch"]\n', "essence.layers"),
    ('[essence]\nmodels = ["nosuch"]\n', "essence.models"),
    ('[representations]\nmodels = ["nosuch"]\n', "representations.models"),
    ('[representations.options.gradcam]\nlayer = "nosuch"\n', "representations.options.gradcam.layer"),
    ('[detection]\nlayer = "nosuch"\n', "detection.layer"),
    ('[detection]\nmodel = "nosuch"\n', "detection.model"),
    ('[corrections.suppression]\nlayers = ["nosuch"]\n', "corrections.suppression.layers"),
    ('[corrections.influence_penalty]\nlayer = "nosuch"\n', "corrections.influence_penalty.layer"),
    ('[discovery]\nlayer = "nosuch"\n', "discovery.layer"),
    ('[discovery]\nmodels = ["nosuch"]\n', "discovery.models"),
])
def test_an_unknown_layer_or_model_in_a_stage_section_is_refused_at_open(tmp_path, section, where):
    d = _user_dir(tmp_path / "case")
    toml = _case(d, extra="\n" + section)
    with pytest.raises(CaseError) as info:
        CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    msg = _one_line(info)
    assert where in msg and "'nosuch'" in msg, msg


def test_known_names_in_the_stage_sections_open(tmp_path):
    d = _user_dir(tmp_path / "case")
    toml = _case(d, extra='\n[essence]\nlayers = ["conv1", "fc"]\nmodels = ["vanilla"]\n'
                          '[detection]\nmodel = "pclarc"\nlayer = "act"\n'  # a correction's name
                          '[discovery]\nlayer = "act"\n')
    study = CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    assert study.config.essence["layers"] == ["conv1", "fc"]


# ------------------------------------------------------- 15. bounds, scales, paths

def test_an_absurd_weight_decay_is_one_line(tmp_path):
    d = _user_dir(tmp_path / "case")
    toml = _case(d, model='factory = "nets:Net"\ntraining = { epochs = 1, weight_decay = 1e308 }\n')
    with pytest.raises(CaseError) as info:
        CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    assert "weight_decay must lie in 0–1" in _one_line(info)


def _tensors_case(folder: Path, data: dict) -> Path:
    d = _user_dir(folder)
    torch.save(data, d / "data.pt")
    return _case(d)


@pytest.mark.parametrize("kind", ["classes", "pixels", "scale"])
def test_what_the_tensors_file_holds_is_checked_when_the_data_loads(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    if kind == "classes":  # 1,001 classes derived from y (the bound is 1,000), 3 images each
        y = torch.arange(1001).repeat_interleave(3)
        data = {"x": torch.rand(len(y), 1, 8, 8, generator=g), "y": y,
                "split": torch.tensor([0, 1, 2]).repeat(1001)}
        expect = "1001 classes; at most 1000"
    elif kind == "pixels":
        data = {"x": torch.rand(60, 1, 1, 1, generator=g), "y": torch.arange(60) % 2}
        expect = "1×1 pixels"
    else:
        data = {"x": torch.rand(60, 1, 8, 8, generator=g) * 255, "y": torch.arange(60) % 2}
        expect = "give float images in [0, 1]"
    toml = _tensors_case(tmp_path / "case", data)
    study = CaseStudy.open(toml, cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(CaseError) as info:
        study.build(["data"])
    assert expect in _one_line(info)
    assert not Cache(tmp_path / "cache").entries()


def test_new_case_into_a_folder_that_cannot_be_made_is_one_line(capsys):
    from core.__main__ import main

    assert main(["new-case", "/proc/casebook-x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the example case" in err, err

"""core.cases.factories: [models.<name>] checks, make_model next to the TOML, load_weights, model_facts."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from core.cases.factories import check_model, check_name, load_weights, make_model, model_facts
from core.cases.seam import SourceError

NETS = '''
import torch
from torch import nn

from helpers import WIDTH


class Net(nn.Module):
    def __init__(self, n_classes=3, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, WIDTH, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(WIDTH * 4, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu1(self.conv1(x)))))


def not_a_module():
    return 42


class NeedsData(nn.Module):
    """Reads a parameter's value while building: fails on the meta device."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.scale = float(self.fc.weight.abs().sum())

    def forward(self, x):
        return self.fc(x) * self.scale


VALUE = 3
'''


@pytest.fixture
def case_dir(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "helpers.py").write_text("WIDTH = 4\n")
    return tmp_path


# ----------------------------------------------------------------------------------------------
# check_model / check_name


def test_check_model_defaults():
    out = check_model({"factory": "nets:Net"}, "c.toml [models.vanilla]")
    assert out == {"factory": "nets:Net", "kwargs": {}, "checkpoint": None, "train_on": None,
                   "init": None, "training": {}}
    full = check_model({"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 3},
                        "train_on": "train", "init": "vanilla",
                        "training": {"epochs": 3, "lr": 1, "batch_size": 8, "weight_decay": 0}},
                       "m")
    assert full["training"] == {"epochs": 3, "lr": 1.0, "batch_size": 8, "weight_decay": 0.0}
    assert check_model({"factory": "nets:Net", "checkpoint": "a.pt"}, "m")["checkpoint"] == "a.pt"


@pytest.mark.parametrize("section, words", [
    ({"factory": "nets:Net", "weights": "a.pt"}, ["'weights'", "valid keys", "checkpoint"]),
    ({"kwargs": {}}, ["'factory'"]),
    ({"factory": "nets.Net"}, ["factory", "module:callable"]),
    ({"factory": "nets:"}, ["factory", "module:callable"]),
    ({"factory": 3}, ["factory", "a string"]),
    ({"factory": "nets:Net", "kwargs": [1]}, ["kwargs", "a table"]),
    ({"factory": "nets:Net", "training": {"epochs": 0}}, ["training.epochs", "[1, 1000]"]),
    ({"factory": "nets:Net", "training": {"epochs": 1001}}, ["training.epochs"]),
    ({"factory": "nets:Net", "training": {"epochs": 2.5}}, ["training.epochs", "an integer"]),
    ({"factory": "nets:Net", "training": {"epochs": True}}, ["training.epochs"]),
    ({"factory": "nets:Net", "training": {"lr": 0}}, ["training.lr", "(0, 10]"]),
    ({"factory": "nets:Net", "training": {"lr": 11}}, ["training.lr"]),
    ({"factory": "nets:Net", "training": {"batch_size": 0}}, ["training.batch_size"]),
    ({"factory": "nets:Net", "training": {"batch_size": 70000}}, ["training.batch_size"]),
    ({"factory": "nets:Net", "training": {"weight_decay": -1}}, ["training.weight_decay"]),
    ({"factory": "nets:Net", "training": {"momentum": 0.9}}, ["'momentum'", "epochs, lr"]),
    ({"factory": "nets:Net", "train_on": "my set"}, ["train_on", "'my set'"]),
    ({"factory": "nets:Net", "init": "x" * 65}, ["init", "1–64"]),
    ({"factory": "nets:Net", "checkpoint": "a.pt", "init": "other"}, ["init", "checkpoint"]),
    ({"factory": "nets:Net", "checkpoint": "a.pt", "training": {"epochs": 2}}, ["training"]),
    ({"factory": "nets:Net", "checkpoint": ""}, ["checkpoint", "empty"]),
])
def test_check_model_errors_name_the_key(section, words):
    with pytest.raises(SourceError) as info:
        check_model(section, "c.toml [models.vanilla]")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("c.toml [models.vanilla]")
    for w in words:
        assert w in msg, msg


def test_check_name():
    assert check_name("clean-v2_B", "[models]") == "clean-v2_B"
    for bad in ("", "a b", "é", "x" * 65, 3):
        with pytest.raises(SourceError, match="1–64 characters"):
            check_name(bad, "[models]")


# ----------------------------------------------------------------------------------------------
# make_model


def test_local_module_is_private_and_leaves_no_trace(case_dir, monkeypatch):
    stranger = types.ModuleType("nets")
    stranger.Net = "someone else's"
    monkeypatch.setitem(sys.modules, "nets", stranger)
    path_before = list(sys.path)
    model = make_model("nets:Net", {"n_classes": 5}, case_dir)
    assert isinstance(model, nn.Module)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    assert sys.modules["nets"] is stranger  # not clobbered
    assert sys.path == path_before  # base_dir not left behind
    assert type(model).__module__.startswith("casebook_user.")
    assert model.conv1.out_channels == 4  # the sibling module was importable while loading
    again = make_model("nets:Net", {}, case_dir)
    assert type(again) is type(model)  # the loaded module is reused while the file is unchanged


def test_local_module_reloads_when_changed(case_dir):
    first = make_model("nets:Net", {}, case_dir)
    (case_dir / "nets.py").write_text(NETS.replace("n_classes=3", "n_classes=7") + "\n# edited\n")
    second = make_model("nets:Net", {}, case_dir)
    assert first.fc.out_features == 3 and second.fc.out_features == 7


def test_dotted_modules_import_normally(tmp_path):
    model = make_model("core.cases.decoy_mnist.net:DecoyCNN", {"n_classes": 4}, tmp_path)
    assert model.fc2.out_features == 4
    resnet = make_model("torchvision.models:resnet18", {"num_classes": 3}, tmp_path)
    assert resnet.fc.out_features == 3


def _err(factory, kwargs, base, *words):
    with pytest.raises(SourceError) as info:
        make_model(factory, kwargs, base)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_make_model_errors(case_dir):
    (case_dir / "broken.py").write_text("import torch\nraise RuntimeError('no GPU here\\nmore')\n")
    (case_dir / "syntax.py").write_text("def f(:\n")
    _err("broken:Net", {}, case_dir, "'broken'", "does not import", "RuntimeError: no GPU here")
    assert not any(k.endswith(".broken") for k in sys.modules)
    _err("syntax:Net", {}, case_dir, "'syntax'", "does not import", "SyntaxError")
    _err("nosuchmodule:Net", {}, case_dir, "no module 'nosuchmodule'", "next to the TOML")
    _err("nets:Missing", {}, case_dir, "no 'Missing'", "Net")
    _err("nets:VALUE", {}, case_dir, "'VALUE'", "not callable")
    _err("nets:not_a_module", {}, case_dir, "returned a int", "nn.Module")
    _err("nets:Net", {"n_clases": 3}, case_dir, "kwargs ['n_clases'] rejected", "n_clases")
    _err("nets Net", {}, case_dir, "module:callable")


def test_pretrained_weights_offline_is_one_line(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _err("torchvision.models:resnet18", {"weights": "DEFAULT"}, tmp_path, "pretrained weights",
         "drop weights=")


# ----------------------------------------------------------------------------------------------
# load_weights


def test_load_weights_round_trip_and_wrappers(case_dir, tmp_path):
    torch.manual_seed(0)
    trained = make_model("nets:Net", {}, case_dir)
    fresh = lambda: make_model("nets:Net", {}, case_dir).train()
    x = torch.rand(3, 1, 8, 8)
    for i, payload in enumerate([trained.state_dict(), {"state_dict": trained.state_dict(), "epoch": 3},
                                 {"model": trained.state_dict()},
                                 {f"module.{k}": v for k, v in trained.state_dict().items()}]):
        torch.save(payload, tmp_path / f"w{i}.pt")
        model = load_weights(fresh(), tmp_path / f"w{i}.pt", "vanilla")
        assert not model.training
        assert torch.equal(model(x), trained(x))


def _werr(model, path, *words):
    with pytest.raises(SourceError) as info:
        load_weights(model, path, "vanilla")
    msg = str(info.value)
    assert "\n" not in msg and "'vanilla'" in msg, msg
    for w in words:
        assert w in msg, msg


def test_load_weights_errors(case_dir, tmp_path):
    model = make_model("nets:Net", {}, case_dir)
    _werr(model, tmp_path / "none.pt", "none.pt", "does not exist")
    torch.save(model, tmp_path / "whole.pt")  # a pickled module, not a state dict
    _werr(model, tmp_path / "whole.pt", "pickled objects", "not a state dict", "state_dict()")
    torch.save(model.state_dict(), tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:50])
    _werr(model, tmp_path / "cut.pt", "could not be read")
    torch.save([1, 2], tmp_path / "list.pt")
    _werr(model, tmp_path / "list.pt", "holds a list", "not a state dict")
    state = dict(model.state_dict())
    state.pop("fc.bias")
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pt")
    _werr(model, tmp_path / "keys.pt", "missing keys: fc.bias", "unexpected keys: head.weight")
    other = make_model("nets:Net", {"n_classes": 5}, case_dir)
    torch.save(other.state_dict(), tmp_path / "shape.pt")
    _werr(model, tmp_path / "shape.pt", "shape mismatch", "fc.weight (5, 16) vs (3, 16)")
    torch.save({"a": "text"}, tmp_path / "strings.pt")
    _werr(model, tmp_path / "strings.pt", "not of tensors", "a")


# ----------------------------------------------------------------------------------------------
# model_facts


def test_model_facts_on_meta_leaves_rng_alone(case_dir):
    state = torch.random.get_rng_state()
    facts = model_facts("nets:Net", {"n_classes": 6}, case_dir, input_shape=(1, 8, 8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert facts["layers"] == ["conv1", "relu1", "pool", "flatten", "fc"]
    assert facts["n_outputs"] == 6 and facts["n_params"] == 4 * 9 + 4 + 16 * 6 + 6
    facts = model_facts("torchvision.models:resnet18", {"num_classes": 3}, case_dir)
    assert facts["n_outputs"] == 3 and "layer4.1.conv2" in facts["layers"]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_model_facts_falls_back_to_cpu_without_touching_rng(case_dir):
    state = torch.random.get_rng_state()
    facts = model_facts("nets:NeedsData", {}, case_dir, input_shape=(4, 1, 1))
    assert facts["layers"] == ["fc"] and facts["n_outputs"] == 2
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(SourceError, match="no 'Nope'"):
        model_facts("nets:Nope", {}, case_dir)


def test_model_facts_without_linear_head(tmp_path):
    (tmp_path / "convnet.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(1, 2, 3))\n")
    facts = model_facts("convnet:make", {}, Path(tmp_path))
    assert facts["layers"] == ["0"] and facts["n_outputs"] is None

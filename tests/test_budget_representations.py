"""The representations stage's budget knobs (issue 21): curve points and MPRT cut points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.methods import metrics as M
from core.methods.attribution import attribute
from core.stages import representations as R


def test_n_steps_sets_the_curve_step_and_step_wins():
    assert R.curve_step(R.check_config({}), (160, 160)) == 160  # default: one row per step
    assert R.curve_step(R.check_config({"n_steps": 16}), (160, 160)) == 1600
    assert R.curve_step(R.check_config({"n_steps": 3}), (28, 28)) == 262  # ceil(784 / 3)
    assert R.curve_step(R.check_config({"n_steps": 16, "step": 7}), (28, 28)) == 7


@pytest.mark.parametrize("key,value", [("n_steps", 0), ("n_steps", 2.5), ("n_steps", True),
                                       ("mprt_points", 0), ("mprt_points", "3"), ("step", -1)])
def test_bad_budget_values_are_one_line_errors(key, value):
    with pytest.raises(ValueError) as err:
        R.check_config({key: value})
    assert f"representations.{key}" in str(err.value) and "\n" not in str(err.value)


def test_cut_points_are_evenly_spaced_and_end_with_the_last_layer():
    assert M.cut_points(10, None) == list(range(10))
    assert M.cut_points(10, 20) == list(range(10))
    assert M.cut_points(10, 1) == [9]
    assert M.cut_points(41, 3) == [13, 26, 40]


def test_mprt_at_cut_points_equals_the_full_test_at_those_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 8), nn.ReLU(),
                        nn.Linear(8, 2))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])

    def explain(m, xx, yy):
        return attribute(m, xx, yy, "saliency")

    full = M.mprt(net, x, y, explain, seed=3)
    part = M.mprt(net, x, y, explain, seed=3, points=2)
    cuts = M.cut_points(len(full["layers"]), 2)
    assert part["layers"] == [full["layers"][i] for i in cuts]
    assert torch.allclose(part["scores"], full["scores"][cuts], equal_nan=True)
    assert torch.allclose(part["last"], full["last"], equal_nan=True)

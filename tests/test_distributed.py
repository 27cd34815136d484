"""Issue 10: the DoI's (input, point) work sharded over torch.distributed ranks.

The test launches this file with torchrun (2 processes, gloo backend, CPU); each rank computes its
share of the pairs and the sums are all-reduced, so every rank gets the whole result. Rank 0 saves
its results, which must equal the one-process results. Run by hand:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py OUT.pt
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, ROOT)

from core.engine.distributions import GaussianDoI, LinearDoI, PointDoI  # noqa: E402
from core.engine.influence import influence  # noqa: E402
from core.engine.quantities import ClassQoI, ComparativeQoI  # noqa: E402


def model_and_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                      nn.Linear(6 * 4 * 4, 5)).eval()
    x = torch.rand(5, 1, 8, 8)
    return m, x


def jobs(distributed: bool) -> dict[str, object]:
    """The same calls with and without sharding; 5 inputs × 3 points split unevenly over 2 ranks."""
    m, x = model_and_data()
    kw = dict(distributed=distributed, batch_size=4)
    seen = []
    return {
        "linear_input_attr": influence(m, x, "3", ClassQoI(2), LinearDoI(3), per_input=True,
                                       multiply=True, progress=lambda d, t: seen.append(t), **kw),
        "pairs_here": torch.tensor(seen[-1]),  # this rank's share of the 15 pairs
        "linear_mean": influence(m, x, None, ComparativeQoI(1, 4), LinearDoI(3), **kw),
        "layers": influence(m, x, layers=[None, "0", "4"], qoi=ClassQoI(0), doi=GaussianDoI(3, stdev=0.1),
                            per_input=True, **kw),
        "at_layer_gl": influence(m, x, "3", ClassQoI(1), LinearDoI(3, at="layer", method="gausslegendre"),
                                 per_input=True, **kw),
        "one_pair": influence(m, x[:1], "3", ClassQoI(1), PointDoI(), **kw),  # a rank with no pairs
    }


def worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        results = jobs(distributed=True)
        if dist.get_rank() == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "ranks.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", __file__, str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = torch.load(out, weights_only=True)
    single = jobs(distributed=False)
    assert sharded.keys() == single.keys()
    assert int(single.pop("pairs_here")) == 15 and int(sharded["pairs_here"]) == 7  # rank 0's share
    for key, expected in single.items():
        got = sharded[key]
        pairs = expected.items() if isinstance(expected, dict) else [(None, expected)]
        for layer, value in pairs:
            mine = got[layer] if isinstance(expected, dict) else got
            assert torch.allclose(mine, value, atol=1e-6), (key, layer)


def test_distributed_needs_a_process_group():
    m, x = model_and_data()
    with pytest.raises(ValueError, match="torch.distributed"):
        influence(m, x, "3", ClassQoI(0), distributed=True)


if __name__ == "__main__":
    worker(sys.argv[1])

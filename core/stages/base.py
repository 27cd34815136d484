"""The one interface every stage is built through: ``build(ctx: StageContext) -> payload``.

A stage never reaches back into the pipeline: what it may read is on its :class:`StageContext` —
the case's data, its models (by name and seed) with their facts, the stage's own config section,
the ``[experts]`` section (layers, classes, k: the case's choice of slices), the artifacts of the
stages it declared in ``reads`` (and only those), the device, the number of seeds, and one progress
callback ``progress(done, total, message)``. The pipeline (``core.casestudy.study``) makes the
context; a test or a script can make one from plain objects with :meth:`StageContext.standalone`.

A payload is a dict with a ``rows`` list (the stage's report rows) and whatever else the stage's
chapter draws; a method inside a stage that cannot run on a model gives a "could not run: <reason>"
entry and the stage goes on (each stage says where).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INPUTS", "Stage", "StageContext", "UndeclaredRead"]

# What a stage's result may follow from besides its config sections and the stages it reads; the
# pipeline's one key function (core.casestudy.keys) keys a stage on exactly the ones it declares.
INPUTS = {
    "files": "the bytes of the files a folder or tensors source reads (and their masks)",
    "adapter": "the code of the case's data adapter module",
    "factories": "the code of the built-in model factories the case names",
    "factory_facts": "the facts of each user factory (its module's code, the model's shape)",
    "checkpoints": "the digest of every model's checkpoint file",
    "seed": "the seed of the models entry (one entry per seed)",
    "seeds": "the digests of every seed's models (a stage that reads all seeds)",
    "roles": "which model is the subject and which the reference",
    "device": "the device type the stage ran on",
}


@dataclass(frozen=True)
class Stage:
    """A stage's declaration, owned by its module as ``STAGE = Stage(...)`` with literal
    arguments only: the registry (``core.casestudy.registry``) reads it from the module's source
    without importing the module (and torch with it).

    ``reads`` are the earlier stages whose results it reads; ``sections`` the config sections in
    its key (``omit`` lists ``"section.key"`` entries it never reads, left out of the key);
    ``inputs`` the other things its result follows from (names of :data:`INPUTS`); ``version``
    is bumped by hand when its payload's meaning changes without its code changing; ``code``
    names modules whose code its result follows from beyond its own module's imports;
    ``delegated`` stages are ``build(ctx)`` of their module, the others (data, models) are the
    pipeline's own; ``plain_payload`` says the payload is plain JSON the report may carry whole
    (False where it holds tensors or weights); ``quick`` holds the values of its first section
    that the quick budget sets where the case does not (``core.casestudy.budget``: fewer images,
    draws, steps and seeds; the same methods and the same questions)."""

    name: str
    reads: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    omit: tuple[str, ...] = ()
    version: int = 1
    code: tuple[str, ...] = ()
    delegated: bool = True
    plain_payload: bool = True
    quick: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [i for i in self.inputs if i not in INPUTS]
        if unknown:
            raise ValueError(f"stage {self.name!r}: unknown input {unknown[0]!r}; "
                             f"inputs: {', '.join(INPUTS)}")

ProgressFn = Callable[[int, int, str], None]


class UndeclaredRead(KeyError):
    """A stage asked for the artifact of a stage it did not declare in ``reads``."""


def _no_progress(done: int, total: int, message: str = "") -> None:
    return None


@dataclass(frozen=True)
class StageContext:
    """What ``build`` gets (see the module docstring). ``section`` is the stage's config section
    as the case gives it ({} when absent: the stage applies its own defaults); ``experts`` is the
    case's ``[experts]`` section; ``subject`` is the model under study, ``reference`` the model
    trained without the shortcut (None when the case has none); ``seeds`` ≥ 1 is how many seeds of
    every model the case builds."""

    stage: str
    data: Any
    section: Mapping[str, Any]
    experts: Mapping[str, Any]
    subject: str
    reference: str | None
    model_names: tuple[str, ...]
    seeds: int
    device: Any
    reads: tuple[str, ...]
    load_model: Callable[[str, int], Any] = field(repr=False)
    load_facts: Callable[[str], dict | None] = field(repr=False)
    load_artifact: Callable[[str], Any] = field(repr=False)
    predict: Callable[[str, str, int], Any] | None = field(default=None, repr=False)
    report_progress: ProgressFn = field(default=_no_progress, repr=False)

    def model(self, name: str | None = None, seed: int = 0):
        """Model ``name`` (default: the subject) of ``seed``, in eval mode on :attr:`device`."""
        return self.load_model(name or self.subject, seed)

    def model_facts(self, name: str | None = None) -> dict | None:
        """The facts of model ``name`` (default: the subject): ``layers`` (named modules in
        order), ``kinds`` {layer: module class name}, shapes; None when unknown."""
        return self.load_facts(name or self.subject)

    def artifact(self, stage: str):
        """The payload of ``stage``, one of :attr:`reads` (built before this stage runs); None
        when it could not be built. :class:`UndeclaredRead` for a stage not in ``reads``: a
        stage's result may depend only on what its key holds."""
        if stage not in self.reads:
            raise UndeclaredRead(f"the {self.stage} stage reads {', '.join(self.reads) or 'nothing'};"
                                 f" it did not declare {stage!r}")
        return self.load_artifact(stage)

    def predictions(self, model: str, split: str = "test", seed: int = 0):
        """Model ``model``'s predicted classes on ``split`` (``"train"``, ``"val"``, ``"test"``)
        as a CPU long tensor; computed here when the pipeline gave no cached reader."""
        if self.predict is not None:
            return self.predict(model, split, seed)
        import torch

        from core.methods.training import predict_logits

        x = getattr(self.data, split).x
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long)
        return predict_logits(self.model(model, seed), x).argmax(1).cpu()

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Report ``done`` of ``total`` steps with a one-line ``message``."""
        self.report_progress(done, total, message)

    @property
    def layers(self) -> list[str]:
        """The case's expert layers (``[experts] layers``); [] when it names none."""
        return list(self.experts.get("layers") or [])

    @classmethod
    def standalone(cls, stage: str, data, models: Mapping[str, Any], *, section=None,
                   experts=None, subject: str | None = None, reference: str | None = None,
                   seeds: int = 1, device=None, artifacts: Mapping[str, Any] | None = None,
                   facts: Mapping[str, dict] | None = None,
                   progress: ProgressFn | None = None) -> StageContext:
        """A context from plain objects, without a case: ``models`` {name: module, or
        {seed: module}}; ``subject`` defaults to the first model, ``reference`` to none;
        ``artifacts`` {stage: payload} are the declared reads; ``facts`` {name: facts}."""
        names = tuple(models)
        if not names:
            raise ValueError("StageContext.standalone needs at least one model")
        artifacts = dict(artifacts or {})

        def load_model(name: str, seed: int):
            if name not in models:
                raise KeyError(f"no model named {name!r}; models: {', '.join(names)}")
            m = models[name]
            return m[seed] if isinstance(m, Mapping) else m

        return cls(stage=stage, data=data, section=dict(section or {}),
                   experts=dict(experts or {}), subject=subject or names[0], reference=reference,
                   model_names=names, seeds=int(seeds), device=device, reads=tuple(artifacts),
                   load_model=load_model, load_facts=lambda n: (facts or {}).get(n),
                   load_artifact=artifacts.get, report_progress=progress or _no_progress)

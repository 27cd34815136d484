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

__all__ = ["StageContext", "UndeclaredRead"]

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

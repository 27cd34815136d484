"""Case studies: a case's config (``config``), the stage registry (``registry``) and the pipeline
that builds a case through the cache (``study``). See ``study``'s docstring for the stages.

    from core.casestudy import CaseStudy, CaseError, list_cases
    study = CaseStudy.open("decoy-mnist")
"""

from pathlib import Path

from core.casestudy.config import (
    CASES_DIR,
    CaseConfig,
    CaseError,
    ModelSpec,
    builtin_cases,
    case_files,
    default_case,
    list_cases,
    parse_config,
    read_toml,
)
from core.casestudy.registry import DELEGATED, REGISTRY, STAGES
from core.casestudy.study import CaseStudy
from core.methods.shortcut import shortcut_rule

CHANCE = 16 / 784  # DecoyMNIST's patch share of the image (every other case: CaseData.chance)


def __getattr__(name: str):
    """``rank_experts`` (the experts stage's plain-dict ranking) imports torch: only when asked."""
    if name == "rank_experts":
        from core.stages.experts import rank_experts

        return rank_experts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_config(path, name=None, *, cache=None) -> CaseConfig:
    """Read and validate a case TOML (every section; model layers need :meth:`CaseStudy.open`).
    Any problem is a one-line :class:`CaseError`."""
    path = Path(path)
    name = name or (path.parent.name if path.name == "case.toml" else path.stem)
    return parse_config(read_toml(path), path, name)


__all__ = [
    "CASES_DIR",
    "CHANCE",
    "DELEGATED",
    "REGISTRY",
    "STAGES",
    "CaseConfig",
    "CaseError",
    "CaseStudy",
    "ModelSpec",
    "builtin_cases",
    "case_files",
    "default_case",
    "list_cases",
    "load_config",
    "rank_experts",
    "shortcut_rule",
]

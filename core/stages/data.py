"""The data stage: the case's :class:`~core.cases.seam.CaseData`, made by its adapter (a built-in
case's generator, or the folder / tensors source of a user's case).

The data is deterministic and rebuilt in memory whenever a process needs it; the cache keeps only
its description, its digest (which keys every stage downstream) and the facts the pages read
without loading it (classes, sizes, chance, the region's name). A source that reads files keys on
their bytes (``files``), so replacing an image rebuilds.
"""

from __future__ import annotations

from core.stages.base import Stage

STAGE = Stage("data", sections=("dataset", "region"), inputs=("files", "adapter"), version=2,
              code=("core.cases.seam",), delegated=False)


def entry(data, facts: dict, case: str, provenance: dict) -> tuple[dict, dict]:
    """The data stage's cache entry for ``data`` (a CaseData): ``(payload, meta)``. The payload
    is its description (``data.describe()``), seed, digest and provenance; the meta carries the
    same plus ``facts`` (what the pages read without loading the data) and the case's name."""
    digest = data.digest()
    info = {**data.describe(), "seed": data.seed, "digest": digest}
    return ({**info, "provenance": provenance},
            {"stage": "data", "case": case, "digest": digest, "describe": info, "facts": facts,
             "provenance": provenance})

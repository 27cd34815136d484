"""Influence Casebook core: influence-directed explanations of PyTorch CNNs.

Leino, Sen, Datta, Fredrikson, Li. "Influence-Directed Explanations for Deep
Convolutional Networks", ITC 2018 (arXiv 1802.03788).

The tree shows the layers; each imports only from the ones above it in this list:

- ``engine``     the paper's maths on any ``nn.Module``: influence, quantities, distributions,
                 experts' ranking, devices
- ``methods``    library code a stage calls, usable without a case: metrics, imaging, training,
                 discovery's clustering and causal tests
- ``storage``    the result cache, code hashes, guarded file reads
- ``cases``      the seam every case plugs into, its sources and factories, the built-in cases
- ``stages``     one module per stage of the pipeline (representations, corrections, essence,
                 detection, discovery)
- ``queries``    what pages ask on demand (explain one image)
- ``casestudy``  config, registry, the pipeline
- ``report``     summary rows, Markdown, claims, HTML export

This package never imports Streamlit; the chapters in ``chapters/`` only draw what it returns.

The flat module names of earlier versions (``core.influence``, ``core.models``, …) still import:
:data:`MOVED` maps each to its module in the tree, and ``import core.influence`` gives that very
module object (the contract names of DESIGN §2 keep working for users' scripts).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

#: old flat name → the module(s) that hold it now (several: one namespace of their public names)
MOVED: dict[str, tuple[str, ...]] = {
    "core.influence": ("core.engine.influence",),
    "core.quantities": ("core.engine.quantities",),
    "core.distributions": ("core.engine.distributions",),
    "core.experts": ("core.engine.experts",),
    "core.devices": ("core.engine.devices",),
    "core.metrics": ("core.methods.metrics",),
    "core.imaging": ("core.methods.imaging",),
    "core.models": ("core.methods.training", "core.cases.decoy_mnist.net"),
    "core.representations": ("core.stages.representations",),
    "core.corrections": ("core.stages.corrections",),
    "core.essence": ("core.stages.essence",),
    "core.detection": ("core.stages.detection",),
    "core.discovery_stage": ("core.stages.discovery",),
    "core.explain": ("core.queries.explain",),
    "core.seam": ("core.cases.seam",),
    "core.sources": ("core.cases.sources",),
    "core.factories": ("core.cases.factories",),
    "core.newcase": ("core.cases.newcase",),
    "core.data": ("core.cases.decoy_mnist.data",),
    "core.cache": ("core.storage.cache",),
    "core.codehash": ("core.storage.codehash",),
    "core.safeio": ("core.storage.safeio",),
    "core.reportmd": ("core.report.markdown",),
    "core.export": ("core.report.html",),
}


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets

    def create_module(self, spec):
        modules = [importlib.import_module(t) for t in self.targets]
        if len(modules) == 1:
            self.spec = modules[0].__spec__  # import overwrites it with the alias's; put back below
            return modules[0]  # the very module: monkeypatching the old name patches the new
        merged = types.ModuleType(spec.name, f"Old name of {', '.join(self.targets)}.")
        for mod in modules:
            public = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
            merged.__dict__.update({n: getattr(mod, n) for n in public})
        return merged

    def exec_module(self, module):  # the target modules ran when they were imported
        if getattr(self, "spec", None) is not None:
            module.__spec__ = self.spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old flat names of :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname, path=None, target=None):
        targets = MOVED.get(fullname)
        if targets is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(targets))


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())

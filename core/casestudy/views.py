"""The experts views pages ask for on demand: the stage's own views (:meth:`ExpertViews.experts`)
and any quantity, distribution, layer or model (:meth:`ExpertViews.experts_for`), cached.

A mixin of :class:`core.casestudy.study.CaseStudy`: it reads the study's config, data, models,
cache and keys; what it ranks and interprets with is the experts stage's own code
(:mod:`core.stages.experts`), so a view and the stage agree.
"""

from __future__ import annotations

from collections.abc import Callable

from core.casestudy.config import CaseError
from core.methods.shortcut import flag

__all__ = ["IMAGES", "ExpertViews"]

# The test images a view's experts are interpreted on: by label or by the model's prediction.
IMAGES = ("label", "predicted")


def _np(t):
    return t.detach().cpu().numpy()


class ExpertViews:
    """Experts views of a case study (see the module docstring)."""

    def _interpretation_indices(self, model: str, classes: list[int], images: str):
        """Test-split indices of the images a view is interpreted on: for each class in
        ``classes`` (one, or a comparative pair a, b), its first ``n_images`` test images by
        label (``images="label"``) or by ``model``'s prediction (``"predicted"``), in that order."""
        import torch

        data = self.data()
        m = self.config.experts["n_images"]
        by = data.test.y if images == "label" else self.predictions(model)
        parts = [(by == c).nonzero().flatten()[:m] for c in classes]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def _rank_and_interpret(self, model, layer: str, qoi, doi, c: int,
                            progress: Callable[[int, int, str], None] | None = None,
                            ranking: dict | None = None, indices=None) -> dict:
        """:func:`core.stages.experts.rank_and_interpret` over the class-c training images, on
        the class-c test images (or on the test images ``indices``)."""
        data = self.data()
        from core.stages import experts  # torch: only when a view is computed

        train_x, images, masks, idx = experts.class_images(data, c, self.config.experts["n_images"])
        if len(train_x) == 0:
            raise CaseError(f"{self.name}: class {c} has no training image")
        if indices is not None:
            idx, images = indices, data.test.x[indices]
            masks = None if data.test.mask is None else data.test.mask[indices]
        return experts.rank_and_interpret(
            model, layer, qoi, doi, train_x, images, masks, idx, section=self.config.experts,
            device=self.device, display=data.display, alias=self._alias(), cls=c,
            progress=progress, ranking=ranking)

    @staticmethod
    def _as_numpy(r: dict) -> dict:
        out = {}
        for k, v in r.items():
            out[k] = _np(v) if hasattr(v, "detach") else ([dict(x) for x in v] if k == "rows" else v)
        return out

    def experts(self, model: str, layer: str, cls: int) -> dict:
        """The precomputed experts of ``model``'s ``layer`` for class ``cls`` (builds the experts
        stage if missing; a layer or class outside the config goes through :meth:`experts_for`).

        ``{"rows": [{"unit", "score", "rank", "frequency", "ci_low", "ci_high", "region_mass",
        "threshold", "shortcut"}], "threshold", "scores": (units,), "images": (m, H, W) or
        (m, H, W, 3) test images in [0, 1] (un-normalised for display), "masks": (m, H, W)
        bool or None, "indices": (m,) test-split indices, "maps": (k, m, H, W)
        interpretations (summed over channels), "class",
        "quantity", "distribution"}`` with NumPy arrays. Without a region the rows carry
        ``region_mass`` None and no ``shortcut``/``threshold``.
        """
        e = self.config.experts
        if model in self.config.models and layer in e["layers"] and cls in self.expert_classes():
            with self._lock:
                payload = self.artifact("experts")
                if payload is None:  # missing, or listed but unreadable (moved aside): build
                    self.build(["experts"])
                    payload = self.artifact("experts")
                if payload is None:
                    raise CaseError(f"{self.name}: the experts stage could not be built")
            return self._as_numpy(payload["results"][f"{model}/{layer}/{int(cls)}"])
        return self.experts_for(model, layer, {"kind": "class", "class": int(cls)},
                                {"kind": "class-images"})

    def _spec(self, model: str, layer: str, qoi: dict, doi: dict):
        """Validate and normalise an experts_for request → (qoi, doi, class, Quantity, DoI)."""
        from core.engine.distributions import LinearDoI, PointDoI
        from core.engine.quantities import ClassQoI, ComparativeQoI

        if not isinstance(qoi, dict) or not isinstance(doi, dict):
            raise CaseError("qoi and doi are dicts, e.g. {'kind': 'class', 'class': 3} and "
                            "{'kind': 'class-images'}")
        n = self._n_classes()

        def klass(v, what):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise CaseError(f"{what} must be a class index 0–{n - 1}, got {v!r}")
            return int(v)

        kind = qoi.get("kind")
        if kind == "class":
            c = klass(qoi.get("class"), "qoi class")
            q, quantity = {"kind": "class", "class": c}, ClassQoI(c)
        elif kind == "comparative":
            a, b = klass(qoi.get("a"), "qoi a"), klass(qoi.get("b"), "qoi b")
            if a == b:
                raise CaseError("a comparative quantity needs two different classes")
            c, q, quantity = a, {"kind": "comparative", "a": a, "b": b}, ComparativeQoI(a, b)
        else:
            raise CaseError(f"qoi kind must be 'class' or 'comparative', got {kind!r}")
        c = klass(doi.get("class", c), "doi class")
        dkind = doi.get("kind")
        if dkind == "class-images":
            d, dist = {"kind": dkind, "class": c}, PointDoI()
        elif dkind == "class-images-linear":
            res = doi.get("resolution", 20)
            if isinstance(res, bool) or not isinstance(res, int) or not 1 <= res <= 1000:
                raise CaseError(f"doi resolution must be an integer in 1–1000, got {res!r}")
            d, dist = {"kind": dkind, "class": c, "resolution": res}, LinearDoI(resolution=res)
        else:
            raise CaseError(f"doi kind must be 'class-images' or 'class-images-linear', got {dkind!r}")
        if not isinstance(model, str) or not model:
            raise CaseError(f"model must be a name such as {self.subject!r}, got {model!r}")
        arch_of = model if model in self.config.models else self.subject
        names = self.model_facts(arch_of)["layers"]
        if layer not in names:
            raise CaseError(f"unknown layer {layer!r}; model {arch_of!r} has: "
                            f"{', '.join(names[:40])}")
        return q, d, c, quantity, dist

    def _corrections_has(self, name: str) -> bool:
        payload = self.artifact("corrections")
        return bool(payload) and name in (payload.get("models") or {})

    def _in_stage(self, model: str, layer: str, q: dict, d: dict) -> bool:
        e = self.config.experts
        return (model in self.config.models and layer in e["layers"] and q["kind"] == "class"
                and d == {"kind": "class-images", "class": q["class"]}
                and q["class"] in self.expert_classes())

    @staticmethod
    def _images_kind(images: str) -> str:
        if images not in IMAGES:
            raise CaseError(f"images must be one of {', '.join(map(repr, IMAGES))}, got {images!r}")
        return images

    def has_experts_for(self, model: str, layer: str, qoi: dict, doi: dict,
                        images: str = "label") -> bool:
        """True when :meth:`experts_for` would answer from the cache (computes nothing)."""
        q, d, _, _, _ = self._spec(model, layer, qoi, doi)
        images = self._images_kind(images)
        if images == "label" and self._in_stage(model, layer, q, d):
            key = self._key("experts")
            if key is not None and (key in self._payloads or self.cache.has(key)):
                return True
        key = self._experts_for_key(model, layer, q, d, images)
        return key is not None and (key in self._payloads or self.cache.has(key))

    def experts_for(self, model: str, layer: str, qoi: dict, doi: dict,
                    progress: Callable[[int, int, str], None] | None = None,
                    images: str = "label") -> dict:
        """Experts for any quantity and distribution, computed and cached when missing.

        ``qoi``: ``{"kind": "class", "class": 3}`` or ``{"kind": "comparative", "a": 3, "b": 8}``
        (y_a − y_b). ``doi``: ``{"kind": "class-images"}`` (each image a point) or
        ``{"kind": "class-images-linear", "resolution": 20}`` (a linear path from a black image
        to each image); the images are the training images of the qoi's class (of ``a`` for
        a comparative quantity), or of ``doi["class"]`` when given.

        ``images`` says which test images each expert is interpreted on: ``"label"`` the first
        ``n_images`` test images labelled with the class (of ``doi["class"]`` when given), or
        ``"predicted"`` the first ``n_images`` the model *predicts* as that class (whatever their
        label: the images a shortcut fools are among them). A comparative quantity is interpreted
        on the images of both classes: ``n_images`` of ``a``, then ``n_images`` of ``b``.

        Same dict as :meth:`experts`, plus ``"labels"`` and ``"predictions"`` (the model's
        argmax) of the interpreted images, ``"images_by"`` (``images``) and
        ``"image_classes"`` (the class each image was chosen for). The experts stage's views
        (a class quantity over the class's images, label) are read from that stage.
        ``progress(done, total, message)`` is called while computing (not on a cache hit).
        """
        q, d, c, quantity, dist = self._spec(model, layer, qoi, doi)
        images = self._images_kind(images)
        shown = [q["a"], q["b"]] if q["kind"] == "comparative" else [c]
        if images == "label" and self._in_stage(model, layer, q, d):
            return self._annotated(self.experts(model, layer, q["class"]), model, shown, images)
        with self._lock:
            net = self.model(model)
            key = self._experts_for_key(model, layer, q, d, images)
            if key is None:
                raise CaseError(f"{self.name}: model {model!r} is not available")
            if key not in self._payloads:
                ranking = None
                if self._in_stage(model, layer, q, d):  # reuse the stage's ranking of the units
                    ranking = self._stage_ranking(model, layer, q["class"])
                indices = self._interpretation_indices(model, shown, images)

                def compute():
                    from core.engine.devices import build_threads

                    with build_threads(self.device):
                        r = self._rank_and_interpret(net, layer, quantity, dist, c, progress,
                                                     ranking=ranking, indices=indices)
                    r.update({"model": model, "layer": layer, "qoi": q, "doi": d,
                              "images_by": images})
                    return r

                payload, _ = self.cache.get_or_compute(
                    key, compute, meta={"stage": "experts_for", "case": self.name,
                                        "model": model, "layer": layer})
                self._payloads[key] = payload
            view = self._as_numpy(self._flagged(self._payloads[key], layer))
            return self._annotated(view, model, shown, images)

    def _stage_ranking(self, model: str, layer: str, cls: int) -> dict:
        """The experts stage's ranking of ``layer`` for class ``cls`` (the rows' ranking fields,
        the scores), as :func:`rank_experts` gives it: reused to interpret on other images."""
        import torch

        r = self.experts(model, layer, cls)
        drop = ("threshold", "shortcut")
        rows = [{k: v for k, v in row.items() if k not in drop and not k.endswith("_mass")}
                for row in r["rows"]]
        return {"experts": rows, "scores": torch.as_tensor(r["scores"]),
                "quantity": r["quantity"], "distribution": r["distribution"]}

    def _annotated(self, view: dict, model: str, shown: list[int], images: str) -> dict:
        """``view`` with the labels and ``model``'s predictions of its interpreted test images,
        ``images_by`` and ``image_classes`` (NumPy)."""
        import numpy as np

        idx = np.asarray(view.get("indices", []), dtype=np.int64).ravel()
        test = self.data().test
        labels = test.y[idx].numpy().astype(np.int64)
        preds = self.predictions(model)[idx].numpy().astype(np.int64)
        by = labels if images == "label" else preds
        cls = np.array([c if c in shown else -1 for c in by.tolist()], dtype=np.int64)
        return {**view, "labels": labels, "predictions": preds, "images_by": images,
                "image_classes": cls}

    def _flagged(self, result: dict, layer: str) -> dict:
        """``result`` with shortcut flags: the layer's threshold from the experts stage when it is
        built and covers the layer, else the floor (factor × chance); unchanged without a
        region."""
        chance = self._chance()
        if chance is None:
            return {**result, "threshold": None}
        threshold = self.config.experts["shortcut_factor"] * chance
        meta = self._meta(self._key("experts"))  # the stage's meta line carries the thresholds
        if meta is not None:
            threshold = (meta.get("thresholds") or {}).get(layer, threshold)
        return {**result, "threshold": threshold,
                "rows": [flag(r, threshold) for r in result["rows"]]}

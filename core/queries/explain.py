"""Explain a reader's own image: read it safely, bring it to the case's input, predict, attribute.

    from core.queries.explain import read_image, explain_image, ImageError
    image = read_image(uploaded_bytes, size=(48, 48), channels=3)    # (H, W, 3) in [0, 1]; nothing on disk
    result = explain_image(study, "vanilla", image, layer="conv1")
    trace = trace_image(study, "vanilla", 17)    # test image 17, followed through every expert layer

``read_image`` accepts PNG and JPEG only, refuses a file over ``MAX_BYTES`` and an image whose
header declares more than ``MAX_PIXELS`` pixels before any pixel is decoded (a decompression bomb
raises, it does not warn), applies the EXIF orientation, flattens transparency onto black, converts
the mode to the case's channels (grey ``L`` or ``RGB``) and resizes to the case's size. Every
problem is an :class:`ImageError` with one readable line (no path, no traceback). This module
imports no Streamlit; the model runs under its lock (``core.engine.influence.model_lock``), so sessions
that share a cached model never interleave hooks.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["FORMATS", "MAX_BYTES", "MAX_PIXELS", "ImageError", "explain_image", "predict_split",
           "read_image", "to_model_input", "trace_image"]

FORMATS = ("PNG", "JPEG")
MAX_BYTES = 8 * 2**20  # 8 MiB of file
MAX_PIXELS = 24_000_000  # declared width × height (Pillow's own bomb limit is ~89 M)


class ImageError(ValueError):
    """An uploaded image cannot be used; the message is one line saying why."""


def read_image(data: bytes, size: Sequence[int], channels: int, *, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes → the case's input picture: (H, W) for one channel or (H, W, 3) for three,
    float32 in [0, 1], resized to ``size`` = (H, W). Reads from memory only."""
    from PIL import Image, ImageOps

    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError("expected the bytes of a PNG or JPEG file")
    data = bytes(data)
    if not data:
        raise ImageError("the file is empty")
    if len(data) > max_bytes:
        raise ImageError(f"the file is {len(data) / 2**20:.1f} MB; at most {max_bytes / 2**20:.0f} MB")
    if int(channels) not in (1, 3):
        raise ImageError(f"the case's images have {channels} channels; only 1 or 3 can be uploaded")
    h, w = (int(s) for s in size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except Image.DecompressionBombError:
            raise ImageError("the image declares too many pixels") from None
        except Image.DecompressionBombWarning:
            raise ImageError("the image declares too many pixels") from None
        except Exception:  # noqa: BLE001 - any decoder failure: one line, no traceback
            raise ImageError("not a readable PNG or JPEG image") from None
        try:
            width, height = img.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise ImageError(f"the image declares {width}×{height} pixels; at most "
                                 f"{max_pixels:,} pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(flat, rgba)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grey: scale to 8 bits
                a = np.asarray(img, dtype=np.float64)
                top = 65535.0 if a.max() > 255 else 255.0
                img = Image.fromarray(np.clip(a / top * 255, 0, 255).astype(np.uint8))
            img = img.convert("L" if int(channels) == 1 else "RGB")
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError("the image declares too many pixels") from None
        except Exception:  # noqa: BLE001 - truncated or corrupt data
            raise ImageError("the image data is damaged or truncated") from None
    return (np.asarray(img, dtype=np.float32) / 255.0).copy()


def to_model_input(image: np.ndarray, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None):
    """A [0, 1] picture (H, W) or (H, W, C) → a (1, C, H, W) float tensor in the model's scale
    (the inverse of :meth:`core.cases.seam.CaseData.display`: ``(x − mean) / std``)."""
    import torch

    a = np.asarray(image, dtype=np.float32)
    t = torch.from_numpy(a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0).copy())[None]
    if mean is not None:
        t = t - torch.tensor(mean, dtype=t.dtype).view(1, -1, 1, 1)
    if std is not None:
        t = t / torch.tensor(std, dtype=t.dtype).view(1, -1, 1, 1)
    return t.contiguous()


def explain_image(study, model: str, image: np.ndarray, *, layer: str | None = None, k: int = 3,
                  resolution: int = 20) -> dict:
    """The model's answer for one picture and why: class probabilities, Integrated Gradients of the
    predicted class at the input, and — when ``layer`` is given — the predicted class's top-``k``
    experts of that layer (from the experts stage when it holds them, else ranked on this image)
    interpreted on it. Plain NumPy / Python values; writes nothing.

    ``{"probs": [p per class], "pred": int, "attribution": (H, W), "experts": [{"unit", "score",
    "map": (H, W)}], "layer", "source": "experts stage" | "this image"}``.
    """
    data = study.data()
    net = study.model(model)
    x = to_model_input(image, data.mean, data.std)
    if tuple(x.shape[1:]) != tuple(data.train.x.shape[1:]):
        raise ImageError(f"the picture is {tuple(x.shape[1:])}; the model expects "
                         f"{tuple(data.train.x.shape[1:])}")
    probs, pred, attribution = _predict_and_attribute(net, x, resolution)
    out = {"probs": probs, "pred": pred, "attribution": attribution, "experts": [], "layer": layer,
           "source": None}
    if layer is None:
        return out
    experts, source = _layer_experts(study, model, net, x, layer, pred, k, resolution)
    out["experts"] = [{k_: e[k_] for k_ in ("unit", "score", "map")} for e in experts]
    out["source"] = source
    return out


def _predict_and_attribute(net, x, resolution: int) -> tuple[list[float], int, np.ndarray]:
    """(class probabilities, predicted class, Integrated Gradients of the predicted class summed
    over channels (H, W)) for one input ``x`` (1, C, H, W) in the model's scale."""
    import torch

    from core.engine.devices import eval_mode, model_device
    from core.engine.distributions import LinearDoI
    from core.engine.influence import influence, model_lock
    from core.engine.quantities import ClassQoI

    x = x.to(model_device(net))
    with model_lock(net), eval_mode(net), torch.no_grad():
        logits = net(x)
    probs = torch.softmax(logits.float(), -1)[0].cpu()
    pred = int(probs.argmax())
    ig = influence(net, x, None, ClassQoI(pred), LinearDoI(resolution), per_input=True, multiply=True)
    return [float(p) for p in probs], pred, ig[0].detach().cpu().sum(0).numpy()


def _layer_experts(study, model: str, net, x, layer: str, cls: int, k: int, resolution: int,
                   mask=None) -> tuple[list[dict], str]:
    """The top-``k`` experts of ``layer`` for class ``cls`` — from the experts stage when it holds
    them for this model and class, else ranked by their influence on this one input — each
    interpreted on ``x``: ``([{"unit", "score", "map": (H, W), "region_mass"}], source)``.
    ``region_mass`` (share of the map's positive attribution inside ``mask``) is None without a
    mask or when the map has no positive attribution."""
    import torch

    from core.engine.devices import model_device
    from core.engine.distributions import PointDoI
    from core.engine.experts import interpret, unit_scores
    from core.engine.influence import influence
    from core.engine.quantities import ClassQoI
    from core.methods.metrics import region_mass

    x = x.to(model_device(net))
    units, source = [], "this image"
    e = study.config.experts
    # the classes the stage ranks (study.expert_classes(): ``[experts] classes``, or every class
    # up to ten when unset — never "none" for an unset list)
    if model in study.config.models and layer in e["layers"] and cls in study.expert_classes() \
            and study.is_built("experts"):
        rows = sorted(study.experts(model, layer, cls)["rows"], key=lambda r: r["rank"])
        units = [(int(r["unit"]), float(r["score"])) for r in rows[:k]]
        source = "experts stage"
    if not units:
        chi = influence(net, x, layer, ClassQoI(cls), PointDoI())
        scores = unit_scores(chi, reduce=e.get("reduce", "sum"))
        order = torch.argsort(scores, descending=True)[:k]
        units = [(int(u), float(scores[u])) for u in order]
        source = "this image"
    out = []
    for unit, score in units:
        a = interpret(net, x, layer, unit, reduce=e.get("reduce", "sum"), resolution=resolution)
        amap = a[0].detach().cpu().sum(0)
        mass = None
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask, dtype=bool))[None, None]
            if amap.clamp(min=0).sum() > 0:
                value = float(region_mass(amap[None, None].float(), m)[0])
                mass = value if np.isfinite(value) else None
        out.append({"unit": unit, "score": score, "map": amap.numpy(), "region_mass": mass})
    return out, source


def _split(study, split: str):
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    data = study.data()
    return data, getattr(data, split)


def predict_split(study, model: str, split: str = "test") -> dict:
    """``model``'s answers on a whole split, without gradients: ``{"label": (N,) int64, "pred": (N,)
    int64, "wrong": [indices where pred != label, ascending]}`` (plain NumPy / Python); the
    predictions are the study's (:meth:`CaseStudy.predictions`, memoised per process)."""
    import torch

    _, s = _split(study, split)
    pred = study.predictions(model, split).numpy().astype(np.int64)
    label = torch.as_tensor(s.y).cpu().numpy().astype(np.int64)
    return {"label": label, "pred": pred, "wrong": [int(i) for i in np.flatnonzero(pred != label)]}


def trace_image(study, model: str, image_or_index, *, layers: Sequence[str] | None = None, k: int = 3,
                split: str = "test", resolution: int | None = None) -> dict:
    """One image followed end to end through ``model``: its prediction, the Integrated Gradients of
    the predicted class at the input, and, for every layer of ``layers`` (default: the case's
    expert layers, ``study.config.experts["layers"]``), the predicted class's top-``k`` experts and
    what each looks at on this image — the machinery of :func:`explain_image`, one layer after
    another. Writes nothing.

    ``image_or_index`` is an index into ``split`` (an ``int``; a bool, a float or an index out of
    range raises :class:`IndexError` / :class:`TypeError` with one readable line) or a picture
    (H, W) / (H, W, 3) in [0, 1] as :func:`read_image` gives (then there is no label and no mask).
    ``resolution`` (Integrated Gradients steps) defaults to the case's ``[experts] resolution``.

    Returns plain NumPy / Python values::

        {"model": str, "split": str | None, "index": int | None,
         "image": (H, W) or (H, W, 3) float32 in [0, 1] (as displayed),
         "label": int | None, "mask": (H, W) bool | None (the case's region on this image),
         "probs": [p per class] (softmax, sums to 1), "pred": int (argmax of probs),
         "correct": bool | None (pred == label),
         "attribution": (H, W) float (IG of the predicted class, summed over channels),
         "layers": [{"layer": str, "class": int (= pred), "source": "experts stage" | "this image",
                     "experts": [{"unit": int, "score": float, "map": (H, W) float,
                                  "region_mass": float | None}]}]}

    Experts come from the experts stage when it ranked this model, layer and class (the same units
    and scores as :func:`explain_image` gives), else they are ranked by their influence on this
    image alone (``source`` says which). Each ``map`` is the expert's interpretation on this image
    (Integrated Gradients of the unit's activation, summed over channels); ``region_mass`` is the
    share of its positive attribution inside the region (``core.methods.metrics.region_mass``), None without
    a region or when the map has no positive attribution.
    """
    data = study.data()
    net = study.model(model)
    e = study.config.experts
    resolution = int(e.get("resolution", 20) if resolution is None else resolution)
    layers = list(e["layers"] if layers is None else layers)
    unknown = [ly for ly in layers if not isinstance(ly, str)]
    if unknown:
        raise TypeError(f"layers must be layer names, got {unknown[0]!r}")
    index = label = mask = None
    if isinstance(image_or_index, np.ndarray):
        image = np.asarray(image_or_index, dtype=np.float32)
        x = to_model_input(image, data.mean, data.std)
        if tuple(x.shape[1:]) != tuple(data.train.x.shape[1:]):
            raise ImageError(f"the picture is {tuple(x.shape[1:])}; the model expects "
                             f"{tuple(data.train.x.shape[1:])}")
        split = None
    else:
        if isinstance(image_or_index, bool) or not isinstance(image_or_index, int | np.integer):
            raise TypeError(f"image must be an index into the {split} split (an integer) or a "
                            f"picture, not {type(image_or_index).__name__}")
        _, s = _split(study, split)
        index = int(image_or_index)
        if not 0 <= index < s.n:
            raise IndexError(f"image {index} is out of range: the {split} split has {s.n} images "
                             f"(0–{s.n - 1})")
        x = s.x[index:index + 1]
        image = data.display(x)[0].astype(np.float32)
        label = int(s.y[index])
        if s.mask is not None:
            mask = s.mask[index, 0].detach().cpu().numpy().astype(bool)
    probs, pred, attribution = _predict_and_attribute(net, x, resolution)
    out = {"model": model, "split": split, "index": index, "image": image, "label": label,
           "mask": mask, "probs": probs, "pred": pred,
           "correct": None if label is None else pred == label, "attribution": attribution,
           "layers": []}
    for layer in layers:
        experts, source = _layer_experts(study, model, net, x, layer, pred, k, resolution, mask)
        out["layers"].append({"layer": layer, "class": pred, "source": source, "experts": experts})
    return out

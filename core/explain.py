"""Explain a reader's own image: read it safely, bring it to the case's input, predict, attribute.

    from core.explain import read_image, explain_image, ImageError
    image = read_image(uploaded_bytes, size=(48, 48), channels=3)    # (H, W, 3) in [0, 1]; nothing on disk
    result = explain_image(study, "vanilla", image, layer="conv1")

``read_image`` accepts PNG and JPEG only, refuses a file over ``MAX_BYTES`` and an image whose
header declares more than ``MAX_PIXELS`` pixels before any pixel is decoded (a decompression bomb
raises, it does not warn), applies the EXIF orientation, flattens transparency onto black, converts
the mode to the case's channels (grey ``L`` or ``RGB``) and resizes to the case's size. Every
problem is an :class:`ImageError` with one readable line (no path, no traceback). This module
imports no Streamlit; the model runs under its lock (``core.influence.model_lock``), so sessions
that share a cached model never interleave hooks.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["FORMATS", "MAX_BYTES", "MAX_PIXELS", "ImageError", "explain_image", "read_image",
           "to_model_input"]

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
    (the inverse of :meth:`core.seam.CaseData.display`: ``(x − mean) / std``)."""
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
    import torch

    from core.devices import eval_mode, model_device
    from core.distributions import LinearDoI, PointDoI
    from core.experts import interpret, unit_scores
    from core.influence import influence, model_lock
    from core.quantities import ClassQoI

    data = study.data()
    net = study.model(model)
    dev = model_device(net)
    x = to_model_input(image, data.mean, data.std).to(dev)
    if tuple(x.shape[1:]) != tuple(data.train.x.shape[1:]):
        raise ImageError(f"the picture is {tuple(x.shape[1:])}; the model expects "
                         f"{tuple(data.train.x.shape[1:])}")
    with model_lock(net), eval_mode(net), torch.no_grad():
        logits = net(x)
    probs = torch.softmax(logits.float(), -1)[0].cpu()
    pred = int(probs.argmax())
    ig = influence(net, x, None, ClassQoI(pred), LinearDoI(resolution), per_input=True, multiply=True)
    out = {"probs": [float(p) for p in probs], "pred": pred,
           "attribution": ig[0].detach().cpu().sum(0).numpy(), "experts": [], "layer": layer,
           "source": None}
    if layer is None:
        return out
    units, source = [], "this image"
    e = study.config.experts
    if model in study.config.models and layer in e["layers"] and pred in (e.get("classes") or []) \
            and study.is_built("experts"):
        rows = sorted(study.experts(model, layer, pred)["rows"], key=lambda r: r["rank"])
        units = [(int(r["unit"]), float(r["score"])) for r in rows[:k]]
        source = "experts stage"
    if not units:
        chi = influence(net, x, layer, ClassQoI(pred), PointDoI())
        scores = unit_scores(chi, reduce=e.get("reduce", "sum"))
        order = torch.argsort(scores, descending=True)[:k]
        units = [(int(u), float(scores[u])) for u in order]
    for unit, score in units:
        a = interpret(net, x, layer, unit, reduce=e.get("reduce", "sum"), resolution=resolution)
        out["experts"].append({"unit": unit, "score": score, "map": a[0].detach().cpu().sum(0).numpy()})
    out["source"] = source
    return out

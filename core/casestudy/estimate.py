"""An estimate of each stage's seconds before a build starts: a timed probe and a count of passes.

The probe (:func:`probe`) times the case's model under study, freshly built (its weights do not
change the cost), on a few batches of random inputs at the case's size on the build's device: one
forward pass per image (``f``, no graph), one forward + backward per image (``fb``, the inputs'
gradient: what the influence engine runs) and one training step's passes (``train``, the
parameters' gradients). Each stage's cost is then a count of such passes that its
settings imply (:func:`counts`): images × DoI resolution × layers × classes for the influence
stages, steps × images for the curves, epochs × training images for the training, and so on —
a list of terms, each named by the setting that scales it. The estimate is the count times the
probe's seconds; the term with the largest count names the setting to lower.

What it is and is not: the counts of ``models``, ``experts`` and ``representations`` follow their
code's loops; those of ``discovery``, ``detection``, ``corrections`` and ``essence`` are coarser
(their main loops, not every check) — ``bench/build.py`` prints the estimate beside a real
build's seconds, stage by stage. Nothing here is fitted to a run: the only measured numbers are
the probe's. Data loading, bootstraps and the metrics' arithmetic are not counted.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from core.casestudy.registry import BY_NAME, REGISTRY, STAGES

__all__ = ["StageEstimate", "counts", "estimate", "format_estimate", "parse_estimate", "probe",
           "sizes", "to_build"]


@dataclass
class StageEstimate:
    """One stage's estimate: ``seconds`` (None: not modelled), ``terms`` [(setting, passes)] in
    forward+backward-equivalents (a forward-only pass counts as the probe's f / fb), and the
    setting of the largest term (``lower``)."""

    stage: str
    seconds: float | None
    terms: list[tuple[str, float]] = field(default_factory=list)
    coarse: bool = False  # its count follows the stage's main loops only (:data:`COARSE`)

    @property
    def lower(self) -> str | None:
        return max(self.terms, key=lambda t: t[1])[0] if self.terms else None


def probe(model, shape: tuple[int, ...], device=None, batch: int | None = None,
          repeats: int = 2, target_s: float = 0.25, max_batch: int = 256,
          layers: tuple[str, ...] = ()) -> dict:
    """Seconds per image of ``model`` on random inputs shaped ``(batch, *shape)`` on ``device``
    (default: the model's), under the build's thread setting
    (:func:`core.engine.devices.build_threads`): ``{"f": forward only, "fb": forward + the
    inputs' gradient (what the influence engine runs), "train": forward + the parameters'
    gradients (a training step's passes), "batch": batch}``, each the fastest of ``repeats`` timed batches
    after one warm-up. ``batch`` None: doubled from 4 until one forward + backward batch takes
    ``target_s`` or ``max_batch`` is reached (the stages run large batches: a small model's
    per-image cost at batch 4 is mostly the per-call overhead). ``"share"``: per layer of
    ``layers``, the forward up to that layer (the engine stops there) over the whole forward —
    what an internal unit's interpretation costs relative to a whole pass; ``"variant"``: per
    layer, the seconds of one masked variant of one image through the essence stage's cut
    (:func:`_variant_seconds`). The model's mode is restored."""
    import torch

    from core.engine.devices import build_threads, eval_mode, model_device
    from core.engine.influence import activations

    dev = torch.device(device) if device is not None else model_device(model)
    model = model.to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def once(fn, x) -> float:
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        return time.perf_counter() - t0

    def forward(x):
        with torch.no_grad():
            model(x)

    def backward(x):  # what the influence engine runs: the gradient of the inputs only
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xx)[:, 0].sum(), xx)

    def train(x):  # what training runs: the parameters' gradients
        model(x)[:, 0].sum().backward()

    with build_threads(dev), eval_mode(model):
        b = batch or 4
        once(backward, torch.rand(b, *shape, device=dev))  # warm-up
        while batch is None and b < max_batch and once(
                backward, torch.rand(b, *shape, device=dev)) < target_s:
            b *= 2
        x = torch.rand(b, *shape, device=dev)
        best = {name: min(once(fn, x) for _ in range(repeats)) / b
                for name, fn in (("f", forward), ("fb", backward), ("train", train))}
        share = {layer: min(1.0, min(once(lambda xx, la=layer: activations(model, xx, la), x)
                                     for _ in range(repeats)) / b / best["f"])
                 for layer in layers}
        variant = {layer: _variant_seconds(model, x, layer, once, repeats) for layer in layers}
    model.zero_grad(set_to_none=True)
    return {**best, "batch": b, "share": share, "variant": variant}


def _variant_seconds(model, x, layer: str, once, repeats: int, n_variants: int = 16) -> float:
    """Seconds per (masked variant × image) of the essence stage's cut at ``layer``
    (:class:`core.methods.essence._Cut`: the folded consumer, the traced tail or a masking hook,
    whichever it picks for this model): what its curves, ablations and region checks repeat."""
    import torch

    from core.methods.essence import _Cut

    cut = _Cut(model, layer)
    xs = x[:32]
    z = cut.slice(xs)
    gen = torch.Generator().manual_seed(0)
    keeps = torch.rand(n_variants, z.shape[1], generator=gen) < 0.5
    fill = torch.zeros_like(z[0])
    cut.logits(xs, z, keeps[:2], fill)  # warm-up: the cut picks its path
    return min(once(lambda _x: cut.logits(xs, z, keeps, fill), xs)
               for _ in range(repeats)) / (n_variants * len(xs))


def _n_classes_of(e: dict, n_classes: int) -> int:
    return len(e.get("classes") or range(min(n_classes, 10)))


def _models(study, n: dict) -> dict:
    """Training: per trained model, epochs × training images (fb), and the splits' evaluation."""
    t = study.config.training
    trained = [m for m, spec in study.config.models.items() if spec.checkpoint is None]
    epochs, seeds = int(t.get("epochs", 10)), int(study.seeds or 1)
    return {"training.epochs × train images": seeds * len(trained) * epochs * n["train"]
            * n["train_step"],
            "evaluation (forward)": seeds * len(study.config.models) * n["all"] * n["f"]}


def _experts(study, n: dict) -> dict:
    e = study.config.experts
    models = len(study.config.models)
    classes = _n_classes_of(e, n["classes"])
    per_class_test = n["test"] / max(n["classes"], 1)
    images = min(int(e.get("n_images", 8)), per_class_test)
    depth = sum(n["share"].get(layer, 1.0) for layer in e.get("layers") or [])
    return {"ranking: class training images": models * n["train"] * classes / n["classes"],
            "experts.resolution × k × n_images × layers × classes":
                models * depth * classes * int(e.get("k", 5)) * int(e.get("resolution", 20))
                * images}


def _method_cost(meth: str, o: dict, n: float, n_ref: float, share: dict) -> float:
    """Forward+backward passes of one representation method on ``n`` images (an internal
    unit's interpretation as its layer's ``share`` of a pass)."""
    if meth == "integrated_gradients":
        return n * int(o.get("steps", 32))
    if meth == "smoothgrad":
        return n * int(o.get("samples", 32))
    if meth == "internal_influence":
        path = max(1, int(o.get("path_resolution") or 0))
        return n_ref * path + int(o.get("k", 3)) * int(o.get("resolution", 8)) * n * share.get(
            o.get("layer"), 1.0)
    return n * (1.0 if meth != "gradcam" else 1.5)  # Grad-CAM: one more forward for activations


def _representations(study, n: dict) -> dict:
    from core.methods.attribution import METHODS
    from core.methods.metrics import cut_points
    from core.stages import representations as R

    cfg = R.check_config(dict(study.config.section("representations")), "estimate")
    models = len(cfg["models"] or [m for m in (study.subject, study.reference) if m])
    n_img = min(int(cfg["n_images"]), n["test"])
    n_mprt = min(int(cfg["n_mprt"]), n_img)
    classes = n["classes"]
    n_ref = min(int(cfg["n_reference"]), n["train"] / classes) * classes
    e = study.config.experts
    layers = list(e.get("layers") or [])
    internal = {"layer": e.get("primary_layer") or layers[-1]} if layers else {}
    step = R.curve_step(cfg, n["hw"])
    steps = math.ceil(n["hw"][0] * n["hw"][1] / step)
    points = len(cut_points(n["layers"], cfg["mprt_points"]))
    maps = mprt = curves = 0.0
    for meth in cfg["methods"]:
        o = {**METHODS[meth].defaults, **(internal if meth == "internal_influence" else {}),
             **cfg["options"].get(meth, {})}
        maps += _method_cost(meth, o, n_img, n_ref, n["share"])
        mprt += points * _method_cost(meth, o, n_mprt, n_ref, n["share"])
        curves += 2 * (steps + 1) * n_img * n["f"]
    return {"n_images (maps)": models * maps,
            "n_steps × n_images (deletion/insertion curves)": models * curves,
            "mprt_points × n_mprt (randomisation test)": models * mprt}


def _discovery(study, n: dict) -> dict:
    """Per model and class: the experts' ranking on the fit images (fb), their maps — one
    weighted experts' quantity, so one gradient per path point at the layer's share of a pass —
    on the fit and held-out images, then per group and region mode the causal tests: the region
    removed from the group's images and from a control (2 forwards each; the groups share the
    held-out images, and the class as one group holds them all), pasted onto the targets with
    its controls (2 forwards each for the fixed and pattern modes, 3 for the moving one). The
    eigengap's k is not known before the maps exist: counted at the middle of
    1…``max_clusters``, plus the class as one group."""
    from core.stages import discovery as D

    cfg = D.check_config(dict(study.config.section("discovery")))
    models = len(cfg["models"] or study.config.models)
    c = n["classes"]
    per_class = n["train"] / c
    fit = min(int(cfg["max_fit"]), per_class / 2)
    held = min(int(cfg["max_heldout"]), per_class / 2 + n["test"] / c)
    targets = min(int(cfg["max_targets"]), n["train"])
    share = n["share"].get(D.layer_of(study.config.experts, cfg), 1.0)
    groups = 1 + (1 + int(cfg["max_clusters"])) / 2
    modes, paste = 3, 2 + 3 + 2
    return {"max_fit + max_heldout × resolution (experts' maps)":
                models * c * (fit + (fit + held) * int(cfg["resolution"]) * share),
            "max_heldout, max_targets × groups (causal tests, forward)":
                models * c * (modes * 2 * 2 * held + paste * groups * targets) * n["f"]}


def _detection(study, n: dict) -> dict:
    """The patch attacks at their full ``steps`` (an attack that settles early stops sooner: an
    upper bound) on the fit images and on every held-out attempt (held-out images × views ×
    patch sides × positions); the detectors' profiles and experts' maps (``resolution`` path
    points, the experts at their layer's share) on the fit images, the clean views and the
    attacked ones; per adaptive attack the held-out attacks again with a penalty — through the
    influence profile a double back-propagation (≈ 3 passes), through the Mahalanobis distance
    one — run side by side in :func:`~core.engine.parallel.process_map`'s workers."""
    from core.engine.parallel import worker_count
    from core.stages import detection as T

    cfg = T.check_config(dict(study.config.section("detection")))
    n_eval = min(int(cfg["n_eval"] or n["test"]), n["test"])
    layers = list(cfg["layers"] or study.config.experts.get("layers") or [])
    expert_layer = cfg["expert_layer"] or cfg["layer"] or (layers[-1] if layers else None)
    views = n_eval * int(cfg["views"])
    attempts = views * len(cfg["patch_sizes"] or [1]) * int(cfg["positions"])
    steps, fit_attacks = int(cfg["steps"]), min(int(cfg["n_attack_fit"]), n["train"])
    # every layer's profile from one engine pass per path point; k experts' interpretations
    per_image = int(cfg["resolution"]) * (1 + int(cfg["k"]) * n["share"].get(expert_layer, 1.0))
    scored = min(int(cfg["n_fit"]), n["train"]) + fit_attacks + views + attempts
    out = {"steps × (n_attack_fit + held-out attempts) (patch attacks)":
               steps * (fit_attacks + attempts),
           "resolution × (1 + k) × images (profiles, experts' maps)": scored * per_image}
    kinds = list(cfg["adaptive_to"]) if cfg["adaptive"] else []
    if kinds:
        cost = sum(3.0 if k == "influence" else 1.0 if k == "mahalanobis" else 4.0 for k in kinds)
        out["adaptive: steps × held-out attempts × attacks"] = (
            steps * attempts * cost + len(kinds) * attempts * per_image
        ) / worker_count(study.device, len(kinds))
    return out


def _corrections(study, n: dict) -> dict:
    """The fine-tunes and the corrected models' measurements run as seeds × methods tasks in
    :func:`~core.engine.parallel.process_map`'s workers: their passes are shared among them."""
    from core.engine.parallel import worker_count
    from core.stages import corrections as C

    cfg = C.check_config(dict(study.config.section("corrections")))
    seeds = int(cfg["seeds"] or study.seeds or 1)
    n_fit = min(int(cfg["n_fit"] or n["train"]), n["train"])
    grid = 0
    for meth in cfg["methods"]:
        lambdas = (cfg.get(meth) or {}).get("lambdas") or [None]
        double = 3.0 if meth in ("rrr", "influence_penalty") else 1.0  # a gradient penalty
        grid += len(lambdas) * double if meth in ("rrr", "influence_penalty",
                                                   "counterexamples") else 0
    workers = worker_count(study.device, seeds * len(cfg["methods"]))
    fine = seeds * int(cfg["epochs"]) * n_fit * grid * n["train_step"] / workers
    models = seeds * (len(cfg["methods"]) / workers + 2)
    explain = models * int(cfg["n_explain"]) * int(cfg["explain_resolution"])
    return {"seeds × epochs × n_fit × strengths (fine-tunes)": fine,
            "n_explain × explain_resolution (region mass)": explain,
            "evaluation (forward)": models * n["all"] * n["f"]}


def _essence(study, n: dict) -> dict:
    """Per model and layer: rankings (fb) over ``n_rank`` images per class of each pair; then
    masked variants of the layer's slice, each run through the part after the layer — the
    probe's ``variant`` cost per (variant × image), which already reflects the cut's path:
    per pair and fill 1 + (ks − 1)(2 + draws) variants on the pair's images, per fill
    1 + classes + draws variants (the ablations) on the evaluation images, and 1 + draws
    variants per region set image (the region check)."""
    from core.methods.essence import k_grid
    from core.stages import essence as S

    cfg = S.check_config(dict(study.config.section("essence")))
    layers = list(cfg["layers"] or study.config.experts.get("layers") or [])
    models = len(cfg["models"] or [study.subject])
    c = n["classes"]
    pairs = min(len(cfg["pairs"]) + int(cfg["n_confused"]), c * (c - 1) // 2)
    data = study.data()
    _, ev = S._eval_split(data, cfg["eval_set"])
    n_eval = min(int(cfg["n_eval"] or ev.n), ev.n)
    regions = S._region_sets(data, cfg["n_eval"]) if cfg["region"] else {}
    n_region = sum(len(y) for _, y, _ in regions.values()) \
        if any(r for _, _, r in regions.values()) else 0
    draws, fills = int(cfg["random_draws"]), len(cfg["fills"])
    rank = models * len(layers) * pairs * 2 * min(int(cfg["n_rank"]), n["train"] / c)
    curves = ablate = region = 0.0
    for layer in layers:
        v = n["variant"].get(layer, 1.0)
        grid = len(k_grid(n["widths"].get(layer, n["width"]), cfg["ks"]))
        curves += v * pairs * fills * (1 + (grid - 1) * (2 + draws)) * n_eval * min(2, c) / c
        ablate += v * fills * (1 + c + draws) * n_eval
        region += v * fills * (1 + draws) * n_region
    return {"n_rank (rankings)": rank,
            "random_draws × ks × n_eval (curves)": models * curves,
            "random_draws × n_eval (ablations)": models * ablate,
            "random_draws × region images (region check)": models * region}


# stages whose count follows their main loops only, not every check they run
COARSE = frozenset({"discovery", "detection", "corrections", "essence"})
COUNTS = {"models": _models, "experts": _experts, "discovery": _discovery,
          "representations": _representations, "detection": _detection,
          "corrections": _corrections, "essence": _essence}


def counts(study, stage: str, sizes: dict) -> dict[str, float] | None:
    """The terms of ``stage``'s cost for ``study``'s settings, in forward+backward passes of one
    image, given the case's ``sizes`` (:func:`sizes`); None for a stage without a count
    (``data``: reading is not modelled)."""
    fn = COUNTS.get(stage)
    return None if fn is None else {k: float(v) for k, v in fn(study, sizes).items()}


def sizes(study, model, p: dict) -> dict:
    """What the counts read of the case: images per split (``train``, ``val``, ``test``,
    ``all``), ``classes``, ``hw`` (H, W), ``layers`` (the subject's randomisable layers that feed
    its class logit, MPRT's cascade), ``width`` (the widest experts layer's channels, from one
    forward of one image of ``model``; ``widths`` per layer), ``variant`` (per layer, a masked
    variant over a forward + backward), ``f`` and ``train_step`` (a forward, a training step
    over a forward + the inputs' gradient) and ``share`` (per experts layer, the forward up to
    it over a whole forward), all from the probe ``p``."""
    import torch

    from core.engine.influence import activations, model_device
    from core.methods.metrics import feeding_layers

    data = study.data()
    n = {s: int(getattr(data, s).n) for s in ("train", "val", "test")}
    x = data.test.x[:1].float().to(model_device(model))
    widths = {}
    with torch.no_grad():
        for layer in study.config.experts.get("layers") or []:
            widths[layer] = int(activations(model, x, layer).shape[1])
    return {**n, "all": sum(n.values()), "classes": len(data.class_names),
            "hw": tuple(int(v) for v in data.test.x.shape[-2:]),
            "width": max([2, *widths.values()]), "widths": widths,
            "variant": {k: v / p["fb"] for k, v in (p.get("variant") or {}).items()},
            "layers": max(len(feeding_layers(model, x, data.test.y[:1])), 1), "f": p["f"] / p["fb"],
            "train_step": p.get("train", p["fb"]) / p["fb"],
            "share": dict(p.get("share") or {})}


def estimate(study, stages: list[str] | None = None, batch: int | None = None
             ) -> tuple[list, dict]:
    """Per stage of ``stages`` (default every stage of the case), a :class:`StageEstimate` from
    one timed probe of the subject (:func:`probe`) and the stage's :func:`counts`; and the probe
    (``{"f", "fb", "batch", "seconds"}``: seconds the estimate itself took)."""
    t0 = time.perf_counter()
    data = study.data()
    model = study._fresh_model(study.subject)
    p = probe(model, tuple(data.test.x.shape[1:]), study.device, batch=batch,
              layers=tuple(study.config.experts.get("layers") or ()))
    n = sizes(study, model, p)
    names = stages or [s.name for s in REGISTRY]
    out = []
    for name in names:
        terms = counts(study, name, n)
        if terms is None:
            out.append(StageEstimate(name, None))
            continue
        out.append(StageEstimate(name, sum(terms.values()) * p["fb"], sorted(
            terms.items(), key=lambda t: -t[1]), coarse=name in COARSE))
    p["seconds"] = time.perf_counter() - t0
    return out, p


def format_estimate(rows: list, p: dict) -> str:
    """The estimate as lines: per stage its seconds and the setting that dominates its count."""
    upto = "".join(f", to {k} {v:.0%}" for k, v in (p.get("share") or {}).items())
    lines = [f"estimate (probe: {p['fb'] * 1e3:.1f} ms per image forward+backward, "
             f"{p.get('train', p['fb']) * 1e3:.1f} ms a training step, {p['f'] * 1e3:.1f} ms "
             f"forward{upto}, batch {p['batch']}; {p['seconds']:.1f} s):"]
    total = 0.0
    for r in rows:
        if r.seconds is None:
            lines.append(f"{r.stage:>15}: not estimated")
            continue
        total += r.seconds
        share = max(t[1] for t in r.terms) / max(sum(t[1] for t in r.terms), 1e-12)
        lines.append(f"{r.stage:>15}: ~{_dur(r.seconds):>8}  (lower: {r.lower}, "
                     f"{share:.0%} of it{'; a coarse count' if r.coarse else ''})")
    lines.append(f"{'total':>15}: ~{_dur(total):>8}  (the counted passes only; the machine's "
                 "other load is not foreseen)")
    return "\n".join(lines)


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def to_build(study, stages: list[str] | None, force: bool = False) -> list[str]:
    """The stages a ``build(stages, force)`` of ``study`` computes, in build order: those asked
    for (default all) and what they read, less those already in the cache (``force``: the asked
    ones count as not built). Reads the cache's entry headers only (no torch)."""
    needed = set(stages or STAGES)
    while True:
        more = needed | {r for s in needed for r in BY_NAME[s].reads}
        if more == needed:
            break
        needed = more
    built = study.status()
    return [s for s in STAGES if s in needed and (not built.get(s) or (force and (
        not stages or s in stages)))]


def parse_estimate(text: str) -> dict[str, float]:
    """The per-stage seconds of a :func:`format_estimate` printout found in ``text`` (e.g. a
    build's stderr): ``{stage: seconds}`` (``total`` included; stages "not estimated" left
    out). What the benches compare with the build's own per-stage seconds."""
    out = {}
    for m in re.finditer(r"^ *([a-z_]+): ~ *([0-9.]+) (s|min)\b", text, re.M):
        out[m.group(1)] = float(m.group(2)) * (60.0 if m.group(3) == "min" else 1.0)
    return out

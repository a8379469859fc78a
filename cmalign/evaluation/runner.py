"""`evaluate(cfg)`: embed once per system, run every task, write metrics.json, report.md and the figures.

Systems are the model itself, an optional baseline (by default a run's own starting model: before vs after), and
the post-hoc fixes applied to the model's embeddings. Every system sees the same images, captions, prompts, seeds.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cmalign
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.manifests import read_manifest_file
from cmalign.artifacts.outputs import check_output
from cmalign.artifacts.sources import RUN, resolve_source
from cmalign.errors import ConfigError
from cmalign.evaluation import encoders
from cmalign.evaluation.captioning.tokenize import NAME as TOKENIZER_NAME
from cmalign.evaluation.config import EvalConfig
from cmalign.evaluation.datasets import load_eval_data
from cmalign.evaluation.evaluators import definitions, evaluators_for, without_ci
from cmalign.evaluation.posthoc import fit_posthoc
from cmalign.evaluation.system_embeddings import embed_all
from cmalign.metrics import gap, gap_intervals
from cmalign.metrics.bootstrap import LEVEL, paired_interval

KIND = "cmalign-eval"


@dataclass
class EvalResult:
    out: Path
    metrics: dict
    seconds: float


def default_out(cfg: EvalConfig) -> Path:
    name = Path(cfg.source).name if cfg.source else cfg.model.replace("/", "_").replace(":", "_")
    return Path("reports") / name


def _subject(cfg: EvalConfig, log):
    if cfg.source is not None:
        return encoders.open_source(cfg.source, "model", cfg.device, cfg.provider, cfg.variant, cfg.batch_size)
    from cmalign.model.base import resolve_pretrained, wants_base_model

    if wants_base_model(cfg.model, cfg.pretrained):
        log("the embedded base model (built once and cached)")
    return encoders.TorchEncoder(cfg.model, resolve_pretrained(cfg.model, cfg.pretrained), "model", cfg.device,
                                 cfg.batch_size)


def _baseline(cfg: EvalConfig, log):
    """The baseline encoder, or (None, why not)."""
    spec = cfg.baseline
    if spec == "none":
        return None, "none requested"
    if spec in ("auto", "base") and cfg.source:
        from cmalign.artifacts.manifests import json_object_or_none

        own = json_object_or_none(Path(cfg.source) / "manifest.json") or {}
        if own.get("kind") == "cmalign-adapter" and Path(str(own.get("base_export"))).is_dir():
            log(f"baseline: the adapter's base export {own['base_export']}")
            enc = encoders.open_source(own["base_export"], "baseline", cfg.device, cfg.provider, cfg.variant,
                                       cfg.batch_size)
            enc.description["role"] = "the adapter's base export"
            return enc, None
    if spec in ("auto", "base"):
        source = resolve_source(cfg.source) if cfg.source else None
        kind = source.kind if source else None
        start = encoders.run_start_model(source) if kind == RUN else None
        if start is None:
            why = ("the source is not a fit run" if kind != "run" else
                   "the run's starting weights are not on this machine")
            if spec == "base":
                raise ConfigError(f"--baseline base: {why}; give a run or export directory, or --baseline none")
            return None, f"no baseline: {why} (give --baseline RUN_OR_EXPORT)"
        log(f"baseline: the run's starting model {start[0]} ({start[1] or 'random init'})")
        return encoders.TorchEncoder(start[0], start[1], "baseline", cfg.device, cfg.batch_size,
                                     description={"role": "the run's starting model"}), None
    return encoders.open_source(spec, "baseline", cfg.device, cfg.provider, cfg.variant, cfg.batch_size), None


def _posthoc_target(cfg: EvalConfig, embedded: dict) -> str:
    """Whose embeddings the post-hoc fixes apply to: by default the original model's (the baseline), since they
    are the cheap alternative to fine-tuning that the fine-tuned model should beat."""
    if cfg.posthoc_on == "baseline" and "baseline" not in embedded:
        raise ConfigError("--posthoc-on baseline needs a baseline (--baseline)")
    if cfg.posthoc_on == "auto":
        return "baseline" if "baseline" in embedded else "model"
    return cfg.posthoc_on


def _run_tasks(emb, data, cfg: EvalConfig, name: str, log, progress, timings: dict) -> tuple[dict, dict, dict, dict]:
    """(figures, skipped, intervals, replicates) of one system, each keyed by task."""
    results, skipped, cis, replicates = {}, {}, {}, {}
    for evaluator in evaluators_for(cfg):
        task = evaluator.name
        if evaluator.needs_labels and data.eval.labels is None:
            skipped[task] = "the evaluation data has no class labels"
            continue
        log(f"{name}: {task}")
        t0 = time.perf_counter()
        results[task] = evaluator(emb, data, progress=lambda done, total, task=task: progress(
            f"{name}: {task} epoch {done}/{total}"))
        timings[f"{name}.{task}"] = round(time.perf_counter() - t0, 2)
        if "ci" in results[task]:
            cis[task] = results[task].pop("ci")
            replicates[task] = results[task].pop("_replicates")
            timings[f"{name}.{task}.bootstrap"] = round(results[task].pop("_bootstrap_seconds"), 2)
    return results, skipped, cis, replicates


def _comparison(systems: dict, reference: str, replicates: dict | None = None) -> dict:
    """Gap reductions and metric deltas of every system against ``reference``; with the bootstrap replicates of
    both (the same image resamples), each also gets a paired interval under ``ci``."""
    ref = systems[reference]
    reps = replicates or {}
    ref_reps = reps.get(reference, {})
    out = {}
    for name, res in systems.items():
        if name == reference:
            continue
        entry: dict = {}
        ci: dict = {}
        sys_reps = reps.get(name, {})
        if "gap" in res and "gap" in ref:
            measures = [m for m in gap.EVAL_GAP_MEASURES if m in res["gap"] and m in ref["gap"]]
            entry["gap_reduction"] = {m: gap.gap_reduction(ref["gap"][m], res["gap"][m])
                                      for m in measures if ref["gap"][m] > 0}
            for m in entry["gap_reduction"]:
                a, b = ref_reps.get("gap", {}).get(m), sys_reps.get("gap", {}).get(m)
                if a is not None and b is not None:
                    basic = entry["gap_reduction"][m] if m in gap_intervals.BASIC_INTERVAL else None
                    ci[f"gap_reduction.{m}"] = paired_interval(a, b, lambda r, s: 1 - s / r, estimate=basic,
                                                               ceiling=1.0)
        delta = {}
        for task in ("retrieval", "mixed", "clustering", "zeroshot", "caption"):
            if task in res and task in ref:
                for key, value in res[task].items():
                    if isinstance(value, float) and isinstance(ref[task].get(key), float):
                        delta[f"{task}.{key}"] = value - ref[task][key]
                        a, b = ref_reps.get(task, {}).get(key), sys_reps.get(task, {}).get(key)
                        if a is not None and b is not None:
                            ci[f"delta.{task}.{key}"] = paired_interval(a, b, lambda r, s: s - r)
        entry["delta"] = delta
        if ci:
            entry["ci"] = ci
        out[name] = entry
    return out


def _model_against_fixes(systems: dict, replicates: dict, fixes: dict) -> dict:
    """The model's changes against each post-hoc fix, with paired intervals: "does it beat Procrustes?" is the
    question a reader of an aligned model's report asks, and two overlapping per-system intervals cannot answer it
    (the systems are scored on the same images, so their difference is far less noisy than either figure)."""
    if "model" not in systems:
        return {}
    return {fix: _comparison({fix: systems[fix], "model": systems["model"]}, fix, replicates)["model"]
            for fix in fixes if fix in systems}


def bootstrap_settings(cfg: EvalConfig) -> dict:
    """What the intervals in metrics.json are, for the reader of the file."""
    slow = min(cfg.bootstrap_slow, cfg.bootstrap)
    return {
        "repetitions": cfg.bootstrap, "repetitions_slow": slow,
        "slow": [f"gap.{m}" for m in gap_intervals.SLOW_BOOTSTRAP], "seed": cfg.seed, "level": LEVEL,
        "method": "percentile bootstrap (scipy.stats.bootstrap, method='percentile') over the evaluation images",
        "basic": [f"gap.{m}" for m in gap_intervals.BASIC_INTERVAL],
        "basic_why": "figures of estimated means or covariances: each resample adds the sampling noise again, so "
                     "their replicates sit above the estimate and a percentile interval can miss it; their interval "
                     "is the basic one, [2θ̂ − q97.5, 2θ̂ − q2.5], which undoes that shift to first order (so it may "
                     "lie below a noise-inflated estimate)",
        "resampling": {
            "gap": "the (image, first caption) pairs, and the images with their mean captions; MMD² keeps the full "
                   "sample's kernel bandwidth (median heuristic) and the estimate's own rows, and pairs only distinct "
                   "images",
            "retrieval": "i→t: the image queries; t→i: the caption queries of the resampled images (an image carries "
                         "its captions); the gallery searched is fixed",
            "mixed": "image queries, and the caption queries of the resampled images; the joint index is fixed",
            "clustering": "the images with their prompt texts, cluster assignments fixed: the interval covers the "
                          "sampling of evaluation items, not the randomness of KMeans or HDBSCAN",
            "zeroshot": "the images; class weights fixed",
            "caption": "the images, with the decoder and CIDEr-D's IDF (the whole reference corpus) fixed: CIDEr-D and "
                       "ROUGE-L as means of per-image scores, BLEU-4 from the summed n-gram counts",
        },
        "without_ci": without_ci() if cfg.bootstrap else {},
    }


def evaluate(cfg: EvalConfig, log=None, progress=None) -> EvalResult:
    """Run ``cfg`` and write its report directory; returns where, and the metrics. ``log(message)`` hears of
    each stage, ``progress(message)`` of transient progress within one (the caption decoder's epochs)."""
    say = log or (lambda _msg: None)
    tick = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    baseline_dir = cfg.baseline if cfg.baseline not in ("auto", "base", "none") else None
    check_output(out, KIND, "metrics.json", inputs=[cfg.source, baseline_dir, cfg.data, cfg.fit_data],
                 overwrite=cfg.overwrite, exists_hint=", or --out elsewhere")
    timings: dict = {}

    t0 = time.perf_counter()
    data = load_eval_data(cfg)
    timings["data"] = round(time.perf_counter() - t0, 2)
    say(f"data: {data.description['images']} images, {data.description['captions']} captions; "
        f"fit set {data.description['fit_images']} images")

    subject = _subject(cfg, say)
    baseline, baseline_note = _baseline(cfg, say)
    embedded = {}
    for enc in (subject, baseline):
        if enc is not None:
            t0 = time.perf_counter()
            embedded[enc.label] = embed_all(enc, data, say)
            timings[f"{enc.label}.embed"] = round(time.perf_counter() - t0, 2)

    posthoc_maps = {}
    target = _posthoc_target(cfg, embedded) if cfg.posthoc else None
    for name in cfg.posthoc:
        fix = fit_posthoc(name, *embedded[target].fit_pairs(data))
        posthoc_maps[f"{target}+{name}"] = fix.describe()
        embedded[f"{target}+{name}"] = embedded[target].mapped(fix)

    systems, skipped, cis, replicates = {}, {}, {}, {}
    for name, emb in embedded.items():
        systems[name], why, cis[name], replicates[name] = _run_tasks(emb, data, cfg, name, say, tick, timings)
        skipped.update(why)
    reference = "baseline" if "baseline" in systems else "model"
    comparison = _comparison(systems, reference, replicates)
    against_fixes = _model_against_fixes(systems, replicates, posthoc_maps)

    metrics = {
        "kind": KIND, "cmalign_version": cmalign.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": subject.description,
        "baseline": baseline.description if baseline else None, "baseline_note": baseline_note,
        "posthoc": posthoc_maps,
        "data": data.description, "notes": data.notes,
        "settings": {"tasks": list(cfg.tasks), "seed": cfg.seed, "k": cfg.k,
                     "caption_decoder": cfg.decoder.to_dict(), "caption_tokenizer": TOKENIZER_NAME,
                     "clustering": "KMeans(k = classes, n_init 10); HDBSCAN(min_cluster_size = max(5, points / "
                                   "(4 × classes)), min_samples 5) after PCA to 50 dims",
                     "retrieval_ties": "expected value over a random order of exactly tied scores",
                     "gap_pairs": "each image with its first caption (l2i_mean_caption, raw_mean_caption: with "
                                  "its re-normalised mean caption)",
                     "bootstrap": cfg.bootstrap},
        "systems": systems, "skipped": skipped,
        "ci": cis if cfg.bootstrap else {},
        "bootstrap": bootstrap_settings(cfg),
        "comparison": {"reference": reference, "systems": comparison,
                       **({"model_against_fixes": against_fixes} if against_fixes else {})},
        "timings_seconds": timings,
        "versions": versions(),
        "definitions": definitions(),
    }
    with atomic_dir(out) as tmp:
        figures = []
        if cfg.figures:
            from cmalign.evaluation import figures as figs

            t0 = time.perf_counter()
            say("figures")
            figures = figs.write_figures(tmp, embedded, systems, data, cfg)
            timings["figures"] = round(time.perf_counter() - t0, 2)
        metrics["figures"] = figures
        metrics["seconds"] = round(time.perf_counter() - t_start, 1)
        write_json(tmp / "metrics.json", metrics)
        from cmalign.evaluation.report import write_report

        write_report(tmp / "report.md", metrics)
    return EvalResult(out, metrics, metrics["seconds"])


def versions() -> dict:
    import sklearn

    out = {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__,
           "platform": platform.platform()}
    for mod in ("torch", "open_clip", "onnxruntime", "hdbscan"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            pass
    try:
        from importlib.metadata import version

        out["pycocoevalcap"] = version("pycocoevalcap")
    except Exception:  # importlib raises PackageNotFoundError; any failure just leaves the field out
        pass
    return out


def read_metrics(path: str | Path) -> dict:
    """A report directory's (or file's) metrics.json."""
    p = Path(path)
    return read_manifest_file(p / "metrics.json" if p.is_dir() else p, KIND, ValueError)

"""`sweep(cfg)`: one fit per alpha_target from the same base and seed, each evaluated with `cmalign eval`, plus the
base model and its post-hoc fixes; then the frontier, the R² of gap against task, and a recommendation.

The paper's advice is that alpha_target needs a validation phase (the trade-off is non-linear); this is it.
Layout of OUT::

    OUT/sweep_config.json   what the sweep is (a re-run with other settings is refused)
    OUT/runs/<name>/        ordinary `cmalign fit` run directories (`cmalign export` takes them)
    OUT/evals/<name>/       ordinary `cmalign eval` report directories (base: the base model + post-hoc fixes)
    OUT/sweep.json, OUT/report.md, OUT/*.png

Resumable: a finished run (its model written, same config hash) and a finished eval are kept; a run killed
mid-way continues from its last checkpoint; so an interrupted sweep goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cmalign
from cmalign.artifacts.atomic import write_json
from cmalign.artifacts.outputs import refuse_inputs
from cmalign.artifacts.sources import run_finished
from cmalign.errors import CmalignError
from cmalign.sweep.analysis import flatten, r2_by_population, r2_table, recommend, row_intervals
from cmalign.sweep.config import SweepConfig

KIND = "cmalign-sweep"


class SweepError(CmalignError, ValueError):
    """The sweep's settings or its output directory are not usable."""


@dataclass
class SweepResult:
    out: Path
    summary: dict
    seconds: float


@dataclass
class RunSpec:
    name: str
    alpha: float
    overrides: dict
    kind: str  # alpha | variant


def run_name(alpha: float) -> str:
    return f"a{alpha:g}"


def _specs(cfg: SweepConfig) -> list[RunSpec]:
    specs = [RunSpec(run_name(a), float(a), {}, "alpha") for a in cfg.alphas]
    for name, overrides in cfg.variants.items():
        if "alpha_target" not in overrides:
            raise SweepError(f"variant '{name}' must set alpha_target")
        specs.append(RunSpec(name, float(overrides["alpha_target"]),
                             {k: v for k, v in overrides.items() if k != "alpha_target"}, "variant"))
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or "base" in names:
        raise SweepError(f"run names must be unique and not 'base': {names}")
    return specs


def fit_config(cfg: SweepConfig, spec: RunSpec, run_dir: Path, threads: int = 0):
    from cmalign.train.config import load_config

    overrides = {"alpha_target": spec.alpha, "train.out": str(run_dir), "train.seed": cfg.seed,
                 "train.steps": cfg.steps, "data.train": cfg.data, "data.val": cfg.val, "model.name": cfg.model,
                 "model.pretrained": cfg.pretrained, "train.threads": threads or None,
                 **cfg.fit_overrides, **spec.overrides}
    return load_config(None, overrides).resolve_defaults()


def eval_config(cfg: SweepConfig, source: str | None, out: Path, **kw):
    from cmalign.evaluation import EvalConfig
    from cmalign.evaluation.captioning.decoder import DecoderConfig

    return EvalConfig(source=source, baseline="none", data=cfg.val, fit_data=cfg.data, out=str(out), overwrite=True,
                      figures=False, max_images=cfg.max_images, fit_images=cfg.fit_images, seed=cfg.seed,
                      decoder=DecoderConfig(epochs=cfg.decoder_epochs, seed=cfg.seed), **kw)


# --------------------------------------------------------------------------- one job


def _eval_done(eval_dir: Path, config_hash: str | None) -> bool:
    path = eval_dir / "metrics.json"
    if not path.is_file():
        return False
    m = json.loads(path.read_text())
    return config_hash is None or m.get("model", {}).get("config_hash") == config_hash


def _fit_job(cfg: SweepConfig, spec: RunSpec, out: Path, threads: int) -> dict:
    """Fit (or resume, or keep) one run, then evaluate it; returns what happened."""
    from cmalign.evaluation import evaluate
    from cmalign.train.loop import fit
    from cmalign.train.run_dir import RunDir, load_checkpoint_state

    run_dir, eval_dir = out / "runs" / spec.name, out / "evals" / spec.name
    fcfg = fit_config(cfg, spec, run_dir, threads)
    h = fcfg.hash()
    did = {"name": spec.name}
    t0 = time.perf_counter()
    if not run_finished(run_dir, h):
        state = load_checkpoint_state(RunDir(run_dir)) if run_dir.exists() else None
        resume = state is not None and state.get("config_hash") == h
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # a sweep-owned run that never checkpointed, or of other settings
        try:
            from rich.console import Console

            fit(fcfg, resume=resume, show_progress=False, console=Console(stderr=True, quiet=True))
        except Exception as e:  # a diverging ablation is a result to report, not the end of the sweep
            return {**did, "error": f"fit failed: {type(e).__name__}: {e}"}
        did["fit"] = "resumed" if resume else "fitted"
    else:
        did["fit"] = "kept"
    did["fit_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if not _eval_done(eval_dir, h):
        evaluate(eval_config(cfg, str(run_dir), eval_dir))
        did["eval"] = "evaluated"
    else:
        did["eval"] = "kept"
    did["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return did


def _base_job(cfg: SweepConfig, out: Path, threads: int) -> dict:
    from cmalign.evaluation import evaluate
    from cmalign.evaluation.posthoc import NAMES
    from cmalign.model.loading import TINY_MODEL

    eval_dir = out / "evals" / "base"
    if _eval_done(eval_dir, None):
        return {"name": "base", "eval": "kept"}
    t0 = time.perf_counter()
    evaluate(eval_config(cfg, None, eval_dir, model=cfg.model or TINY_MODEL, pretrained=cfg.pretrained,
                         posthoc=NAMES, posthoc_on="model"))
    return {"name": "base", "eval": "evaluated", "eval_seconds": round(time.perf_counter() - t0, 1)}


def _job(args) -> dict:
    kind, cfg, spec, out, threads = args
    if threads:
        import torch

        torch.set_num_threads(threads)
    return _base_job(cfg, out, threads) if kind == "base" else _fit_job(cfg, spec, out, threads)


# --------------------------------------------------------------------------- the sweep


def _check_out(cfg: SweepConfig, out: Path) -> None:
    refuse_inputs(out, [cfg.data, cfg.val, cfg.pretrained])
    identity_file = out / "sweep_config.json"
    if identity_file.is_file():
        old = json.loads(identity_file.read_text()).get("identity")
        if old != json.loads(json.dumps(cfg.identity())):
            if not cfg.overwrite:
                raise SweepError(f"{out} holds a sweep with other settings ({_diff(old, cfg.identity())}); "
                                 "use another --out, or --overwrite to start it again")
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        # --overwrite restarts a sweep, but never deletes a directory that is not one
        raise SweepError(f"{out} exists and is not a sweep; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(identity_file, {"kind": KIND, "identity": cfg.identity(), "cmalign_version": cmalign.__version__})


def _diff(old: dict | None, new: dict) -> str:
    if not old:
        return "unreadable"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != json.loads(json.dumps(new.get(k))))
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys) or "format"


def sweep(cfg: SweepConfig, log=None) -> SweepResult:
    """Run (or continue) the sweep in ``cfg.out`` and write its summary; see the module docstring."""
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    if cfg.data is not None and cfg.val is None:
        raise SweepError("a sweep on your --data needs --val: evaluation must not see the training images")
    if cfg.jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {cfg.jobs}")
    if cfg.engine not in ("local", "ray"):
        raise SweepError(f"--engine must be local or ray, got {cfg.engine!r}")
    if not cfg.alphas and not cfg.variants:
        raise SweepError("nothing to sweep: give at least one alpha")
    specs = _specs(cfg)
    out = Path(cfg.out)
    for spec in specs:  # bad --set keys or values surface now, not in the middle of the sweep
        fit_config(cfg, spec, out / "runs" / spec.name).validate()
    _check_out(cfg, out)
    from cmalign.model.base import ensure_base_model, wants_base_model
    from cmalign.model.loading import TINY_MODEL

    if wants_base_model(cfg.model or TINY_MODEL, cfg.pretrained):
        say("the embedded base model (built once and cached)")
        ensure_base_model()  # once, before parallel jobs would race for it
    if cfg.engine == "ray":
        threads = max(1, round(cfg.cluster.cpus_per_run))
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs) if cfg.jobs > 1 else 0
    jobs = [("fit", cfg, s, out, threads) for s in specs]
    if cfg.baselines:
        jobs.append(("base", cfg, None, out, threads))
    done: list[dict] = []
    if cfg.engine == "ray":
        from cmalign.cluster.sweep import run_jobs_on_ray

        done = run_jobs_on_ray(_job, jobs, cfg.cluster, out=str(out), describe=_describe, log=say,
                               read=[p for p in (cfg.data, cfg.val, cfg.pretrained) if p and Path(p).exists()])
    elif cfg.jobs == 1:
        for i, job in enumerate(jobs, 1):
            say(f"[{i}/{len(jobs)}] {'base model + post-hoc fixes' if job[0] == 'base' else job[2].name}")
            done.append(_job(job))
            say(_describe(done[-1]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_job, job) for job in jobs]
            for i, f in enumerate(as_completed(futures), 1):
                done.append(f.result())
                say(f"[{i}/{len(jobs)}] {_describe(done[-1])}")
    summary = summarise(cfg, specs, out, done)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "sweep.json", summary)
    from cmalign.sweep.report import write_sweep_report

    write_sweep_report(out, summary)
    return SweepResult(out, summary, summary["seconds"])


def _describe(d: dict) -> str:
    parts = [d["name"]] + [f"{k} {v}" for k, v in d.items() if k != "name"]
    return ": ".join(parts[:1]) + (" — " + ", ".join(parts[1:]) if len(parts) > 1 else "")


# --------------------------------------------------------------------------- summary


def stability(run_dir: Path, window: int = 20, factor: float = 1.5) -> dict:
    """From the run's metrics log: non-finite losses, and spikes (a step's total loss above ``factor`` × the
    median of the previous ``window`` steps and at least 0.5 above it)."""
    import numpy as np

    losses = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "train" and row.get("total") is not None:
                losses.append(float(row["total"]))
    loss = np.asarray(losses, float)
    finite = np.isfinite(loss)
    spikes = 0
    for i in range(window, len(loss)):
        prev = loss[i - window:i][finite[i - window:i]]
        if finite[i] and len(prev) and loss[i] > factor * np.median(prev) and loss[i] > np.median(prev) + 0.5:
            spikes += 1
    return {"steps": int(len(loss)), "non_finite": int((~finite).sum()), "spikes": spikes,
            "max_loss": float(loss[finite].max()) if finite.any() else math.nan,
            "final_loss": float(loss[finite][-10:].mean()) if finite.any() else math.nan}


def _seconds(manifest: Path) -> float:
    """The "seconds" a run manifest or eval metrics file records (0 when absent)."""
    try:
        return float(json.loads(manifest.read_text()).get("seconds", 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0


def _rows_of_eval(eval_dir: Path) -> dict:
    from cmalign.evaluation.runner import read_metrics

    return read_metrics(eval_dir)["systems"]


def summarise(cfg: SweepConfig, specs: list[RunSpec], out: Path, done: list[dict]) -> dict:
    errors = {d["name"]: d["error"] for d in done if d.get("error")}
    rows = []
    for spec in specs:
        run_dir, eval_dir = out / "runs" / spec.name, out / "evals" / spec.name
        row = {"name": spec.name, "kind": spec.kind, "alpha_target": spec.alpha, "overrides": spec.overrides,
               "run_dir": str(run_dir), "eval_dir": str(eval_dir), "stability": stability(run_dir)}
        if spec.name in errors:
            row["error"] = errors[spec.name]
        elif (eval_dir / "metrics.json").is_file():
            row["metrics"] = flatten(_rows_of_eval(eval_dir)["model"])
            row["ci"] = row_intervals(row)
        row["seconds"] = _seconds(run_dir / "manifest.json") + _seconds(eval_dir / "metrics.json")
        rows.append(row)
    base_seconds = _seconds(out / "evals" / "base" / "metrics.json")
    if cfg.baselines and (out / "evals" / "base" / "metrics.json").is_file():
        for name, system in _rows_of_eval(out / "evals" / "base").items():
            label = "base" if name == "model" else name.replace("model+", "base+")
            row = {"name": label, "kind": "base" if name == "model" else "posthoc", "alpha_target": None,
                   "eval_dir": str(out / "evals" / "base"), "metrics": flatten(system)}
            row["ci"] = row_intervals(row)
            rows.append(row)
    return {
        "kind": KIND, "cmalign_version": cmalign.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": asdict(cfg), **analyse(rows, cfg.max_zeroshot_drop, cfg.select), "rows": rows,
        # what the whole sweep cost, from the artifacts' own timings (so a resumed sweep still counts it all)
        "compute_seconds": round(sum(r.get("seconds", 0.0) for r in rows) + base_seconds, 1),
        "jobs": done,
    }


def analyse(rows: list[dict], max_zeroshot_drop: float, select: str = "gap") -> dict:
    """The summary's judgements over ``rows`` (each row gets its change against the reference): the reference
    (α = 0, else the base), R² tables and the recommendation. Apart from `summarise` so that rows gathered from
    several sweeps (benchmarks/paper_table.py) are judged alike."""
    measured = [r for r in rows if "metrics" in r]
    reference = next((r for r in measured if r["kind"] == "alpha" and r["alpha_target"] == 0), None) or \
        next((r for r in measured if r["kind"] == "base"), None)
    for r in measured:
        _relative(r, reference)
    rec = recommend(measured, max_zeroshot_drop, select)
    if rec:
        rec["export_command"] = f"cmalign export {rec['run_dir']} --int8"
    return {"reference": reference["name"] if reference else None, "r2": r2_table(measured), "recommendation": rec,
            # the α runs alone and runs + base + post-hoc fixes: the two populations can disagree (docs/method.md)
            "r2_by_population": r2_by_population(measured)}


def _relative(row: dict, ref: dict | None) -> None:
    """Gap reduction, relative zero-shot drop and CIDEr change against the reference row."""
    if ref is None:
        return
    m, r = row["metrics"], ref["metrics"]
    if r.get("gap.raw", 0) > 0 and "gap.raw" in m:
        row["raw_gap_reduction"] = 1 - m["gap.raw"] / r["gap.raw"]
    if r.get("zeroshot.top1", 0) > 0 and "zeroshot.top1" in m:
        row["zeroshot_drop"] = (r["zeroshot.top1"] - m["zeroshot.top1"]) / r["zeroshot.top1"]
    if r.get("caption.cider_d", 0) > 0 and "caption.cider_d" in m:
        row["cider_change"] = m["caption.cider_d"] / r["caption.cider_d"] - 1

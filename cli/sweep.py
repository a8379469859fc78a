"""`cmalign sweep`: builds a SweepConfig and calls :func:`cmalign.sweep.run.sweep`."""

from __future__ import annotations

from typing import Annotated

import typer

from cmalign.sweep.config import SweepConfig

HELP = (
    "Pick alpha_target on a measured frontier: one `cmalign fit` per alpha from the same base and seed, each "
    "evaluated with `cmalign eval`, plus the base model with the post-hoc fixes. Writes OUT/sweep.json, "
    "OUT/report.md (the runs in the paper's table form, R² of every gap measure against every task metric, a "
    "recommendation with the command to export it) and figures (Pareto frontier, ARI/CIDEr vs zero-shot, gap vs "
    "task with fitted lines).\n\n"
    "Resumable: run the same command again after an interruption and it continues where it stopped; finished "
    "runs and evaluations are kept. Each run is an ordinary run directory (OUT/runs/aALPHA) that `export` takes."
)
_D = SweepConfig()


def _alphas(value: str) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in value.split(",") if a.strip())
    except ValueError:
        raise typer.BadParameter(f"expected a comma list of numbers, got {value!r}") from None
    if any(a < 0 for a in alphas) or len(set(alphas)) != len(alphas):
        raise typer.BadParameter("alphas must be distinct and non-negative")
    return alphas


def sweep_command(
    alphas: Annotated[str, typer.Option(help="Comma list of alpha_target values.")] = ",".join(
        f"{a:g}" for a in _D.alphas),
    out: Annotated[str, typer.Option("--out", "-o", help="Sweep directory (created, or continued).")] = _D.out,
    data: Annotated[str | None, typer.Option(help="Training data for every fit (the formats `fit` reads). "
                    "(default: the generated set)")] = None,
    val: Annotated[str | None, typer.Option(help="Evaluation data; required with --data. (default: the generated "
                   "validation split)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="open_clip model name. (default: the embedded "
                     "cmalign-tiny base)")] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag or checkpoint file.")] = None,
    steps: Annotated[int | None, typer.Option(help="Fit steps per run. (default: fit's default)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any fit config key for every run, e.g. --set "
                    "train.batch_size=64 (repeatable).")] = None,
    max_zeroshot_drop: Annotated[float, typer.Option(help="Largest relative zero-shot top-1 drop (vs the α = 0 "
                                 "run, else the base model) a recommended alpha may cost.")] = _D.max_zeroshot_drop,
    select: Annotated[str, typer.Option(help="What the recommendation maximises: gap (raw gap reduction), ari or "
                      "cider.")] = _D.select,
    jobs: Annotated[int, typer.Option(help="Runs fitted and evaluated in parallel (processes; CPU threads are "
                    "shared out).")] = _D.jobs,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Evaluate the base model and its "
                         "post-hoc fixes too.")] = True,
    max_images: Annotated[int | None, typer.Option(help="Eval: evaluation images. (default: all)")] = None,
    fit_images: Annotated[int, typer.Option(help="Eval: images for the caption decoder and post-hoc fits.")] =
        _D.fit_images,
    decoder_epochs: Annotated[int, typer.Option(help="Eval: caption decoder epochs.")] = _D.decoder_epochs,
    seed: Annotated[int, typer.Option(help="Seed of every run and evaluation.")] = _D.seed,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in an OUT that holds a sweep with "
                         "other settings.")] = False,
    engine: Annotated[str, typer.Option(help="local (processes on this machine, see --jobs) or ray (each run a Ray "
                      "task; needs the ray extra). See docs/cluster.md.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray: auto, local, ray://HOST:10001 or HOST:6379. (default: "
                       "the instance running on this machine, else a new one)")] = None,
    cpus_per_run: Annotated[float, typer.Option(help="Ray: CPUs each run asks for (its torch threads).")] = 1.0,
    gpus_per_run: Annotated[float, typer.Option(help="Ray: GPUs each run asks for.")] = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print errors.")] = False,
):
    from rich.console import Console
    from rich.markup import escape

    from cmalign.cluster.connect import RayOptions
    from cmalign.sweep.run import SweepError, sweep
    from cmalign.train.config import parse_set

    console = Console(stderr=quiet)
    cfg = SweepConfig(alphas=_alphas(alphas), out=out, data=data, val=val, model=model, pretrained=pretrained,
                      steps=steps, fit_overrides=parse_set(set_ or []), max_zeroshot_drop=max_zeroshot_drop,
                      select=select, jobs=jobs, baselines=baselines, max_images=max_images,
                      fit_images=fit_images, decoder_epochs=decoder_epochs, seed=seed, overwrite=overwrite,
                      engine=engine, cluster=RayOptions(address=address, cpus_per_run=cpus_per_run,
                                                        gpus_per_run=gpus_per_run))
    if select not in ("gap", "ari", "cider"):
        raise SweepError(f"--select must be gap, ari or cider, got {select!r}")
    result = sweep(cfg, log=(lambda msg: None) if quiet else (lambda msg: console.log(escape(msg))))
    if not quiet:
        print_summary(console, result)


def print_summary(console, result) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cmalign.sweep.report import TABLE_HEADER, table_rows

    s = result.summary
    table = Table(title=f"{escape(str(result.out))}  (reference: {s['reference']}, {result.seconds:.0f} s)")
    for col in TABLE_HEADER[:-1]:
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in table_rows(s):
        table.add_row(*[escape(c) for c in row[:-1]])
    console.print(table)
    rec = s["recommendation"]
    if rec:
        console.print(f"recommended: alpha_target {rec['alpha_target']:g} — {escape(rec['export_command'])}",
                      highlight=False)
    else:
        console.print("no alpha keeps the zero-shot drop within the bound", highlight=False)
    console.print(f"report: {escape(str(result.out / 'report.md'))}", highlight=False)

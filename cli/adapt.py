"""`cmalign adapt` and `cmalign adapt-apply`: build an AdaptConfig and call :func:`cmalign.adapter.train.adapt`;
re-map stored embeddings with :func:`cmalign.adapter.apply.apply_adapter`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from cmalign.adapter.config import AdaptConfig

HELP = (
    "Align a stored corpus without re-encoding it: train a TPC-CMA adapter on the paired embeddings of a "
    "`cmalign embed` directory (any export, an unaligned base included), with fit's objective, curriculum and "
    "gradient-aware scheduler. --kind query maps text vectors only (stored image vectors and an image index stay "
    "valid); --kind both maps each modality. Writes ADAPTER/adapter.npz and ADAPTER/export, the base export with "
    "the adapter fused into its graphs, for embed, index, search and serve. Minutes on a CPU; no image is read."
)
APPLY_HELP = (
    "Re-map a `cmalign embed` directory of the adapter's base export with the adapter into a new embeddings "
    "directory bound to the derived export (no image decoded or encoded); then `cmalign index OUT` builds an "
    "aligned joint index from it."
)
_D = AdaptConfig(embeddings="")


def adapt_command(
    embeddings: Annotated[str, typer.Argument(help="Embeddings directory written by `cmalign embed`.",
                                              show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Adapter directory to write.")] = _D.out,
    kind: Annotated[str, typer.Option(help="query (texts only) or both (one map per modality).")] = _D.kind,
    rank: Annotated[int, typer.Option(help="Rank of the residual map; 0 = full rank (d x d).")] = _D.rank,
    hidden: Annotated[int, typer.Option(help="Hidden units of a residual MLP (GELU) instead of the linear "
                                        "residual; 0 = linear.")] = _D.hidden,
    export: Annotated[str | None, typer.Option(help="The export the embeddings were made with (default: the one "
                                               "their manifest names).")] = None,
    alpha_target: Annotated[float, typer.Option(help="Weight of the alignment term after the curriculum.")]
    = _D.alpha_target,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = _D.steps,
    batch_size: Annotated[int, typer.Option(help="Pairs per step (distinct images, one caption each).")]
    = _D.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine).")] = _D.lr,
    lambda_paired: Annotated[float, typer.Option(help="Weight of the paired-residual term (0: the paper's loss; "
                                                 "fit's default is 3).")] = _D.loss.lambda_paired,
    scheduler: Annotated[str | None, typer.Option(help="Gradient-aware scheduler: block | project | lr | alpha | "
                                                  "off [default: block].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, batches and held-out split.")] = _D.seed,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: none).")]
    = _D.checkpoint_every,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last "
                                         "checkpoint.")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or before/after table.")] = False,
):
    from rich.console import Console
    from rich.table import Table

    from cmalign.adapter.train import adapt

    cfg = AdaptConfig(embeddings=embeddings, out=out, kind=kind, rank=rank, hidden=hidden, export=export,
                      alpha_target=alpha_target, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      checkpoint_every=checkpoint_every, threads=threads,
                      loss=replace(_D.loss, lambda_paired=lambda_paired),  # replace() validates the section
                      scheduler=replace(_D.scheduler, mode=scheduler or _D.scheduler.mode))
    console = Console(stderr=True)
    result = adapt(cfg, resume=resume, console=console, show_progress=not quiet)
    if result.before and not quiet:
        table = Table(title=f"held-out pairs ({result.after['images']} images, {result.after['captions']} captions)")
        for col in ("", "stored vectors", "adapted", "change"):
            table.add_column(col, justify="right" if col else "left")
        for key, label in (("raw_gap", "raw gap"), ("centroid_gap", "centroid gap"), ("mmd2", "MMD²"),
                           ("r1_i2t", "R@1 image→text"), ("r1_t2i", "R@1 text→image")):
            b, a = result.before[key], result.after[key]
            change = f"{100 * (a - b) / b:+.1f} %" if b else "—"
            table.add_row(label, f"{b:.4g}", f"{a:.4g}", change)
        console.print(table)
    typer.echo(f"adapter: {result.out} (derived export: {result.export}; {result.seconds:.0f} s)")


def apply_command(
    embeddings: Annotated[str, typer.Argument(help="Embeddings directory of the adapter's base export.",
                                              show_default=False)],
    adapter: Annotated[str, typer.Option(help="Adapter directory written by `cmalign adapt`.",
                                         show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Embeddings directory to write.")] = "emb/adapted",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an embeddings directory at --out.")]
    = False,
):
    from cmalign.adapter.apply import apply_adapter

    r = apply_adapter(embeddings, adapter, out, overwrite=overwrite)
    typer.echo(f"{r.out}: {r.images} image and {r.texts} text vectors mapped in {r.seconds:.1f} s; "
               f"`cmalign index {r.out}` builds the aligned index")

"""`cmalign index` and `cmalign index-add`: options → :func:`cmalign.index.build.build_index` /
:func:`cmalign.index.extend.add_to_index`, with a progress bar and a summary of what was built and measured."""

from __future__ import annotations

from typing import Annotated

import typer

from cmalign.cli.progress import stage_progress

HELP = (
    "Build one FAISS index over the image AND text embeddings of a `cmalign embed` directory (inner product on "
    "L2-normalised vectors, int64 ids), with the id → (modality, pair_id, path, caption) table and a manifest "
    "binding it to the export.\n\n"
    "--factory auto picks by corpus size and --max-memory (Flat, HNSW32, IVF-Flat, IVF-PQ + refinement) and "
    "tunes nprobe/efSearch for --recall-target recall@10 against exact search, recording the choice and the "
    "measured recall; any faiss index_factory string works too. --on-disk builds an IVF index shard by shard "
    "and merges its lists into OUT/index.ivfdata (corpora larger than memory)."
)
ADD_HELP = ("Add a merged embeddings directory (new data embedded with the same export) to an existing index "
            "without rebuilding it, then re-tune its search knobs.")


def print_summary(manifest: dict, out: str, seconds: float) -> None:
    from rich.console import Console
    from rich.markup import escape

    r = manifest["recall"]
    counts = manifest["counts"]
    if not r.get("measured", True) or "recall_at_k" not in r:
        recall = f"recall not measured ({r.get('reason') or r.get('stale') or 'no tuning'})"
    else:
        low = f" (95 % lower bound {r['recall_lower_95']:.3f})" if r.get("recall_lower_95") is not None else ""
        recall = (f"recall@{r['k']} {r['recall_at_k']:.3f}{low} vs exact on {r['queries']} held-out queries "
                  f"(target {r['target']}), {r['ms_per_query']:.3f} ms/query")
    params = ", ".join(f"{k}={v}" for k, v in manifest["search_params"].items()) or "exact"
    lines = [
        f"{escape(out)}: {manifest['ntotal']:,} vectors ({counts['image']:,} images, {counts['text']:,} texts), "
        f"dim {manifest['dim']}, {seconds:.1f} s",
        f"factory {escape(manifest['factory'])} ({escape(manifest['reason'])})",
        f"search: {params}; {escape(recall)}",
    ]
    if r.get("stale"):
        lines.append(f"[yellow]note:[/] {escape(r['stale'])}")
    if not r.get("reached", True):
        lines.append(f"[yellow]warning:[/] the recall target {r['target']} was not reached; the knobs giving the "
                     "best recall are set. Choose a larger index (e.g. --factory Flat or HNSW32)")
    Console().print("\n".join(lines), soft_wrap=True, highlight=False)


def index_command(
    embeddings: Annotated[str, typer.Argument(help="Merged `cmalign embed` directory.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Index directory to write.")] = "idx/corpus",
    factory: Annotated[str, typer.Option(help="auto, or a faiss index_factory string (Flat, HNSW32, "
                                         "IVF4096,Flat, IVF4096,PQ64x4fs,Refine(SQ8), ...).")] = "auto",
    max_memory: Annotated[str | None, typer.Option(help="Memory budget for auto, e.g. 8G (default: half of RAM).")
                          ] = None,
    recall_target: Annotated[float, typer.Option(
        help="recall@k vs exact search the tuned knobs must reach (its 95 % lower bound over held-out queries)."
    )] = 0.95,
    k: Annotated[int, typer.Option("-k", help="k of the recall the knobs are tuned for.")] = 10,
    tune_queries: Annotated[int, typer.Option(help="Corpus vectors held out as tuning queries.")] = 1000,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="IVF only: build per shard, merge the inverted lists "
                                          "into OUT/index.ivfdata (bounded memory).")] = False,
    gpu: Annotated[bool, typer.Option("--gpu", help="Train and add on faiss GPU indexes (needs faiss-gpu).")] = False,
    threads: Annotated[int | None, typer.Option(help="faiss threads (default: all cores).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the tuning queries and training sample.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
):
    from cmalign.index.build import IndexConfig, build_index

    cfg = IndexConfig(embeddings=embeddings, out=out, factory=factory, max_memory=max_memory,
                      recall_target=recall_target, k=k, tune_queries=tune_queries, on_disk=on_disk, gpu=gpu,
                      threads=threads, seed=seed, overwrite=overwrite)
    progress, report = stage_progress(quiet)
    with progress:
        result = build_index(cfg, progress=report)
    if not quiet:
        print_summary(result.manifest, str(result.out), result.seconds)


def add_command(
    index: Annotated[str, typer.Argument(help="Index directory written by `cmalign index`.", show_default=False)],
    embeddings: Annotated[str, typer.Argument(help="Merged embeddings directory to add.", show_default=False)],
    no_retune: Annotated[bool, typer.Option("--no-retune", help="Keep the search knobs as they are.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
):
    from cmalign.index.extend import add_to_index

    progress, report = stage_progress(quiet)
    with progress:
        result = add_to_index(index, embeddings, retune=not no_retune, progress=report)
    if not quiet:
        print_summary(result.manifest, str(result.out), result.seconds)

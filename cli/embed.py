"""`cmalign embed` and `cmalign embed-merge`: build an EmbedConfig and call :func:`cmalign.corpus.embed_dataset`."""

from __future__ import annotations

from typing import Annotated

import typer

from cmalign.cli.progress import stage_progress
from cmalign.data.options import FORMATS, ReaderOptions

HELP = (
    "Embed a data set with an export (torch-free onnxruntime) into clip-retrieval's layout: "
    "OUT/img_emb/img_emb_NNNN.npy, OUT/text_emb/text_emb_NNNN.npy, OUT/metadata/metadata_NNNN.parquet "
    "(image rows then text rows, with modality and pair_id), plus manifests.\n\n"
    "--shard I/N embeds the I-th of N slices (numbered from 0) so a scheduler can fan the work out; "
    "the last shard to finish merges, or run `cmalign embed-merge OUT`. Unreadable images are skipped "
    "and listed in OUT/bad_samples/."
)
MERGE_HELP = "Check that every shard of OUT is there and from the same export, and write OUT/manifest.json."
IMPORT_HELP = (
    "Import embeddings that clip-retrieval's `inference` wrote (img_emb/, text_emb/, metadata/; row i of each is one "
    "image and its caption) into an embeddings directory bound to EXPORT, the export of the model that made them "
    "(checked: it must reproduce the stored caption vectors). adapt, adapt-apply, index, search and serve then take "
    "it. Vector files are hard-linked, not copied, where the file system allows."
)
_R = ReaderOptions()


def embed_command(
    export: Annotated[str, typer.Argument(help="Export directory written by `cmalign export`.", show_default=False)],
    data: Annotated[str, typer.Option(help="Data set: CSV/TSV, JSON lines, COCO captions JSON, folder, WebDataset "
                                      "shards (as for `fit`), or generated:train|val|test[:IMAGES] "
                                      "(IMAGES scenes, 5 captions each).")] = "generated:val",
    out: Annotated[str, typer.Option("--out", "-o", help="Embeddings directory.")] = "emb/corpus",
    shard: Annotated[str, typer.Option(help="I/N: embed slice I of N (0 <= I < N).")] = "0/1",
    provider: Annotated[str, typer.Option(help="cpu, cuda (needs onnxruntime-gpu) or auto.")] = "cpu",
    variant: Annotated[str, typer.Option(help="Graph variant of the export: fp32, fp16 or int8.")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Images per inference batch (texts: 4x).")] = 64,
    workers: Annotated[int, typer.Option(help="Image decoding threads.")] = 2,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float16 (halves the files).")] = "float32",
    data_format: Annotated[str, typer.Option("--format", help="|".join(FORMATS))] = _R.format,
    image_root: Annotated[str | None, typer.Option(help="Directory relative image paths are under.")] = None,
    csv_separator: Annotated[str | None, typer.Option(help="CSV separator (default: sniffed).")] = None,
    image_column: Annotated[str, typer.Option(help="Image path column/field.")] = _R.image_column,
    caption_column: Annotated[str, typer.Option(help="Caption column/field.")] = _R.caption_column,
    label_column: Annotated[str, typer.Option(help="Optional class-name column/field.")] = _R.label_column,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo a shard that is already done.")] = False,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray Data pipeline on a Ray cluster; "
                      "needs the ray extra). See docs/cluster.md.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray: auto (the cluster this machine joined with `ray start`), "
                       "local (a new instance for this command), ray://HOST:10001 or HOST:6379. (default: the "
                       "instance running on this machine, else a new one)")] = None,
    actors: Annotated[int, typer.Option(help="Ray: encoder actors, one onnxruntime session each.")] = 2,
    shards: Annotated[int | None, typer.Option(help="Ray: shards to write; finished ones survive an interruption. "
                      "(default: one per 100,000 images)")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(help="Ray: CPUs each actor asks for (and its onnxruntime "
                              "threads). (default: 1 with a GPU, else a share leaving room for decoding)")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="Ray: GPUs each actor asks for. (default: 1 with "
                              "--provider cuda, else 0)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
):
    from rich.console import Console
    from rich.markup import escape

    from cmalign.cluster.connect import RayOptions
    from cmalign.corpus.embed import EmbedConfig, embed_dataset

    console = Console()
    cfg = EmbedConfig(export=export, data=data, out=out, shard=shard, provider=provider, variant=variant,
                      batch_size=batch_size, workers=workers, threads=threads, dtype=dtype, format=data_format,
                      image_root=image_root, csv_separator=csv_separator, image_column=image_column,
                      caption_column=caption_column, label_column=label_column, overwrite=overwrite,
                      engine=engine, shards=shards, cluster=RayOptions(address=address, actors=actors,
                                                                       cpus_per_actor=cpus_per_actor,
                                                                       gpus_per_actor=gpus_per_actor))
    progress, report = stage_progress(quiet, console, label=lambda kind: f"embedding {kind}")
    with progress:
        result = embed_dataset(cfg, progress=report,
                               log=None if quiet else lambda m: progress.console.print(escape(m), highlight=False))
    if quiet:
        return
    i, n = result.shard
    where = escape(str(result.out))
    if engine == "ray" and not result.shards_written:
        console.print(f"nothing to do: all {n} shard(s) of {where} are done and merged", soft_wrap=True,
                      highlight=False)
        return
    what = (f"shard(s) {', '.join(map(str, sorted(result.shards_written)))} of {n} on Ray" if engine == "ray"
            else f"shard {i}/{n}")
    console.print(f"{what}: {result.images} images, {result.texts} texts, {len(result.skipped)} skipped "
                  f"({result.seconds:.1f} s, of which {result.setup_seconds:.1f} s loading; "
                  f"{(result.images + result.texts) / max(result.seconds - result.setup_seconds, 1e-9):.0f} "
                  f"embeddings/s) → {where}", soft_wrap=True, highlight=False)
    if result.skipped:
        console.print(f"skipped samples are listed in {where}/bad_samples/", soft_wrap=True, highlight=False)
    if result.merged:
        console.print(f"merged {n} shard(s): {result.merged['rows']['images']} images, "
                      f"{result.merged['rows']['texts']} texts → {where}/manifest.json", soft_wrap=True,
                      highlight=False)
    else:
        console.print(f"not merged yet: run `cmalign embed-merge {where}` once all {n} shards are done",
                      soft_wrap=True, highlight=False)


def merge_command(
    out: Annotated[str, typer.Argument(help="Embeddings directory holding the shards.", show_default=False)],
):
    from rich.console import Console
    from rich.markup import escape

    from cmalign.corpus.store import merge_shards

    manifest = merge_shards(out)
    Console().print(f"merged {manifest['num_shards']} shard(s): {manifest['rows']['images']} images, "
                    f"{manifest['rows']['texts']} texts, {manifest['skipped']} skipped → {escape(out)}/manifest.json",
                    soft_wrap=True, highlight=False)


def import_command(
    source: Annotated[str, typer.Argument(help="clip-retrieval's output folder (img_emb/, text_emb/, metadata/).",
                                          show_default=False)],
    export: Annotated[str, typer.Option(help="Export of the model that made the vectors.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Embeddings directory to write.")] = "emb/imported",
    variant: Annotated[str, typer.Option(help="Graph variant that queries of this directory run through: fp32, fp16 "
                                         "or int8.")] = "fp32",
    copy: Annotated[bool, typer.Option("--copy", help="Copy the vector files even where a hard link is "
                                       "possible.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check that EXPORT reproduces the stored "
                                         "caption vectors (needs captions in the metadata).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an embeddings directory at --out.")]
    = False,
):
    from cmalign.corpus.clip_retrieval import ImportConfig, import_clip_retrieval

    r = import_clip_retrieval(ImportConfig(source=source, export=export, out=out, variant=variant, link=not copy,
                                           verify=verify, overwrite=overwrite))
    check = (f"export checked on {r.verified['captions']} captions (min cosine {r.verified['min_cosine']:.5f})"
             if "captions" in r.verified else "export not checked (--no-verify)")
    typer.echo(f"{r.out}: {r.pairs} image-caption pairs in {r.shards} shard(s), vector files "
               f"{'hard-linked' if r.linked else 'copied'}; {check}")

"""`cmalign search`: options → :func:`cmalign.index.searcher.search`, hits printed as tables or JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer

HELP = (
    "Search a joint index with text (--text) or image (--image) queries, encoded by the export that built the "
    "index (ONNX runtime, no torch). Prints rank, score, modality and the image path or caption of each hit; "
    "--json for machines. --modality image|text filters inside faiss and still returns k results."
)


def search_command(
    index: Annotated[str, typer.Argument(help="Index directory written by `cmalign index`.", show_default=False)],
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="Text query (repeatable).")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image file query (repeatable).")] = None,
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = 10,
    modality: Annotated[str, typer.Option(help="any, image or text: which items to return.")] = "any",
    export: Annotated[str | None, typer.Option(help="Export to encode queries with (default: the one recorded in "
                                               "the index; must have the same fingerprint).")] = None,
    provider: Annotated[str, typer.Option(help="onnxruntime provider: cpu, cuda or auto.")] = "cpu",
    gpu: Annotated[bool, typer.Option("--gpu", help="Search on faiss GPU indexes (needs faiss-gpu).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cmalign.index.searcher import SearchConfig, search

    cfg = SearchConfig(index=index, text=text, image=image, k=k, modality=modality, export=export,
                       provider=provider, gpu=gpu)
    results = search(cfg)
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    console = Console()
    for block in results:
        table = Table(title=f"{block['kind']} query: {escape(block['query'])}", title_justify="left")
        for col, justify in (("rank", "right"), ("score", "right"), ("modality", "left"), ("pair", "right"),
                             ("image path or caption", "left")):
            table.add_column(col, justify=justify)
        for h in block["hits"]:
            what = h["image_path"] if h["modality"] == "image" else h["caption"]
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", h["modality"], str(h["pair_id"]), escape(str(what)))
        console.print(table)

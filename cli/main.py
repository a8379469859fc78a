"""The `cmalign` command: a thin skin over the library, one module per command."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

import cmalign
from cmalign.cli import data as data_cmd
from cmalign.cli import embed as embed_cmd
from cmalign.cli import eval as eval_cmd
from cmalign.cli import export as export_cmd
from cmalign.cli import fit as fit_cmd
from cmalign.cli import index as index_cmd
from cmalign.cli import search as search_cmd
from cmalign.cli import sweep as sweep_cmd

app = typer.Typer(
    name="cmalign",
    help="Close the modality gap of CLIP-style models: TPC-CMA fine-tuning (fit), ONNX export (export), "
         "corpus embedding (embed, embed-merge), evaluation (eval), the α sweep (sweep), joint image+text FAISS "
         "indexes (index, index-add, search) and the generated default data set (data). "
         "Run `cmalign COMMAND --help` for each command's options.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("fit", help=fit_cmd.HELP)(fit_cmd.fit_command)
app.command("export", help=export_cmd.HELP)(export_cmd.export_command)
app.command("embed", help=embed_cmd.HELP)(embed_cmd.embed_command)
app.command("embed-merge", help=embed_cmd.MERGE_HELP)(embed_cmd.merge_command)
app.command("eval", help=eval_cmd.HELP)(eval_cmd.eval_command)
app.command("sweep", help=sweep_cmd.HELP)(sweep_cmd.sweep_command)
app.command("index", help=index_cmd.HELP)(index_cmd.index_command)
app.command("index-add", help=index_cmd.ADD_HELP)(index_cmd.add_command)
app.command("search", help=search_cmd.HELP)(search_cmd.search_command)
app.add_typer(data_cmd.app, name="data")


def _version(value: bool):
    if value:
        typer.echo(f"cmalign {cmalign.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main():
    app()


if __name__ == "__main__":
    main()

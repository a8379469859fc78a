"""The `cmalign` command: a thin skin over the library, one module per command.

Each command module imports only typer and plain config classes at start-up, and its library code inside the
command function, so `cmalign --help` and the production commands (embed, index, search) never import torch or
scikit-learn.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

import cmalign
from cmalign.cli import adapt as adapt_cmd
from cmalign.cli import data as data_cmd
from cmalign.cli import embed as embed_cmd
from cmalign.cli import errors
from cmalign.cli import eval as eval_cmd
from cmalign.cli import export as export_cmd
from cmalign.cli import fit as fit_cmd
from cmalign.cli import index as index_cmd
from cmalign.cli import search as search_cmd
from cmalign.cli import serve as serve_cmd
from cmalign.cli import sweep as sweep_cmd
from cmalign.cli.errors import reports_errors

app = typer.Typer(
    name="cmalign",
    help="Close the modality gap of CLIP-style models. The pipeline, in order: fine-tune with TPC-CMA (fit), "
         "export ONNX encoders (export), embed a corpus (embed, embed-merge), build and extend a joint image+text "
         "FAISS index (index, index-add), query it (search) or serve it over HTTP with a web page (serve); "
         "align a stored corpus without re-encoding it (adapt, adapt-apply); "
         "measure what alignment bought (eval) and choose "
         "alpha_target (sweep). `data synth` writes the generated default data set. Only the command you run "
         "loads its dependencies: embed, index, search and serve need no torch. "
         "Run `cmalign COMMAND --help` for each command's options.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Pipeline order (typer lists commands as registered). Every command goes through reports_errors: a
# CmalignError is a one-line `error:`, anything else a bug with its traceback.
for name, command, help_text in [
    ("fit", fit_cmd.fit_command, fit_cmd.HELP),
    ("export", export_cmd.export_command, export_cmd.HELP),
    ("embed", embed_cmd.embed_command, embed_cmd.HELP),
    ("embed-merge", embed_cmd.merge_command, embed_cmd.MERGE_HELP),
    ("embed-import", embed_cmd.import_command, embed_cmd.IMPORT_HELP),
    ("index", index_cmd.index_command, index_cmd.HELP),
    ("index-add", index_cmd.add_command, index_cmd.ADD_HELP),
    ("search", search_cmd.search_command, search_cmd.HELP),
    ("serve", serve_cmd.serve_command, serve_cmd.HELP),
    ("adapt", adapt_cmd.adapt_command, adapt_cmd.HELP),
    ("adapt-apply", adapt_cmd.apply_command, adapt_cmd.APPLY_HELP),
    ("eval", eval_cmd.eval_command, eval_cmd.HELP),
    ("sweep", sweep_cmd.sweep_command, sweep_cmd.HELP),
]:
    app.command(name, help=help_text)(reports_errors(command))
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
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of user errors too (for bug "
                                        "reports); other errors always show theirs.")] = False,
):
    errors.DEBUG = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main():
    app()


if __name__ == "__main__":
    main()

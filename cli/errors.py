"""How every command reports errors: a user's mistake as one red ``error:`` line (exit 2), a bug with its traceback.

The line between the two is :class:`cmalign.errors.CmalignError`: the library raises it (or a subclass) for
anything the user can fix; every other exception is a defect and must not be disguised as a user error.
``cmalign --debug COMMAND`` shows the traceback of user errors too.
"""

from __future__ import annotations

import functools

import typer

from cmalign.errors import CmalignError, MissingDependencyError

DEBUG = False  # set by the root `--debug` option
# Dependencies of the training and evaluation commands that a production (runtime-only) environment may lack:
# missing one is an install problem the user fixes, not a bug in cmalign.
OPTIONAL_STACK = {"torch", "torchvision", "open_clip", "sklearn", "hdbscan", "matplotlib", "pycocoevalcap", "onnx",
                  "onnxscript", "faiss", "onnxruntime"}


def fail(e: Exception):
    from rich.console import Console
    from rich.markup import escape

    # escape(): paths and messages are text, not markup ("[raw]" would vanish, "[/raw]" would raise)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2) from None


def reports_errors(command):
    """Wrap a command so a CmalignError prints as ``error: …``; anything else propagates with its traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CmalignError as e:
            if DEBUG:
                raise
            fail(e)
        except ModuleNotFoundError as e:
            if DEBUG or (e.name or "").split(".")[0] not in OPTIONAL_STACK:
                raise
            fail(MissingDependencyError(
                f"this command needs the Python package '{e.name}', which is not installed here; install cmalign "
                "with everything (see the README's Install section: pip install -e '.[cpu]' or '.[gpu]')"))

    return run

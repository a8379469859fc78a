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
RUNTIME_STACK = {"faiss", "onnxruntime"}  # the cpu or gpu extra
TRAIN_STACK = {"torch", "torchvision", "open_clip", "sklearn", "hdbscan", "matplotlib", "pycocoevalcap", "onnx",
               "onnxscript", "scipy", "safetensors"}  # the train extra
OPTIONAL_STACK = RUNTIME_STACK | TRAIN_STACK


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
            fail(MissingDependencyError(missing_package_message(e.name)))

    return run


def missing_package_message(name: str) -> str:
    """Which extra brings a missing package: the runtime (cpu / gpu) or training (train)."""
    if name.split(".")[0] in RUNTIME_STACK:
        return (f"this command needs the Python package '{name}', which is not installed here; install a runtime "
                "extra: pip install 'cmalign[cpu]' (or 'cmalign[gpu]' on a CUDA machine; never both)")
    return (f"this command needs the Python package '{name}', which is not installed here (a runtime-only install "
            "has embed, index, index-add, search and serve); install the training extra: "
            "pip install 'cmalign[train,cpu]' (gpu for cpu on a CUDA machine)")

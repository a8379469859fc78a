"""Package-level names loaded on first use, so importing a package never pulls in torch, faiss or sklearn.

Each stage package lists its public names here-and-there in submodules; ``from cmalign.index import
build_index`` then imports faiss only when that line runs, and ``import cmalign.index.choice`` not at all.
"""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path) on first use."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__

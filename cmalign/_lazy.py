"""Package-level names loaded on first use, so importing a package never pulls in torch, faiss or sklearn.

``from cmalign.index import build_index`` imports faiss only when that line runs, and
``import cmalign.index.choice`` not at all: each stage package declares its public names with
:func:`lazy_exports` instead of importing its submodules.
"""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]):
    """(``__getattr__``, ``__all__``) for ``package``: each name in ``modules[sub]`` loads ``package.sub``."""
    where = {name: f"{package}.{sub}" for sub, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            return getattr(import_module(where[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__, list(where)

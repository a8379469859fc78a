"""The joint image+text FAISS index: vectors in, build, load + search, extend, index choice and tuning.

The names below are loaded on first use, so ``import cmalign.index`` costs nothing until one is needed.
"""

from importlib import import_module

_EXPORTS = {
    "IndexConfig": "cmalign.index.joint", "IndexResult": "cmalign.index.joint", "build_index": "cmalign.index.joint",
    "load_index": "cmalign.index.joint", "JointIndex": "cmalign.index.joint", "Hit": "cmalign.index.joint",
    "add_to_index": "cmalign.index.joint", "read_index_manifest": "cmalign.index.joint",
    "SearchConfig": "cmalign.index.searcher", "Searcher": "cmalign.index.searcher", "search": "cmalign.index.searcher",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cmalign.index' has no attribute '{name}'")

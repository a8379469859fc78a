"""The joint image+text FAISS index: vectors in, build, load + search, extend, index choice and tuning.

    vectors.py        embeddings directories in: checked, normalised vectors and id-table rows
    choice.py         `--factory auto`: which index for a corpus size and memory budget
    tuning.py         search knobs (nprobe, efSearch, k_factor) tuned for a recall target
    build.py          `cmalign index`: build, train, fill, tune, write (also on disk)
    extend.py         `cmalign index-add`: grow an index with new embeddings of the same export
    joint.py          the loaded index: filtered search, hits as id-table rows
    searcher.py       `cmalign search`: text/image queries encoded by the index's export
    directory.py      the index directory's files, manifest and id table
    faiss_backend.py  importing faiss, threads, GPUs, wrapped sub-indexes
    errors.py         what the index stage raises

Public names load on first use (faiss is imported only when one is needed)."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "build": ("IndexConfig", "IndexResult", "build_index"),
    "extend": ("add_to_index",),
    "joint": ("load_index", "JointIndex", "Hit"),
    "directory": ("read_index_manifest",),
    "searcher": ("SearchConfig", "Searcher", "search"),
    "errors": ("IndexBuildError", "IndexFormatError", "ExportMismatchError", "GpuUnavailableError",
               "IndexChoiceError"),
})

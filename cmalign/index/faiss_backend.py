"""The one place that imports faiss and knows its quirks: threads, GPU support, wrapped sub-indexes, versions.

faiss is imported when a function here is first called, never when a module of :mod:`cmalign.index` is
imported, so choosing an index or reading a manifest costs no faiss start-up.
"""

from __future__ import annotations

import logging

import numpy as np

import cmalign
from cmalign.index.errors import GpuUnavailableError

log = logging.getLogger(__name__)


def import_faiss(threads: int | None = None):
    """The faiss module, its OpenMP threads set to ``threads`` when given (default: faiss' own, all cores)."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    return faiss


def check_gpu(faiss) -> int:
    """The number of GPUs faiss sees; an error saying what to install when it sees none."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n < 1:
        build = "with GPU support" if hasattr(faiss, "StandardGpuResources") else "without GPU support (faiss-cpu)"
        raise GpuUnavailableError(f"--gpu: this faiss ({faiss.__version__}) was built {build} and sees no GPU. "
                                  "Install the gpu extra (faiss-gpu, without faiss-cpu) on a CUDA machine, or drop "
                                  "--gpu")
    return n


def to_gpu(faiss, index):
    """The index on all GPUs for training and adding, or None where faiss has no GPU version of it (HNSW)."""
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # e.g. HNSW: no GPU implementation
        log.warning("no GPU version of this index (%s); building on the CPU", e)
        return None


def unwrap(index, kind: str):
    """The sub-index of a kind ('ivf', 'hnsw', 'refine') inside pre-transform/refine/id-map wrappers, or None."""
    faiss = import_faiss()
    cls = {"ivf": faiss.IndexIVF, "hnsw": faiss.IndexHNSW, "refine": faiss.IndexRefine}[kind]
    idx = faiss.downcast_index(index)
    while idx is not None:
        if isinstance(idx, cls):
            return idx
        if isinstance(idx, faiss.IndexPreTransform):
            idx = faiss.downcast_index(idx.index)
        elif isinstance(idx, faiss.IndexRefine):
            idx = faiss.downcast_index(idx.base_index)
        elif isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            idx = faiss.downcast_index(idx.index)
        else:
            return None
    return None


def versions(faiss) -> dict:
    """The library versions an index manifest records (a faiss index may not load in an older faiss)."""
    return {"faiss": faiss.__version__, "numpy": np.__version__, "cmalign": cmalign.__version__}

"""`cmalign adapt`: the TPC-CMA objective trained on stored embeddings — no image decoded or encoded again.

    config.py   what an adapter run is (torch-free: reading it imports nothing heavy)
    pairs.py    paired vectors of a `cmalign embed` directory, over its memory-mapped shards (torch-free)
    model.py    the adapter: a residual linear map per adapted modality, initialised at the identity (torch)
    train.py    :func:`adapt`, the second trainer of the one objective (:mod:`cmalign.objective`)
    weights.py  the trained maps as numpy arrays, applied without torch
    graphs.py   the adapter as ONNX, fused into a derived export of the base (parity-checked)
    apply.py    stored embeddings re-mapped into an embeddings directory of the derived export (torch-free)

Public names load on first use."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("AdaptConfig",),
    "train": ("AdaptResult", "adapt"),
    "apply": ("ApplyResult", "apply_adapter"),
    "weights": ("AdapterWeights", "AdapterError"),
    "graphs": ("derive_export",),
})

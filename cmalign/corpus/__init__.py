"""`cmalign embed`: encoding a corpus with an ONNX export (no torch) and the on-disk embeddings store.

Public names load on first use."""

from cmalign._lazy import lazy_exports

_EXPORTS = {
    "EmbedConfig": "cmalign.corpus.embed",
    "EmbedResult": "cmalign.corpus.embed",
    "embed_dataset": "cmalign.corpus.embed",
    "Embeddings": "cmalign.corpus.store",
    "load_embeddings": "cmalign.corpus.store",
    "merge_shards": "cmalign.corpus.store",
    "EmbeddingsError": "cmalign.corpus.store",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""`cmalign embed`: encoding a corpus with an ONNX export (no torch) and the on-disk embeddings store.

    embed.py   read the data set, decode and preprocess in threads, encode with onnxruntime, write one shard
    store.py   the embeddings directory (clip-retrieval's layout): shards, manifests, merge, loading
    clip_retrieval.py   clip-retrieval's own output bound to an export (`cmalign embed-import`)

Public names load on first use."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "embed": ("EmbedConfig", "EmbedResult", "embed_dataset"),
    "store": ("Embeddings", "load_embeddings", "merge_shards", "EmbeddingsError"),
    "clip_retrieval": ("ImportConfig", "import_clip_retrieval"),
})

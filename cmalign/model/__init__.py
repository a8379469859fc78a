"""open_clip models: loading, freezing and saving them, and the embedded base model (a stand-in for a
pretrained CLIP). Public names load on first use (they need torch and open_clip)."""

from cmalign._lazy import lazy_exports

_EXPORTS = {
    "LoadedModel": "cmalign.model.loading",
    "load_model": "cmalign.model.loading",
    "save_local_dir": "cmalign.model.loading",
    "TINY_MODEL": "cmalign.model.loading",
    "ensure_base_model": "cmalign.model.base",
    "BASE_TAG": "cmalign.model.base",
    "resolve_pretrained": "cmalign.model.base",
    "encode_images": "cmalign.model.encode",
    "encode_texts": "cmalign.model.encode",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

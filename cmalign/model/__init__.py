"""open_clip models: loading, freezing and saving them, and the embedded base model.

    loading.py  open_clip models by name/tag/checkpoint, trainable parts, parameter groups, local-dir saving
    base.py     the embedded stand-in for a pretrained CLIP (cmalign-tiny trained once, cached)
    encode.py   the torch embedding loop shared by fit's guard and eval

Public names load on first use (they need torch and open_clip)."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "loading": ("LoadedModel", "load_model", "save_local_dir", "TINY_MODEL"),
    "base": ("ensure_base_model", "BASE_TAG", "resolve_pretrained"),
    "encode": ("encode_images", "encode_texts"),
})

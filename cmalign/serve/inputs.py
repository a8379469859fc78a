"""Checks of what a request carries: each refusal names the field and what was expected (the service answers 4xx
and stays up). Nothing here trusts a size the client states: images are measured from their header before any
pixel is decoded, vectors before they reach faiss."""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np

from cmalign.serve.config import MODALITIES


class BadInput(ValueError):
    """A request field that cannot be served; ``status`` 400 (malformed) or 422 (well-formed, unusable)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def text(value, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise BadInput(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadInput(field, "empty text; give words to search for")
    if len(value) > max_chars:
        raise BadInput(field, f"{len(value)} characters, over the limit of {max_chars} (texts beyond the model's "
                              "context are truncated, but not ones this long)")
    return value


def image_bytes(value, field: str) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL, as a browser's FileReader gives) to bytes."""
    if not isinstance(value, str):
        raise BadInput(field, f"expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(field, "not valid base64") from None
    if not data:
        raise BadInput(field, "empty image")
    return data


def decode_image(data: bytes, field: str, max_pixels: int):
    """Bytes to an RGB PIL image, refusing anything over ``max_pixels`` from its header, before decoding."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadInput(field, f"image of {w}×{h} pixels is over the limit of {max_pixels:,}", status=413)
            im.load()
            return im.convert("RGB")
    except BadInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad files
        raise BadInput(field, f"not a readable image ({type(e).__name__})") from None


def vector(value, field: str, dim: int) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise BadInput(field, f"expected a list of {dim} numbers")
    if len(value) != dim:
        raise BadInput(field, f"{len(value)} numbers, but the index holds vectors of dim {dim}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise BadInput(field, "expected numbers only")
    v = np.asarray(value, np.float64)
    if not np.isfinite(v).all():
        raise BadInput(field, "contains NaN or infinity")
    norm = float(np.linalg.norm(v))
    if norm == 0 or not math.isfinite(norm):
        raise BadInput(field, "a zero vector has no direction to search in")
    return (v / norm).astype(np.float32)


def count(value, field: str, cap: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(field, f"expected a whole number, got {value!r}")
    if not 1 <= value <= cap:
        raise BadInput(field, f"must be in 1..{cap}, got {value}")
    return value


def modality(value, field: str = "modality", default: str = "any") -> str:
    if value is None:
        return default
    if value == "all":  # clip back has image | text; "all" is the joint index's both
        return "any"
    if value not in MODALITIES:
        raise BadInput(field, f"expected one of {', '.join(MODALITIES)} (or all), got {value!r}")
    return value

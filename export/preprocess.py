"""Torch-free image preprocessing for the production runtime, equal to open_clip's inference transform.

Reimplements ``open_clip.image_transform(size, is_train=False, ...)`` (open_clip 3.3.0, MIT) with PIL and numpy,
because it is built from torchvision transforms and returns torch tensors, and the runtime must not import torch.
The PIL calls are the ones torchvision's PIL backend makes (``Image.resize``, ``ImageOps.expand``, ``Image.crop``),
in the same order, so the pixels are the same; the float steps (``/255``, ``(x - mean) / std``) are done in float32
as torchvision's ``ToTensor`` and ``Normalize`` do:

* ``resize_mode='shortest'``, square target: torchvision ``Resize(size)`` (short edge to ``size``, long edge
  ``int(size * long / short)``), then ``CenterCrop`` (pads with 0 where the image is smaller).
* ``'shortest'``, non-square target: open_clip's ``ResizeKeepRatio`` (``round()`` of each edge divided by the
  smaller ratio), always BICUBIC whatever ``interpolation`` says, then ``CenterCrop``.
* ``'longest'``: ``ResizeKeepRatio(longest=1)`` with ``interpolation``, then ``CenterCropOrPad`` with ``fill_color``.
* ``'squash'``: resize to exactly (h, w).

then ``convert("RGB")``, ``/ 255`` and normalisation. ``interpolation='random'`` means bicubic at inference.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cmalign.artifacts.atomic import write_json
from cmalign.errors import ConfigError
from cmalign.export.manifest import read_json_object

PREPROCESS_JSON = "preprocess.json"
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear", "random")
RESIZE_MODES = ("shortest", "longest", "squash")
CONFIG_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
# open_clip's PreprocessCfg defaults, used for keys a (legacy) config leaves out.
DEFAULTS = {
    "size": 224, "mode": "RGB", "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD,
    "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
}
# Image.Resampling is Pillow >= 9.1; the module-level constants work on every version.
_RESAMPLING = getattr(Image, "Resampling", Image)
_ACCEPTED = "a PIL.Image.Image, a str or os.PathLike path to an image file, or a numpy uint8 array (H, W), " \
            "(H, W, 3) or (H, W, 4)"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _py_number(v) -> int | float:
    return int(v) if _is_int(v) else float(v)


def _channel_stats(name: str, value) -> list[float]:
    if _is_number(value):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 3) or not all(_is_number(v) for v in value):
        raise ConfigError(f"preprocess config '{name}': expected a number or a list of 1 or 3 numbers, got {value!r}")
    value = [float(v) for v in value]
    return value * 3 if len(value) == 1 else value


def _center_crop_or_pad(img: Image.Image, out_h: int, out_w: int, fill) -> Image.Image:
    """torchvision ``F.center_crop`` (fill 0) / open_clip ``center_crop_or_pad`` on a PIL image."""
    w, h = img.size
    if out_w > w or out_h > h:
        padding_ltrb = (
            (out_w - w) // 2 if out_w > w else 0,
            (out_h - h) // 2 if out_h > h else 0,
            (out_w - w + 1) // 2 if out_w > w else 0,
            (out_h - h + 1) // 2 if out_h > h else 0,
        )
        img = _pad(img, padding_ltrb, fill)
        w, h = img.size
        if out_w == w and out_h == h:
            return img
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))


def _pad(img: Image.Image, padding_ltrb: tuple[int, int, int, int], fill) -> Image.Image:
    """torchvision's PIL ``pad(..., padding_mode='constant')``, fill parsed as its ``_parse_fill`` does."""
    bands = len(img.getbands())
    if _is_number(fill) and bands > 1:
        fill = (fill,) * bands
    if isinstance(fill, (list, tuple)):
        if len(fill) == 1:
            fill = tuple(fill) * bands
        elif len(fill) != bands:
            raise ConfigError(f"fill_color has {len(fill)} values but the image (mode {img.mode}) has {bands} bands")
        fill = tuple(fill)
    if img.mode != "F":
        fill = tuple(int(x) for x in fill) if isinstance(fill, tuple) else int(fill)
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=padding_ltrb, fill=fill)
        out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=padding_ltrb, fill=fill)


def _resize(img: Image.Image, out_h: int, out_w: int, resample: int) -> Image.Image:
    if img.size == (out_w, out_h):  # torchvision's F.resize returns the image untouched
        return img
    return img.resize((out_w, out_h), resample)


def _keep_ratio_size(w: int, h: int, target_h: int, target_w: int, longest: float) -> tuple[int, int]:
    """open_clip ``ResizeKeepRatio.get_params`` without the random factors: (new_h, new_w)."""
    ratio_h = h / target_h
    ratio_w = w / target_w
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h * 1.0 / ratio), round(w * 1.0 / ratio)


class ImagePreprocessor:
    """open_clip's inference preprocessing: image -> float32 array (3, H, W), normalised."""

    def __init__(self, size=224, mode: str = "RGB", mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                 interpolation: str = "bicubic", resize_mode: str = "shortest", fill_color=0):
        if _is_int(size):
            if size < 1:
                raise ConfigError(f"preprocess config 'size': must be positive, got {size!r}")
            self.size: int | list[int] = int(size)
            self.height = self.width = int(size)
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size):
            self.size = [int(s) for s in size]
            self.height, self.width = self.size
        else:
            raise ConfigError(f"preprocess config 'size': expected a positive int or [height, width], got {size!r}")
        if mode != "RGB":
            raise ConfigError(f"preprocess config 'mode': only 'RGB' is supported (as in open_clip), got {mode!r}")
        self.mode = mode
        self.mean = _channel_stats("mean", mean)
        self.std = _channel_stats("std", std)
        if any(s == 0 for s in self.std):
            raise ConfigError(f"preprocess config 'std': must not contain 0, got {std!r}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocess config 'interpolation': expected one of {INTERPOLATIONS}, "
                             f"got {interpolation!r}")
        self.interpolation = interpolation
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"preprocess config 'resize_mode': expected one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        if not (_is_number(fill_color) or (isinstance(fill_color, (list, tuple))
                                           and all(_is_number(v) for v in fill_color))):
            raise ConfigError(f"preprocess config 'fill_color': expected a number or a list of numbers, "
                             f"got {fill_color!r}")
        self.fill_color = [_py_number(v) for v in fill_color] if isinstance(fill_color, (list, tuple)) \
            else _py_number(fill_color)
        # 'random' is a training-time choice; open_clip's inference transform uses bicubic for it.
        self._resample = _RESAMPLING.BILINEAR if interpolation == "bilinear" else _RESAMPLING.BICUBIC
        self._mean32 = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std32 = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: dict) -> ImagePreprocessor:
        """From open_clip's preprocess cfg dict; missing or None keys take open_clip's defaults, others ignored."""
        if not isinstance(cfg, dict):
            raise TypeError(f"preprocess config must be a dict, got {type(cfg).__name__}")
        kwargs = {k: cfg[k] if cfg.get(k) is not None else DEFAULTS[k] for k in CONFIG_KEYS}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ImagePreprocessor:
        """From a ``preprocess.json`` written by `save_preprocess` (or a directory holding one); every key needed."""
        p = Path(path)
        if p.is_dir():
            p = p / PREPROCESS_JSON
        cfg = read_json_object(p)
        for k in CONFIG_KEYS:
            if k not in cfg:
                raise ConfigError(f"{p}: field '{k}' is missing")
        try:
            return cls(**{k: cfg[k] for k in CONFIG_KEYS})
        except ValueError as e:
            raise ConfigError(f"{p}: {e}") from e

    def to_config(self) -> dict:
        return {
            "size": list(self.size) if isinstance(self.size, list) else self.size,
            "mode": self.mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": list(self.fill_color) if isinstance(self.fill_color, list) else self.fill_color,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}.from_config({self.to_config()!r})"

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return 3, self.height, self.width

    def _geometry(self, img: Image.Image) -> Image.Image:
        th, tw = self.height, self.width
        w, h = img.size
        if self.resize_mode == "squash":
            return _resize(img, th, tw, self._resample)
        if self.resize_mode == "longest":
            nh, nw = _keep_ratio_size(w, h, th, tw, longest=1.0)
            img = _resize(img, nh, nw, self._resample)
            return _center_crop_or_pad(img, th, tw, self.fill_color)
        # shortest
        if th == tw:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = th, int(th * long / short)
            nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            img = _resize(img, nh, nw, self._resample)
        else:
            nh, nw = _keep_ratio_size(w, h, th, tw, longest=0.0)
            img = _resize(img, nh, nw, _RESAMPLING.BICUBIC)  # open_clip's ResizeKeepRatio default
        return _center_crop_or_pad(img, th, tw, 0)

    def __call__(self, image) -> np.ndarray:
        """Preprocess one image to a float32 C-contiguous array of shape (3, H, W)."""
        return self.normalise(self.rgb8(image))

    def rgb8(self, image) -> np.ndarray:
        """The first half: decode, resize, crop, then RGB, as uint8 (H, W, 3). A quarter of the float32 result's
        bytes: what a decoding worker sends to an encoding one (`cmalign embed --engine ray`)."""
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as im:
                return np.asarray(self._geometry(im).convert("RGB"), dtype=np.uint8)
        return np.asarray(self._geometry(_as_pil(image)).convert("RGB"), dtype=np.uint8)

    def normalise(self, rgb8: np.ndarray) -> np.ndarray:
        """The second half: uint8 (..., H, W, 3) to normalised float32 (..., 3, H, W), C-contiguous.

        Channels first while still uint8, then the float steps in place on contiguous memory: the same float32
        operations per element as ToTensor + Normalize (bit for bit), 9x faster on a batch of 32-px images than
        the strided steps one image at a time (27 -> 3 us an image), which a small model's `embed` felt."""
        x = np.ascontiguousarray(np.moveaxis(rgb8, -1, -3)).astype(np.float32)
        x /= np.float32(255)
        x -= self._mean32
        x /= self._std32
        return x

    def batch(self, images) -> np.ndarray:
        """Preprocess several images to a float32 array (n, 3, H, W), normalised together."""
        if not len(images):
            return np.empty((0, *self.output_shape), dtype=np.float32)
        return self.normalise(np.stack([self.rgb8(image) for image in images]))


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy image arrays must be uint8 (0..255), got dtype {image.dtype}; "
                            "convert e.g. with (x * 255).round().clip(0, 255).astype(np.uint8)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ConfigError(f"numpy image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image))
    raise TypeError(f"cannot preprocess an object of type {type(image).__module__}.{type(image).__qualname__}; "
                    f"expected {_ACCEPTED}")


def save_preprocess(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """Validate open_clip's preprocess cfg and write it, completed with defaults, as ``out_dir/preprocess.json``."""
    config = ImagePreprocessor.from_config(cfg).to_config()
    write_json(Path(out_dir) / PREPROCESS_JSON, config)
    return config

"""The torch-free runtime preprocessing (cmalign.export.preprocess) against open_clip's inference transform,
its config round trip and input checks; and that the runtime modules import and work with torch unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip import tokenizer as oc_tok
from PIL import Image

from cmalign.export.preprocess import PREPROCESS_JSON, ImagePreprocessor, save_preprocess
from cmalign.export.tokenizer import save_tokenizer

TOL = 1e-5
SIZES = [32, 224, (48, 64), (64, 40)]
SIGLIP_MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # the reference transforms are tiny; torch's intra-op threads only add start-up cost here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    # noise plus a gradient: interpolation errors show in both
    base = rng.integers(0, 256, size=shape).astype(np.int32)
    ramp = np.linspace(0, 120, w, dtype=np.int32)[None, :]
    if channels > 1:
        ramp = ramp[..., None]
    return ((base + ramp) % 256).astype(np.uint8)


# (height, width): square and non-square, bigger and smaller than every target, and mixed.
IMAGE_SHAPES = [(300, 300), (20, 20), (180, 320), (260, 150), (16, 24), (500, 20), (37, 229), (64, 48)]
IMAGES = {f"{h}x{w}": Image.fromarray(_noise(h, w, seed=h * 1000 + w)) for h, w in IMAGE_SHAPES}


def _reference(size, resize_mode="shortest", interpolation="bicubic", fill_color=0, mean=None, std=None):
    return open_clip.image_transform(size, is_train=False, resize_mode=resize_mode, interpolation=interpolation,
                                     fill_color=fill_color, mean=mean, std=std)


def _ours(size, resize_mode="shortest", interpolation="bicubic", fill_color=0, mean=None, std=None):
    return ImagePreprocessor.from_config({"size": size, "resize_mode": resize_mode, "interpolation": interpolation,
                                         "fill_color": fill_color, "mean": mean, "std": std})


def _assert_close(got: np.ndarray, want: torch.Tensor, what: str = "") -> None:
    want = want.numpy()
    assert got.dtype == np.float32 and got.shape == want.shape, (what, got.shape, want.shape)
    assert got.flags.c_contiguous
    diff = float(np.abs(got - want).max())
    assert diff <= TOL, f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_matches_open_clip(resize_mode: str, interpolation: str, size) -> None:
    fill = 0 if interpolation == "bicubic" else 128  # CenterCropOrPad's fill, used by 'longest'
    ref = _reference(size, resize_mode, interpolation, fill)
    ours = _ours(size, resize_mode, interpolation, fill)
    h, w = (size, size) if isinstance(size, int) else size
    for name, img in IMAGES.items():
        got = ours(img)
        assert got.shape == (3, h, w)
        _assert_close(got, ref(img), f"{name} -> {size} {resize_mode} {interpolation}")


@pytest.mark.parametrize("interpolation", ["random", "bilinear"])
def test_random_interpolation_and_other_mean_std(interpolation: str) -> None:
    ref = _reference(224, "shortest", interpolation, **SIGLIP_MEAN_STD)
    ours = _ours(224, "shortest", interpolation, **SIGLIP_MEAN_STD)
    for name, img in IMAGES.items():
        _assert_close(ours(img), ref(img), name)
    if interpolation == "random":  # bicubic at inference
        img = IMAGES["180x320"]
        assert np.array_equal(ours(img), _ours(224, "shortest", "bicubic", **SIGLIP_MEAN_STD)(img))


def _mode_images() -> dict[str, Image.Image]:
    rgba = Image.fromarray(_noise(90, 60, 4, seed=1))  # random alpha: premultiplied resize matters
    gray = Image.fromarray(_noise(45, 70, 1, seed=2))
    pal = Image.fromarray(_noise(70, 50, 3, seed=3)).quantize(colors=64)
    return {
        "RGBA": rgba,
        "L": gray,
        "P": pal,
        "LA": rgba.convert("LA"),
        "1": gray.convert("1"),
        "CMYK": Image.fromarray(_noise(40, 40, 3, seed=4)).convert("CMYK"),
    }


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_image_modes_match_open_clip(resize_mode: str) -> None:
    for size in (32, 224, (48, 64)):
        ref = _reference(size, resize_mode, fill_color=77)
        ours = _ours(size, resize_mode, fill_color=77)
        for mode, img in _mode_images().items():
            assert img.mode == mode
            _assert_close(ours(img), ref(img), f"mode {mode} -> {size} {resize_mode}")


def test_numpy_inputs_match_open_clip() -> None:
    ref, ours = _reference(224, "shortest"), _ours(224, "shortest")
    ref_long, ours_long = _reference(64, "longest", fill_color=10), _ours(64, "longest", fill_color=10)
    arrays = {
        "HxW": _noise(50, 80, 1, seed=5),
        "HxWx3": _noise(120, 90, 3, seed=6),
        "HxWx4": _noise(33, 77, 4, seed=7),
    }
    for name, arr in arrays.items():
        _assert_close(ours(arr), ref(Image.fromarray(arr)), name)
        _assert_close(ours_long(arr), ref_long(Image.fromarray(arr)), name)
    arr = _noise(60, 40, 3, seed=8)
    flipped = arr[:, ::-1]  # not contiguous
    _assert_close(ours(flipped), ref(Image.fromarray(np.ascontiguousarray(flipped))), "non-contiguous")
    single = _noise(60, 40, 1, seed=9)
    _assert_close(ours(single[:, :, None]), ref(Image.fromarray(single)), "HxWx1")


def test_file_path_inputs_match_open_clip(tmp_path: Path) -> None:
    ref, ours = _reference((48, 64), "shortest"), _ours((48, 64), "shortest")
    files = {
        "rgb.png": Image.fromarray(_noise(100, 70, 3, seed=10)),
        "rgba.png": Image.fromarray(_noise(30, 50, 4, seed=11)),
        "pal.png": Image.fromarray(_noise(80, 80, 3, seed=12)).quantize(colors=32),
        "gray.jpg": Image.fromarray(_noise(90, 120, 1, seed=13)),
        "rgb.jpg": Image.fromarray(_noise(200, 260, 3, seed=14)),
    }
    for name, img in files.items():
        path = tmp_path / name
        img.save(path)
        with Image.open(path) as opened:
            want = ref(opened)
        _assert_close(ours(str(path)), want, name)
        _assert_close(ours(path), want, name)


def test_batch() -> None:
    ours = _ours((48, 64), "longest")
    imgs = [IMAGES["20x20"], _noise(30, 40, 3), IMAGES["180x320"]]
    out = ours.batch(imgs)
    assert out.shape == (3, 3, 48, 64) and out.dtype == np.float32
    for i, img in enumerate(imgs):
        assert np.array_equal(out[i], ours(img))
    assert ours.batch([]).shape == (0, 3, 48, 64)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", [[1, 2], [3, 4]], torch.zeros(3, 8, 8)],
                         ids=["None", "int", "bytes", "list", "tensor"])
def test_rejects_other_types(bad) -> None:
    with pytest.raises(TypeError, match=rf"{type(bad).__qualname__}.*expected a PIL\.Image\.Image.*numpy uint8"):
        _ours(32)(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, bool])
def test_rejects_non_uint8_arrays(dtype) -> None:
    with pytest.raises(TypeError, match="must be uint8"):
        _ours(32)(np.zeros((8, 8, 3), dtype=dtype))


def test_rejects_bad_array_shapes() -> None:
    for shape in [(8,), (8, 8, 2), (8, 8, 5), (2, 8, 8, 3)]:
        with pytest.raises(ValueError, match="shape"):
            _ours(32)(np.zeros(shape, dtype=np.uint8))


def test_config_defaults_round_trip_and_file(tmp_path: Path) -> None:
    # a legacy cfg (size/mean/std only, as get_model_preprocess_cfg can return) takes open_clip's defaults
    legacy = ImagePreprocessor.from_config({"size": 224, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)})
    assert legacy.to_config() == {"size": 224, "mode": "RGB", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                                  "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    cfg = {"size": (256, 192), "mode": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 255, "unrelated": 1}
    written = save_preprocess(cfg, tmp_path / "export")
    path = tmp_path / "export" / PREPROCESS_JSON
    assert json.loads(path.read_text()) == written
    assert written["size"] == [256, 192] and "unrelated" not in written
    for loaded in (ImagePreprocessor.from_file(path), ImagePreprocessor.from_file(path.parent)):
        assert loaded.to_config() == written
    assert ImagePreprocessor.from_config(written).to_config() == written
    img = IMAGES["180x320"]
    _assert_close(ImagePreprocessor.from_file(path)(img), _reference((256, 192), "longest", "bilinear", 255,
                                                                     (0.5,) * 3, (0.5,) * 3)(img), "from_file")


def test_from_file_errors(tmp_path: Path) -> None:
    path = tmp_path / PREPROCESS_JSON
    with pytest.raises(ValueError, match="missing"):
        ImagePreprocessor.from_file(path)
    full = ImagePreprocessor.from_config({}).to_config()
    path.write_text(json.dumps({k: v for k, v in full.items() if k != "std"}))
    with pytest.raises(ValueError, match=r"preprocess\.json: field 'std' is missing"):
        ImagePreprocessor.from_file(path)
    path.write_text(json.dumps({**full, "resize_mode": "fit"}))
    with pytest.raises(ValueError, match=r"preprocess\.json: .*'resize_mode'"):
        ImagePreprocessor.from_file(path)


@pytest.mark.parametrize(("key", "value"), [
    ("size", 0), ("size", [224]), ("size", "224"), ("mode", "L"), ("mean", [0.5, 0.5]), ("std", [0.5, 0.0, 0.5]),
    ("interpolation", "lanczos"), ("resize_mode", "fit"), ("fill_color", "white"),
])
def test_from_config_rejects_bad_values(key, value) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        ImagePreprocessor.from_config({key: value})


TORCH_FREE_SCRIPT = r"""
import sys
for name in ("torch", "torchvision", "open_clip"):
    sys.modules[name] = None  # any import of these now raises ImportError
import json
import numpy as np
import cmalign.export.tokenizer
import cmalign.export.preprocess
from cmalign.export.preprocess import ImagePreprocessor
from cmalign.export.tokenizer import ClipTokenizer

tok = ClipTokenizer.from_dir(sys.argv[1])
pre = ImagePreprocessor.from_file(sys.argv[2])
ids = tok(["a photo of a cat", "Café 東京 👩🏽‍💻"])
x = pre.batch([np.full((40, 50, 3), 200, dtype=np.uint8), sys.argv[3]])
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("torch", "torchvision"))
print(json.dumps({"ids": ids.tolist(), "shape": list(x.shape), "x1": x[1].tolist(), "torch_modules": loaded}))
"""


def test_runtime_modules_work_without_torch(tmp_path: Path) -> None:
    save_tokenizer(oc_tok.SimpleTokenizer(), tmp_path / "tok")
    save_preprocess({"size": 32}, tmp_path)
    img_path = tmp_path / "img.png"
    Image.fromarray(_noise(40, 30, 3, seed=15)).save(img_path)
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(tmp_path / "tok"),
                           str(tmp_path / PREPROCESS_JSON), str(img_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["torch_modules"] == []
    assert out["shape"] == [2, 3, 32, 32]
    want_ids = oc_tok.SimpleTokenizer()(["a photo of a cat", "Café 東京 👩🏽‍💻"]).numpy()
    assert np.array_equal(np.array(out["ids"]), want_ids)
    with Image.open(img_path) as img:
        want_x = _reference(32)(img)
    _assert_close(np.array(out["x1"], dtype=np.float32), want_x, "subprocess")

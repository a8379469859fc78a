"""A trained adapter as numpy arrays (``ADAPTER/adapter.npz``), applied without torch.

Keys per adapted tower: ``{tower}.weight`` (full rank), ``{tower}.down`` and ``{tower}.up`` (rank r), or
``{tower}.w1``, ``{tower}.b1`` and ``{tower}.w2`` (residual MLP), and ``{tower}.bias``. The same maps run inside the
derived export's graphs; this is the reference they are checked against and what re-maps stored vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmalign.artifacts.atomic import atomic_write
from cmalign.errors import CmalignError

WEIGHTS_FILE = "adapter.npz"
CHUNK = 65536


GELU_C = np.float32(np.sqrt(2 / np.pi))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """torch's ``F.gelu(x, approximate="tanh")``."""
    return 0.5 * x * (1 + np.tanh(GELU_C * (x + np.float32(0.044715) * x ** 3)))


class AdapterError(CmalignError, ValueError):
    """An adapter directory that is incomplete, or applied to vectors it was not trained for."""


class AdapterWeights:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.towers = sorted({k.split(".")[0] for k in arrays})

    @classmethod
    def load(cls, adapter_dir: str | Path) -> AdapterWeights:
        path = Path(adapter_dir) / WEIGHTS_FILE
        if not path.is_file():
            raise AdapterError(f"{path}: missing; is {adapter_dir} a directory written by `cmalign adapt`?")
        with np.load(path) as z:
            return cls({k: np.asarray(z[k], np.float32) for k in z.files})

    def save(self, adapter_dir: str | Path) -> None:
        """Write ``adapter_dir/adapter.npz`` atomically."""
        with atomic_write(Path(adapter_dir) / WEIGHTS_FILE, "wb") as f:
            np.savez(f, **self.arrays)

    def apply(self, tower: str, x: np.ndarray) -> np.ndarray:
        """The tower's map on rows of ``x`` (float32, chunked); a tower without a map returns ``x`` unchanged."""
        if tower not in self.towers:
            return x
        a = self.arrays
        out = np.empty((len(x), x.shape[1]), np.float32)
        for s in range(0, len(x), CHUNK):
            v = np.asarray(x[s:s + CHUNK], np.float32)
            if f"{tower}.w1" in a:
                y = v + gelu_tanh(v @ a[f"{tower}.w1"] + a[f"{tower}.b1"]) @ a[f"{tower}.w2"]
            elif f"{tower}.weight" in a:
                y = v + v @ a[f"{tower}.weight"]
            else:
                y = v + (v @ a[f"{tower}.down"]) @ a[f"{tower}.up"]
            y += a[f"{tower}.bias"]
            out[s:s + CHUNK] = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return out

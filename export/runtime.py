"""Run an exported model in production: onnxruntime, numpy, PIL — and no torch.

    from cmalign.export import load_export
    model = load_export("exports/b32-a005")            # CPU; provider="cuda" with onnxruntime-gpu
    img = model.encode_images(["a.jpg", pil_image, uint8_array])   # (n, d) float32, L2-normalised
    txt = model.encode_texts(["a red circle", "two blue squares"])

Preprocessing and tokenisation are the torch-free copies in this package, tested against
open_clip's own; the graphs output normalised embeddings, so cosine similarity is a dot product.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cmalign.artifacts.checksums import sha256_file
from cmalign.errors import CmalignError, ConfigError, MissingDependencyError
from cmalign.export.manifest import (
    FINGERPRINTED,
    PREPROCESS,
    TOKENIZER_DIR,
    ExportFormatError,
    fingerprint,
    graph_file,
    read_manifest,
)
from cmalign.export.prefetch import prefetch_map
from cmalign.export.preprocess import ImagePreprocessor
from cmalign.export.tokenizer import ClipTokenizer, token_lengths, trim_padding

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderUnavailableError(CmalignError, RuntimeError):
    """The asked-for execution provider is not in this onnxruntime build."""


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "onnxruntime is not installed: pip install 'cmalign[cpu]' (CPU) or 'cmalign[gpu]' (CUDA)"
        ) from e
    return ort


def session_providers(provider: str) -> list:
    """onnxruntime provider list for 'cpu', 'cuda' or 'auto' (CUDA when this build has it)."""
    ort = _import_ort()
    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider '{provider}': expected one of cpu, cuda, auto")
    if PROVIDERS[provider] not in available:
        raise ProviderUnavailableError(
            f"execution provider '{provider}' ({PROVIDERS[provider]}) is not available in this onnxruntime "
            f"(available: {', '.join(available)}). For CUDA install onnxruntime-gpu: pip install 'cmalign[gpu]', "
            "and uninstall the CPU package `onnxruntime` (installed together they hide the CUDA provider)."
        )
    return [PROVIDERS[provider], PROVIDERS["cpu"]] if provider == "cuda" else [PROVIDERS["cpu"]]


def default_optimization(variant: str, provider: str) -> str:
    # onnxruntime 1.32's CPU provider segfaults on fp16 graphs at ORT_ENABLE_ALL (measured here); one level
    # down runs them correctly.
    return "extended" if variant == "fp16" and provider != "cuda" else "all"


_PRELOADED: list[bool] = []


def preload_cuda_libraries(ort) -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels before the first CUDA session, once.

    onnxruntime-gpu finds them through torch when torch is imported, and otherwise only on the system's library path;
    the production path runs without torch, so it asks ``onnxruntime.preload_dlls()`` (onnxruntime >= 1.21) to load
    them from the wheels (it coexists with torch's copies). ``CMALIGN_ORT_PRELOAD=0`` turns this off, e.g. to use a
    system CUDA on the library path instead. A failure is left to the session, whose error names the provider.
    """
    if _PRELOADED or os.environ.get("CMALIGN_ORT_PRELOAD", "1") == "0" or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED.append(True)
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - missing wheels: the system's libraries may still serve
        pass


# onnxruntime's intra-op threads spin between runs by default: right for a process that only runs the model, wrong
# where other threads share the cores (embed's decoders and tokenizer, serve's event loop parsing HTTP and JSON):
# the spinning burns the CPU those need (benchmarks/embed_bound.py, benchmarks/serve_load.py measure it).
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}


def make_session(path: str | Path, provider: str = "cpu", threads: int | None = None, optimization: str = "all",
                 config: dict[str, str] | None = None):
    """An InferenceSession with graph optimisation; fails loudly if CUDA was asked for and not used.

    ``config`` holds onnxruntime session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
    """
    ort = _import_ort()
    providers = session_providers(provider)
    if optimization not in ("all", "extended", "basic", "none"):
        raise ConfigError(f"unknown optimization level '{optimization}': expected all, extended, basic or none")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if providers[0] == PROVIDERS["cuda"]:
        preload_cuda_libraries(ort)
    session = ort.InferenceSession(str(path), so, providers=providers)
    if providers[0] != PROVIDERS["cpu"] and session.get_providers()[0] != providers[0]:
        raise ProviderUnavailableError(
            f"onnxruntime could not start {providers[0]} for {path} (session runs on {session.get_providers()}); "
            "check the CUDA/cuDNN libraries onnxruntime-gpu needs"
        )
    return session


class ExportedModel:
    """An export directory loaded for inference: two sessions, a tokenizer and a preprocessor."""

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu", variant: str = "fp32",
                 threads: int | None = None, verify: bool = True, optimization: str | None = None,
                 session_config: dict[str, str] | None = None):
        self.path = Path(export_dir)
        self.manifest = read_manifest(self.path)
        graphs = self.manifest["graphs"]
        if variant not in graphs:
            raise ExportFormatError(
                f"{self.path}: no '{variant}' graphs in this export (it has: {', '.join(graphs)}); "
                f"export it with `cmalign export ... --{variant}`"
            )
        self.variant = variant
        optimization = optimization or default_optimization(variant, provider)
        self.fingerprint: str = self.manifest["fingerprint"]
        self.embed_dim: int = int(self.manifest["embed_dim"])
        self.preprocessor = ImagePreprocessor.from_file(self.path / PREPROCESS)
        self.tokenizer = ClipTokenizer.from_dir(self.path / TOKENIZER_DIR)
        self._sessions = {}
        hashed: dict[str, str] = {}
        for tower in ("image", "text"):
            entry = graphs[variant][tower]
            file = self.path / entry.get("file", graph_file(tower, variant))
            if not file.is_file():
                raise ExportFormatError(f"{file}: missing (listed in {self.path / 'manifest.json'})")
            if verify and entry.get("sha256"):
                hashed[file.name] = sha256_file(file)
                if hashed[file.name] != entry["sha256"]:
                    raise ExportFormatError(f"{file}: checksum differs from the manifest; the file was changed or "
                                            "is truncated. Re-export, or pass verify=False to load it anyway")
            self._sessions[tower] = make_session(file, provider, threads, optimization, session_config)
        if verify and fingerprint(self.path, hashed) != self.fingerprint:
            # the fingerprint is what indexes and embeddings are bound to: recomputed, not trusted from the manifest
            raise ExportFormatError(
                f"{self.path}: its files no longer match the manifest's fingerprint {self.fingerprint} (one of "
                f"{', '.join(FINGERPRINTED)} was changed); embeddings from it would not be comparable. Re-export, "
                "or pass verify=False to load it anyway")
        for tower, session in self._sessions.items():
            # embed_dim is not fingerprinted: a manifest edited to another dim would label every embedding wrongly
            dim = session.get_outputs()[0].shape[-1]
            if isinstance(dim, int) and dim != self.embed_dim:
                raise ExportFormatError(f"{self.path / 'manifest.json'}, field 'embed_dim': {self.embed_dim}, but the "
                                        f"{tower} graph outputs vectors of dim {dim}")
        self.providers = self._sessions["image"].get_providers()
        self.context_length = self.tokenizer.context_length
        # a named sequence axis takes any length; exports written before it existed have a fixed one (an int)
        self.trims_padding = isinstance(self.manifest.get("inputs", {}).get("text", {}).get("shape", [0, 0])[1], str)

    # -- arrays in, embeddings out ------------------------------------------------------------------
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Run the image graph on a preprocessed float32 batch (n, 3, H, W)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self._run("image", pixels)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Run the text graph on int64 token ids (n, context_length)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ConfigError(f"token ids must have shape (n, {self.context_length}), got {tokens.shape}")
        if self.trims_padding:  # the graph takes any length: the padding after the longest caption is skipped
            tokens = trim_padding(tokens)
        return self._run("text", tokens)

    def encode_tokens_batched(self, tokens: np.ndarray, batch_size: int) -> np.ndarray:
        """``encode_tokens`` in batches of ``batch_size`` rows; with a graph that skips padding, the rows are run
        shortest first, so that each batch is cut at its own longest caption rather than at a long caption's that
        happens to share it. Rows come back in their order."""
        order = np.arange(len(tokens))
        if self.trims_padding and len(tokens) > batch_size:
            order = np.argsort(token_lengths(tokens), kind="stable")
        out = np.empty((len(tokens), self.embed_dim), np.float32)
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            out[rows] = self.encode_tokens(tokens[rows])
        return out

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        session = self._sessions[tower]
        if len(x) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        out = session.run(None, {session.get_inputs()[0].name: x})[0]
        return np.asarray(out, dtype=np.float32)

    # -- user-facing ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> np.ndarray:
        return self.preprocessor.batch(images)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        return self.tokenizer(texts)

    def encode_images(self, images: Iterable, batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Embed image paths, PIL images or uint8 arrays; decoding runs in threads beside inference."""
        images = list(images)
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        if not batches:
            return np.zeros((0, self.embed_dim), np.float32)
        workers = workers or min(4, os.cpu_count() or 1)
        # PIL decodes and resizes outside the GIL, so the next batches are prepared while this one runs.
        return np.concatenate([self.encode_pixels(p) for p in prefetch_map(self.preprocess, batches, workers)])

    def encode_texts(self, texts: str | Iterable[str], batch_size: int = 256) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}; expected str")
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.encode_tokens_batched(self.tokenize(texts), batch_size)

    def __repr__(self) -> str:
        return (f"ExportedModel({str(self.path)!r}, variant={self.variant!r}, providers={self.providers}, "
                f"dim={self.embed_dim}, fingerprint={self.fingerprint})")


def load_export(export_dir: str | os.PathLike, provider: str = "cpu", variant: str = "fp32",
                threads: int | None = None, verify: bool = True, optimization: str | None = None) -> ExportedModel:
    """Load an export directory written by `cmalign export` (see :class:`ExportedModel`)."""
    return ExportedModel(export_dir, provider=provider, variant=variant, threads=threads, verify=verify,
                         optimization=optimization)

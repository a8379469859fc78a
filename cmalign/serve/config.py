"""What a search service is: its indexes, where it listens, and the limits that keep it up under bad input and load.

A config file (TOML or JSON) may name several indexes with their options::

    host = "127.0.0.1"
    port = 1234
    [indexes.val]          # served as "val"
    path = "idx/val"
    export = "exports/other-location"   # optional: the export recorded in the index, moved

clip-retrieval's ``indices_paths.json`` (``{"name": "path", ...}``) is read as well, so a `clip back` setup
carries over. Reading a config imports nothing heavy (every command's ``--help`` must stay fast).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from cmalign.errors import ConfigError, MissingInputError

MODALITIES = ("any", "image", "text")


@dataclass
class IndexEntry:
    name: str
    path: str
    export: str | None = None  # None: the export recorded in the index's manifest


@dataclass
class ServeConfig:
    indexes: list[IndexEntry] = field(default_factory=list)
    host: str = "127.0.0.1"  # not 0.0.0.0: exposing the service is a decision, not a default
    port: int = 1234  # clip back's default port
    provider: str = "cpu"  # onnxruntime provider: cpu | cuda
    gpu: bool = False  # faiss GPU copy of each index
    threads: int | None = None  # onnxruntime / faiss threads (None: their defaults; with workers, cores / workers)
    # Processes that serve the same port, each with its own copy of every index: past one core of Python (HTTP,
    # validation, JSON run under one GIL a process), a small model's service needs more processes, not threads.
    workers: int = 1
    # Micro-batching: concurrent queries wait at most max_wait_ms for each other, then run as one onnxruntime
    # call and one faiss search per modality; a full queue answers 503 with Retry-After instead of growing.
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 256
    # Bad input is a 4xx, never a crash or an unbounded allocation.
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000  # decoded image size (a decompression bomb is refused before decoding)
    max_text_chars: int = 4096  # longer texts are refused; texts beyond the context length are truncated
    max_k: int = 1000
    allow_url_fetch: bool = False  # clip back's image_url: off, so the service makes no requests of its own
    log_requests: bool = True  # one structured (JSON) access-log line per request

    def validate(self) -> ServeConfig:
        if not self.indexes:
            raise ConfigError("give at least one index directory to serve (cmalign serve IDX [IDX ...])")
        names = [e.name for e in self.indexes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"index names must be unique, got {', '.join(dupes)} more than once; name them in a "
                              "config file ([indexes.NAME] path = ...)")
        for e in self.indexes:
            if not e.name or "/" in e.name:
                raise ConfigError(f"index name {e.name!r} must be non-empty and contain no '/'")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        for name in ("workers", "max_batch", "queue_size", "max_body_bytes", "max_pixels", "max_text_chars", "max_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and math.isfinite(self.max_wait_ms)
                and self.max_wait_ms >= 0):
            raise ConfigError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        if self.provider not in ("cpu", "cuda"):
            raise ConfigError(f"provider must be cpu or cuda, got {self.provider!r}")
        return self


def entry_for_path(path: str) -> IndexEntry:
    """An index given on the command line: named by its directory."""
    p = Path(path)
    return IndexEntry(name=p.name or p.resolve().name or str(p), path=str(p))  # as given ("." resolved)


def read_config_file(path: str | Path) -> dict:
    """The file's settings as a dict (TOML, or JSON by suffix), with ``indexes`` as a list of IndexEntry."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"serve config not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except (json.JSONDecodeError, ValueError) as e:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    if data and all(isinstance(v, str) for v in data.values()) and "indexes" not in data:
        data = {"indexes": data}  # clip-retrieval's indices_paths.json
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    raw = data.get("indexes", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}, field 'indexes': expected a table of name = path (or name = {{path = ...}})")
    entries = []
    for name, value in raw.items():
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            raise ConfigError(f"{path}, field 'indexes.{name}': expected a path or a table with 'path'")
        extra = sorted(set(value) - {"path", "export"})
        if extra:
            raise ConfigError(f"{path}, field 'indexes.{name}': unknown key(s) {', '.join(extra)} (path, export)")
        entries.append(IndexEntry(name, _beside(path, value["path"]),
                                  _beside(path, value["export"]) if value.get("export") else None))
    data["indexes"] = entries
    return data


def _beside(config: Path, p: str) -> str:
    """A path in a config file is relative to the file, not to wherever the server was started."""
    return str(p if Path(p).is_absolute() else config.parent / p)


def load_serve_config(paths: list[str] | None = None, config_file: str | None = None, **overrides) -> ServeConfig:
    """Defaults, then the config file, then the command line (index paths are added to the file's)."""
    cfg = ServeConfig()
    if config_file:
        data = read_config_file(config_file)
        for k, v in data.items():
            setattr(cfg, k, v)
    cfg.indexes = list(cfg.indexes) + [entry_for_path(p) for p in paths or []]
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg.validate()

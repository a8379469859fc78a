"""Which artifact a directory is — a `cmalign fit` run, an export, or an open_clip model directory — decided once.

`export`, `eval` and `sweep` all take "a run or a model"; they used to decide it each their own way, and disagreed
about a run whose final model was missing. Here a run is a directory whose manifest says ``cmalign-run`` (or, with
no manifest yet, one holding ``model/open_clip_config.json``), an export one whose manifest says
``cmalign-export``, and a model directory one holding ``open_clip_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmalign.artifacts.manifests import json_object_or_none, read_json_object
from cmalign.errors import CmalignError

RUN, EXPORT, MODEL = "run", "export", "model"


class SourceError(CmalignError, ValueError):
    """A directory is not the kind of artifact a command takes."""


@dataclass(frozen=True)
class Source:
    kind: str  # run | export | model
    path: Path
    manifest: dict = field(default_factory=dict)  # the run's or export's manifest; a model's `cmalign` block

    @property
    def model_dir(self) -> Path | None:
        """The open_clip local-dir of a run or model (None for an export)."""
        return {RUN: self.path / "model", MODEL: self.path}.get(self.kind)

    @property
    def open_clip_name(self) -> str:
        """The name open_clip loads it by: ``local-dir:DIR``."""
        if self.model_dir is None:
            raise SourceError(f"{self.path}: an ONNX export, not an open_clip model; give the run it was exported from")
        return f"local-dir:{self.model_dir}"


def source_kind(path: str | Path) -> str:
    """'run', 'export' or 'model'; a :class:`SourceError` that says what was expected otherwise."""
    return resolve_source(path).kind


def resolve_source(path: str | Path) -> Source:
    p = Path(path)
    if not p.is_dir():
        raise SourceError(f"{p}: no such directory" if not p.exists() else f"{p}: not a directory")
    manifest_path = p / "manifest.json"
    manifest = read_json_object(manifest_path, SourceError) if manifest_path.is_file() else {}
    kind = manifest.get("kind")
    has_run_model = (p / "model" / "open_clip_config.json").is_file()
    if kind == "cmalign-run" or (not manifest and has_run_model):
        if not has_run_model:
            raise SourceError(f"{p}: a run without a final model (RUN/model); did the fit finish? "
                              "(`cmalign fit --resume --out RUN` continues it)")
        return Source(RUN, p, manifest)
    if kind == "cmalign-export":
        return Source(EXPORT, p, manifest)
    if kind == "cmalign-adapter":  # an adapter is evaluated (and served) as its derived export
        return resolve_source(p / str(manifest.get("export", "export")))
    if (p / "open_clip_config.json").is_file():
        extra = read_json_object(p / "open_clip_config.json", SourceError).get("cmalign", {})
        return Source(MODEL, p, extra if isinstance(extra, dict) else {})
    raise SourceError(f"{p}: not a cmalign run (manifest.json of kind cmalign-run), an export (kind "
                      "cmalign-export), an adapter (kind cmalign-adapter) or an open_clip model directory "
                      "(open_clip_config.json)")


def run_finished(run_dir: str | Path, config_hash: str | None = None) -> bool:
    """Whether ``run_dir`` holds a finished run (its final model and manifest), of ``config_hash`` if given."""
    p = Path(run_dir)
    manifest = json_object_or_none(p / "manifest.json") or {}
    return ((p / "model" / "open_clip_config.json").is_file() and manifest.get("kind") == "cmalign-run"
            and (config_hash is None or manifest.get("config_hash") == config_hash))

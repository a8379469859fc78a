"""May a command write to ``--out``? It never deletes what cmalign did not write, nor one of its own inputs.

``--overwrite`` replaces a directory only when its manifest says it is the same kind of cmalign artifact
(an export replaces an export, never a folder of someone's photos), and no ``--out`` may be, or contain, one
of the command's inputs (``cmalign index EMB --out EMB --overwrite`` would destroy the embeddings it reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cmalign.artifacts.manifests import json_object_or_none
from cmalign.errors import ConfigError, OutputExistsError


def check_output(out: str | Path, kind: str, manifest: str = "manifest.json", inputs: Iterable = (),
                 overwrite: bool = False, exists_hint: str = "") -> Path:
    """Raise unless writing ``out`` is safe; ``kind`` is the artifact's manifest kind, ``inputs`` the paths the
    command reads. A non-empty ``out`` needs ``overwrite`` and must hold a ``kind``."""
    out = Path(out)
    refuse_inputs(out, inputs)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):  # an empty directory holds nothing to lose
        return out
    if not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it{exists_hint}")
    found = (json_object_or_none(out / manifest) or {}).get("kind") if out.is_dir() else None
    if found != kind:
        held = f"a {found}" if found else ("a file" if not out.is_dir() else f"no {manifest} of a cmalign artifact")
        raise OutputExistsError(f"{out} holds {held}, not a {kind}: --overwrite replaces only a {kind} that cmalign "
                                "wrote. Move it away yourself, or choose another --out")
    return out


def refuse_inputs(out: str | Path, inputs: Iterable) -> None:
    """Raise if ``out`` is, or contains, one of ``inputs`` (paths; None and ``generated:`` data are skipped)."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None or str(item).startswith("generated:"):
            continue
        source = Path(item).resolve()
        if target == source or target in source.parents:
            what = "is" if target == source else "contains"
            raise ConfigError(f"--out {out} {what} the input {item}; writing there would destroy what this command "
                              "reads. Choose another --out")


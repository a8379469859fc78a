"""--out and --overwrite: cmalign replaces only an artifact of the same kind it wrote, and never its own input."""

from __future__ import annotations

import json

import pytest

from cmalign.artifacts.outputs import check_output, refuse_inputs
from cmalign.errors import ConfigError, OutputExistsError
from cmalign.export.onnx_export import ExportConfig, export_model


def _artifact(path, kind, manifest="manifest.json"):
    path.mkdir(parents=True)
    (path / manifest).write_text(json.dumps({"kind": kind}))
    return path


def test_a_new_or_empty_out_is_fine(tmp_path):
    assert check_output(tmp_path / "new", "cmalign-index") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "cmalign-index")


def test_an_existing_out_needs_overwrite(tmp_path):
    out = _artifact(tmp_path / "idx", "cmalign-index")
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        check_output(out, "cmalign-index")
    check_output(out, "cmalign-index", overwrite=True)


def test_overwrite_never_replaces_what_cmalign_did_not_write(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="holds no manifest.json of a cmalign artifact, not a cmalign-index"):
        check_output(photos, "cmalign-index", overwrite=True)
    export = _artifact(tmp_path / "export", "cmalign-export")
    with pytest.raises(OutputExistsError, match="holds a cmalign-export, not a cmalign-index"):
        check_output(export, "cmalign-index", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="holds a file"):
        check_output(tmp_path / "file", "cmalign-index", overwrite=True)
    assert (photos / "holiday.jpg").read_bytes() == b"precious"


def test_out_may_not_be_or_contain_an_input(tmp_path):
    emb = _artifact(tmp_path / "emb", "cmalign-embeddings")
    with pytest.raises(ConfigError, match="is the input"):
        check_output(emb, "cmalign-index", inputs=[emb], overwrite=True)
    with pytest.raises(ConfigError, match="contains the input"):
        refuse_inputs(tmp_path, [emb / "sub"])
    refuse_inputs(emb / "idx", [emb])  # a new directory inside an input destroys nothing
    refuse_inputs(tmp_path / "x", [None, "generated:val"])


def test_export_over_its_own_run_is_refused_and_the_run_survives(tmp_path):
    run = _artifact(tmp_path / "run", "cmalign-run")
    (run / "model").mkdir()
    (run / "model" / "open_clip_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is the input"):
        export_model(ExportConfig(source=str(run), out=str(run), overwrite=True))
    assert (run / "model" / "open_clip_config.json").is_file()
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="not a cmalign-export"):
        export_model(ExportConfig(source=str(run), out=str(photos), overwrite=True))
    assert (photos / "a.jpg").is_file()

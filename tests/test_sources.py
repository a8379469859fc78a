"""Which artifact a directory is: one resolver for export, eval and sweep, with errors that say what was expected."""

from __future__ import annotations

import json

import pytest

from cmalign.artifacts.sources import EXPORT, MODEL, RUN, SourceError, resolve_source, run_finished


def _run(tmp_path, finished=True, manifest=True, config_hash="abc"):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    if finished:
        (run / "model" / "open_clip_config.json").write_text("{}")
    if manifest:
        (run / "manifest.json").write_text(json.dumps({"kind": "cmalign-run", "config_hash": config_hash,
                                                       "model": "cmalign-tiny"}))
    return run


def test_a_finished_run_is_a_run_and_loads_from_its_model_dir(tmp_path):
    src = resolve_source(_run(tmp_path))
    assert src.kind == RUN and src.open_clip_name == f"local-dir:{tmp_path / 'run' / 'model'}"
    assert src.manifest["model"] == "cmalign-tiny"


def test_a_run_without_its_final_model_is_refused_with_a_hint(tmp_path):
    with pytest.raises(SourceError, match=r"did the fit finish\?.*--resume"):
        resolve_source(_run(tmp_path, finished=False))


def test_a_run_whose_manifest_is_not_written_yet_is_still_a_run(tmp_path):
    assert resolve_source(_run(tmp_path, manifest=False)).kind == RUN


def test_exports_and_model_directories(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"kind": "cmalign-export"}))
    src = resolve_source(export)
    assert src.kind == EXPORT and src.model_dir is None
    with pytest.raises(SourceError, match="an ONNX export, not an open_clip model"):
        _ = src.open_clip_name
    model = tmp_path / "model"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "cmalign": {"alpha_target": 0.5}}))
    src = resolve_source(model)
    assert src.kind == MODEL and src.manifest == {"alpha_target": 0.5}


def test_anything_else_names_what_was_expected(tmp_path):
    with pytest.raises(SourceError, match="no such directory"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match="not a directory"):
        resolve_source(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not a cmalign run .* an export .* or an open_clip model directory"):
        resolve_source(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(SourceError, match=r"manifest.json: not valid JSON"):
        resolve_source(bad)


def test_run_finished_checks_the_model_the_manifest_and_the_config_hash(tmp_path):
    run = _run(tmp_path, config_hash="abc")
    assert run_finished(run) and run_finished(run, "abc")
    assert not run_finished(run, "other")
    (run / "model" / "open_clip_config.json").unlink()
    assert not run_finished(run, "abc")
    assert not run_finished(tmp_path / "nope")

"""`cmalign export`'s options do what docs/export.md says: --overwrite, --exporter legacy, --int8-per-tensor,
--int8-full-range and --opset, each through the CLI on the embedded tiny base model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.data.synth import synth_split
from cmalign.errors import ConfigError
from cmalign.export import ExportFormatError, load_export
from cmalign.export import graphs as export_graphs
from cmalign.export import manifest as mf
from cmalign.export.onnx_export import ExportConfig, export_model
from cmalign.model.loading import load_model, save_local_dir

FP32_FILES = {"image_encoder.onnx", "text_encoder.onnx"}


def _export(*args: str) -> str:
    r = CliRunner().invoke(app, ["export", *args, "-q"])
    assert r.exit_code == 0, r.output
    return r.output


def _val_inputs(n: int):
    records = synth_split("val", n_images=n, captions_per_image=1).records
    return [r.image.load().convert("RGB") for r in records], [r.caption for r in records]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def _int8_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{weight name: (int8 values, scale, zero point)} of every MatMulInteger's constant weight."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            name = node.input[1]
            out[name] = (inits[name], inits[name.removesuffix("_quantized") + "_scale"], inits[node.input[3]])
    assert out, f"{path.name}: no int8 weights"
    return out


def _assert_int8_checks_held(manifest: dict) -> None:
    """The bounds docs/export.md states, as the export recorded them."""
    for tower in mf.TOWERS:
        assert manifest["graphs"]["int8"][tower]["parity"]["min_cosine"] >= mf.MIN_COSINE["int8"], tower
    r = manifest["retrieval"]["int8"]
    assert r["bound_enforced"] and r["images"] >= mf.INT8_R1_MIN_IMAGES
    assert r["max_drop_vs_fp32"] <= mf.INT8_MAX_R1_DROP, manifest["retrieval"]


# -- --overwrite ---------------------------------------------------------------------------------------

def test_overwrite_replaces_an_export_with_nothing_of_the_old_left(tiny_export, base_model_dir, tmp_path):
    """The new export is what the new source gives: its own files and manifest only, no stale fp16/int8 graph
    of the old weights beside it, and it loads (checksums, fingerprint) and matches its torch model."""
    out = tmp_path / "exp"
    shutil.copytree(tiny_export.out, out)  # fp32, fp16 and int8 graphs of the base model
    other = load_model(f"local-dir:{base_model_dir}")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    save_local_dir(other.model, other.model_cfg, other.preprocess_cfg, tmp_path / "other")

    _export(str(tmp_path / "other"), "--out", str(out), "--overwrite", "--retrieval-images", "0")

    m = mf.read_manifest(out)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {f for f in files if f.endswith(".onnx")} == FP32_FILES
    assert files == FP32_FILES | {"manifest.json", "preprocess.json", "tokenizer/tokenizer.json",
                                  f"tokenizer/{m['tokenizer']['vocab_file']}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "other"]  # no temporary or old directory left
    assert set(m["graphs"]) == {"fp32"} and m["retrieval"] == {} and m["int8"] is None
    assert m["source"]["model_dir"] == str((tmp_path / "other").resolve())
    assert m["fingerprint"] != tiny_export.manifest["fingerprint"] and m["fingerprint"] == mf.fingerprint(out)
    with pytest.raises(ExportFormatError, match="no 'int8' graphs"):
        load_export(out, variant="int8")

    images, captions = _val_inputs(16)
    rt, old = load_export(out), load_export(tiny_export.out)
    with torch.no_grad():
        ref_img = other.model.encode_image(torch.stack([other.preprocess_val(im) for im in images]),
                                           normalize=True).numpy()
        ref_txt = other.model.encode_text(other.tokenizer(captions), normalize=True).numpy()
    got_img, got_txt = rt.encode_images(images), rt.encode_texts(captions)
    assert _min_cos(got_img, ref_img) >= mf.MIN_COSINE["fp32"] and _min_cos(got_txt, ref_txt) >= mf.MIN_COSINE["fp32"]
    assert np.abs(got_txt - old.encode_texts(captions)).max() > 1e-2  # really the new weights


# -- --exporter legacy ----------------------------------------------------------------------------------

def test_legacy_exporter_writes_a_torchscript_graph_that_matches_the_default_one(tiny_export, base_model_dir,
                                                                                 tmp_path):
    out = tmp_path / "legacy"
    _export(str(base_model_dir), "--out", str(out), "--exporter", "legacy", "--retrieval-images", "0")
    m = mf.read_manifest(out)
    assert m["exporter"] == "legacy" and m["opset"] == 20
    assert m["inputs"]["text"]["shape"] == ["batch", 32]  # TorchScript bakes the length in: no cut padding
    for tower in mf.TOWERS:
        path = out / mf.graph_file(tower, "fp32")
        onnx.checker.check_model(str(path), full_check=True)
        # TorchScript names its ops by module scope ("/visual/conv1/Conv"); torch.export calls them "node_..."
        ops = [n.name for n in onnx.load(str(path)).graph.node if n.op_type != "Constant"]
        assert ops and all(name.startswith("/") for name in ops), tower
        assert not any(n.name.startswith("/") for n in onnx.load(str(tiny_export.out / path.name)).graph.node)
        assert m["graphs"]["fp32"][tower]["parity"]["min_cosine"] >= mf.MIN_COSINE["fp32"]

    images, captions = _val_inputs(32)
    legacy, dynamo = load_export(out), load_export(tiny_export.out)
    # measured max |Δ| 1.0e-7 between the two exporters' embeddings (float32 rounding)
    np.testing.assert_allclose(legacy.encode_images(images), dynamo.encode_images(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(legacy.encode_texts(captions), dynamo.encode_texts(captions), rtol=0, atol=1e-6)


# -- --int8-per-tensor and --int8-full-range -----------------------------------------------------------

def test_int8_per_tensor_gives_each_weight_one_scale(tiny_export, base_model_dir, tmp_path):
    """Default int8 (tiny_export): one scale and zero point per output channel. --int8-per-tensor: one per
    weight, the largest of the per-channel scales (the whole tensor's range), still 7-bit; within int8's bounds."""
    out = tmp_path / "per-tensor"
    _export(str(base_model_dir), "--out", str(out), "--int8", "--int8-per-tensor", "--retrieval-images", "500")
    m = mf.read_manifest(out)
    assert m["int8"]["per_channel"] is False and m["int8"]["reduce_range"] is True
    for tower in mf.TOWERS:
        per_tensor = _int8_weights(out / mf.graph_file(tower, "int8"))
        per_channel = _int8_weights(tiny_export.out / mf.graph_file(tower, "int8"))
        assert per_tensor.keys() == per_channel.keys()
        for name, (w, scale, zero) in per_tensor.items():
            _, channel_scale, channel_zero = per_channel[name]
            assert scale.shape == () and zero.shape == (), name
            assert channel_scale.shape == channel_zero.shape == (w.shape[1],), name
            np.testing.assert_allclose(scale, channel_scale.max(), rtol=1e-6)
            assert np.abs(w.astype(int)).max() == 64, name  # 7-bit, as without the option
    _assert_int8_checks_held(m)


def test_int8_full_range_uses_all_eight_bits_of_the_weights(tiny_export, base_model_dir, tmp_path):
    """Symmetric int8: each output channel's largest weight maps to ±127 with --int8-full-range, ±64 by default
    (reduce_range), so the same weights get scales 64/127 as large; still per channel; within int8's bounds."""
    out = tmp_path / "full-range"
    _export(str(base_model_dir), "--out", str(out), "--int8", "--int8-full-range", "--retrieval-images", "500")
    m = mf.read_manifest(out)
    assert m["int8"]["reduce_range"] is False and m["int8"]["per_channel"] is True
    for tower in mf.TOWERS:
        full = _int8_weights(out / mf.graph_file(tower, "int8"))
        reduced = _int8_weights(tiny_export.out / mf.graph_file(tower, "int8"))
        assert full.keys() == reduced.keys()
        for name, (w, scale, _) in full.items():
            w7, scale7, _ = reduced[name]
            assert (np.abs(w.astype(int)).max(0) == 127).all(), name
            assert (np.abs(w7.astype(int)).max(0) == 64).all(), name
            assert scale.shape == (w.shape[1],), name
            np.testing.assert_allclose(scale * 127, scale7 * 64, rtol=1e-6)
    _assert_int8_checks_held(m)


# -- --opset --------------------------------------------------------------------------------------------

def test_opset_option_sets_every_graphs_opset(base_model_dir, tmp_path):
    """--opset 18 (not the default 20): the fp32 graphs and their int8 conversions all import ai.onnx 18."""
    out = tmp_path / "op18"
    _export(str(base_model_dir), "--out", str(out), "--opset", "18", "--int8", "--retrieval-images", "0")
    m = mf.read_manifest(out)
    assert m["opset"] == 18 and m["settings"]["opset"] == 18
    for variant in ("fp32", "int8"):
        for tower in mf.TOWERS:
            model = onnx.load(str(out / mf.graph_file(tower, variant)), load_external_data=False)
            assert {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx") == 18
            assert m["graphs"][variant][tower]["parity"]["min_cosine"] >= mf.MIN_COSINE[variant]


@pytest.mark.parametrize("args, says", [
    (["--opset", "17"], "--opset 17 is not supported by the dynamo exporter (it writes opsets 18 to 25; "
                        "--exporter legacy writes opset 17)"),
    (["--opset", "24", "--exporter", "legacy"], "--opset 24 is not supported by the legacy exporter (it writes "
                                                "opsets 14 to 23; --exporter dynamo writes opset 24)"),
    (["--opset", "30"], "--opset 30 is not supported by the dynamo exporter (it writes opsets 18 to 25)"),
    (["--opset", "23", "--int8"], "--int8 with --opset 23"),
], ids=["dynamo-below-18", "legacy-above-23", "above-every-exporter", "int8-with-fused-attention"])
def test_an_unsupported_opset_is_a_clear_error_before_any_work(base_model_dir, tmp_path, args, says):
    r = CliRunner().invoke(app, ["export", str(base_model_dir), "--out", str(tmp_path / "exp"), *args])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and text.startswith("error:") and says in text, text
    assert "Traceback" not in text and list(tmp_path.iterdir()) == []


def test_a_graph_written_at_another_opset_than_asked_is_refused(base_model_dir, tmp_path, monkeypatch):
    """Asked for 17, torch's dynamo exporter writes 18 with only a warning: the export must not keep it."""
    monkeypatch.setitem(export_graphs.OPSETS, "dynamo", (17, 25))  # let 17 past the up-front check
    with pytest.raises(ConfigError, match="wrote the image encoder at opset 18, not the --opset 17 asked for"):
        export_model(ExportConfig(source=str(base_model_dir), out=str(tmp_path / "exp"), opset=17,
                                  retrieval_images=0))
    assert list(tmp_path.iterdir()) == []


def test_model_with_the_base_tag_exports_the_embedded_base(tiny_export, tmp_path):
    """`--model cmalign-tiny --pretrained cmalign-base` is the unaligned export the adapter path starts from: the
    same graphs (fingerprint) as exporting the cached base model's directory; `random` exports other weights."""
    base = export_model(ExportConfig(model="cmalign-tiny", pretrained="cmalign-base", out=str(tmp_path / "b"),
                                     retrieval_images=0))
    assert base.manifest["fingerprint"] == tiny_export.manifest["fingerprint"]
    assert base.manifest["source"]["pretrained"].endswith("open_clip_model.safetensors")  # the cached base
    rand = export_model(ExportConfig(model="cmalign-tiny", pretrained="random", out=str(tmp_path / "r"),
                                     retrieval_images=0))
    assert rand.manifest["fingerprint"] != base.manifest["fingerprint"]

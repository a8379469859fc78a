"""`cmalign export` and the runtime: real graphs, real onnxruntime sessions, compared with torch eager."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST_FIT
from onnx import TensorProto, helper
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.data.synth import make_scene, synth_split
from cmalign.export import ExportFormatError, ProviderUnavailableError, load_export
from cmalign.export import manifest as mf
from cmalign.export.graphs import check_graph
from cmalign.export.onnx_export import ExportConfig, ParityError, export_model
from cmalign.model.loading import load_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def torch_model(base_model_dir):
    loaded = load_model(f"local-dir:{base_model_dir}")
    loaded.model.eval()
    return loaded


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _val_inputs(n: int):
    records = synth_split("val", n_images=n, captions_per_image=1).records
    return [r.image.load().convert("RGB") for r in records], [r.caption for r in records]


# -- the export directory ------------------------------------------------------------------------------

def test_export_directory_describes_itself(tiny_export):
    out, m = tiny_export.out, tiny_export.manifest
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(m, default=str))
    assert m["kind"] == "cmalign-export" and m["embed_dim"] == 128 and m["context_length"] == 32
    assert m["opset"] == 20 and m["exporter"] == "dynamo" and m["image_size"] == [32, 32]
    assert m["source"]["kind"] == "local-dir"
    assert set(m["graphs"]) == {"fp32", "fp16", "int8"}
    for variant, towers in m["graphs"].items():
        for tower, g in towers.items():
            assert (out / g["file"]).is_file() and mf.sha256_file(out / g["file"]) == g["sha256"]
            assert g["parity"]["min_cosine"] >= mf.MIN_COSINE[variant], (variant, tower, g["parity"])
            assert set(g["parity"]) >= {"batch_1", "batch_3", "batch_32"}
    assert m["fingerprint"] == mf.fingerprint(out)
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["size"] in (32, [32, 32]) and pre["mean"] and pre["std"] and pre["interpolation"]
    tok = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert tok["context_length"] == 32 and (out / "tokenizer" / tok["vocab_file"]).is_file()
    assert m["parity"]["pipeline"]["tokens_equal"] and m["parity"]["pipeline"]["preprocess_max_abs_diff"] <= 1e-5
    # no temporary directories left next to the export
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_every_graph_passes_the_full_checker_and_has_a_dynamic_batch(tiny_export):
    for towers in tiny_export.manifest["graphs"].values():
        for g in towers.values():
            path = tiny_export.out / g["file"]
            onnx.checker.check_model(str(path), full_check=True)
            graph = onnx.load(str(path)).graph
            assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
            assert graph.output[0].type.tensor_type.shape.dim[0].dim_param


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_fp32_runtime_matches_torch_eager_end_to_end(tiny_export, torch_model, batch):
    """PIL images and strings in, through the torch-free preprocessing/tokenizer, vs open_clip's own pipeline."""
    images, captions = _val_inputs(32)
    rt = load_export(tiny_export.out)
    with torch.no_grad():
        ref_img = torch_model.model.encode_image(torch.stack([torch_model.preprocess_val(im) for im in images]),
                                                 normalize=True).numpy()
        ref_txt = torch_model.model.encode_text(torch_model.tokenizer(captions), normalize=True).numpy()
    got_img = rt.encode_images(images, batch_size=batch)
    got_txt = rt.encode_texts(captions, batch_size=batch)
    assert got_img.dtype == np.float32 and got_img.shape == (32, 128)
    assert _cos_rows(got_img, ref_img).min() >= 0.99999
    assert _cos_rows(got_txt, ref_txt).min() >= 0.99999
    assert np.allclose(np.linalg.norm(got_img, axis=1), 1, atol=1e-5)


def test_runtime_accepts_paths_pil_and_uint8_arrays_alike(tiny_export, tmp_path):
    im = make_scene(0, "val", 7).load().convert("RGB")
    im.save(tmp_path / "x.png")
    rt = load_export(tiny_export.out)
    e = rt.encode_images([str(tmp_path / "x.png"), im, np.asarray(im)])
    assert np.allclose(e[0], e[1], atol=1e-6) and np.allclose(e[1], e[2], atol=1e-6)
    assert rt.encode_texts([]).shape == (0, 128) and rt.encode_images([]).shape == (0, 128)
    assert rt.encode_texts("one caption").shape == (1, 128)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        rt.encode_texts(["ok", 3])
    with pytest.raises(ValueError, match="shape"):
        rt.encode_tokens(np.zeros((2, 7), np.int64))


def test_int8_keeps_retrieval_within_one_point_on_the_default_validation_split(tiny_export):
    """The quality bar, measured independently of the exporter's own check, on the whole generated val split."""
    records = synth_split("val").records
    keys = sorted({r.key for r in records})
    images = {r.key: r.image for r in records}
    owner = np.asarray([keys.index(r.key) for r in records])
    r1 = {}
    for variant in ("fp32", "int8"):
        rt = load_export(tiny_export.out, variant=variant)
        s = rt.encode_images([images[k].load() for k in keys], batch_size=256) @ \
            rt.encode_texts([r.caption for r in records]).T
        r1[variant] = ((owner[s.argmax(1)] == np.arange(len(keys))).mean(), (s.argmax(0) == owner).mean())
    assert len(keys) == 1000
    assert r1["fp32"][0] > 0.05  # a real model, far above chance (0.001)
    for fp32, int8 in zip(r1["fp32"], r1["int8"], strict=True):
        assert fp32 - int8 <= 0.01, r1
    recorded = tiny_export.manifest["retrieval"]["int8"]
    assert recorded["bound_enforced"] and recorded["max_drop_vs_fp32"] <= 0.01


def test_text_graphs_take_any_length_and_the_runtime_cuts_the_padding(tiny_export):
    """A causal, EOT-pooled text tower: padding after the last EOT changes nothing, so the graph has a named
    sequence axis and the runtime runs only the columns up to the longest caption's EOT — with the same result as
    the full context length, in every variant."""
    from cmalign.export.graphs import trims_padding
    from cmalign.export.tokenizer import trim_padding

    assert tiny_export.manifest["inputs"]["text"]["shape"] == ["batch", "sequence"]
    _, captions = _val_inputs(16)
    captions += ["wow! a red circle!", "!"]  # "!" is token id 0, the padding id: it must not end a caption early
    for variant in ("fp32", "fp16", "int8"):
        model = load_export(tiny_export.out, variant=variant)
        assert model.trims_padding
        tokens = model.tokenize(captions)
        cut = trim_padding(tokens)
        assert 2 < cut.shape[1] < tokens.shape[1] and (cut[:, -1] != 0).any()  # up to the longest caption's EOT
        full = model._run("text", tokens)  # the graph on all 32 columns
        tol = 1e-6 if variant == "fp32" else 2e-3
        assert np.abs(model.encode_texts(captions) - full).max() < tol, variant
        # in batches of 4, run shortest first ("!" alone first) and put back in their order (int8 quantises
        # activations per batch, so other batch-mates move its rows by ~2e-3; a row out of order moves by ~0.2)
        batched = model.encode_texts(captions, batch_size=4)
        assert np.abs(batched - full).max() < (1e-2 if variant == "int8" else tol), variant
        parity = tiny_export.manifest["graphs"][variant]["text"]["parity"]
        assert parity["trimmed"]["length"] < tiny_export.manifest["context_length"]
    # the predicate: another pooling (last token) would read a padding position, so it keeps the fixed length
    loaded = load_model("cmalign-tiny")
    assert trims_padding(loaded.model)
    loaded.model.text_pool_type = "last"
    assert not trims_padding(loaded.model)


def test_fp16_and_int8_graphs_stay_close_and_fp16_pools_on_integer_ids(tiny_export):
    images, captions = _val_inputs(16)
    ref = load_export(tiny_export.out)
    ri, rt_ = ref.encode_images(images), ref.encode_texts(captions)
    for variant, bound in (("fp16", 0.999), ("int8", 0.98)):
        rt = load_export(tiny_export.out, variant=variant)
        assert _cos_rows(rt.encode_images(images), ri).min() >= bound
        assert _cos_rows(rt.encode_texts(captions), rt_).min() >= bound
    graph = onnx.load(str(tiny_export.out / mf.graph_file("text", "fp16"))).graph
    producers = {o: n for n in graph.node for o in n.output}
    argmax = [n for n in graph.node if n.op_type == "ArgMax"]
    assert argmax and all(producers.get(n.input[0]) is None or producers[n.input[0]].op_type != "Cast"
                          for n in argmax)
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.INT64


# -- the checks refuse what the runtime cannot trust ----------------------------------------------------

def _tiny_graph(path: Path, batch, cast_before_argmax: bool) -> Path:
    nodes = []
    src = "ids"
    if cast_before_argmax:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT))
        src = "ids_f"
    nodes.append(helper.make_node("ArgMax", [src], ["out"], axis=1, keepdims=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, [batch])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_check_graph_refuses_a_fixed_batch_and_float_cast_pooling(tmp_path):
    assert check_graph(_tiny_graph(tmp_path / "ok.onnx", "batch", False))["input_shape"] == ["batch", 8]
    with pytest.raises(ParityError, match="batch axis .* fixed at 1"):
        check_graph(_tiny_graph(tmp_path / "fixed.onnx", 1, False))
    with pytest.raises(ParityError, match="must not be cast"):
        check_graph(_tiny_graph(tmp_path / "cast.onnx", "batch", True))


def test_a_graph_that_fails_parity_is_not_written(base_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(mf.MIN_COSINE, "fp32", 1.5)  # unreachable: every graph must fail
    out = tmp_path / "exp"
    with pytest.raises(ParityError, match=r"image encoder \(fp32\): min cosine .* below the bound 1.5"):
        export_model(ExportConfig(source=str(base_model_dir), out=str(out), retrieval_images=0))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_replace_without_overwrite_and_names_bad_sources(tiny_export, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(ExportConfig(source="whatever", out=str(tiny_export.out)))
    with pytest.raises(ValueError, match="not both or neither"):
        export_model(ExportConfig(out=str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_model(ExportConfig(source=str(tmp_path / "nope"), out=str(tmp_path / "b")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a cmalign run"):
        export_model(ExportConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "c")))


# -- the runtime refuses what it cannot run --------------------------------------------------------------

def test_runtime_errors_name_the_problem(tiny_export, tmp_path):
    with pytest.raises(ExportFormatError, match="export directory not found"):
        load_export(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(ExportFormatError, match="manifest.json: missing"):
        load_export(tmp_path / "run")
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_export.out, bad)
    with open(bad / "text_encoder.onnx", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ExportFormatError, match="checksum differs"):
        load_export(bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["kind"] = "something-else"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportFormatError, match="field 'kind'"):
        load_export(bad)
    with pytest.raises(ValueError, match="unknown provider"):
        load_export(tiny_export.out, provider="tpu")


def test_asking_for_cuda_without_onnxruntime_gpu_is_a_clear_error(tiny_export):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ProviderUnavailableError, match=r"onnxruntime-gpu.*cmalign\[gpu\]"):
        load_export(tiny_export.out, provider="cuda")
    assert load_export(tiny_export.out, provider="auto").providers == ["CPUExecutionProvider"]


def test_cuda_libraries_are_preloaded_once_unless_turned_off(monkeypatch):
    """The torch-free runtime asks onnxruntime to load the nvidia-* wheels' CUDA libraries before its first CUDA
    session (a stand-in module records the calls: this machine has no GPU, and preloading twice is what to avoid)."""
    from types import SimpleNamespace

    from cmalign.export import runtime

    calls = []
    ort = SimpleNamespace(preload_dlls=lambda: calls.append(1))
    monkeypatch.setattr(runtime, "_PRELOADED", [])
    monkeypatch.setenv("CMALIGN_ORT_PRELOAD", "0")
    runtime.preload_cuda_libraries(ort)
    assert calls == []
    monkeypatch.delenv("CMALIGN_ORT_PRELOAD")
    runtime.preload_cuda_libraries(ort)
    runtime.preload_cuda_libraries(ort)
    assert calls == [1]
    monkeypatch.setattr(runtime, "_PRELOADED", [])
    runtime.preload_cuda_libraries(SimpleNamespace())  # an onnxruntime older than 1.21: nothing to call


def test_runtime_imports_no_torch(tiny_export, tmp_path):
    """Production code path: load the export and embed, with torch made unimportable."""
    images, captions = _val_inputs(4)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    expected = load_export(tiny_export.out)
    np.save(tmp_path / "img.npy", expected.encode_images([str(tmp_path / f"{i}.png") for i in range(4)]))
    np.save(tmp_path / "txt.npy", expected.encode_texts(captions))
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.modules["open_clip"] = None
        import numpy as np
        from cmalign.export import load_export
        rt = load_export({str(tiny_export.out)!r}, variant="fp32")
        img = rt.encode_images([{str(tmp_path)!r} + f"/{{i}}.png" for i in range(4)])
        txt = rt.encode_texts({captions!r})
        assert np.allclose(img, np.load({str(tmp_path / "img.npy")!r}), atol=1e-6)
        assert np.allclose(txt, np.load({str(tmp_path / "txt.npy")!r}), atol=1e-6)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision")
                                and sys.modules[m] is not None)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# -- the CLI, from a real `fit` run and from a plain open_clip model ------------------------------------

def test_cli_exports_a_fit_run_and_a_plain_open_clip_model(base_model_dir, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["fit", *FAST_FIT, "--steps", "2", "--alpha-target", "0.3", "--out", str(run)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exp-run"
    r = runner.invoke(app, ["export", str(run), "--out", str(out), "--retrieval-images", "0"])
    assert r.exit_code == 0, r.output
    assert "image_encoder.onnx" in r.output and "tokens equal to open_clip: True" in r.output
    m = json.loads((out / "manifest.json").read_text())
    run_manifest = json.loads((run / "manifest.json").read_text())
    assert m["source"]["kind"] == "cmalign-run" and m["alpha_target"] == 0.3
    assert m["config_hash"] == run_manifest["config_hash"] and m["source"]["steps"] == 2
    assert set(m["source"]["gaps"]) == {"before", "after"} and "centroid" in m["source"]["gaps"]["after"]
    assert set(m["graphs"]) == {"fp32"}
    with pytest.raises(ExportFormatError, match="no 'int8' graphs"):
        load_export(out, variant="int8")

    base = tmp_path / "exp-base"
    r = runner.invoke(app, ["export", "--model", "cmalign-tiny", "--pretrained",
                            str(base_model_dir / "open_clip_model.safetensors"), "--out", str(base),
                            "--retrieval-images", "0", "-q"])
    assert r.exit_code == 0, r.output
    mb = json.loads((base / "manifest.json").read_text())
    assert mb["source"]["kind"] == "open_clip" and mb["alpha_target"] is None
    assert mb["fingerprint"] != m["fingerprint"]  # different weights, different export

    r = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 2 and "error:" in r.output and "--overwrite" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no such directory" in r.output and "Traceback" not in r.output


def test_exporting_an_export_names_the_run_to_export_instead(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="already an ONNX export; give the run"):
        export_model(ExportConfig(source=str(tiny_export.out), out=str(tmp_path / "again")))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_an_edited_preprocessing_config_or_vocabulary_is_refused(tiny_export, tmp_path, variant):
    """The fingerprint binds indexes and embeddings to an export: it is recomputed at load, not trusted."""
    bad = tmp_path / "edited"
    shutil.copytree(tiny_export.out, bad)
    pre = json.loads((bad / "preprocess.json").read_text())
    pre["mean"] = [m + 0.1 for m in pre["mean"]]
    (bad / "preprocess.json").write_text(json.dumps(pre))
    with pytest.raises(ExportFormatError, match="no longer match the manifest's fingerprint"):
        load_export(bad, variant=variant)
    assert load_export(bad, variant=variant, verify=False).fingerprint == load_export(tiny_export.out).fingerprint

"""Real-size backbones through the same code paths, with random weights (no hub here). Slow: --run-slow."""

import json

import open_clip
import pytest
from conftest import FAST_FIT
from typer.testing import CliRunner

from cmalign.cli.main import app


@pytest.mark.slow
def test_vit_b32_two_fit_steps(tmp_path):
    out = tmp_path / "b32"
    args = list(FAST_FIT)
    args[args.index("--batch-size") + 1] = "8"
    res = CliRunner().invoke(app, ["fit", *args, "--model", "ViT-B-32", "--steps", "2", "--out", str(out),
                                   "--trainable", "all", "--grad-checkpointing"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")
    assert model.visual.proj.shape == (768, 512)


@pytest.mark.slow
def test_vit_b32_export_with_random_weights(tmp_path):
    """ViT-B-32 (224 px, context 77) through export's parity checks at batch 1/3/32, fp32 and int8."""
    from cmalign.export import load_export
    from cmalign.export.onnx_export import ExportConfig, export_model

    res = export_model(ExportConfig(model="ViT-B-32", out=str(tmp_path / "b32"), int8=True, retrieval_images=0))
    m = res.manifest
    assert m["embed_dim"] == 512 and m["context_length"] == 77 and m["image_size"] == [224, 224]
    assert m["graphs"]["fp32"]["image"]["parity"]["min_cosine"] >= 0.99999
    assert m["graphs"]["int8"]["image"]["parity"]["min_cosine"] >= 0.98
    rt = load_export(res.out)
    assert rt.encode_texts(["a photo of a dog", ""]).shape == (2, 512)


@pytest.mark.slow
def test_vit_b32_eval_with_random_weights(tmp_path):
    """The real backbone through every eval task and the post-hoc fixes (random weights: no hub here)."""
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["eval", "--model", "ViT-B-32", "--pretrained", "random", "--max-images", "24",
                                 "--fit-images", "24", "--decoder-epochs", "1", "--posthoc", "all", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["systems"]["model"]["gap"]["d"] == 512
    assert set(m["systems"]) == {"model", "model+centring", "model+liang", "model+procrustes"}
    assert all(set(s) == {"gap", "retrieval", "mixed", "mixcorpus", "clustering", "zeroshot", "caption"}
               for s in m["systems"].values())

"""Real-size backbones through the same code paths, with random weights (no hub here). Slow: --run-slow."""

import json

import open_clip
import pytest
from cmalign.cli.main import app
from conftest import FAST_FIT
from typer.testing import CliRunner


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

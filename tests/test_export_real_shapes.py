"""A real-size ONNX export in CI: ViT-B-32's shapes (224 px, patch 32, context 77, vocab 49408, width 768/512,
12 layers per tower) with random weights, since nothing here can download the pretrained ones."""

from __future__ import annotations

import numpy as np
import torch

from cmalign.data.synth import synth_split
from cmalign.export import load_export
from cmalign.export import manifest as mf
from cmalign.export.onnx_export import ExportConfig, export_model
from cmalign.model.loading import load_model


def test_vit_b32_graphs_take_real_shapes_at_batch_1_and_2_and_match_torch(tmp_path):
    """The whole ViT-B-32 through `export_model` with the defaults (fp32, dynamo, opset 20; no retrieval check:
    random weights retrieve nothing): ~30 s on 2 shared cores, so the real model, not a narrowed config.
    Then its graphs are run at batch 1 and 2 on [B, 3, 224, 224] pixels and [B, 77] token ids, against torch
    eager on the same random weights (open_clip's init from the same seed). At batch 1 the runtime runs the first
    caption cut to its own length; the second, truncated, keeps all 77 columns."""
    torch.manual_seed(0)
    res = export_model(ExportConfig(model="ViT-B-32", out=str(tmp_path / "b32"), retrieval_images=0))
    torch.manual_seed(0)
    ref = load_model("ViT-B-32")
    ref.model.eval()
    m = res.manifest
    assert m["image_size"] == [224, 224] and m["context_length"] == 77 and m["embed_dim"] == 512
    assert m["inputs"]["image"]["shape"] == ["batch", 3, 224, 224]  # as check_graph read them from the graphs
    assert m["inputs"]["text"]["shape"] == ["batch", "sequence"]  # any length: the runtime cuts the padding off

    records = synth_split("val", n_images=2, captions_per_image=1).records
    images = [r.image.load().convert("RGB") for r in records]
    # the second caption is longer than the context: truncated, its EOT pooled at position 76
    captions = [records[0].caption, " ".join(["a red circle above a blue square"] * 20)]
    pixels = torch.stack([ref.preprocess_val(im) for im in images])
    tokens = ref.tokenizer(captions)
    assert pixels.shape == (2, 3, 224, 224) and tokens.shape == (2, 77) and tokens[1, -1] != 0
    with torch.no_grad():
        expected = {"image": ref.model.encode_image(pixels, normalize=True).numpy(),
                    "text": ref.model.encode_text(tokens, normalize=True).numpy()}

    rt = load_export(res.out)
    for batch in (1, 2):
        got = {"image": np.concatenate([rt.encode_pixels(pixels[i:i + batch].numpy()) for i in range(0, 2, batch)]),
               "text": np.concatenate([rt.encode_tokens(tokens[i:i + batch].numpy()) for i in range(0, 2, batch)])}
        for tower in mf.TOWERS:
            g, e = got[tower].astype(np.float64), expected[tower].astype(np.float64)
            assert got[tower].shape == (2, 512) and got[tower].dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
            assert (g * e).sum(1).min() >= mf.MIN_COSINE["fp32"], (tower, batch)
            # random ViT embeddings of different inputs are close (cosine up to ~0.99), so cosine alone is weak:
            # max |Δ| was 2e-7 in the export's own check
            assert np.abs(g - e).max() <= 1e-5, (tower, batch)

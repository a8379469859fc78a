"""`cmalign adapt`: an adapter trained on stored embeddings, fused into a derived export, applied to stored vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmalign.adapter.apply import apply_adapter
from cmalign.adapter.config import AdaptConfig
from cmalign.adapter.model import AlignmentAdapter
from cmalign.adapter.train import adapt
from cmalign.adapter.weights import AdapterError, AdapterWeights
from cmalign.cli.main import app
from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import EmbeddingsError, load_embeddings
from cmalign.export.runtime import load_export


@pytest.fixture(scope="module")
def stored(tiny_export, tmp_path_factory):
    """600 generated scenes (3000 captions) embedded with the base export: a stored, unaligned corpus."""
    out = tmp_path_factory.mktemp("adapter") / "emb"
    embed_dataset(EmbedConfig(export=str(tiny_export.out), data="generated:train:600", out=str(out)))
    return out


def _cfg(stored, out, **kw) -> AdaptConfig:
    base = dict(embeddings=str(stored), out=str(out), steps=40, batch_size=64, checkpoint_every=10, warmup_steps=5)
    return AdaptConfig(**(base | kw))


@pytest.fixture(scope="module")
def both(stored, tmp_path_factory):
    return adapt(_cfg(stored, tmp_path_factory.mktemp("both") / "a"), show_progress=False)


@pytest.fixture(scope="module")
def query(stored, tmp_path_factory):
    return adapt(_cfg(stored, tmp_path_factory.mktemp("query") / "a", kind="query", rank=8), show_progress=False)


def test_an_untrained_adapter_is_the_identity():
    x = torch.nn.functional.normalize(torch.randn(50, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    for rank, hidden in ((0, 0), (4, 0), (0, 16)):
        fi, ft, _ = AlignmentAdapter(32, "both", rank, hidden=hidden)(x, x)
        assert torch.equal(fi, ft) and (fi - x).abs().max() < 1e-6
    zeros = AdapterWeights({"text.weight": np.zeros((32, 32), np.float32), "text.bias": np.zeros(32, np.float32)})
    assert np.abs(zeros.apply("text", x.numpy()) - x.numpy()).max() < 1e-6
    assert zeros.apply("image", x.numpy()) is not None and np.array_equal(zeros.apply("image", x.numpy()), x.numpy())


def test_adapting_closes_the_gap_on_held_out_pairs(both):
    """40 steps at α = 0.5 on 540 images: the held-out raw and centroid gaps fall (measured: 0.84 -> ~0.3)."""
    b, a = both.before, both.after
    assert a["raw_gap"] < 0.6 * b["raw_gap"] and a["centroid_gap"] < 0.3 * b["centroid_gap"]
    manifest = json.loads((both.out / "manifest.json").read_text())
    assert manifest["towers"] == ["image", "text"] and manifest["block_scheduler"]["measurements"] > 0


def test_derived_export_equals_the_base_followed_by_the_adapter(both, tiny_export):
    """Every variant's fused graphs against the base's graphs + the numpy map, on texts and images."""
    from cmalign.data.synth import synth_split

    weights = AdapterWeights.load(both.out)
    records = synth_split("test", n_images=8, captions_per_image=1).records
    texts, images = [r.caption for r in records], [r.image.load() for r in records]
    for variant in ("fp32", "fp16", "int8"):
        base = load_export(tiny_export.out, variant=variant)
        derived = load_export(both.export, variant=variant)
        assert derived.fingerprint != base.fingerprint
        for tower, got, ref in (("text", derived.encode_texts(texts), base.encode_texts(texts)),
                                ("image", derived.encode_images(images), base.encode_images(images))):
            expected = weights.apply(tower, ref)
            assert np.abs(got - expected).max() < 2e-6, (variant, tower)
            assert np.abs(got - ref).max() > 1e-3  # the adapter did move them


def test_a_residual_mlp_adapter_is_the_same_map_in_torch_numpy_and_its_derived_export(stored, tiny_export, tmp_path):
    from cmalign.data.synth import synth_split
    from cmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="--hidden and --rank"):
        AdaptConfig(embeddings=str(stored), hidden=16, rank=4).validate()
    r = adapt(_cfg(stored, tmp_path / "mlp", hidden=32), show_progress=False)
    # an MLP starts slower than the linear map (W2 at zero: W1 learns once W2 has moved); measured 0.56 at 40 steps
    assert r.after["centroid_gap"] < 0.7 * r.before["centroid_gap"]
    weights = AdapterWeights.load(r.out)
    assert {"text.w1", "text.b1", "text.w2", "text.bias", "image.w2"} <= set(weights.arrays)
    model = AlignmentAdapter(weights.arrays["text.bias"].shape[0], "both", hidden=32)
    for tower, m in model.towers().items():
        m.load_state_dict({n: torch.from_numpy(weights.arrays[f"{tower}.{n}"]) for n, _ in m.named_parameters()})
    x = load_embeddings(stored).text[:64].astype(np.float32)
    with torch.no_grad():
        in_torch = model.text(torch.from_numpy(x)).numpy()
    assert np.abs(weights.apply("text", x) - in_torch).max() < 2e-6
    # large random weights, where the GELU's form matters (erf vs tanh differ by up to 5e-4 a unit): torch, numpy
    # and the adapter's own ONNX graph compute one map
    import onnx
    import onnxruntime as ort

    from cmalign.adapter.graphs import UNADAPTED, adapter_model

    rng = np.random.default_rng(3)
    d = x.shape[1]
    big = AdapterWeights({"text.w1": rng.normal(0, 1, (d, 32)).astype(np.float32),
                          "text.b1": rng.normal(0, 1, 32).astype(np.float32),
                          "text.w2": rng.normal(0, 0.3, (32, d)).astype(np.float32),
                          "text.bias": rng.normal(0, 0.1, d).astype(np.float32)})
    model.text.load_state_dict({n: torch.from_numpy(big.arrays[f"text.{n}"]) for n, _ in model.text.named_parameters()})
    with torch.no_grad():
        in_torch = model.text(torch.from_numpy(x)).numpy()
    graph = adapter_model(big, "text", onnx.load(str(tiny_export.out / "text_encoder.onnx")), "emb")
    in_onnx = ort.InferenceSession(graph.SerializeToString()).run(None, {"emb" + UNADAPTED: x})[0]
    assert np.abs(big.apply("text", x) - in_torch).max() < 2e-6
    assert np.abs(in_onnx - in_torch).max() < 2e-6
    records = synth_split("test", n_images=8, captions_per_image=1).records
    base, derived = load_export(tiny_export.out), load_export(r.export)
    for tower, got, ref in (("text", derived.encode_texts([r.caption for r in records]),
                             base.encode_texts([r.caption for r in records])),
                            ("image", derived.encode_images([r.image.load() for r in records]),
                             base.encode_images([r.image.load() for r in records]))):
        assert np.abs(got - weights.apply(tower, ref)).max() < 2e-6, tower
        assert np.abs(got - ref).max() > 1e-3  # the MLP did move them


def test_query_adapter_leaves_image_vectors_bit_identical(query, stored, tmp_path):
    out = apply_adapter(stored, query.out, tmp_path / "mapped").out
    before, after = load_embeddings(stored), load_embeddings(out)
    assert np.array_equal(before.image, after.image)
    assert np.abs(after.text - AdapterWeights.load(query.out).apply("text", before.text)).max() == 0
    assert after.manifest["export_fingerprint"] == json.loads((query.export / "manifest.json").read_text())[
        "fingerprint"]
    derived = load_export(query.export)
    assert (query.export / "image_encoder.onnx").read_bytes() == (
        load_export(json.loads((query.out / "manifest.json").read_text())["base_export"]).path
        / "image_encoder.onnx").read_bytes()
    assert derived.embed_dim == before.image.shape[1]


def test_adapted_embeddings_index_and_search(both, stored, tmp_path):
    """adapt-apply -> index -> search with the derived export: the query side runs the fused text graph."""
    from cmalign.index import IndexConfig, build_index
    from cmalign.index.searcher import Searcher

    emb = apply_adapter(stored, both.out, tmp_path / "mapped").out
    build_index(IndexConfig(embeddings=str(emb), out=str(tmp_path / "idx")))
    s = Searcher(tmp_path / "idx")
    assert s.model.fingerprint == load_export(both.export).fingerprint
    caption = load_embeddings(stored).text_metadata["caption"].iloc[3]
    hits = s.text(caption, k=5)[0]
    assert any(h.caption == caption for h in hits)
    # the base's (unaligned) vectors never enter the aligned index; the error says how to map them
    from cmalign.index import add_to_index
    from cmalign.index.errors import ExportMismatchError

    with pytest.raises(ExportMismatchError, match="cmalign adapt-apply"):
        add_to_index(tmp_path / "idx", stored)


def test_an_adapter_refuses_vectors_of_another_export(both, base_model_dir, tmp_path):
    from cmalign.export.onnx_export import ExportConfig, export_model

    other = export_model(ExportConfig(model="cmalign-tiny", out=str(tmp_path / "other"), retrieval_images=0))
    emb = tmp_path / "emb-other"
    embed_dataset(EmbedConfig(export=str(other.out), data="generated:test:20", out=str(emb)))
    with pytest.raises(AdapterError, match="an adapter maps only the vectors of the export it was trained on"):
        apply_adapter(emb, both.out, tmp_path / "mapped")
    assert not (tmp_path / "mapped").exists()
    with pytest.raises(AdapterError, match="fingerprint"):  # training on them with the wrong --export, too
        adapt(_cfg(emb, tmp_path / "a", export=str(both.export)), show_progress=False)
    assert not (tmp_path / "a").exists()


def _interrupted_at_step_17(cfg: AdaptConfig, monkeypatch) -> None:
    """Run ``cfg`` until a KeyboardInterrupt at step 17 (after the checkpoint of step 10)."""
    from cmalign.adapter.pairs import PairedVectors

    real = PairedVectors.batch

    def interrupted(self, images, seed, step, size):
        if step == 17:
            raise KeyboardInterrupt
        return real(self, images, seed, step, size)

    monkeypatch.setattr(PairedVectors, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adapt(cfg, show_progress=False)
    monkeypatch.setattr(PairedVectors, "batch", real)


def test_resume_after_an_interruption_is_exact(stored, tmp_path, monkeypatch):
    straight = adapt(_cfg(stored, tmp_path / "straight", steps=25), show_progress=False)
    _interrupted_at_step_17(_cfg(stored, tmp_path / "resumed", steps=25), monkeypatch)
    assert not (tmp_path / "resumed" / "manifest.json").exists()  # unfinished: no manifest
    with pytest.raises(Exception, match="--resume"):
        adapt(_cfg(stored, tmp_path / "resumed", steps=25), show_progress=False)
    resumed = adapt(_cfg(stored, tmp_path / "resumed", steps=25), resume=True, show_progress=False)
    a, b = AdapterWeights.load(straight.out).arrays, AdapterWeights.load(resumed.out).arrays
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 26))  # rows after the checkpoint (11-17) redone once, not doubled
    with pytest.raises(Exception, match="finished adapter \\(nothing to resume\\)"):  # never retrained over
        adapt(_cfg(stored, tmp_path / "resumed", steps=25), resume=True, show_progress=False)


def test_a_run_started_before_the_settle_gate_resumes_with_its_fixed_warm_up(stored, tmp_path, monkeypatch):
    """An adapter run interrupted under the code before the warm-up's settle gate and the α balance (its
    config.json without their keys, its checkpoints without the gate's state) resumes with today's command and
    finishes as it would have: a fixed warm-up, weights equal to an uninterrupted run of that recipe."""
    from cmalign.objective.curriculum import CurriculumConfig

    fixed = dict(steps=25, curriculum=CurriculumConfig(settle_tolerance=0.0))
    straight = adapt(_cfg(stored, tmp_path / "straight", **fixed), show_progress=False)
    _interrupted_at_step_17(_cfg(stored, tmp_path / "old", **fixed), monkeypatch)
    saved = tmp_path / "old" / "config.json"  # as the earlier code wrote it
    written = json.loads(saved.read_text())
    for key in ("settle_tolerance", "settle_window", "warmup_max_fraction"):
        del written["config"]["curriculum"][key]
    del written["config"]["scheduler"]["balance_ratio"]
    saved.write_text(json.dumps(written))
    for ckpt in (tmp_path / "old" / "checkpoints").glob("step_*.pt"):
        state = torch.load(ckpt, weights_only=False)
        del state["warmup"]
        torch.save(state, ckpt)

    resumed = adapt(_cfg(stored, tmp_path / "old", steps=25), resume=True, show_progress=False)
    a, b = AdapterWeights.load(straight.out).arrays, AdapterWeights.load(resumed.out).arrays
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads(saved.read_text())["config"]["curriculum"]["settle_tolerance"] == 0  # and says so now


def test_bad_embeddings_are_refused_naming_file_and_row(stored, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stored, bad)
    path = bad / "text_emb" / "text_emb_0000.npy"
    a = np.load(path)
    a[123, 5] = np.nan
    np.save(path, a)
    with pytest.raises(EmbeddingsError, match=r"text_emb_0000.npy, row 123: NaN"):
        adapt(_cfg(bad, tmp_path / "a"), show_progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(Exception, match="--kind must be one of query, both"):
        adapt(_cfg(stored, tmp_path / "a", kind="text"), show_progress=False)


def test_cli_adapt_prints_the_before_after_table(stored, tmp_path):
    r = CliRunner().invoke(app, ["adapt", str(stored), "--out", str(tmp_path / "a"), "--steps", "12",
                                 "--batch-size", "32", "--kind", "query"])
    assert r.exit_code == 0, r.output
    assert "raw gap" in r.output and "R@1 text→image" in r.output and "derived export" in r.output
    r = CliRunner().invoke(app, ["adapt-apply", str(stored), "--adapter", str(tmp_path / "a"), "--out",
                                 str(tmp_path / "m")])
    assert r.exit_code == 0 and "aligned index" in r.output
    r = CliRunner().invoke(app, ["adapt-apply", str(stored), "--adapter", str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "m2")])
    assert r.exit_code != 0 and "not a finished `cmalign adapt` directory" in r.output


def test_eval_of_an_adapter_compares_it_with_its_base_export(both, tmp_path):
    from cmalign.evaluation import EvalConfig, evaluate

    r = evaluate(EvalConfig(source=str(both.out), tasks=("gap", "mixcorpus"), max_images=200, figures=False,
                            bootstrap=0, out=str(tmp_path / "rep")), log=lambda m: None)
    m = r.metrics
    assert m["baseline"]["role"] == "the adapter's base export"
    assert m["comparison"]["systems"]["model"]["gap_reduction"]["raw"] > 0.3
    model, base = m["systems"]["model"]["mixcorpus"], m["systems"]["baseline"]["mixcorpus"]
    assert model["ndcg_range"] < base["ndcg_range"]  # the base sags between p = 0 and 1; the adapted space less

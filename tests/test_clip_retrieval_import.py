"""`cmalign embed-import`: clip-retrieval's output (one row per image-caption sample, no manifest) made into an
embeddings directory of an export, then adapted and indexed as if `cmalign embed` had written it."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cmalign.adapter.config import AdaptConfig
from cmalign.adapter.pairs import PairedVectors
from cmalign.adapter.train import adapt
from cmalign.cli.main import app
from cmalign.corpus.clip_retrieval import ImportConfig, import_clip_retrieval, is_clip_retrieval_dir
from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import EmbeddingsError, load_embeddings
from cmalign.objective.curriculum import CurriculumConfig


@pytest.fixture(scope="module")
def stored(tiny_export, tmp_path_factory):
    """200 generated scenes embedded with the base export: each image and its first caption."""
    out = tmp_path_factory.mktemp("cr") / "emb"
    embed_dataset(EmbedConfig(export=str(tiny_export.out), data="generated:train:200", out=str(out)))
    e = load_embeddings(out)
    first = e.text_metadata.drop_duplicates("pair_id").set_index("pair_id")
    pids = e.image_metadata["pair_id"].to_numpy()
    text_rows = first.loc[pids, "row"].to_numpy()
    return {"image": e.image, "text": e.text[text_rows], "caption": first.loc[pids, "caption"].tolist(),
            "image_path": e.image_metadata["image_path"].tolist()}


def _write_clip_retrieval(root, stored, splits=(0, 120, 200), text=None):
    """clip-retrieval's layout: img_emb/img_emb_K.npy, text_emb/text_emb_K.npy, metadata/metadata_K.parquet."""
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True)
    text = stored["text"] if text is None else text
    for k, (a, b) in enumerate(itertools.pairwise(splits)):
        np.save(root / "img_emb" / f"img_emb_{k}.npy", stored["image"][a:b].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{k}.npy", text[a:b].astype(np.float16))
        pq.write_table(pa.table({"image_path": stored["image_path"][a:b], "caption": stored["caption"][a:b]}),
                       root / "metadata" / f"metadata_{k}.parquet")
    return root


def test_import_pairs_row_i_of_each_file_and_links_the_vectors(stored, tiny_export, tmp_path):
    src = _write_clip_retrieval(tmp_path / "cr", stored)
    assert is_clip_retrieval_dir(src)
    with pytest.raises(EmbeddingsError, match="clip-retrieval's output; .* `cmalign embed-import"):
        PairedVectors(src)  # adapt (and index) on the raw folder say what to run
    r = import_clip_retrieval(ImportConfig(source=str(src), export=str(tiny_export.out), out=str(tmp_path / "emb")))
    assert (r.shards, r.pairs, r.linked) == (2, 200, True)
    assert r.verified["captions"] == 16 and r.verified["min_cosine"] > 0.999
    assert os.path.samefile(src / "img_emb" / "img_emb_1.npy", tmp_path / "emb" / "img_emb" / "img_emb_0001.npy")
    e = load_embeddings(r.out)
    assert e.manifest["export_fingerprint"] == tiny_export.manifest["fingerprint"]
    assert e.manifest["imported_from"]["layout"] == "clip-retrieval"
    np.testing.assert_array_equal(e.image, stored["image"].astype(np.float16))
    # every caption is paired with the image of its row, across shards
    pairs = PairedVectors(r.out)
    np.testing.assert_array_equal(pairs.text_image, np.arange(200))
    assert e.text_metadata["caption"].tolist() == stored["caption"]


def test_imported_vectors_adapt_and_index_like_embedded_ones(stored, tiny_export, tmp_path):
    src = _write_clip_retrieval(tmp_path / "cr", stored)
    emb = import_clip_retrieval(ImportConfig(source=str(src), export=str(tiny_export.out),
                                             out=str(tmp_path / "emb"))).out
    # a fixed warm-up: in 20 steps the loss-settle gate would hold α back until step 16
    a = adapt(AdaptConfig(embeddings=str(emb), out=str(tmp_path / "adapter"), steps=20, batch_size=64,
                          warmup_steps=2, curriculum=CurriculumConfig(settle_tolerance=0.0)), show_progress=False)
    assert a.after["centroid_gap"] < 0.5 * a.before["centroid_gap"]
    runner = CliRunner()
    res = runner.invoke(app, ["adapt-apply", str(emb), "--adapter", str(a.out), "--out", str(tmp_path / "aligned")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["index", str(tmp_path / "aligned"), "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["search", str(tmp_path / "idx"), "--text", stored["caption"][3], "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)[0]["hits"]
    # the query, encoded by the derived export, finds its own stored caption (imported, then re-mapped) first
    assert len(hits) == 3 and hits[0]["caption"] == stored["caption"][3] and hits[0]["score"] > 0.999


def test_vectors_of_another_model_are_refused_naming_the_row(stored, tiny_export, tmp_path):
    rng = np.random.default_rng(0)
    other = stored["text"][rng.permutation(len(stored["text"]))]  # the right shapes, not this export's vectors
    src = _write_clip_retrieval(tmp_path / "cr", stored, text=other)
    with pytest.raises(EmbeddingsError, match=r"text_emb_0\.npy, row \d+: .* cosine .* another model"):
        import_clip_retrieval(ImportConfig(source=str(src), export=str(tiny_export.out), out=str(tmp_path / "emb")))
    assert not (tmp_path / "emb").exists()  # nothing written


def test_bad_clip_retrieval_folders_get_errors_naming_the_file(stored, tiny_export, tmp_path):
    src = _write_clip_retrieval(tmp_path / "cr", stored)
    np.save(src / "text_emb" / "text_emb_1.npy", stored["text"][:10].astype(np.float16))
    with pytest.raises(EmbeddingsError, match=r"text_emb_1\.npy: 10 rows, but .*img_emb_1\.npy holds 80"):
        import_clip_retrieval(ImportConfig(source=str(src), export=str(tiny_export.out), out=str(tmp_path / "e")))
    (src / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(EmbeddingsError, match=r"img_emb_1\.npy: no text_emb/text_emb_1\.npy"):
        import_clip_retrieval(ImportConfig(source=str(src), export=str(tiny_export.out), out=str(tmp_path / "e")))
    res = CliRunner().invoke(app, ["embed-import", str(tmp_path / "nothing"), "--export", str(tiny_export.out)])
    assert res.exit_code != 0 and "img_emb" in res.output


def test_cli_embed_import_says_what_it_did(stored, tiny_export, tmp_path):
    src = _write_clip_retrieval(tmp_path / "cr", stored)
    res = CliRunner().invoke(app, ["embed-import", str(src), "--export", str(tiny_export.out), "--out",
                                   str(tmp_path / "emb"), "--copy"])
    assert res.exit_code == 0, res.output
    assert "200 image-caption pairs in 2 shard(s), vector files copied; export checked on 16 captions" in res.output
    assert not os.path.samefile(src / "img_emb" / "img_emb_0.npy", tmp_path / "emb" / "img_emb" / "img_emb_0000.npy")

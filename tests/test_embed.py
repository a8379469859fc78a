"""`cmalign embed` / `embed-merge`: the embeddings directory, sharding, bad images, float16, the CLI, no torch.

Everything runs the real onnxruntime graphs of the shared tiny export on PNG files a user could have
written, and checks the written files against `ExportedModel` on the same inputs.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import EmbeddingsError, load_embeddings, merge_shards, parse_shard
from cmalign.data.synth import make_scene
from cmalign.errors import ConfigError
from cmalign.export.runtime import ExportedModel

runner = CliRunner()
N_IMAGES = 40
CAPTIONS = 2
# A few images in the modes users' PNGs come in besides RGB: the pipeline must preprocess them exactly as
# `ExportedModel.encode_images` does (resize/crop first, then convert to RGB, as open_clip does); for a palette
# image converting first changes the embedding by ~2e-2.
MODES = {3: "P", 11: "L", 17: "RGBA", 29: "LA"}


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 generated pictures saved as PNG, two captions each: one CSV row per caption (open_clip's layout)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    images, rows = [], []
    for i in range(N_IMAGES):
        scene = make_scene(0, "val", i)
        img = scene.load()
        if i in MODES:
            img = img.convert(MODES[i])
        path = root / "images" / f"scene_{i:03d}.png"
        img.save(path)
        images.append(str(path))
        caps = [f"{scene.colour} {scene.shape} number {i}", f"a picture of {scene.count} {scene.shape}, view {i}"]
        rows.extend((f"images/{path.name}", c, scene.shape) for c in caps)
    return {"root": root, "csv": _write_csv(root / "corpus.csv", rows), "images": images,
            "captions": [r[1] for r in rows], "labels": [r[2] for r in rows]}


def _embed(tiny_export, data, out, **kw):
    return embed_dataset(EmbedConfig(export=str(tiny_export.out), data=str(data), out=str(out), batch_size=8,
                                     workers=3, **kw))


@pytest.fixture(scope="module")
def single(tiny_export, corpus, tmp_path_factory):
    """The whole corpus as one shard (small batches, several decoding threads: any reordering would show)."""
    out = tmp_path_factory.mktemp("single") / "emb"
    return _embed(tiny_export, corpus["csv"], out)


@pytest.fixture(scope="module")
def model(tiny_export):
    return ExportedModel(tiny_export.out)


def test_layout_rows_and_values_match_the_runtime(single, tiny_export, corpus, model):
    out = single.out
    for rel in ("img_emb/img_emb_0000.npy", "text_emb/text_emb_0000.npy", "metadata/metadata_0000.parquet",
                "shards/shard_0000.json", "bad_samples/bad_samples_0000.jsonl", "manifest.json"):
        assert (out / rel).is_file(), rel
    assert single.shard == (0, 1) and single.images == N_IMAGES and single.texts == N_IMAGES * CAPTIONS
    assert single.skipped == [] and (out / "bad_samples/bad_samples_0000.jsonl").read_text() == ""

    manifest = json.loads((out / "manifest.json").read_text())
    assert single.merged == manifest
    assert manifest["kind"] == "cmalign-embeddings" and manifest["num_shards"] == 1
    assert manifest["export_fingerprint"] == tiny_export.manifest["fingerprint"]
    assert manifest["rows"] == {"images": N_IMAGES, "texts": N_IMAGES * CAPTIONS} and manifest["skipped"] == 0
    dim = manifest["embed_dim"]
    assert dim == tiny_export.manifest["embed_dim"] == model.embed_dim

    img = np.load(out / "img_emb/img_emb_0000.npy")
    txt = np.load(out / "text_emb/text_emb_0000.npy")
    assert img.dtype == txt.dtype == np.float32
    assert img.shape == (N_IMAGES, dim) and txt.shape == (N_IMAGES * CAPTIONS, dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)

    meta = pd.read_parquet(out / "metadata/metadata_0000.parquet")
    assert list(meta.columns) == ["modality", "row", "pair_id", "image_path", "caption", "label", "key", "source"]
    assert meta["modality"].tolist() == ["image"] * N_IMAGES + ["text"] * (N_IMAGES * CAPTIONS)
    im, tx = meta[meta.modality == "image"], meta[meta.modality == "text"]
    assert im["row"].tolist() == list(range(N_IMAGES)) and tx["row"].tolist() == list(range(N_IMAGES * CAPTIONS))
    assert im["image_path"].tolist() == corpus["images"]  # in the order of the CSV
    assert im["pair_id"].tolist() == list(range(N_IMAGES))
    assert tx["caption"].tolist() == corpus["captions"] and tx["label"].tolist() == corpus["labels"]
    # Each caption's pair_id is its image's; the captions of image i are CSV rows 2i and 2i+1 (header is line 1).
    assert tx["pair_id"].tolist() == [i for i in range(N_IMAGES) for _ in range(CAPTIONS)]
    by_pair = dict(zip(im["pair_id"], im["image_path"], strict=True))
    assert [by_pair[p] for p in tx["pair_id"]] == tx["image_path"].tolist()
    assert tx["source"].tolist() == [f"{corpus['csv']}:{n}" for n in range(2, 2 + N_IMAGES * CAPTIONS)]

    # The pipeline reorders nothing and preprocesses as the runtime does, whatever the PNG's mode.
    np.testing.assert_allclose(img, model.encode_images(corpus["images"], batch_size=16), atol=1e-5)
    np.testing.assert_allclose(txt, model.encode_texts(corpus["captions"]), atol=1e-5)

    loaded = load_embeddings(out)
    np.testing.assert_array_equal(loaded.image, img)
    np.testing.assert_array_equal(loaded.text, txt)
    assert loaded.image_metadata["image_path"].tolist() == corpus["images"]
    assert loaded.text_metadata["pair_id"].tolist() == tx["pair_id"].tolist()


def test_shards_merge_into_the_single_run(single, tiny_export, corpus, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    first = _embed(tiny_export, corpus["csv"], out, shard="0/3")
    _embed(tiny_export, corpus["csv"], out, shard="2/3")
    assert first.merged is None and not (out / "manifest.json").exists()
    with pytest.raises(EmbeddingsError, match=r"1 of 3 shards missing \(1\)"):
        merge_shards(out)
    with pytest.raises(EmbeddingsError, match="embed-merge"):
        load_embeddings(out)

    last = _embed(tiny_export, corpus["csv"], out, shard="1/3")
    assert last.merged is not None and (out / "manifest.json").is_file()
    assert [s["rows"]["images"] for s in last.merged["shards"]] == [13, 13, 14]
    assert last.merged["rows"] == single.merged["rows"] and last.merged["skipped"] == 0

    merged, whole = load_embeddings(out), load_embeddings(single.out)
    # Batches are composed differently per shard; the graphs give the same rows within float noise.
    np.testing.assert_allclose(merged.image, whole.image, atol=1e-6)
    np.testing.assert_allclose(merged.text, whole.text, atol=1e-6)
    cols = ["pair_id", "image_path", "caption", "label", "key", "source"]
    pd.testing.assert_frame_equal(merged.image_metadata[cols], whole.image_metadata[cols])
    pd.testing.assert_frame_equal(merged.text_metadata[cols], whole.text_metadata[cols])
    # `row` is the row within the shard's own file.
    assert merged.image_metadata["row"].tolist() == [*range(13), *range(13), *range(14)]

    with pytest.raises(FileExistsError, match="already done"):
        _embed(tiny_export, corpus["csv"], out, shard="1/3")
    with pytest.raises(EmbeddingsError, match="shard count"):
        _embed(tiny_export, corpus["csv"], out, shard="1/2")

    # Redoing a shard: the old merged embeddings stay usable, file for file, until the new shard is complete
    # (it is written aside and moved in); a stopped redo leaves nothing behind. tests/drills kill -9 it.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupt(kind, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_dataset(EmbedConfig(export=str(tiny_export.out), data=str(corpus["csv"]), out=str(out), shard="1/3",
                                  overwrite=True), progress=interrupt)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    np.testing.assert_allclose(load_embeddings(out).image, whole.image, atol=1e-6)

    def stop_before_moving_in(*args):
        raise KeyboardInterrupt  # every new file is written (staged) by now

    with monkeypatch.context() as m:
        m.setattr("cmalign.corpus.embed._move_in", stop_before_moving_in)
        with pytest.raises(KeyboardInterrupt):
            _embed(tiny_export, corpus["csv"], out, shard="1/3", overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "the staging directory is removed"
    again = _embed(tiny_export, corpus["csv"], out, shard="1/3", overwrite=True)
    assert again.merged is not None and again.merged["rows"] == single.merged["rows"]
    np.testing.assert_allclose(load_embeddings(out).image, whole.image, atol=1e-6)


@pytest.fixture(scope="module")
def other_export(base_model_dir, tmp_path_factory):
    """A second export with other weights, hence another fingerprint."""
    from cmalign.export.onnx_export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("other") / "export"
    return export_model(ExportConfig(model="cmalign-tiny", out=str(out), retrieval_images=0))


def test_overwrite_replaces_a_shard_made_from_other_data(tiny_export, corpus, tmp_path):
    """--overwrite redoes the shard whatever made it (here: another data set); shards it does not redo must still
    match the new one."""
    out = tmp_path / "emb"
    _embed(tiny_export, corpus["csv"], out)
    embed_dataset(EmbedConfig(export=str(tiny_export.out), data="generated:val:7", out=str(out), overwrite=True))
    e = load_embeddings(out)
    assert len(e.image) == 7 and e.manifest["data"]["path"] == "generated:val:7"
    two = tmp_path / "two"
    _embed(tiny_export, corpus["csv"], two, shard="0/2")
    with pytest.raises(EmbeddingsError, match="its data set differs"):  # shard 0 is not redone: still checked
        embed_dataset(EmbedConfig(export=str(tiny_export.out), data="generated:val:7", out=str(two), shard="1/2",
                                  overwrite=True))


def test_a_shard_of_another_export_is_refused(tiny_export, other_export, corpus, tmp_path):
    assert other_export.manifest["fingerprint"] != tiny_export.manifest["fingerprint"]
    out = tmp_path / "emb"
    _embed(tiny_export, corpus["csv"], out, shard="0/2")
    with pytest.raises(EmbeddingsError, match="its export differs") as err:
        embed_dataset(EmbedConfig(export=str(other_export.out), data=str(corpus["csv"]), out=str(out), shard="1/2"))
    assert str(Path(other_export.out).resolve()) in str(err.value)
    assert str(Path(tiny_export.out).resolve()) in str(err.value)
    assert not (out / "shards/shard_0001.json").exists() and not (out / "img_emb/img_emb_0001.npy").exists()


@pytest.mark.parametrize("spec", ["3/3", "-1/2", "a/b", "0/0", "1", "", "1/2/3"])
def test_parse_shard_rejects(spec):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(spec)


def test_parse_shard_accepts():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 15 / 16 ") == (15, 16)


def test_bad_images_are_skipped_and_listed(tiny_export, corpus, model, tmp_path):
    good = corpus["images"][:10]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really an image" * 20)
    truncated = Path(good[5]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[:len(truncated) // 2])
    rows = [(good[0], "first good", "a"), (str(tmp_path / "missing.png"), "lost image", "b"),
            (good[1], "second good", "a"), (str(tmp_path / "corrupt.png"), "corrupt one", "c"),
            (str(tmp_path / "corrupt.png"), "corrupt two", "c"), (good[2], "third good", "a"),
            (str(tmp_path / "truncated.png"), "half a file", "d"), *[(g, f"good {g}", "e") for g in good[3:]]]
    data = _write_csv(tmp_path / "data.csv", rows)
    src = {n: f"{data}:{n + 2}" for n in range(len(rows))}  # CSV row n is on line n + 2

    result = _embed(tiny_export, data, tmp_path / "emb")
    assert result.images == len(good) and result.texts == len(good)
    bad = [json.loads(x) for x in (tmp_path / "emb/bad_samples/bad_samples_0000.jsonl").read_text().splitlines()]
    assert [b.to_dict() for b in result.skipped] == bad
    by_source = {}
    for b in bad:
        by_source.setdefault(b["source"], []).append(b)
    assert set(by_source) == {src[1], src[3], src[4], src[6]}
    assert [b["field"] for b in by_source[src[1]]] == ["image"] and "not found" in by_source[src[1]][0]["reason"]
    assert [b["field"] for b in by_source[src[3]]] == ["image", "caption"]  # decoder failure, then its captions
    assert [b["field"] for b in by_source[src[4]]] == ["caption"]
    assert [b["field"] for b in by_source[src[6]]] == ["image", "caption"]
    assert json.loads((tmp_path / "emb/manifest.json").read_text())["skipped"] == len(bad) == 6

    emb = load_embeddings(tmp_path / "emb")
    assert emb.image_metadata["image_path"].tolist() == good
    assert "corrupt one" not in emb.text_metadata["caption"].tolist()
    assert emb.text_metadata["caption"].tolist() == [r[1] for r in rows if r[0] in good]
    np.testing.assert_allclose(emb.image, model.encode_images(good), atol=1e-5)
    np.testing.assert_allclose(emb.text, model.encode_texts(emb.text_metadata["caption"].tolist()), atol=1e-5)
    # pair ids still link each kept caption to its image
    by_pair = dict(zip(emb.image_metadata["pair_id"], emb.image_metadata["image_path"], strict=True))
    assert [by_pair[p] for p in emb.text_metadata["pair_id"]] == emb.text_metadata["image_path"].tolist()

    # Sharded, every bad sample is listed (and counted) once: reader skips in shard 0, decoder skips where met.
    res = [runner.invoke(app, ["embed", str(tiny_export.out), "--data", str(data), "--out", str(tmp_path / "two"),
                               "--shard", s, "--batch-size", "4"]) for s in ("0/2", "1/2")]
    assert [r.exit_code for r in res] == [0, 0], [r.output for r in res]
    assert "skipped samples are listed in" in res[0].output and "merged 2 shard(s)" in res[1].output
    lines = [json.loads(x) for s in (0, 1)
             for x in (tmp_path / f"two/bad_samples/bad_samples_{s:04d}.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, lines)) == sorted(map(json.dumps, bad))
    assert json.loads((tmp_path / "two/manifest.json").read_text())["skipped"] == 6


def test_float16_halves_the_files(single, tiny_export, corpus, tmp_path):
    half = _embed(tiny_export, corpus["csv"], tmp_path / "emb", dtype="float16")
    for rel in ("img_emb/img_emb_0000.npy", "text_emb/text_emb_0000.npy"):
        a32, a16 = np.load(single.out / rel), np.load(half.out / rel)
        assert a16.dtype == np.float16 and a16.shape == a32.shape
        np.testing.assert_allclose(a16.astype(np.float32), a32, atol=2e-3)
        header = 128  # .npy header of a 2-D array
        assert (half.out / rel).stat().st_size - header == ((single.out / rel).stat().st_size - header) // 2
    loaded = load_embeddings(half.out)
    assert loaded.manifest["dtype"] == "float16" and loaded.image.dtype == np.float16
    with pytest.raises(ValueError, match="dtype"):
        _embed(tiny_export, corpus["csv"], tmp_path / "x", dtype="int8")


def test_cli_embed_and_merge(tiny_export, corpus, tmp_path):
    out = tmp_path / "emb"
    res = runner.invoke(app, ["embed", str(tiny_export.out), "--data", str(corpus["csv"]), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output == ""
    assert json.loads((out / "manifest.json").read_text())["rows"]["images"] == N_IMAGES

    res = runner.invoke(app, ["embed", str(tiny_export.out), "--data", str(corpus["csv"]), "--out", str(out), "-q"])
    assert res.exit_code == 2 and "error:" in res.output and "--overwrite" in res.output

    res = runner.invoke(app, ["embed", str(tiny_export.out), "--data", str(corpus["csv"]), "--out",
                              str(tmp_path / "bad"), "--shard", "5/2"])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "5/2" in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)

    missing = tmp_path / "[old]" / "no[" / "such]"  # text, not rich markup: "[old]" must stay, "[/such]" not raise
    res = runner.invoke(app, ["embed", str(missing), "--data", str(corpus["csv"]), "--out", str(tmp_path / "e2")])
    assert res.exit_code == 2, res.output
    assert "export directory not found" in res.output and str(missing) in res.output
    assert "Traceback" not in res.output and not (tmp_path / "e2").exists()

    part = tmp_path / "part"
    res = runner.invoke(app, ["embed", str(tiny_export.out), "--data", str(corpus["csv"]), "--out", str(part),
                              "--shard", "1/4"])
    assert res.exit_code == 0, res.output
    assert "not merged yet" in res.output and "embed-merge" in res.output
    res = runner.invoke(app, ["embed-merge", str(part)])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert "3 of 4 shards missing (0, 2, 3)" in res.output

    res = runner.invoke(app, ["embed-merge", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no shards found" in res.output

    (out / "manifest.json").unlink()
    res = runner.invoke(app, ["embed-merge", str(out)])
    assert res.exit_code == 0, res.output
    assert "merged 1 shard(s)" in res.output and load_embeddings(out).image.shape[0] == N_IMAGES


def test_load_embeddings_needs_the_merge(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(EmbeddingsError, match=r"manifest.json: missing; it holds no shards"):
        load_embeddings(tmp_path)
    (tmp_path / "shards" / "shard_0000.json").write_text("{}")
    with pytest.raises(EmbeddingsError, match=r"manifest.json: missing; run `cmalign embed-merge "):
        load_embeddings(tmp_path)
    with pytest.raises(EmbeddingsError, match=r"embeddings directory not found"):
        load_embeddings(tmp_path / "nope")


TORCH_FREE = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now fails
    from cmalign.corpus.embed import EmbedConfig, embed_dataset

    export, data, out = sys.argv[1:4]
    result = embed_dataset(EmbedConfig(export=export, data=data, out=out, batch_size=16))
    assert result.merged is not None, result
    heavy = sorted(m for m in ("torch", "torchvision", "open_clip", "onnx") if sys.modules.get(m) is not None)
    print("OK", result.images, result.texts, heavy)
""")


def test_embed_runs_without_torch(tiny_export, corpus, single, tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tiny_export.out), str(corpus["csv"]), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == f"OK {N_IMAGES} {N_IMAGES * CAPTIONS} []"
    np.testing.assert_array_equal(load_embeddings(out).text, load_embeddings(single.out).text)
    assert pq.read_table(out / "metadata/metadata_0000.parquet").num_rows == N_IMAGES * (1 + CAPTIONS)


def test_generated_corpus_of_a_given_size(tiny_export):
    """generated:SPLIT:N reads N scenes (5 captions each) for load tests; a size that is not a count is refused."""
    from cmalign.corpus.embed import read_corpus

    pairs, skipped, desc = read_corpus(EmbedConfig(export=str(tiny_export), data="generated:test:7"))
    assert len(pairs) == 7 and desc["texts"] == 35 and not skipped
    assert pairs[-1].image.key == "synth/0/test/000006"
    for bad in ("generated:test:0", "generated:test:ten", "generated:test:-3"):
        with pytest.raises(ConfigError, match="whole number of images"):
            read_corpus(EmbedConfig(export=str(tiny_export), data=bad))

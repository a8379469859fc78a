"""Fuzz drill: the loaders of every artifact's self-description — manifest.json of exports, indexes, embeddings
directories and runs, the export's preprocess.json and tokenizer.json — fed damaged files: arbitrary bytes, JSON
of the wrong shape, fields missing or of the wrong type.

Property: the artifact loads and works, or a documented error (a CmalignError naming the file) comes back; never a
KeyError, TypeError or AttributeError from deep inside, never a hang. Profiles and the hang guard:
tests/helpers/fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers.fuzz import check_documented, examples, json_file_bytes, mostly, no_hang, write_embeddings
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image

from cmalign.artifacts.manifests import json_object_or_none, read_json_object, read_manifest_file
from cmalign.artifacts.sources import EXPORT, MODEL, RUN, SourceError, resolve_source
from cmalign.corpus.store import EmbeddingsError, load_embeddings, merge_shards, read_merged_manifest
from cmalign.errors import CmalignError
from cmalign.export.manifest import ExportFormatError, fingerprint, read_manifest
from cmalign.export.preprocess import ImagePreprocessor
from cmalign.export.runtime import ExportedModel
from cmalign.export.tokenizer import ClipTokenizer
from cmalign.index import IndexConfig, JointIndex, add_to_index, build_index
from cmalign.index.directory import read_index_manifest, verify_checksums
from cmalign.index.errors import IndexFormatError


def outcome(e: BaseException | None) -> None:
    event("loaded" if e is None else f"error: {type(e).__name__}")


def attempt(fn, names: Path | str, *expected: type[BaseException]):
    """``fn()``'s result, or None after a documented error naming ``names``."""
    try:
        with no_hang():
            result = fn()
    except CmalignError as e:
        outcome(e)
        check_documented(e, *expected, names=str(names))
        return None
    outcome(None)
    return result


# -- plain JSON objects and manifests ---------------------------------------------------------------------------

MANIFEST_TEMPLATE = {"kind": "cmalign-index", "format_version": 1, "files": {"index": "index.faiss"}}


@examples(1.0)
@given(data=json_file_bytes(MANIFEST_TEMPLATE))
@example(data=b'{"kind": "cmalign-index", "format_version": "2"}').via("a string version (fixed)")
@example(data=b'{"kind": "cmalign-index", "format_version": null}').via("a null version (fixed)")
@example(data=b"[" * 100000).via("nesting past the recursion limit (fixed)")
def test_json_object_readers(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_bytes(data)
        obj = attempt(lambda: read_json_object(path, SourceError), path, SourceError)
        assert obj is None or isinstance(obj, dict)
        with no_hang():
            assert json_object_or_none(path) == obj or obj is None and json_object_or_none(path) is None
        m = attempt(lambda: read_manifest_file(path, "cmalign-index", IndexFormatError, "hint", 1), path,
                    IndexFormatError)
        assert m is None or (m["kind"] == "cmalign-index" and m.get("format_version", 0) <= 1)


def test_manifest_versions_of_the_wrong_type_are_named(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    for version in ('"2"', "null", "[1]", "true", "1.5"):
        path.write_text(f'{{"kind": "cmalign-index", "format_version": {version}}}')
        with pytest.raises(IndexFormatError, match=r"manifest\.json, field 'format_version': expected"):
            read_manifest_file(path, "cmalign-index", IndexFormatError, max_version=1)
    path.write_text("[" * 100000)
    with pytest.raises(IndexFormatError, match=r"manifest\.json: not valid JSON"):
        read_manifest_file(path, "cmalign-index", IndexFormatError, max_version=1)
    assert json_object_or_none(path) is None


# -- the export: manifest.json, preprocess.json, tokenizer/tokenizer.json -------------------------------------


@pytest.fixture(scope="module")
def export_dir(tiny_export) -> Path:
    return Path(tiny_export.out)


def linked_export(src: Path, dst: Path, skip: set[str]) -> None:
    """``dst`` mirrors the export ``src`` by symbolic links (the graphs are MBs), except the files in ``skip``."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif str(rel) not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, dst / rel)


EXPORT_FILES = ("manifest.json", "preprocess.json", "tokenizer/tokenizer.json")


@examples(0.2)
@given(data=st.data(), which=st.sampled_from(EXPORT_FILES))
def test_export_files_damaged(export_dir: Path, data, which: str) -> None:
    template = json.loads((export_dir / which).read_text())
    raw = data.draw(json_file_bytes(template), label=which)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "export"
        linked_export(export_dir, d, {which})
        (d / which).write_bytes(raw)
        m = attempt(lambda: read_manifest(d), d, ExportFormatError)
        if m is not None:
            assert isinstance(m["graphs"], dict) and isinstance(m["fingerprint"], str)
            assert len(fingerprint(d)) == 16  # every fingerprinted file is there (only its content is damaged)
        model = attempt(lambda: ExportedModel(d), d)
        if model is not None:
            with no_hang():
                emb = model.encode_texts(["a photo of a red circle", ""])
            assert emb.shape == (2, model.embed_dim) and np.isfinite(emb).all()


@pytest.mark.parametrize("change, match", [
    ({"embed_dim": 64}, r"field 'embed_dim': 64, but the image graph outputs vectors of dim 128"),  # loaded silently
    ({"graphs": {"fp32": "image_encoder.onnx"}}, r"field 'graphs\.fp32': expected an object"),  # TypeError
    ({"graphs": {"fp32": {"image": {"file": "../../x.onnx"}, "text": {}}}}, r"field 'graphs\.fp32\.image\.file'"),
    ({"embed_dim": "128"}, r"field 'embed_dim': expected a positive integer"),  # int("128") passed, "x" leaked
])
def test_export_manifest_fields_are_checked(export_dir: Path, tmp_path: Path, change: dict, match: str) -> None:
    d = tmp_path / "export"
    linked_export(export_dir, d, {"manifest.json"})
    (d / "manifest.json").write_text(json.dumps(json.loads((export_dir / "manifest.json").read_text()) | change))
    with pytest.raises(ExportFormatError, match=match):
        ExportedModel(d)


@pytest.fixture(scope="module")
def vocab_file(export_dir: Path) -> Path:
    return next((export_dir / "tokenizer").glob("*.gz"))


TOKENIZER_VOCAB_DAMAGE = st.sampled_from(["none", "truncated", "flipped", "not-gzip", "gzip-of-garbage", "missing"])


@examples(0.25)
@given(data=st.data(), damage=mostly(st.just("none"), TOKENIZER_VOCAB_DAMAGE, one_in=2), keep_hash=st.booleans())
def test_tokenizer_dir_damaged(export_dir: Path, vocab_file: Path, data, damage: str, keep_hash: bool) -> None:
    import gzip

    template = json.loads((export_dir / "tokenizer" / "tokenizer.json").read_text())
    if not keep_hash:
        template.pop("vocab_sha256")
    raw = data.draw(mostly(st.just(json.dumps(template).encode()), json_file_bytes(template), one_in=2),
                    label="tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "tokenizer.json").write_bytes(raw)
        vocab = vocab_file.read_bytes()
        if damage == "truncated":
            vocab = vocab[: len(vocab) // 3]
        elif damage == "flipped":
            at = len(vocab) // 2
            vocab = vocab[:at] + bytes(b ^ 0xFF for b in vocab[at:at + 64]) + vocab[at + 64:]
        elif damage == "not-gzip":
            vocab = b"plain text\n" * 10
        elif damage == "gzip-of-garbage":
            vocab = gzip.compress(b"\xff\xfe version\nab cd\nx\n" + bytes(range(256)))
        if damage != "missing":
            (d / vocab_file.name).write_bytes(vocab)
        tok = attempt(lambda: ClipTokenizer.from_dir(d), d / "tokenizer.json")
        if tok is not None:
            ids = tok(["a cat", ""])
            assert ids.shape == (2, tok.context_length) and ids.dtype == np.int64


PREPROCESS_TEMPLATE = {"size": [32, 32], "mode": "RGB", "mean": [0.48, 0.45, 0.4], "std": [0.26, 0.26, 0.27],
                       "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


@examples(1.0)
@given(raw=mostly(st.just(json.dumps(PREPROCESS_TEMPLATE).encode()), json_file_bytes(PREPROCESS_TEMPLATE), one_in=2)
       | st.sampled_from([{**PREPROCESS_TEMPLATE, "size": 5, "resize_mode": m, "fill_color": f}
                          for m in ("shortest", "longest", "squash") for f in (0, [1, 2, 3], 255.5)]).map(
           lambda d: json.dumps(d).encode()), image_mode=st.sampled_from(["RGB", "L", "P", "RGBA", "I;16", "F"]))
@example(raw=b'{"size": [32, 32], "mode": "RGB", "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bicubic", '
             b'"resize_mode": "longest", "fill_color": [1, 2]}', image_mode="RGB")
def test_preprocess_json_damaged(raw: bytes, image_mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preprocess.json"
        path.write_bytes(raw)
        pre = attempt(lambda: ImagePreprocessor.from_file(path), path)
        if pre is not None and pre.height * pre.width <= 512 * 512:
            # a config can only be judged against an image (fill_color against its bands): a ConfigError then
            out = attempt(lambda: pre(Image.new(image_mode, (7, 5))), "fill_color")
            assert out is None or (out.shape == (3, pre.height, pre.width) and out.dtype == np.float32)


# -- the index directory ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A tiny corpus (40 images, 120 captions, dim 8) embedded in two parts, indexed from the first."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fuzz-index")
    write_embeddings(root / "emb", rng.standard_normal((40, 8)), rng.standard_normal((120, 8)),
                     np.repeat(np.arange(40), 3), num_shards=2)
    write_embeddings(root / "emb2", rng.standard_normal((8, 8)), rng.standard_normal((16, 8)),
                     np.repeat(np.arange(8), 2))
    build_index(IndexConfig(embeddings=str(root / "emb"), out=str(root / "idx")))
    return {"emb": root / "emb", "emb2": root / "emb2", "idx": root / "idx"}


INDEX_DAMAGE = st.sampled_from(["manifest", "manifest", "manifest", "index-truncated", "ids-not-parquet",
                                "ids-other-table"])


def damaged_index(corpus: dict[str, Path], tmp: Path, damage: str, raw: bytes) -> Path:
    d = tmp / "idx"
    shutil.copytree(corpus["idx"], d)
    if damage == "manifest":
        (d / "manifest.json").write_bytes(raw)
        return d
    m = json.loads((d / "manifest.json").read_text())
    m.pop("checksums")  # the checksums would catch any change to the files: these damages are past them
    (d / "manifest.json").write_text(json.dumps(m))
    if damage == "index-truncated":
        data = (d / "index.faiss").read_bytes()
        (d / "index.faiss").write_bytes(data[: len(data) // 2])
    elif damage == "ids-not-parquet":
        (d / "ids.parquet").write_bytes(b"PAR1 not really")
    else:
        import pandas as pd

        pd.DataFrame({"x": np.arange(160)}).to_parquet(d / "ids.parquet")
    return d


@examples(0.5)
@given(data=st.data(), damage=INDEX_DAMAGE)
def test_index_directory_damaged(corpus: dict[str, Path], data, damage: str) -> None:
    template = json.loads((corpus["idx"] / "manifest.json").read_text())
    raw = data.draw(json_file_bytes(template), label="manifest.json") if damage == "manifest" else b""
    with tempfile.TemporaryDirectory() as tmp:
        d = damaged_index(corpus, Path(tmp), damage, raw)
        m = attempt(lambda: read_index_manifest(d), d, IndexFormatError)
        if m is not None:
            attempt(lambda: verify_checksums(d, m), d, IndexFormatError)
        index = attempt(lambda: JointIndex(d), d)
        if index is not None:
            q = np.random.default_rng(1).standard_normal((2, index.dim)).astype(np.float32)
            for modality in ("any", "image", "text"):
                with no_hang():
                    scores, ids = index.search(q, 5, modality)
                assert ids.shape == (2, 5) and (ids >= 0).all()
                hits = index.hits(scores, ids)
                assert all(h.modality == modality for row in hits for h in row) or modality == "any"


def _edit(path: Path, change: dict, drop: tuple[str, ...] = ()) -> None:
    m = json.loads(path.read_text()) | change
    for key in drop:
        m.pop(key)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("change, drop, match", [
    ({"files": None}, (), r"field 'files': expected an object"),  # TypeError
    ({}, ("files",), r"field 'files' is missing"),  # KeyError
    ({"files": {"index": "../idx/index.faiss", "ids": "ids.parquet"}}, (), r"field 'files\.index': expected a file"),
    ({"dim": 16}, (), r"field 'dim': 16, but index\.faiss holds vectors of dim 8"),  # loaded; the search failed
    ({"dim": None}, (), r"field 'dim': expected a positive integer"),  # TypeError
    ({"export": {"path": None}}, (), r"field 'export\.fingerprint' is missing"),  # KeyError on .fingerprint
    ({"search_params": {"nprobe": 4}}, (), r"field 'search_params': .* do not apply to a Flat index"),  # RuntimeError
    ({"search_params": {"nprobe": 0}}, (), r"field 'search_params\.nprobe': expected"),
    ({"checksums": {"index.faiss": 5}}, (), r"field 'checksums\.index\.faiss': expected"),  # TypeError
    ({"format_version": "1"}, (), r"field 'format_version': expected an integer"),  # TypeError
])
def test_index_manifest_fields_are_checked(corpus, tmp_path: Path, change: dict, drop: tuple, match: str) -> None:
    d = tmp_path / "idx"
    shutil.copytree(corpus["idx"], d)
    _edit(d / "manifest.json", change, drop)
    with pytest.raises(IndexFormatError, match=match):
        JointIndex(d)


def test_an_id_table_of_other_columns_is_named(corpus, tmp_path: Path) -> None:
    import pandas as pd

    d = damaged_index(corpus, tmp_path, "ids-other-table", b"")
    assert pd.read_parquet(d / "ids.parquet").columns.tolist() == ["x"]
    with pytest.raises(IndexFormatError, match=r"ids\.parquet: not an id table \(columns modality, .* missing\)"):
        JointIndex(d)  # was KeyError: 'modality'


@pytest.mark.parametrize("change, drop, match", [
    ({"parts": "x"}, (), r"field 'parts': expected a list"),  # TypeError
    ({"parts": [{"part": 0}]}, (), r"field 'parts\[0\]\.embeddings' is missing"),  # KeyError
    ({}, ("recall",), r"field 'recall' is missing"),  # KeyError
    ({"settings": {"seed": "0"}}, (), r"field 'settings\.seed': expected an integer"),  # TypeError on seed + part
])
def test_index_add_checks_the_manifest(corpus, tmp_path: Path, change: dict, drop: tuple, match: str) -> None:
    d = tmp_path / "idx"
    shutil.copytree(corpus["idx"], d)
    _edit(d / "manifest.json", change, drop)
    with pytest.raises(IndexFormatError, match=match):
        add_to_index(d, corpus["emb2"])


@pytest.mark.parametrize("which, raw, match", [
    ("shards/shard_0001.json", b"{", r"shard_0001\.json: not valid JSON"),  # JSONDecodeError
    ("shards/shard_0001.json", b'{"num_shards": "2"}', r"shard_0001\.json, field 'num_shards': expected"),  # KeyError
    ("manifest.json", b'{"kind": "cmalign-embeddings", "num_shards": null, "embed_dim": 8}',
     r"manifest\.json, field 'num_shards': expected a positive integer"),  # TypeError in int(None)
    ("manifest.json", b'{"kind": "cmalign-embeddings", "format_version": [1]}',
     r"manifest\.json, field 'format_version': expected an integer"),  # TypeError in >
])
def test_embeddings_manifest_fields_are_checked(corpus, tmp_path: Path, which: str, raw: bytes, match: str) -> None:
    d = tmp_path / "emb"
    shutil.copytree(corpus["emb"], d)
    (d / which).write_bytes(raw)
    with pytest.raises(EmbeddingsError, match=match):
        merge_shards(d) if which.startswith("shards/") else load_embeddings(d)


@examples(0.1)
@given(data=st.data())
def test_index_add_with_a_damaged_manifest(corpus: dict[str, Path], data) -> None:
    template = json.loads((corpus["idx"] / "manifest.json").read_text())
    raw = data.draw(json_file_bytes(template), label="manifest.json")
    with tempfile.TemporaryDirectory() as tmp:
        d = damaged_index(corpus, Path(tmp), "manifest", raw)
        result = attempt(lambda: add_to_index(d, corpus["emb2"]), d)
        if result is not None:
            assert len(JointIndex(d)) == 160 + 24


# -- embeddings directories ---------------------------------------------------------------------------------------

EMB_FILES = ("manifest.json", "shards/shard_0000.json", "shards/shard_0001.json")


@examples(0.5)
@given(data=st.data(), which=st.sampled_from(EMB_FILES), remerge=st.booleans())
def test_embeddings_manifests_damaged(corpus: dict[str, Path], data, which: str, remerge: bool) -> None:
    template = json.loads((corpus["emb"] / which).read_text())
    raw = data.draw(json_file_bytes(template), label=which)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "emb"
        shutil.copytree(corpus["emb"], d)
        (d / which).write_bytes(raw)
        if remerge:  # `cmalign embed-merge` reads every shard's manifest
            attempt(lambda: merge_shards(d), d, EmbeddingsError)
        m = attempt(lambda: read_merged_manifest(d), d, EmbeddingsError)
        e = attempt(lambda: load_embeddings(d), d, EmbeddingsError)
        if e is not None:
            assert m is not None and e.image.shape[1] == e.text.shape[1] == int(e.manifest["embed_dim"])
            assert len(e.image_metadata) == len(e.image) and len(e.text_metadata) == len(e.text)


# -- "which artifact is this directory?" -----------------------------------------------------------------------

RUN_MANIFEST = {"kind": "cmalign-run", "format_version": 1, "config_hash": "abc", "steps": 10}
EXPORT_MANIFEST = {"kind": "cmalign-export", "format_version": 1, "fingerprint": "f", "graphs": {}, "embed_dim": 8}
MODEL_CONFIG = {"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {}, "cmalign": {"alpha_target": 0.5}}


@examples(1.0)
@given(manifest=st.none() | json_file_bytes(RUN_MANIFEST) | json_file_bytes(EXPORT_MANIFEST),
       model_config=st.none() | json_file_bytes(MODEL_CONFIG), run_model=st.booleans())
def test_resolve_source_on_damaged_directories(manifest, model_config, run_model) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "thing"
        d.mkdir()
        if manifest is not None:
            (d / "manifest.json").write_bytes(manifest)
        if model_config is not None:
            (d / "open_clip_config.json").write_bytes(model_config)
        if run_model:
            (d / "model").mkdir()
            (d / "model" / "open_clip_config.json").write_bytes(json.dumps(MODEL_CONFIG).encode())
        source = attempt(lambda: resolve_source(d), d, SourceError)
        if source is not None:
            assert source.kind in (RUN, EXPORT, MODEL) and isinstance(source.manifest, dict)
            if source.kind != EXPORT:
                assert source.open_clip_name.startswith("local-dir:")

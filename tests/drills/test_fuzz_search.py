"""Fuzz drill: searching a joint index with arbitrary arguments — k, modality, query vectors and texts, the search
knobs (nprobe, efSearch, k_factor_rf) of the index manifest, and `cmalign search`'s SearchConfig.

Property: results, or a documented error (a CmalignError); and when k is at most what the index holds of the asked
modality, k distinct results of that modality, ranked by score. Never another exception, never a hang, never a
process killed for memory. Four small indexes over one corpus of random vectors embedded "by" the tiny export (so text
queries are encoded for real): Flat, IVF, HNSW and IVF-PQ with a refine stage. Profiles: tests/helpers/fuzz.py.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers.fuzz import check_documented, examples, mostly, no_hang, write_embeddings, wrong_values
from hypothesis import event, example, given
from hypothesis import strategies as st

from cmalign.errors import CmalignError, ConfigError
from cmalign.index import IndexConfig, JointIndex, SearchConfig, Searcher, build_index, search
from cmalign.index.errors import IndexFormatError

FACTORIES = ("Flat", "IVF4,Flat", "HNSW8", "IVF4,PQ16x4fs,RFlat")
N_IMAGES, CAPTIONS_PER_IMAGE = 60, 3
COUNTS = {"any": N_IMAGES * (1 + CAPTIONS_PER_IMAGE), "image": N_IMAGES, "text": N_IMAGES * CAPTIONS_PER_IMAGE}


@pytest.fixture(scope="module")
def indexes(tiny_export, tmp_path_factory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fuzz-search")
    d = int(tiny_export.manifest["embed_dim"])
    write_embeddings(root / "emb", rng.standard_normal((N_IMAGES, d)), rng.standard_normal((COUNTS["text"], d)),
                     np.repeat(np.arange(N_IMAGES), CAPTIONS_PER_IMAGE),
                     fingerprint=tiny_export.manifest["fingerprint"], export=str(tiny_export.out))
    out = {}
    for factory in FACTORIES:
        out[factory] = root / factory.replace(",", "_")
        build_index(IndexConfig(embeddings=str(root / "emb"), out=str(out[factory]), factory=factory, tune_queries=32))
    return out


@pytest.fixture(scope="module")
def loaded(indexes) -> dict[str, JointIndex]:
    return {factory: JointIndex(path) for factory, path in indexes.items()}


@pytest.fixture(scope="module")
def searcher(indexes) -> Searcher:
    return Searcher(indexes["Flat"])


# k as a caller might pass it: good and bad integers, numpy integers, and what is not an integer at all.
good_ks = st.one_of(st.integers(1, 300), st.sampled_from([2**31, 2**40, 2**63 - 1]), st.integers(1, 50).map(np.int64))
bad_ks = st.one_of(st.integers(-3, 0), wrong_values,
                   st.sampled_from([-(2**63), True, 5.0, 2.5, float("nan"), float("inf"), "5", None]))
ks = mostly(good_ks, bad_ks, one_in=3)
modalities = mostly(st.sampled_from(["any", "image", "text"]), st.text(max_size=6) | wrong_values, one_in=3)


def valid(k, modality) -> bool:
    """Arguments a search must answer: an integer k >= 1 and a known modality."""
    return (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 and isinstance(modality, str)
            and modality in COUNTS)


def check_results(scores, ids, k, modality: str, index: JointIndex) -> None:
    """What a caller may rely on: shapes, real ids of the asked modality, k of them when that many exist."""
    n = len(index)
    width = min(k, n)
    assert scores.shape == ids.shape and ids.shape[1] == width, (ids.shape, k)
    want = min(k, COUNTS[modality])
    for s_row, i_row in zip(scores, ids, strict=True):
        found = i_row[i_row >= 0]
        assert len(found) == want, f"{len(found)} of {want} results ({modality}, k={k})"
        assert (i_row[:want] >= 0).all() and (i_row[want:] < 0).all(), "results are not first in the row"
        assert len(set(found.tolist())) == len(found), "an item came back twice"
        assert (found < n).all()
        if modality != "any":
            assert (index.ids["modality"].to_numpy()[found] == modality).all()
        assert np.isfinite(s_row[:want]).all()


@examples(1.0)
@given(factory=st.sampled_from(FACTORIES), k=ks, modality=modalities, nq=st.integers(0, 4))
@example(factory="Flat", k="x", modality="any", nq=1).via("int('x') leaked a ValueError (fixed)")
@example(factory="Flat", k=None, modality="any", nq=1).via("int(None) leaked a TypeError (fixed)")
@example(factory="Flat", k=float("inf"), modality="any", nq=1).via("int(inf) leaked an OverflowError (fixed)")
@example(factory="Flat", k=2**40, modality="text", nq=2).via("allocated 2**40 columns (fixed: cut to the size)")
@example(factory="Flat", k=2.5, modality="any", nq=1).via("silently searched k=2 (fixed: ConfigError)")
def test_vector_search_arguments(loaded, factory: str, k, modality, nq: int) -> None:
    index = loaded[factory]
    queries = np.random.default_rng(nq).standard_normal((nq, index.dim)).astype(np.float32)
    try:
        with no_hang():
            scores, ids = index.search(queries, k, modality)
    except CmalignError as e:
        event(f"error: {type(e).__name__}")
        check_documented(e, ConfigError)
        assert not valid(k, modality), f"valid arguments refused: {e}"
        return
    event("results")
    assert valid(k, modality)
    assert ids.shape[0] == nq
    check_results(scores, ids, int(k), modality, index)
    hits = index.hits(scores, ids)
    for row in hits:
        assert [h.rank for h in row] == list(range(1, len(row) + 1))
        assert all(h.modality == modality for h in row) or modality == "any"
        if factory == "Flat":  # exact: scores come back best first
            assert all(a.score >= b.score - 1e-6 for a, b in zip(row, row[1:], strict=False))


query_arrays = st.one_of(
    st.sampled_from(["nan", "inf", "zero", "wrong-dim", "1-d", "3-d", "strings", "objects", "empty", "float64",
                     "huge", "tiny", "ints"]),
)


@examples(0.5)
@given(kind=query_arrays, factory=st.sampled_from(FACTORIES), modality=st.sampled_from(["any", "image", "text"]))
def test_query_vectors_of_any_shape(loaded, kind: str, factory: str, modality: str) -> None:
    index = loaded[factory]
    d = index.dim
    base = np.random.default_rng(0).standard_normal((2, d))
    q = {"nan": np.where(np.arange(d) == 3, np.nan, base), "inf": np.where(np.arange(d) == 0, np.inf, base),
         "zero": np.zeros((2, d)), "wrong-dim": base[:, :-1], "1-d": base[0], "3-d": base[None], "strings": [["x"] * d],
         "objects": [[None] * d], "empty": np.zeros((0, d)), "float64": base, "huge": base * 1e30,
         "tiny": base * 1e-30, "ints": np.ones((2, d), np.int64)}[kind]
    try:
        with no_hang():
            scores, ids = index.search(q, 5, modality)
    except CmalignError as e:
        event(f"error: {type(e).__name__}")
        check_documented(e, ConfigError)
        assert kind in ("nan", "inf", "zero", "wrong-dim", "3-d", "strings", "objects", "tiny"), e
        return
    event("results")
    assert kind in ("1-d", "empty", "float64", "huge", "ints", "tiny")
    check_results(scores, ids, 5, modality, index)


knob_values = mostly(st.integers(1, 70) | st.sampled_from([1 << 12, 1 << 16]),
                     st.one_of(st.integers(-2, 0), st.sampled_from([2**31 - 1, 2**31, 2**40, (1 << 16) + 1]),
                               wrong_values), one_in=2)


@examples(0.5)
@given(factory=st.sampled_from(FACTORIES), knobs=st.dictionaries(
    mostly(st.sampled_from(["nprobe", "efSearch", "k_factor_rf"]), st.sampled_from(["max_codes", "x", ""])),
    knob_values, max_size=3),
    k=st.sampled_from([1, 5, 60, 240, 1000]), modality=st.sampled_from(["any", "image", "text"]))
@example(factory="IVF4,PQ16x4fs,RFlat", knobs={"nprobe": 0}, k=5, modality="image").via(
    "nprobe 0 with a refine stage: faiss aborts the process (fixed: refused on load)")
@example(factory="IVF4,PQ16x4fs,RFlat", knobs={"nprobe": 2**31 - 1}, k=5, modality="image").via(
    "nprobe 2**31 - 1 with a refine stage: killed for memory (fixed: refused on load)")
@example(factory="IVF4,PQ16x4fs,RFlat", knobs={"k_factor_rf": 2**31 - 1}, k=5, modality="any").via(
    "std::bad_alloc as a MemoryError (fixed: refused on load)")
@example(factory="Flat", knobs={"nprobe": 4}, k=5, modality="any").via("a RuntimeError from faiss (fixed)")
def test_search_knobs_from_the_manifest(indexes, factory: str, knobs: dict, k: int, modality: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "idx"
        shutil.copytree(indexes[factory], d)
        m = json.loads((d / "manifest.json").read_text())
        m["search_params"] = {**m["search_params"], **knobs}
        (d / "manifest.json").write_text(json.dumps(m))
        try:
            with no_hang():
                index = JointIndex(d)
        except CmalignError as e:
            event(f"error: {type(e).__name__}")
            check_documented(e, IndexFormatError, names=str(d / "manifest.json"))
            return
        event("loaded")
        q = np.random.default_rng(k).standard_normal((3, index.dim)).astype(np.float32)
        with no_hang():
            scores, ids = index.search(q, k, modality)
        check_results(scores, ids, k, modality, index)


texts = st.lists(st.text(st.characters(exclude_categories=()), max_size=40)
                 | st.sampled_from(["a red circle", "", "   ", "🐱" * 50, "x" * 5000, "<end_of_text>"]), max_size=4)


@examples(0.5)
@given(queries=texts, k=ks, modality=modalities)
def test_text_queries(searcher, queries: list[str], k, modality) -> None:
    try:
        with no_hang():
            results = searcher.text(queries, k, modality)
    except CmalignError as e:
        event(f"error: {type(e).__name__}")
        check_documented(e, ConfigError)
        assert not valid(k, modality), f"valid arguments refused: {e}"
        return
    event("results")
    assert valid(k, modality) and len(results) == len(queries)
    for hits in results:
        assert len(hits) == min(int(k), COUNTS[modality])
        assert all(math.isfinite(h.score) for h in hits) and len({h.id for h in hits}) == len(hits)
        assert all(h.modality == modality for h in hits) or modality == "any"


@pytest.fixture(scope="module")
def query_images(tmp_path_factory) -> dict[str, str]:
    from PIL import Image

    d = tmp_path_factory.mktemp("query-images")
    Image.new("RGB", (9, 7), (10, 200, 30)).save(d / "good.png")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "empty.jpg").write_bytes(b"")
    return {name: str(d / name) for name in ("good.png", "garbage.png", "empty.jpg")} | {"a directory": str(d)}


@examples(0.05)
@given(text=st.none() | texts, image=st.none() | st.lists(st.sampled_from(
    ["good.png", "good.png", "garbage.png", "empty.jpg", "a directory", "", "missing.png", "\x00"]), max_size=2),
       k=st.sampled_from([1, 10, 10**12, 0, -1]), modality=st.sampled_from(["any", "text", "image", "images"]))
def test_search_config(indexes, query_images, text, image, k: int, modality: str) -> None:
    """`cmalign search` end to end (loads the index and its export each time: few examples)."""
    image = [query_images.get(name, name) for name in image] if image is not None else None
    cfg = SearchConfig(index=str(indexes["Flat"]), text=text, image=image, k=k, modality=modality)
    try:
        with no_hang():
            blocks = search(cfg)
    except CmalignError as e:
        event(f"error: {type(e).__name__}")
        check_documented(e)
        return
    event("results")
    assert len(blocks) == len(text or []) + len(image or [])
    for b in blocks:
        assert len(b["hits"]) == min(k, COUNTS[modality])

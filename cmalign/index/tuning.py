"""Search-time knobs of a FAISS index (nprobe, efSearch, refine k_factor): read, set, widen, and tune for a recall
target, so that an approximate index answers as well as the user asked and the manifest says how well.

Recall is measured against exact inner-product search and is *tie-tolerant*: a returned item counts as a
hit when its exact score reaches the k-th exact score, so duplicates (the same caption twice) cannot lower
it. faiss' ``contrib.evaluation.knn_intersection_measure`` counts id intersections and so penalises ties;
its ``check_ref_knn_with_draws`` asserts instead of measuring — hence this small function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cmalign.index.faiss_backend import import_faiss, unwrap

NPROBE = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Up to 256: at 1M clustered vectors, IVF4096,PQ64x4fs's 4-bit codes put the true top 10 among the first 640
# candidates (k_factor 64) for only ~94 % of them at any nprobe, so the refine stage needs more to reach 0.95.
K_FACTOR = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def get_search_params(index) -> dict:
    """The index's current search knobs, e.g. {'nprobe': 16, 'k_factor_rf': 4}; {} for exact indexes."""
    out = {}
    if (ivf := unwrap(index, "ivf")) is not None:
        out["nprobe"] = int(ivf.nprobe)
    if (hnsw := unwrap(index, "hnsw")) is not None:
        out["efSearch"] = int(hnsw.hnsw.efSearch)
    if (refine := unwrap(index, "refine")) is not None:
        out["k_factor_rf"] = int(refine.k_factor)
    return out


def set_search_params(index, params: dict) -> None:
    faiss = import_faiss()
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def search_parameters(index, selector=None, knobs: dict | None = None):
    """faiss SearchParameters carrying ``selector`` *and* the index's current knobs (or ``knobs``: nprobe,
    efSearch, k_factor_rf values for this search only, leaving the shared index untouched).

    A params object replaces the index's own settings (SearchParametersIVF's nprobe defaults to 1, HNSW's
    efSearch to 16), so the current values are copied in. Returns (params, keep): ``keep`` holds the nested
    SWIG objects, which must outlive the search.
    """
    faiss = import_faiss()
    keep = []
    knobs = knobs or {}

    def build(idx):
        idx = faiss.downcast_index(idx)
        if isinstance(idx, faiss.IndexPreTransform):
            p = faiss.SearchParametersPreTransform(index_params=build(idx.index))
        elif isinstance(idx, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters(k_factor=knobs.get("k_factor_rf", idx.k_factor),
                                                  base_index_params=build(idx.base_index))
        elif isinstance(idx, faiss.IndexIVF):
            p = faiss.SearchParametersIVF(nprobe=knobs.get("nprobe", idx.nprobe), max_codes=idx.max_codes)
        elif isinstance(idx, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW(efSearch=knobs.get("efSearch", idx.hnsw.efSearch))
        else:
            p = faiss.SearchParameters()
        if selector is not None:
            p.sel = selector
        keep.append(p)
        return p

    return build(index), keep


def widen(index, knobs: dict) -> bool:
    """Double the search knobs in ``knobs`` (for one search's parameters only; the index is not touched);
    False once nothing can grow. A filtered search that comes back short widens this way."""
    ivf, hnsw = unwrap(index, "ivf"), unwrap(index, "hnsw")
    grown = False
    if ivf is not None and knobs.get("nprobe", ivf.nlist) < ivf.nlist:
        knobs["nprobe"] = min(ivf.nlist, knobs["nprobe"] * 2)
        grown = True
    if hnsw is not None and knobs.get("efSearch", 4096) < 4096:
        knobs["efSearch"] = min(4096, knobs["efSearch"] * 2)
        grown = True
    return grown


def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(queries, min(k, len(vectors)))


def exact_knn_blocks(blocks, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a corpus given as (position offset, vectors) blocks, one block in memory at a time;
    positions in ``exclude`` are left out."""
    dists, ids = [], []
    for offset, block in blocks:
        positions = np.arange(offset, offset + len(block))
        if exclude is not None and len(exclude):
            keep = ~np.isin(positions, exclude)
            block, positions = block[keep], positions[keep]
        if len(block) == 0:
            continue
        d, i = exact_knn(block, queries, k)
        dists.append(d)
        ids.append(np.where(i >= 0, positions[np.maximum(i, 0)], -1))
    if not dists:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    dist, idx = np.hstack(dists), np.hstack(ids)
    order = np.argsort(-dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def tie_tolerant_hits(gather, queries: np.ndarray, found: np.ndarray, kth_exact: np.ndarray, k: int,
                      tol: float = 1e-5) -> np.ndarray:
    """Per query, how many of the k returned ids (``found``; -1 = none) score at least the k-th exact score.

    ``gather(ids)`` returns the indexed vectors of ``ids``.
    """
    wanted = np.unique(found[found >= 0])
    vectors = dict(zip(wanted.tolist(), gather(wanted), strict=True)) if len(wanted) else {}
    hits = np.zeros(len(queries), np.int64)
    for i in range(len(queries)):
        ids = found[i][found[i] >= 0][:k]
        if len(ids):
            scores = np.stack([vectors[j] for j in ids.tolist()]) @ queries[i]
            hits[i] = min(int(np.sum(scores >= kth_exact[i] - tol)), k)
    return hits


def tie_tolerant_recall(gather, queries: np.ndarray, found: np.ndarray, kth_exact: np.ndarray, k: int,
                        tol: float = 1e-5) -> float:
    """Share of the k returned ids (``found``, per query; -1 = none) whose exact score reaches the k-th exact score."""
    return float(tie_tolerant_hits(gather, queries, found, kth_exact, k, tol).sum()) / (k * len(queries))


# Tuning asks the one-sided 95 % lower bound of the probe's recall (over its queries) to reach the target, not the
# probe's mean: the first setting whose mean crosses the target on one sample of queries reads lower on new ones
# (measured on 1000 fresh queries: 0.954 on the probe, 0.946 on them; HNSW at 1M 0.961 against 0.951). The bound is
# the normal approximation; per-query recalls near 0.95 are skewed to the left, and there it covers ~93 %, not 95 %
# (tests/test_tuning.py measures it).
Z_LOWER = 1.645


def lower_bound(hits: np.ndarray, k: int) -> float:
    """One-sided 95 % lower confidence bound of the mean recall of the queries ``hits`` (per-query hits out of k)."""
    per_query = hits / k
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    return float(per_query.mean() - Z_LOWER * per_query.std(ddof=1) / np.sqrt(len(per_query)))


@dataclass
class RecallProbe:
    """Held-out queries with their exact k-th scores over the rest of the corpus.

    The queries are corpus vectors kept *out* of the index while it is tuned (and added after), so the
    recall is that of queries the index has never seen, as a user's are.
    """

    queries: np.ndarray
    positions: np.ndarray  # corpus positions of the queries
    kth_exact: np.ndarray
    k: int

    @classmethod
    def held_out(cls, blocks, gather, n: int, k: int = 10, n_queries: int = 1000, seed: int = 0,
                 candidates: np.ndarray | None = None) -> RecallProbe | None:
        """``blocks()`` yields (position offset, vectors) over the whole corpus, ``gather(positions)`` reads rows;
        queries are drawn from ``candidates`` (default: all positions). None if the corpus is too small to spare
        any (fewer than 5 vectors)."""
        pool = np.arange(n) if candidates is None else np.asarray(candidates)
        size = min(n_queries, len(pool) // 5)
        if size < 1:
            return None
        positions = np.sort(pool[sample_ids(len(pool), size, seed)])
        queries = np.ascontiguousarray(gather(positions), dtype=np.float32)
        k = min(k, n - size)
        dist, _ = exact_knn_blocks(blocks(), queries, k, exclude=positions)
        return cls(queries, positions, dist[:, k - 1].astype(np.float32), k)

    def measure(self, index, gather, selector=None) -> tuple[float, float, float]:
        """(recall@k, its 95 % lower bound, ms per query) of ``index`` as it is set now; ``gather(ids)`` reads indexed
        vectors by id; ``selector`` (a faiss IDSelector) restricts the search, e.g. to leave the queries' own ids
        out."""
        params, _keep = search_parameters(index, selector) if selector is not None else (None, None)
        t0 = time.perf_counter()
        _, found = index.search(self.queries, self.k, params=params)
        ms = 1000 * (time.perf_counter() - t0) / len(self.queries)
        hits = tie_tolerant_hits(gather, self.queries, found, self.kth_exact, self.k)
        return float(hits.sum()) / (self.k * len(self.queries)), lower_bound(hits, self.k), ms


def sample_ids(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted distinct ids in [0, n), deterministic from the seed."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


@dataclass
class Tuning:
    params: dict
    recall: float
    ms_per_query: float
    reached: bool  # the lower bound reached the target
    target: float
    tried: list[dict] = field(default_factory=list)
    recall_low: float | None = None  # one-sided 95 % lower bound over the probe's queries

    def to_dict(self) -> dict:
        return {"params": self.params, "recall_at_k": round(self.recall, 4),
                "recall_lower_95": None if self.recall_low is None else round(self.recall_low, 4),
                "ms_per_query": round(self.ms_per_query, 4), "target": self.target, "reached": self.reached,
                "reached_means": "the one-sided 95 % lower bound of the recall over the probe's queries reached "
                                 "the target", "tried": self.tried}


def tune(index, probe: RecallProbe, gather, target: float = 0.95, selector=None) -> Tuning:
    """Set the cheapest search knobs whose recall@k on ``probe`` reaches ``target`` with 95 % confidence (its lower
    bound over the probe's queries; the best knobs if none does).

    ``gather(ids)`` reads the indexed vectors by index id (for the exact scores of what comes back)."""
    knobs = get_search_params(index)
    tried: list[dict] = []

    def trial(params: dict) -> dict:
        set_search_params(index, params)
        recall, low, ms = probe.measure(index, gather, selector)
        row = {**params, "recall": round(recall, 4), "recall_low": round(low, 4), "ms_per_query": round(ms, 4)}
        tried.append(row)
        return row

    if not knobs:  # exact index: nothing to tune, but measure it so the manifest says what it does
        row = trial({})
        return Tuning({}, row["recall"], row["ms_per_query"], row["recall_low"] >= target, target, tried,
                      row["recall_low"])

    ivf = unwrap(index, "ivf")
    if ivf is not None:
        main_name, main_values = "nprobe", sorted({v for v in NPROBE if v <= ivf.nlist} | {ivf.nlist})
    else:
        main_name, main_values = "efSearch", list(EF_SEARCH)
    k_factors = list(K_FACTOR) if "k_factor_rf" in knobs else [None]
    reaching = []
    for kf in k_factors:
        for v in main_values:
            params = {main_name: v} | ({"k_factor_rf": kf} if kf is not None else {})
            row = trial(params)
            if row["recall_low"] >= target:
                reaching.append(row)
                break
    if reaching:
        best = min(reaching, key=lambda r: r["ms_per_query"])
    else:
        best = max(tried, key=lambda r: (r["recall"], -r["ms_per_query"]))
    params = {k: v for k, v in best.items() if k not in ("recall", "recall_low", "ms_per_query")}
    set_search_params(index, params)
    return Tuning(params, best["recall"], best["ms_per_query"], best["recall_low"] >= target, target, tried,
                  best["recall_low"])


RECALL_PROTOCOL = ("a sample of the corpus held out as queries: kept out of IVF training and out of the index while "
                   "it is tuned, then added last; truth is exact inner-product top-k over the rest; tie-tolerant (a "
                   "hit scores at least the k-th exact score)")


def recall_entry(tuning: Tuning | None, probe: RecallProbe | None) -> dict:
    """The ``recall`` entry of an index manifest: what the tuned knobs measured, and how."""
    if tuning is None or probe is None:
        return {"measured": False, "reason": "corpus too small to hold out tuning queries", "reached": True,
                "protocol": RECALL_PROTOCOL}
    return tuning.to_dict() | {"measured": True, "k": probe.k, "queries": len(probe.positions),
                               "protocol": RECALL_PROTOCOL}

"""Joint-index benchmark: build time, QPS and recall@10 of Flat, HNSW32, IVF-Flat and IVF-PQ + refinement
on clustered 512-d vectors, and what ``--factory auto`` picks.

    .venv/bin/python benchmarks/index_benchmark.py                 # 100k and 1M (about 30 min on 2 cores)
    .venv/bin/python benchmarks/index_benchmark.py --sizes 100000  # quick

The vectors imitate CLIP embeddings rather than points uniform on the sphere: two modality cones (a
shared mean direction plus a per-modality offset, as a modality gap makes), Zipf-sized semantic clusters
with anisotropic (low-rank) spread, L2-normalised. Queries are 1000 held-out draws of the same generator
(texts and images). Each approximate index is tuned the way ``cmalign index`` tunes it (the library's
``tune`` on corpus queries, target recall@10 0.95), then measured on the held-out queries: recall@10
against exact search (tie-tolerant) and QPS of a batch of 1000 queries. Ratios to Flat are measured in
the same run. Results: benchmarks/results/index_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmalign.index.build import fill_and_tune, make_index  # noqa: E402
from cmalign.index.choice import choose_index, estimate_bytes, nlist_for, parse_memory, pq_m  # noqa: E402
from cmalign.index.tuning import RecallProbe, exact_knn, get_search_params, tie_tolerant_recall  # noqa: E402
from cmalign.index.vectors import ArrayVectors  # noqa: E402


def clustered(n: int, d: int, rng: np.random.Generator, clusters: int = 2000, rank: int = 48) -> np.ndarray:
    """Clustered vectors in two modality cones (see the module docstring).

    Scales give cosines like a CLIP's: ~0.75 within a cluster, ~0.4 across clusters of one modality.
    """
    common = rng.standard_normal(d)
    common *= 1.2 / np.linalg.norm(common)
    gap = rng.standard_normal((2, d))
    gap *= 0.45 / np.linalg.norm(gap, axis=1, keepdims=True)
    centers = rng.standard_normal((clusters, d)) * (1.2 / np.sqrt(d))
    sizes = 1.0 / np.arange(1, clusters + 1) ** 0.8
    which = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    modality = rng.integers(0, 2, n)
    out = (common + gap[modality] + centers[which]).astype(np.float32)
    for c in range(clusters):  # a low-rank spread per cluster: points vary along a few semantic directions
        members = np.flatnonzero(which == c)
        if len(members):
            basis = rng.standard_normal((rank, d)).astype(np.float32) / np.sqrt(d * rank)
            out[members] += rng.standard_normal((len(members), rank)).astype(np.float32) @ basis
    out += rng.standard_normal((n, d)).astype(np.float32) * (0.25 / np.sqrt(d))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def qps(index, queries: np.ndarray, k: int = 10, repeats: int = 3) -> tuple[float, np.ndarray]:
    times, found = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, found = index.search(queries, k)
        times.append(time.perf_counter() - t0)
    return len(queries) / float(np.median(times)), found


def run_size(n: int, d: int, seed: int, factories: list[str], budget: int, target: float = 0.95) -> dict:
    rng = np.random.default_rng(seed)
    t0 = time.time()
    data = clustered(n + 1000, d, rng)
    corpus, queries = data[:n], data[n:]
    print(f"[{n:,}] generated in {time.time() - t0:.0f} s", flush=True)
    dist, _ = exact_knn(corpus, queries, 10)
    kth = dist[:, 9]
    vectors = ArrayVectors(corpus)
    probe = RecallProbe.held_out(vectors.blocks, vectors.gather, n, k=10, n_queries=1000, seed=seed + 1)
    auto = choose_index(n, d, budget)
    rows = []
    nlist, m = nlist_for(n), pq_m(d)
    named = {"Flat": "Flat", "HNSW32": "HNSW32", "IVF-Flat": f"IVF{nlist},Flat",
             "IVF-PQ+refine": f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"}
    for name in factories:
        factory = named.get(name, name)
        index = make_index(faiss, factory, d)  # as `cmalign index` builds it
        t0 = time.time()
        if not index.is_trained:
            ivf_train = min(n, 64 * nlist if "IVF" in factory else n)
            index.train(corpus[rng.choice(n, size=max(ivf_train, 39 * nlist), replace=False)])
        train_s = time.time() - t0
        index, order, tuning = fill_and_tune(index, vectors, probe, target)  # as `cmalign index` does
        build_s = time.time() - t0
        tune_s = sum(r["ms_per_query"] for r in tuning.tried) * len(probe.queries) / 1000
        speed, found = qps(index, queries)
        recall = tie_tolerant_recall(lambda ids, order=order: corpus[order[ids]], queries, found, kth, 10)
        row = {"name": name, "factory": factory, "train_s": round(train_s, 1), "build_s": round(build_s, 1),
               "build_note": "build_s includes training and tuning",
               "tune_s": round(tune_s, 1), "params": get_search_params(index), "qps": round(speed, 1),
               "recall_at_10": round(recall, 4), "tuning_recall_corpus_queries": round(tuning.recall, 4),
               "tuning_recall_lower_95": round(tuning.recall_low, 4),
               "memory_estimate_mb": None}
        row["memory_estimate_mb"] = round(estimate_bytes(factory, n, d) / 2**20, 1)
        rows.append(row)
        print(f"[{n:,}] {name:14s} build {build_s:7.1f} s  {row['params']}  QPS {speed:9.1f}  "
              f"recall@10 {recall:.4f}", flush=True)
        del index
    flat = next((r for r in rows if r["name"] == "Flat"), None)
    if flat:
        for r in rows:
            r["qps_vs_flat"] = round(r["qps"] / flat["qps"], 2)
    return {"n": n, "d": d, "auto": {"factory": auto.factory, "reason": auto.reason}, "indexes": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-memory", default="8G", help="memory budget given to the auto choice")
    ap.add_argument("--indexes", default="Flat,HNSW32,IVF-Flat,IVF-PQ+refine")
    ap.add_argument("--recall-target", type=float, default=0.95, help="as `cmalign index --recall-target`")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_benchmark.json"))
    args = ap.parse_args(argv)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "threads": faiss.omp_get_max_threads()},
               "versions": {"faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(["benchmarks/index_benchmark.py", *sys.argv[1:]]),
               "queries": 1000, "k": 10, "recall_target": args.recall_target, "memory_budget": args.max_memory,
               "sizes": []}
    for n in (int(s) for s in args.sizes.split(",")):
        budget = parse_memory(args.max_memory)
        results["sizes"].append(run_size(n, args.dim, args.seed, args.indexes.split(","), budget, args.recall_target))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for size in results["sizes"]:
        print(f"\nn = {size['n']:,}, d = {size['d']}; auto picks {size['auto']['factory']} ({size['auto']['reason']})")
        print(f"{'index':14s} {'build s':>8s} {'QPS':>9s} {'x flat':>7s} {'recall@10':>9s}  params")
        for r in size["indexes"]:
            print(f"{r['name']:14s} {r['build_s']:8.1f} {r['qps']:9.1f} {r.get('qps_vs_flat', 0):7.2f} "
                  f"{r['recall_at_10']:9.4f}  {r['params']}")


if __name__ == "__main__":
    main()

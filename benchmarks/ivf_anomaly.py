"""Why IVF-Flat at nprobe 24 was slower than exact search at 100k vectors (index_benchmark: 0.84x Flat's QPS).

    .venv/bin/python benchmarks/ivf_anomaly.py [--n 100000]

On index_benchmark's clustered 512-d vectors, for IVF-Flat at several nlist, each tuned to recall@10 >= 0.95 on
held-out queries: the lists' imbalance factor (faiss' ``invlists.imbalance_factor``), the vectors a query really
scans at the tuned nprobe (against the nprobe/nlist share a balanced index would scan), QPS of a 1000-query batch
with 2 threads and with 1, and the work rate: scanned multiply-adds per second, beside Flat's (a BLAS GEMM over the
whole corpus). Results: benchmarks/results/ivf_anomaly.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index_benchmark import clustered, qps  # noqa: E402

from cmalign.index.tuning import exact_knn, tie_tolerant_recall  # noqa: E402


def scanned_per_query(index, queries: np.ndarray, nprobe: int) -> float:
    """Mean number of vectors in the lists each query probes."""
    _, probed = index.quantizer.search(queries, nprobe)
    sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
    return float(sizes[probed].sum(axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--nlists", default="256,1024,4096")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "ivf_anomaly.json"))
    args = ap.parse_args()
    d, n = 512, args.n
    rng = np.random.default_rng(0)
    data = clustered(n + 1000, d, rng)
    corpus, queries = data[:n], data[n:]
    dist, _ = exact_knn(corpus, queries, 10)
    flat = faiss.IndexFlatIP(d)
    flat.add(corpus)
    flat_qps, _ = qps(flat, queries)
    rows = [{"factory": "Flat", "qps": round(flat_qps, 1), "scanned_per_query": n,
             "gmacs_per_s": round(flat_qps * n * d / 1e9, 1)}]
    print(rows[0], flush=True)
    for nlist in (int(x) for x in args.nlists.split(",")):
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        t0 = time.time()
        index.train(corpus[rng.choice(n, min(n, 256 * nlist), replace=False)])
        index.add(corpus)
        train_s = time.time() - t0
        for nprobe in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256):
            if nprobe > nlist:
                break
            index.nprobe = nprobe
            _, found = index.search(queries, 10)
            recall = tie_tolerant_recall(lambda ids: corpus[ids], queries, found, dist[:, 9], 10)
            if recall >= 0.95:
                break
        q2, _ = qps(index, queries)
        faiss.omp_set_num_threads(1)
        q1, _ = qps(index, queries)
        faiss.omp_set_num_threads(2)
        scanned = scanned_per_query(index, queries, index.nprobe)
        row = {"factory": f"IVF{nlist},Flat", "nprobe": index.nprobe, "recall_at_10": round(recall, 4),
               "imbalance_factor": round(index.invlists.imbalance_factor(), 2),
               "scanned_per_query": round(scanned), "balanced_would_scan": round(n * index.nprobe / nlist),
               "qps": round(q2, 1), "qps_1_thread": round(q1, 1), "qps_vs_flat": round(q2 / flat_qps, 2),
               "gmacs_per_s": round(q2 * (scanned + nlist) * d / 1e9, 1), "train_add_s": round(train_s, 1)}
        rows.append(row)
        print(row, flush=True)
    Path(args.result).write_text(json.dumps({"benchmark": "ivf_anomaly", "n": n, "d": d, "rows": rows,
                                             "date": time.strftime("%Y-%m-%d"), "threads": 2}, indent=2) + "\n")


if __name__ == "__main__":
    main()

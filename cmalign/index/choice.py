"""`--factory auto`: pick a FAISS index for a corpus size and a memory budget, the way autofaiss does.

autofaiss's selection (criteo/autofaiss, ``get_optimal_index_keys_v2``) lives inside a package that logs
failures and returns ``(None, None)``, pins old faiss versions and does not normalise; the rule itself is
a few lines, so it is restated here with this project's thresholds (measured in
``benchmarks/index_benchmark.py``):

- up to ``flat_max`` vectors: ``Flat`` — exact, and fast enough at that size;
- up to ``hnsw_max`` vectors, if the graph fits the budget: ``HNSW32`` (no training, highest QPS);
- otherwise, if the raw vectors fit: ``IVF{nlist},Flat`` (bounded build time, exact distances);
- otherwise: ``IVF{nlist},PQ{m}x4fs,Refine(SQ8)`` — 4-bit fast-scan PQ codes re-ranked with 8-bit scalar
  codes, about a quarter of the raw size; without the refinement if even that does not fit.

``nlist`` is the power of two nearest ``4·sqrt(n)`` (faiss' guideline: 4–16·sqrt(n)).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from cmalign.errors import ConfigError
from cmalign.index.errors import IndexChoiceError

FLAT_MAX = 50_000
# At 1M clustered 512-d vectors on 2 cores, HNSW32 gave recall@10 0.951 at 26x Flat's QPS (built in 6 min), IVF-Flat
# 0.964 at only 4.1x (unbalanced lists): HNSW up to 2M, where the build still takes minutes, not hours.
HNSW_MAX = 2_000_000
HNSW_M = 32
# faiss' default efConstruction (40) built graphs that needed efSearch 384-768 for recall@10 0.95 on clustered
# 512-d vectors here; at 128 the same recall took efSearch 16-24 (10x faster queries) for ~5x the build time.
HNSW_EF_CONSTRUCTION = 128


@dataclass
class IndexChoice:
    factory: str
    reason: str
    bytes_estimate: int
    train_size: int  # vectors to train on (0: needs no training)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def parse_memory(text: str | int | None) -> int:
    """'8G', '512M', '2.5GB', 1e9 → bytes; None → half the machine's physical memory."""
    if text is None or text == "auto":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return 4 << 30
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ConfigError(f"memory budget {text!r}: expected a size like 512M, 8G or 1.5GB")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)])


def nlist_for(n: int) -> int:
    """Power of two nearest 4·sqrt(n), and at most n/39 so that k-means has 39 points per centroid."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return max(nlist, 1)


def ivf_train_size(n: int, nlist: int) -> int:
    # faiss warns below 39 points per centroid and gains little above 256 (it subsamples to 256·nlist itself).
    return min(n, max(64 * nlist, 50_000), 256 * nlist)


def pq_m(d: int) -> int:
    """Sub-quantizers for PQ: d/8 rounded down to an even number (fast-scan needs an even count), at least 2."""
    m = max(2, d // 8)
    m -= m % 2
    while d % m:
        m -= 2
    return max(m, 2)


def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Resident size of an index of ``n`` vectors (codes, ids, graph links, centroids); the order of magnitude
    the choice needs, not an exact figure."""
    f = factory.replace(" ", "")
    nlist_m = re.search(r"IVF(\d+)", f)
    centroids = int(nlist_m.group(1)) * d * 4 if nlist_m else 0
    ids = 8 * n if nlist_m else 0
    if f == "Flat":
        per = 4 * d
    elif f.startswith("HNSW"):
        m = int(re.match(r"HNSW(\d+)", f).group(1) or 32)
        per = 4 * d + int(2 * m * 4 * 1.05)  # level-0 links (2M) and a few upper-level ones
    else:
        per = 0
        pq = re.search(r"PQ(\d+)(?:x(\d+))?", f)
        if pq:
            per += int(pq.group(1)) * int(pq.group(2) or 8) // 8
        elif ",Flat" in f:
            per += 4 * d
        elif "SQ8" in f.split("Refine")[0]:
            per += d
        if "Refine(SQ8)" in f:
            per += d
        elif "RFlat" in f or "Refine(Flat)" in f:
            per += 4 * d
    return int(n * per + ids + centroids)


def choose_index(n: int, d: int, memory_budget: int, flat_max: int = FLAT_MAX, hnsw_max: int = HNSW_MAX) -> IndexChoice:
    """The index ``--factory auto`` builds for ``n`` vectors of dimension ``d`` within ``memory_budget`` bytes."""
    if n < 1:
        raise IndexChoiceError("nothing to index: the corpus has no vectors")
    budget = human_bytes(memory_budget)

    def fits(factory):
        return estimate_bytes(factory, n, d) <= memory_budget

    if n <= flat_max and fits("Flat"):
        return IndexChoice("Flat", f"n = {n:,} <= {flat_max:,}: exact search", estimate_bytes("Flat", n, d), 0)
    hnsw = f"HNSW{HNSW_M}"
    if n <= hnsw_max and fits(hnsw):
        return IndexChoice(hnsw, f"{flat_max:,} < n = {n:,} <= {hnsw_max:,} and the graph fits {budget}",
                           estimate_bytes(hnsw, n, d), 0)
    nlist = nlist_for(n)
    train = ivf_train_size(n, nlist)
    ivf_flat = f"IVF{nlist},Flat"
    if fits(ivf_flat):
        why = (f"n = {n:,} > {hnsw_max:,}" if n > hnsw_max else f"HNSW{HNSW_M} does not fit {budget}")
        return IndexChoice(ivf_flat, f"{why}; the raw vectors fit", estimate_bytes(ivf_flat, n, d), train)
    m = pq_m(d)
    for factory in (f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", f"IVF{nlist},PQ{m}x4fs"):
        if fits(factory):
            return IndexChoice(factory, f"the raw vectors ({human_bytes(4 * n * d)}) do not fit {budget}: "
                               "compressed codes" + (" re-ranked with 8-bit codes" if "Refine" in factory else ""),
                               estimate_bytes(factory, n, d), train)
    need = estimate_bytes(f"IVF{nlist},PQ{m}x4fs", n, d)
    raise IndexChoiceError(f"{n:,} vectors of dim {d} need at least {human_bytes(need)} even as IVF-PQ codes; the "
                           f"budget is {budget}. Raise --max-memory, or build on disk (--on-disk) with an IVF factory")

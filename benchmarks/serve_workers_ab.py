"""`serve --workers 1` against `--workers 2`, interleaved: the two start in turn (the order alternating), each
answers text and image queries at concurrency 8 and 32, and the medians of the per-pair ratios decide. One run of
serve_load.py cannot: on this shared machine two runs differ by more than the change.

    .venv/bin/python benchmarks/serve_workers_ab.py /tmp/sl/tiny/idx-fp32 [--pairs 7] [--requests 600]

The index is one serve_load.py prepared (its --work directory). Prints the table; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (its server start and load functions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--requests", type=int, default=600, help="per row and start")
    ap.add_argument("--port", type=int, default=18900)
    args = ap.parse_args()
    bodies = serve_load.query_bodies()
    qps = {(w, k, c): [] for w in (1, 2) for k in bodies for c in (8, 32)}
    port = args.port
    for p in range(args.pairs):
        for workers in ((1, 2) if p % 2 == 0 else (2, 1)):
            proc = serve_load._serve(Path(args.index), port, 32, workers)
            try:
                for kind, body in bodies.items():
                    serve_load._load(port, body, 40, 4)  # warm-up
                    for c in (8, 32):
                        qps[(workers, kind, c)].append(serve_load._load(port, body, args.requests, c)["qps"])
            finally:
                proc.terminate()
                proc.wait(30)
            port += 1  # the last port may linger in TIME_WAIT
        print(f"pair {p}: " + ", ".join(f"w{w} {k} c{c} {v[-1]:.0f}" for (w, k, c), v in qps.items()), flush=True)
    for kind in bodies:
        for c in (8, 32):
            one, two = qps[(1, kind, c)], qps[(2, kind, c)]
            ratios = [b / a for a, b in zip(one, two, strict=True)]
            print(f"{kind} c={c}: --workers 1 {statistics.median(one):.0f} q/s, --workers 2 "
                  f"{statistics.median(two):.0f} q/s, median ratio {statistics.median(ratios):.2f} "
                  f"({sum(r > 1 for r in ratios)} of {len(ratios)} pairs faster)")


if __name__ == "__main__":
    main()

"""What the property-based fuzz drills (tests/drills/test_fuzz_*.py) share: hypothesis profiles, a hang guard,
and the check that an error is a documented one.

Profiles, chosen with the environment variable ``HYPOTHESIS_PROFILE``:

* ``ci`` (the default): 200 examples per property (scaled per property), so the whole fuzz set runs in about
  45 s on a 2-core machine, plus the shared ``tiny_export`` fixture; derandomized, so CI sees the same examples
  every run, and no example database is written into the repository.
* ``long``: ten times the examples (about 30 min), random each run, with hypothesis' example database
  (``.hypothesis/``, git-ignored): for runs by hand, e.g.
  ``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/drills -k fuzz``.
* ``dev``: a handful of examples, for editing the drills themselves.

Each property takes ``max_examples`` from the profile scaled by its own factor (:func:`examples`), so a costly
property (a search that encodes text) runs fewer examples than a cheap one (a JSON line).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
from contextlib import contextmanager

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cmalign.errors import CmalignError

_BASE = {"ci": 200, "long": 2000, "dev": 10}

# No hypothesis deadline: it judges an example after it returns, and a slow moment of a shared CI machine makes it
# fail as "flaky". A hang is what :func:`no_hang` catches instead, inside the example, at HANG_SECONDS.
_COMMON = {"deadline": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
settings.register_profile("ci", max_examples=_BASE["ci"], derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=_BASE["long"], **_COMMON)
settings.register_profile("dev", max_examples=_BASE["dev"], derandomize=True, database=None, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)  # any registered profile (hypothesis' own "default" too); a typo fails collection

# One example may take this long before the guard calls it a hang (the slowest CI example takes about 2 s).
HANG_SECONDS = 30.0


def examples(factor: float) -> settings:
    """The loaded profile with ``max_examples`` scaled by ``factor`` (at least 5)."""
    return settings(settings.default, max_examples=max(5, int(settings.default.max_examples * factor)))


class Hang(AssertionError):
    """An example ran past :data:`HANG_SECONDS`."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    """Fail an example that runs longer than ``seconds`` (SIGALRM: main thread, POSIX; elsewhere a no-op)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_documented(error: BaseException, *expected: type[BaseException], names: str | None = None) -> None:
    """``error`` must be a CmalignError of one of ``expected`` (default: any) whose message names ``names``
    (a file, usually). Anything else is re-raised: it is the bug the drill is looking for."""
    allowed = expected or (CmalignError,)
    if not isinstance(error, CmalignError) or not isinstance(error, allowed):
        raise error
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    if names is not None:
        assert names in message, f"{type(error).__name__} does not name {names!r}: {message}"


# -- generated JSON ---------------------------------------------------------------------------------------------

# JSON of any shape, as json.loads gives it (NaN included: Python's json reads and writes it).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# The values a field of the wrong type most often holds in a hand-edited or damaged file.
wrong_values = st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, -(2**70), 0.5, 1e308, float("nan"),
                                float("inf"), "", "x", "../x", "/abs/x", "a/b", "\x00", [], [1], ["x"], {}, {"a": 1}])


def mostly(good, bad, one_in: int = 5):
    """A strategy: ``good``, except one draw in ``one_in`` from ``bad``. Inputs close enough to valid that they load
    (so what a loader returns gets checked too), with damage often enough to find the crashes."""
    return st.integers(0, one_in - 1).flatmap(lambda i: bad if i == 0 else good)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def mutated(template):
    """A strategy: ``template`` (a JSON document a writer made) with one to three fields deleted or replaced by a
    value of another type (or the whole document replaced)."""

    @st.composite
    def build(draw):
        doc = copy.deepcopy(template)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(list(_paths(doc))))
            value = copy.deepcopy(draw(wrong_values | json_values))  # sampled_from hands out shared objects
            if not path:
                doc = value
                continue
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict) and draw(st.booleans()):
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        return doc

    return build()


def json_file_bytes(template):
    """A strategy: the bytes of a JSON file meant to hold ``template``: mostly mutated, sometimes not JSON at all."""
    return st.one_of(
        mutated(template).map(lambda d: json.dumps(d).encode()),
        mutated(template).map(lambda d: json.dumps(d).encode()),
        mutated(template).map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=200),
        st.sampled_from([b"", b"\xef\xbb\xbf{}", b"{\"kind\": 1" + b"1" * 5000 + b"}", b"[" * 100000, b"\xff\xfe{}",
                         b"{\"a\": NaN}", b"null", json.dumps(template).encode()[:-1]]),
    )


def write_embeddings(out, image, text, text_pair, fingerprint: str = "0123456789abcdef", export: str = "/nowhere",
                     num_shards: int = 1) -> dict:
    """An embeddings directory written with the library's own writers, ``num_shards`` shards of the given rows
    (as tests/test_index.py's ``_write_embeddings``); returns the merged manifest."""
    import numpy as np

    from cmalign.artifacts.atomic import write_json
    from cmalign.corpus.store import merge_shards, save_array, save_metadata, shard_paths

    image, text, text_pair = np.asarray(image), np.asarray(text), np.asarray(text_pair)
    for s in range(num_shards):
        img_rows = np.arange(len(image))[s::num_shards]
        txt_rows = np.flatnonzero(np.isin(text_pair, img_rows))
        p = shard_paths(out, s)
        save_array(p["image"], image[img_rows].astype(np.float32))
        save_array(p["text"], text[txt_rows].astype(np.float32))
        rows = {c: [] for c in ("modality", "row", "pair_id", "image_path", "caption", "label", "key", "source")}
        for modality, pairs in (("image", img_rows), ("text", text_pair[txt_rows])):
            for row, pid in enumerate(pairs):
                for col, v in zip(rows, (modality, row, int(pid), f"img{pid}.png", f"caption {row}", None, str(pid),
                                         "t"), strict=True):
                    rows[col].append(v)
        save_metadata(p["metadata"], rows)
        write_json(p["manifest"], {"export": export, "export_fingerprint": fingerprint, "model": {},
                                   "variant": "fp32", "embed_dim": image.shape[1], "dtype": "float32",
                                   "data": {"path": "x"}, "num_shards": num_shards, "cmalign_version": "test",
                                   "rows": {"images": len(img_rows), "texts": len(txt_rows)}, "skipped": 0,
                                   "seconds": 0})
    return merge_shards(out)

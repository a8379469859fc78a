"""Session fixtures built once per test run, also when pytest-xdist runs the suite in several workers.

Each xdist worker is its own process with its own session, so a plain session fixture would be built once per
worker: two 120-step fits and a full export twice over on a 2-core machine. The first worker that asks builds the
value under a file lock in the run's shared temp directory (the parent of every worker's basetemp, unique to the
run) and leaves it pickled there; the others wait on the lock and read it back. Without xdist it is a plain build.
The pattern is pytest-xdist's documented one ("Making session-scoped fixtures execute only once"); fcntl instead of
the filelock package, as cmalign.model.base does for the base model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
from collections.abc import Callable
from pathlib import Path


@contextlib.contextmanager
def all_cores():
    """torch on every core while a shared fixture is built: the other worker is usually waiting for it, and the
    base model comes out as a serial run (torch's default threads) builds it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]):
    """``build(directory)``'s value, built by one worker of the run and shared with the others."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    root, value_file = shared / f"shared-{name}", shared / f"shared-{name}.pickle"
    with open(shared / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if value_file.is_file():
            return pickle.loads(value_file.read_bytes())
        root.mkdir(exist_ok=True)
        with all_cores():
            value = build(root)
        tmp = value_file.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(value))
        tmp.replace(value_file)
        return value

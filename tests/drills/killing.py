"""Running a `cmalign` command to be killed, and looking at what it left.

A command runs as ``python -m cmalign.cli.main`` in its own process group; :func:`run_cli` sends SIGKILL to
the group after a delay (none: it runs to the end), and can watch a directory to note when the command first
and last changed anything in it. :func:`kill_delays` draws the delays from a seeded generator, from a clean
run's timing: half of them (rounded up) one in each equal slice of the whole run, the others one in each
equal slice of the part where the clean run changed the file system. Most of a short run is imports and
set-up; this way the writing (the work between the first and the last change) is hit in every drill.

``CMALIGN_DRILL_KILLS`` (default 3) is the number of kill points per command form, ``CMALIGN_DRILL_SEED``
(default 0) the seed; every drill prints both and each delay, so a failure can be re-run by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KILLS = int(os.environ.get("CMALIGN_DRILL_KILLS", "3"))
SEED = int(os.environ.get("CMALIGN_DRILL_SEED", "0"))
# One OpenMP thread per command: on a busy machine torch's spinning threads made a tiny fit step take 5 s
# instead of 0.1 s, and a clean run's timing would say little about the next one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Outcome:
    args: list[str]
    pid: int
    returncode: int
    seconds: float
    delay: float | None  # the kill delay asked for (None: not to be killed)
    killed: bool  # SIGKILL was sent before the command ended
    log: str  # its stdout and stderr
    changes: tuple[float, float] | None = None  # when it first and last changed the watched directory (seconds)

    def describe(self) -> str:
        what = f"killed at {self.delay:.2f} s" if self.killed else f"exit {self.returncode} after {self.seconds:.2f} s"
        return f"`cmalign {' '.join(self.args)}` (pid {self.pid}): {what}"


def _tree(root: Path) -> frozenset:
    """(path, mtime, size) of everything under ``root``: changes when anything is created, written or moved."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                found.append((os.path.join(dirpath, name), st.st_mtime_ns, st.st_size))
    return frozenset(found)


class _Watcher(threading.Thread):
    """Polls a directory tree every 10 ms while a command runs; notes the first and last time it changed."""

    def __init__(self, root: Path, t0: float):
        super().__init__(daemon=True)
        self.root, self.t0, self.stop, self.changes = root, t0, threading.Event(), None
        self.state = _tree(root)

    def run(self):
        while not self.stop.wait(0.01):
            self.poll()

    def poll(self):
        state = _tree(self.root)
        if state != self.state:
            now = time.monotonic() - self.t0
            self.changes = (self.changes[0] if self.changes else now, now)
            self.state = state


def run_cli(args: list[str], log_dir: Path, kill_after: float | None = None, timeout: float = 600,
            watch: Path | None = None) -> Outcome:
    """Run ``cmalign ARGS``; with ``kill_after``, SIGKILL its process group after that many seconds; with ``watch``
    (a directory), note when the command first and last changed anything under it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"run-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        watcher = _Watcher(watch, t0) if watch is not None else None
        p = subprocess.Popen([sys.executable, "-m", "cmalign.cli.main", *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, env=ENV)
        if watcher:
            watcher.start()
        killed = False
        try:
            p.wait(timeout=timeout if kill_after is None else kill_after)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise AssertionError(f"`cmalign {' '.join(args)}` took over {timeout} s") from None
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
            p.wait()
        seconds = time.monotonic() - t0
        if watcher:
            watcher.stop.set()
            watcher.join()
            watcher.poll()  # what the last 10 ms changed
    return Outcome(list(args), p.pid, p.returncode, seconds, kill_after, killed, log_path.read_text(),
                   watcher.changes if watcher else None)


def ok(args: list[str], log_dir: Path, watch: Path | None = None) -> Outcome:
    """Run ``cmalign ARGS`` to the end; it must succeed."""
    o = run_cli(args, log_dir, watch=watch)
    assert o.returncode == 0, f"{o.describe()}\n{o.log[-3000:]}"
    return o


def kill_delays(form: str, clean: Outcome, kills: int = KILLS, seed: int = SEED) -> list[float]:
    """``kills`` delays for a form whose uninterrupted run was ``clean``: half (rounded up) in [0, 1.05 × its
    duration), the others between its first and last change of the watched directory; one uniformly in each equal
    slice, from a generator seeded by ``seed`` and the form's name (a string seed hashes the same in every process)."""
    rng = random.Random(f"{seed}/{form}")
    n_writing = kills // 2 if clean.changes else 0
    span = clean.seconds * 1.05  # a little past the end: a command that finishes first must leave a complete artifact
    delays = [span * (i + rng.random()) / (kills - n_writing) for i in range(kills - n_writing)]
    if n_writing:
        first, last = clean.changes
        delays += [first + (last - first) * (i + rng.random()) / n_writing for i in range(n_writing)]
    writing = f", changing files from {clean.changes[0]:.2f} to {clean.changes[1]:.2f} s" if clean.changes else ""
    print(f"drill {form!r}: seed {seed}, clean run {clean.seconds:.2f} s{writing}; "
          f"kill at {', '.join(f'{d:.2f}' for d in sorted(delays))} s")
    return sorted(delays)


def file_hashes(root: Path) -> dict[str, str]:
    """relative path → sha256 of every visible file under ``root`` (names starting with '.' and what is under
    them are left out: the temporary and staging names of atomic writes)."""
    out = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hidden_entries(root: Path) -> list[Path]:
    """Every file or directory under ``root`` (and ``root`` itself) whose name starts with '.'."""
    found = [root] if root.name.startswith(".") else []
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                if name.startswith("."):
                    found.append(Path(dirpath) / name)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return found


def leftovers_of(out: Path) -> list[Path]:
    """What a writer of ``out`` can leave beside it (``.NAME.*``) or in it (hidden names) when killed."""
    beside = sorted(out.parent.glob(f".{out.name}.*"))
    return beside + hidden_entries(out)


def check_leftovers_are_the_killed_ones(out: Path, o: Outcome) -> None:
    """A killed writer may leave hidden temporary or staging entries, but only named after its own pid (so the
    next writer can tell them from a live writer's and remove them)."""
    for path in leftovers_of(out):
        assert str(o.pid) in path.name, f"{o.describe()} left {path}, not named after its pid"


def check_no_leftovers(out: Path, after: str) -> None:
    left = leftovers_of(out)
    assert not left, f"after {after}: leftovers of a killed run remain: {[str(p) for p in left]}"


def check_fresh(out: Path, o: Outcome, load) -> str:
    """After a run that wrote a new ``out`` (killed or not): 'absent' (nothing visible at ``out``) or 'complete'
    (``load(out)`` succeeds); a visible part of an artifact fails the drill."""
    check_leftovers_are_the_killed_ones(out, o)
    visible = sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) if out.parent.is_dir() else []
    assert visible in ([], [out.name]), f"{o.describe()}: unexpected entries beside {out}: {visible}"
    assert o.killed or o.returncode == 0, f"{o.describe()}\n{o.log[-3000:]}"
    if not file_hashes(out):
        assert o.killed, f"{o.describe()} wrote nothing\n{o.log[-3000:]}"
        return "absent"
    try:
        load(out)
    except Exception as e:
        raise AssertionError(f"{o.describe()} left a half-written {out}: {e}\nfiles: {sorted(file_hashes(out))}"
                             ) from e
    return "complete"


def check_replaced_or_intact(out: Path, before: dict[str, str], o: Outcome, load) -> str:
    """After an --overwrite run (killed or not): 'intact' (every file as before, and it still loads) or 'replaced'
    (another artifact, complete: ``load(out)`` succeeds)."""
    check_leftovers_are_the_killed_ones(out, o)
    assert o.killed or o.returncode == 0, f"{o.describe()}\n{o.log[-3000:]}"
    now = file_hashes(out)
    state = "intact" if now == before else "replaced"
    try:
        load(out)
    except Exception as e:
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        raise AssertionError(f"{o.describe()}: {out} is neither the old artifact nor a complete new one ({e}); "
                             f"changed: {changed}") from e
    return state

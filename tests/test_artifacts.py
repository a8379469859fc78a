"""Atomic writes (cmalign.artifacts.atomic): files look as if open() had written them, and a failed write leaves
neither a half file nor a temporary one behind."""

import contextlib
import os
import sys

import pytest

from cmalign.artifacts.atomic import atomic_write


def test_atomic_files_get_normal_permissions(tmp_path):
    """mkstemp makes 0600; a run directory shared with a team must get what the umask allows (0644 here)."""
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.json") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    from cmalign.artifacts.atomic import atomic_dir

    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".idx.{dead}.abcd1234.tmp"
    running = tmp_path / f".idx.{alive}.efgh5678.tmp"  # another writer of ours, still at work
    old = tmp_path / f".idx.old-{dead}"
    for d in (stale, running, old):
        d.mkdir()
    with atomic_dir(tmp_path / "idx") as tmp:
        (tmp / "f").write_text("1")
    assert not stale.exists() and running.exists()
    assert old.exists()  # the swap was killed before: with no idx, this may be the only copy; kept
    with atomic_dir(tmp_path / "idx") as tmp:
        (tmp / "f").write_text("2")
    assert not old.exists() and (tmp_path / "idx" / "f").read_text() == "2"


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write_of_that_file(tmp_path):
    """A checkpoint write killed mid-way leaves `.step_N.pt.PID.RANDOM.tmp` (gigabytes for a real model); the resumed
    run writes step N again and removes it. Another live writer's temporary, and other files', are kept."""
    from cmalign.artifacts.atomic import staging_dir

    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".step_8.pt.{dead}.abcd1234.tmp"
    running = tmp_path / f".step_8.pt.{alive}.efgh5678.tmp"
    other = tmp_path / f".step_16.pt.{dead}.ijkl9012.tmp"
    for p in (stale, running, other):
        p.write_text("half")
    with atomic_write(tmp_path / "step_8.pt", "wb") as f:
        f.write(b"full")
    assert not stale.exists() and running.exists() and other.exists()
    assert [p.name for p in tmp_path.glob(".step_8.pt.*")] == [running.name]  # ours was moved in

    killed_stage = tmp_path / "emb" / f".shard_0000.{dead}.mnop3456.tmp"
    killed_stage.mkdir(parents=True)
    with staging_dir(tmp_path / "emb", "shard_0000") as stage:
        assert stage.parent == tmp_path / "emb" and stage.name.startswith(f".shard_0000.{alive}.")
        assert not killed_stage.exists()
    assert not stage.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_replacing_a_directory_never_leaves_it_missing(tmp_path, monkeypatch):
    """Killed at any point of an overwrite, `out` holds the old or the new directory: the two are exchanged in one
    step, not renamed one after the other (a kill between two renames left no `out` at all)."""
    from cmalign.artifacts import atomic

    with atomic.atomic_dir(tmp_path / "idx") as tmp:
        (tmp / "f").write_text("old")
    real_replace = os.replace

    def replace_then_die(src, dst):  # the process dies right after any rename of the swap
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", replace_then_die)
    with contextlib.suppress(KeyboardInterrupt):
        with atomic.atomic_dir(tmp_path / "idx") as tmp:
            (tmp / "f").write_text("new")
    assert (tmp_path / "idx" / "f").read_text() == "new"

    def die(*args, **kwargs):  # ... or right after the exchange, before the old one is deleted
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", die)
    with contextlib.suppress(KeyboardInterrupt):
        with atomic.atomic_dir(tmp_path / "idx") as tmp:
            (tmp / "f").write_text("newer")
    assert (tmp_path / "idx" / "f").read_text() == "newer"

"""Atomic writes (cmalign.artifacts.atomic): files look as if open() had written them, and a failed write leaves
neither a half file nor a temporary one behind."""

import os

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

"""Folder locks: a second writer is refused at once, readers share, a killed holder frees the folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.folder_lock import LOCK_NAME, FolderInUse, folder_lock

HOLD = """
import sys, time
from pipeline.folder_lock import folder_lock
with folder_lock(sys.argv[1], shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path, mode: str) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _refused(folder: Path, shared: bool = False) -> str:
    """The message with which ``folder_lock`` refuses ``folder``."""
    with pytest.raises(FolderInUse) as info, folder_lock(folder, shared=shared):
        pass
    return str(info.value)


def test_a_second_writer_is_refused_naming_the_holder_and_readers_share(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out, "exclusive")
    try:
        assert _refused(out).startswith(f"{out}: in use by medpipe pid {holder.pid} ")
        _refused(out, shared=True)
    finally:
        holder.kill()
        holder.wait()
    reader = _holder(out, "shared")
    try:
        with folder_lock(out, shared=True):  # readers share
            pass
        _refused(out)
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
    with folder_lock(out):  # a killed holder leaves no stale lock
        assert (out / LOCK_NAME).is_file()


def test_a_shared_lock_on_a_missing_folder_creates_nothing(tmp_path):
    with folder_lock(tmp_path / "missing", shared=True):
        pass
    assert not (tmp_path / "missing").exists()


def test_preprocess_into_a_run_another_process_is_writing_is_refused(tmp_path, capsys, make_ct):
    make_ct(tmp_path / "scans" / "a.nii.gz")
    holder = _holder(tmp_path / "run" / "preprocess", "exclusive")
    try:
        started = time.perf_counter()
        assert main(["preprocess", "--input", str(tmp_path / "scans"), "--run", str(tmp_path / "run")]) == 2
        assert time.perf_counter() - started < 30  # refused at once, not after waiting
    finally:
        holder.kill()
        holder.wait()
    assert f"{tmp_path / 'run' / 'preprocess'}: in use by medpipe pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "preprocess" / "cache").exists()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with folder_lock(tmp_path / "out"):
        pass
    assert "cannot lock it (No locks available); going on unlocked" in capsys.readouterr().err


def test_an_exclusive_lock_that_may_not_create_leaves_no_folder(tmp_path):
    with folder_lock(tmp_path / "run" / "classify", create=False):
        pass
    assert not (tmp_path / "run").exists()

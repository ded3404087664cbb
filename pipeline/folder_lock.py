"""Advisory locks on medpipe's folders, so two processes never write one folder at once.

A stage holds an exclusive lock on the folder it writes (preprocess: ``RUN/preprocess``; train and
evaluate: ``RUN/<task>``; predict: ``--out``; report: ``RUN/report``) and a shared one on a folder it
reads from another stage (train classify: ``RUN/preprocess``; predict: the model folder). A second
writer, or a reader of a folder being written, is refused at once with the holder's pid and command,
instead of deleting the other's temporary files, mixing two configs in one cache or loading a
checkpoint mid-training.

The lock is ``flock`` on ``FOLDER/.medpipe.lock``: the kernel releases it when its process exits,
however it exits, so no stale lock survives a kill. Where the lock file cannot be created (a
read-only model folder), a shared lock is skipped: nobody can write there either. Where the file
system has no locks (an NFS mount without lockd), a warning says the stage goes on unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderInUse", "folder_lock"]

LOCK_NAME = ".medpipe.lock"


class FolderInUse(RuntimeError):
    """Another process holds a conflicting lock on the folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, shared: bool = False, create: bool = True) -> Iterator[None]:
    """Hold an exclusive (or ``shared``) lock on ``folder`` for the block. An exclusive lock
    creates the folder unless ``create`` is False (a stage that needs it to exist says so itself).
    Raise FolderInUse at once if another process holds a conflicting lock. Where the file system
    cannot lock (an NFS mount without lockd), warn and go on unlocked."""
    folder = Path(folder)
    if not folder.is_dir():
        if shared or not create:
            yield  # nothing there to guard; the stage names the missing folder itself
            return
        folder.mkdir(parents=True, exist_ok=True)  # another process may make it first
    path = folder / LOCK_NAME
    try:
        fd = _open_lock_file(path)
    except OSError:
        if not shared:
            raise  # a folder this stage cannot write: its own error (read-only, permission)
        yield  # a read-only model folder: nobody can write there either
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
            raise FolderInUse(
                f"{folder}: in use by {holder}; wait for it to finish, or use another folder"
            ) from None
        except OSError as exc:
            print(f"warning: {folder}: cannot lock it ({exc.strerror}); going on unlocked", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):  # a read-only descriptor keeps the old holder's text
                os.ftruncate(fd, 0)
                os.write(fd, f"medpipe pid {os.getpid()} ({' '.join(sys.argv[1:])[:200]})".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock_file(path: Path) -> int:
    """A descriptor of the lock file, created if need be; read-only where another user's lock file
    in a group-shared folder cannot be opened for writing (flock needs no write access)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not path.is_file():
            raise
        return os.open(path, os.O_RDONLY)

"""Atomic writes: a temporary file (or folder) beside the target, fsync, rename over the target."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` so that readers see the old file or the complete new one, never half.

    The data go to ``.<name>.tmp-*`` in the same folder, are flushed and fsynced, and the
    temporary file is renamed over ``path`` (atomic on POSIX and Windows); the folder is then
    fsynced so the rename itself survives a power cut. On any exception, ``KeyboardInterrupt``
    included, the temporary file is removed and ``path`` is untouched. A process killed
    outright (SIGKILL, power loss) leaves the previous file intact and at worst a hidden
    temporary file beside it, which weightport never reads.

    The new file gets the permissions of the file it replaces, or the usual ``0o666 & ~umask``
    (``mkstemp`` alone would make it private). A symbolic link at ``path`` is replaced by the
    new file; the file it pointed to is not changed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TMP_MARK}", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX; on Windows the mode bits barely apply
                os.fchmod(f.fileno(), _mode_for(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _mode_for(path: str) -> int:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0o666 & ~_UMASK
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~_UMASK


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_folder_for(path: str | os.PathLike[str]) -> str:
    """A new, empty hidden folder beside ``path`` (``.<name>.tmp-*``) to write a folder's contents
    into before :func:`replace_folder`; with the usual ``0o777 & ~umask`` permissions."""
    path = os.fspath(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}{TMP_MARK}", dir=_parent(path))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def replace_folder(tmp: str, path: str | os.PathLike[str]) -> None:
    """Put the complete folder ``tmp`` (from :func:`temp_folder_for`) at ``path``.

    A missing or empty ``path`` is replaced by one atomic rename. A folder already there (a previous
    checkpoint) is first renamed aside, then removed once the new one is in place: a reader sees the
    old folder, the new one, or (between the two renames) none, never a mix; if the second rename
    fails the old folder is put back.
    """
    path = os.fspath(path)
    try:
        os.replace(tmp, path)
    except OSError:
        if not os.path.isdir(path) or os.path.islink(path):
            raise
        old = f"{tmp}.old"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(_parent(path))


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))

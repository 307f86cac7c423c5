"""Replace a directory as a whole: write a staged copy next to it, then swap it in.

On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``, so the path always names a complete
directory; elsewhere two renames (the old directory is set aside, then the new one moved in). A
staged directory left by a killed writer (its name holds the writer's pid) is removed by the next
save to the same place.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A fresh directory to fill; on a clean exit it replaces ``target``, on any error it is removed."""
    _remove_orphans(target)
    staging = target.parent / f".{target.name}.{os.getpid()}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _fsync_dir(staging)
        if target.exists():
            _swap(staging, target)
            shutil.rmtree(staging)  # now the previous directory
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap(new: Path, target: Path) -> None:
    """Exchange ``new`` and ``target`` (afterwards ``new`` names the previous directory)."""
    if _exchange(new, target):
        return
    aside = target.parent / f".{target.name}.{os.getpid()}.previous"
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, new)


def _exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0  # unsupported by the file system: fall back to two renames


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_orphans(target: Path) -> None:
    """Staged directories of earlier saves to ``target`` whose writing process no longer exists."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.staging"):
        pid = path.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

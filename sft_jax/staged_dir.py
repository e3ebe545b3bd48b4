"""Write an output directory in full beside its target, then put it in place in one step.

    with staged_dir(out, overwrite=False) as tmp:
        ...write every file into tmp...

The files are written into `.<name>.export-<pid>-<random>` in the target's parent directory
(same filesystem, so the final step is a rename). On success the staged tree is made readable
(files 0644, directories 0755), fsynced, and then:

- the target does not exist or is empty: the staged directory is renamed onto it;
- the target is non-empty: refused with `TargetExistsError` unless `overwrite`, which exchanges
  the two directories atomically (Linux `renameat2(RENAME_EXCHANGE)`; a filesystem without it
  gets rename-aside + rename) and deletes the old tree, so no file of the old export survives.

A process killed at any moment leaves the old target intact (or the new one complete), plus a
hidden staging directory; staging directories of processes that are gone are deleted by the
next export into the same parent directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class TargetExistsError(ValueError):
    """The output path cannot be written (non-empty without overwrite, or not a directory); one line."""


def check_target(out: str, overwrite: bool) -> None:
    """Raise TargetExistsError when `out` cannot receive a new export."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise TargetExistsError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise TargetExistsError(f"{out} is not empty; pass --overwrite to replace it (its files are all removed)")


def _exchange(a: str, b: str) -> bool:
    """Atomically swap directories `a` and `b`; False when this system or filesystem cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_stale(parent: str, prefix: str) -> None:
    """Delete staging directories `<prefix><pid>-*` of processes that are gone."""
    for name in os.listdir(parent):
        pid = name[len(prefix):].split("-", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            log.warning("removing %s, left by an interrupted export", os.path.join(parent, name))
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _publishable(root: str) -> None:
    """Files 0644 and directories 0755 under `root`, every file fsynced."""
    os.chmod(root, 0o755)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o755)
        for name in files:
            p = os.path.join(d, name)
            os.chmod(p, 0o644)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def staged_dir(out: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh directory beside `out`; when the block succeeds, it becomes `out` (see the module doc).
    When the block raises, the staged directory is deleted and `out` is untouched."""
    out = os.path.abspath(out)
    check_target(out, overwrite)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}.export-"
    _remove_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        yield tmp
        _publishable(tmp)
        check_target(out, overwrite)  # again: another process may have written it meanwhile
        if not os.path.isdir(out):
            os.rename(tmp, out)
        elif not _exchange(tmp, out):
            aside = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
            os.rename(out, os.path.join(aside, name))
            os.rename(tmp, out)
            shutil.rmtree(aside)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old tree after an exchange, or a failed export

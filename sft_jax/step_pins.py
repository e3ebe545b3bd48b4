"""Pins of checkpoint steps: a reader keeps the trainer's rotation off the step it reads.

A reader of a work directory (export, generate, eval, serve: `workdir.load_run`) takes a shared
`fcntl.flock` on `WORKDIR/.pins/<root>.<step>` (`<root>` = `checkpoints` or `checkpoint_best`) for as
long as it reads `WORKDIR/<root>/<step>`.  The trainer's rotation (`checkpoint.Checkpointer`, which wraps
Orbax's deleter) takes an exclusive non-blocking flock on the same file before it deletes a step: when a
reader holds it the step is kept and deleted at a later rotation (the next save, or the end of the run)
once no reader holds it.  The kernel drops a flock when its process dies, so the pin of a killed reader
is never stale, and nothing records pids.  Several readers share a pin.

Both sides lock the file that is at the path *after* locking (an unlinked file's lock protects nothing):
the deleter unlinks the pin file while it still holds its exclusive lock, and a reader that locked that
old file sees the path gone or a new file there and locks again.  A reader that cannot create the pin
(a work directory it may not write) reads without one, with a warning.  No jax import.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

log = logging.getLogger(__name__)

PIN_DIR = ".pins"


def pin_path(step_root: str | os.PathLike, step: int) -> str:
    """The pin file of `<step_root>/<step>` (`step_root` = WORKDIR/checkpoints or WORKDIR/checkpoint_best)."""
    root = os.path.abspath(os.fspath(step_root))
    return os.path.join(os.path.dirname(root), PIN_DIR, f"{os.path.basename(root)}.{int(step)}")


def _lock_file(path: str, op: int) -> int | None:
    """open (creating) + flock(op) of the file that stays at `path`; None when a non-blocking lock is busy."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)  # unlinked (or replaced) by a deleter between open and flock: lock the new file


class StepPin:
    """A shared pin on `<step_root>/<step>` (held until `release()`; a context manager).  `held` is False when
    the pin could not be created (then the read goes on unpinned; a warning says so)."""

    def __init__(self, step_root: str | os.PathLike, step: int):
        self.path = pin_path(step_root, step)
        self.step = int(step)
        self._fd: int | None = None
        try:
            self._fd = _lock_file(self.path, fcntl.LOCK_SH)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                raise
            log.warning("cannot pin checkpoint step %d (%s: %s): reading it unpinned; a trainer running in this "
                        "work directory may delete it meanwhile", self.step, self.path, e.strerror)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the pin; the last reader also removes the pin file (when no one else holds it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:  # converting to exclusive succeeds only when no other reader shares the pin
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            _unlink_if_same(self.path, fd)
        finally:
            os.close(fd)

    def __enter__(self) -> "StepPin":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a forgotten pin must not outlive its reader object
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _unlink_if_same(path: str, fd: int) -> None:
    try:
        here, mine = os.stat(path), os.fstat(fd)
        if (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
            os.unlink(path)
    except OSError:
        pass


def try_exclusive(step_root: str | os.PathLike, step: int) -> int | None:
    """The deleter's side: an fd holding the exclusive lock of the step's pin, or None while a reader pins it."""
    return _lock_file(pin_path(step_root, step), fcntl.LOCK_EX | fcntl.LOCK_NB)


def release_exclusive(step_root: str | os.PathLike, step: int, fd: int) -> None:
    """After deleting (or keeping) the step: remove the pin file while still holding the lock, then unlock."""
    try:
        _unlink_if_same(pin_path(step_root, step), fd)
    finally:
        os.close(fd)


def is_pinned(step_root: str | os.PathLike, step: int) -> bool:
    """Whether a reader pins the step now (tests, messages)."""
    if not os.path.exists(pin_path(step_root, step)):
        return False
    fd = try_exclusive(step_root, step)
    if fd is None:
        return True
    os.close(fd)  # leave the file: it may be about to be pinned again
    return False

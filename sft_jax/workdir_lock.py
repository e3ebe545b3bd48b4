"""One training run per work directory: `WORKDIR/.lock`, held for the whole run.

The lock is an `fcntl.flock` on `WORKDIR/.lock`, which also records its holder as JSON
(`{"host", "pid", "pid_start", "started"}`).  The kernel drops a flock when its process dies
(kill -9 included), so on one host a dead holder never blocks anybody; the recorded holder is
what the refusal names, and what tells a stale file apart:

- flock busy                        -> `WorkdirLocked`, one line naming host, pid and start time;
- flock free, file names a live process on this host (a filesystem without working flock)
                                    -> `WorkdirLocked`;
- flock free, file names a dead process on this host
                                    -> taken over, with a warning naming the dead holder;
- flock free, file names another host (its liveness cannot be checked from here)
                                    -> `WorkdirLocked`, saying which file to delete if that run is gone.

A process is "the same" only when its pid and its start time (`/proc/<pid>/stat`, field 22)
both match, so a reused pid is not mistaken for the holder.  Multi-host runs take the lock on
process 0 only (`train.run` decides and broadcasts the outcome).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def running_trainer(workdir: str | os.PathLike) -> dict | None:
    """The holder of `WORKDIR/.lock` when it is a live process on this host (or on another host), else None.

    For readers (export / generate / eval / serve of a work directory): reads the recorded holder only
    and never flocks, so a reader cannot make a starting trainer fail.  Decision (issue 19): a reader
    does not refuse while a trainer runs (evaluating a mid-run checkpoint is a normal use); it says so, and
    pins the step it reads (`sft_jax.step_pins`: the trainer's rotation keeps a pinned step until the reader
    is done)."""
    path = os.path.join(os.fspath(workdir), LOCK_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read(65536)
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(holder, dict) or not holder:
        return None
    if holder.get("host") != socket.gethostname():
        return holder
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return None
    return holder if pid > 0 and pid != os.getpid() and _alive(pid, str(holder.get("pid_start", ""))) else None


def warn_if_training(workdir: str | os.PathLike, step: int | None = None) -> dict | None:
    """Log a warning naming the running trainer of `workdir` (see :func:`running_trainer`)."""
    holder = running_trainer(workdir)
    if holder:
        log.warning("work directory %s is being trained right now (%s): reading %s (pinned while it is read: the "
                    "trainer's rotation keeps it meanwhile)", workdir, _describe(holder),
                    f"step {step}" if step is not None else "the latest checkpoint")
    return holder


class WorkdirLocked(RuntimeError):
    """The work directory is in use by another run; the message (one line) names the holder."""


def _pid_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ("" when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    # field 2 (comm) is parenthesised and may contain spaces: split after its closing ')'
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, pid_start: str) -> bool:
    """True when process `pid` exists on this host (and, when recorded, started at `pid_start`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _pid_start(pid)
    return not (pid_start and now and now != pid_start)


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _read_holder(fd: int) -> dict:
    """The holder recorded in the open lock file ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """An acquired lock on a work directory; `release()` (or leaving the `with` block) frees it."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_NAME)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self._fd: int | None = None
        self._acquire()

    def _in_use(self, holder: dict) -> WorkdirLocked:
        return WorkdirLocked(f"work directory {os.path.dirname(self.path)} is in use by another training run "
                             f"({_describe(holder)}); wait for it to finish or use another --workdir")

    def _open_locked(self) -> int:
        """Open the lock file and flock it; retries when the file was replaced meanwhile."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the previous holder unlinks the file on release: make sure we hold the file at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = self._open_locked()
        old = _read_holder(fd)
        if old:
            try:
                pid = int(old.get("pid", -1))
            except (TypeError, ValueError):
                pid = -1
            if old.get("host") != self.holder["host"]:
                os.close(fd)
                raise WorkdirLocked(f"work directory {os.path.dirname(self.path)} is locked by a run on another host "
                                    f"({_describe(old)}); if that run is gone, delete {self.path}")
            if pid > 0 and pid != os.getpid() and _alive(pid, str(old.get("pid_start", ""))):
                os.close(fd)
                raise self._in_use(old)
            if pid != os.getpid():
                log.warning("taking over the stale lock %s of a process that is gone (%s)", self.path, _describe(old))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(self.holder, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the flock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

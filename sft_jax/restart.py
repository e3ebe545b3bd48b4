"""What a training run that starts over from step 0 does with the files of an earlier run.

A restart from step 0 (`checkpoint.resume=none`, or no checkpoint to resume from) must not mix
its files with the earlier run's: its checkpoints would be skipped as "already saved" or rotated
away, its metrics rows appended after the old ones. `keep_aside(path)` renames such a file or
directory to `<path>.<n>` (the first unused n, from 1), so nothing is deleted.
"""

from __future__ import annotations

import itertools
import logging
import os

log = logging.getLogger(__name__)


def keep_aside(path: str | os.PathLike, why: str) -> str | None:
    """Rename `path` (a file, or a non-empty directory) to `<path>.<n>`; returns the new path,
    None when there was nothing to keep (missing, or an empty directory)."""
    path = os.fspath(path)
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return None
    for n in itertools.count(1):
        new = f"{path}.{n}"
        if not os.path.lexists(new):
            os.rename(path, new)
            log.warning("%s: the earlier %s is kept as %s", why, path, new)
            return new
    raise AssertionError("unreachable")

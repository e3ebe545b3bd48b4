"""Where the native kernel's shared object may be loaded from, and which file may be loaded.

A shared object is code: loading one that someone else could write is running their code. So:

- `safe_cache_dir(preferred)`: `preferred` only when it is (or can be created as) a directory owned
  by this user, writable by this user and by nobody else (no group/other write bit); otherwise a
  private `tempfile.mkdtemp` (0700, one per process), with a warning naming the reason. There is no
  predictable shared fallback path (e.g. under /tmp) where a planted file would be picked up.
- `record(so, key)` (at build) writes `<so>.json` = {"key": the hash of source, flags, jax version
  and CPU, "sha256": the file's own hash}; `verified(so, key)` (before loading) is True only when
  that record exists, names this key, matches the file's bytes, and the file is owned by this user
  and not group/other-writable. Anything else means "build again", never "load it anyway".
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _unsafe(st: os.stat_result) -> str:
    """Why a file or directory with this stat may not be trusted ("" when it may)."""
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


@functools.lru_cache(maxsize=None)
def _private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sft_jax_native-"))


def safe_cache_dir(preferred: Path) -> Path:
    """`preferred` if it is a safe cache directory for code (see the module doc), else a private mkdtemp."""
    try:
        preferred.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _unsafe(preferred.stat())
        if not why and not os.access(preferred, os.W_OK):
            why = "not writable"
    except OSError as e:
        why = f"cannot be created ({e.strerror})"
    if not why:
        return preferred
    private = _private_dir()
    log.warning("native kernel cache %s is %s: using the private directory %s", preferred, why, private)
    return private


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_path(so: Path) -> Path:
    return so.with_name(so.name + ".json")


def record(so: Path, key: str) -> None:
    """Write the record of a freshly built `so` (atomically)."""
    tmp = _record_path(so).with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"key": key, "sha256": _sha256(so)}))
    os.replace(tmp, _record_path(so))


def verified(so: Path, key: str) -> bool:
    """True when `so` may be loaded: recorded for `key`, unchanged since, ours and not writable by others."""
    try:
        rec = json.loads(_record_path(so).read_text())
        why = _unsafe(so.stat()) or _unsafe(_record_path(so).stat())
    except (OSError, ValueError):
        return False
    if why:
        log.warning("not loading %s: %s", so, why)
        return False
    return isinstance(rec, dict) and rec.get("key") == key and rec.get("sha256") == _sha256(so)

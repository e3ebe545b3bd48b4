"""The native kernel's shared object loads only from a safe cache directory and only when its
recorded key and hash match (issue 19 item 10; `sft_jax.kernels.native_cache`)."""

from __future__ import annotations

import logging
import os
import shutil
import stat

import pytest

from sft_jax.kernels import native_attention as N
from sft_jax.kernels import native_cache as C


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_cache_dir_must_be_ours_and_not_writable_by_others(tmp_path, caplog, monkeypatch):
    own = tmp_path / "own"
    assert C.safe_cache_dir(own) == own and _mode(own) == 0o700  # created private
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # e.g. a predictable path under /tmp that anyone could have made
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        got = C.safe_cache_dir(shared)
    assert got != shared and "writable by others" in caplog.text
    assert os.stat(got).st_uid == os.getuid() and _mode(got) == 0o700
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert C.safe_cache_dir(blocked / "cache") == got  # cannot be created: the private directory
    monkeypatch.setenv("SFT_JAX_CACHE", str(shared))
    assert N.library_path().parent == got  # the kernel never builds into / loads from the shared dir
    if os.getuid() == 0:  # as root a directory of another user can be made
        other = tmp_path / "other"
        other.mkdir(mode=0o755)
        os.chown(other, 65534, 65534)
        assert C.safe_cache_dir(other) == got


def test_only_a_recorded_unchanged_file_of_ours_is_verified(tmp_path):
    so = tmp_path / "k.so"
    so.write_bytes(b"\x7fELF built")
    assert not C.verified(so, "key")  # planted: no record
    C.record(so, "key")
    assert C.verified(so, "key")
    assert not C.verified(so, "other-key")  # built for another source / jax / CPU
    so.write_bytes(b"\x7fELF swapped")
    assert not C.verified(so, "key")  # changed since it was built
    C.record(so, "key")
    so.chmod(0o666)
    assert not C.verified(so, "key")  # others could change it
    so.chmod(0o644)
    assert C.verified(so, "key")
    (tmp_path / "k.so.json").write_text("{not json")
    assert not C.verified(so, "key")


@pytest.mark.skipif(not shutil.which("g++"), reason="no C++ compiler for the native kernel")
def test_planted_library_is_not_verified_a_build_is(tmp_path, monkeypatch):
    """A file at the kernel's cache path without a matching record is not loadable (`available()`
    builds again); the build records it."""
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    path = N.library_path()
    path.write_bytes(b"planted")
    assert not C.verified(path, N._key())
    N.build(path)
    assert path.read_bytes() != b"planted" and C.verified(path, N._key())

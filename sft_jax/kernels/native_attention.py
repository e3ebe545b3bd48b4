"""The native CPU attention kernel (`attention_cpu.cc`): build, load, and call it from JAX.

`attention(q, k, v, segment_ids, positions, dtype=..., sliding_window=...)` is the same function as
`flash_attention.segment_attention` (causal, segment-block-diagonal, sliding window, GQA; float32 math),
computed by an XLA FFI custom call on CPU, with a custom VJP whose backward is the kernel's backward.

Build: at first use the C++ source is compiled with the system's g++ (`-O3 -march=native`, against
the FFI headers that jaxlib ships) into a cache directory (`$SFT_JAX_CACHE`, default
`~/.cache/sft_jax`), keyed by a hash of the source, the compiler flags, jax's version and the CPU's
feature flags; later runs load the cached library. Only from a directory this user owns and nobody
else can write (else a private mkdtemp), and only a file whose recorded key and hash match
(`native_cache`); anything else is rebuilt. No compiler, or a failed build: `available()` is
False (the reason is logged once) and sft_jax uses the XLA implementation.

When it is used: only in the `model.kernels=cpu` set (`auto` on a CPU backend), for
`model.attention=flash`, when `status()` allows it: the default backend is CPU, there is a single device
(the custom call has no sharding rule: under a multi-device mesh XLA would gather its operands onto every
device), head_dim is a multiple of 16, the dtype is float32 or bfloat16 and the kernel builds. The debug
override `SFT_JAX_NATIVE_ATTENTION=0` turns it off, `=1` makes it required whatever the device count (an
error when it cannot build); `sft_jax.kernels.describe` reports the decision and the override, and the
trainer logs it and writes it to run_info.json. Measured in bench/README.md ("Native CPU attention").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.kernels import native_cache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_cpu.cc")
CXXFLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
ENV = "SFT_JAX_NATIVE_ATTENTION"  # debug override: 0 = off, 1 = required (logged by kernels.describe)
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    """`$SFT_JAX_CACHE` or ~/.cache/sft_jax when safe for code, else a private temporary directory."""
    return native_cache.safe_cache_dir(Path(os.environ.get("SFT_JAX_CACHE") or Path.home() / ".cache" / "sft_jax"))


def _key() -> str:
    """The hash of this source, these flags, this jax and this CPU (what a built library is for)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CXXFLAGS).encode(), jax.__version__.encode(), _cpu_flags().encode()):
        h.update(part)
    return h.hexdigest()


def library_path() -> Path:
    """Where the compiled kernel for this source, these flags, this jax and this CPU lives."""
    return _cache_dir() / f"attention_cpu_{_key()[:16]}.so"


def build(path: Path) -> None:
    """Compile the kernel to `path` (atomically: a temporary file renamed into place) and record
    its key and hash beside it (`native_cache.record`)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp, "-lpthread"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, path)
        native_cache.record(path, _key())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def available() -> bool:
    """Build (once per source/CPU), load and register the kernel; False (reason logged) if that fails."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        try:
            path = library_path()
            if not native_cache.verified(path, _key()):  # missing, stale, altered or not ours: build it
                t0 = time.perf_counter()
                build(path)
                log.info("built the native CPU attention kernel in %.1f s: %s", time.perf_counter() - t0, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            for name, sym in (("sft_attention_fwd", lib.SftAttentionFwd), ("sft_attention_bwd", lib.SftAttentionBwd)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(sym), platform="cpu")
            _state["ok"], _state["path"] = True, path
        except Exception as e:  # noqa: BLE001  (any build/load failure: fall back to XLA)
            if os.environ.get(ENV) == "1":
                raise
            log.warning("native CPU attention unavailable, using the XLA implementation: %s", e)
            _state["ok"], _state["error"] = False, str(e)
    return _state["ok"]


def status(head_dim: int, dtype) -> tuple[bool, str]:
    """(use the kernel?, why) for the current backend, device count and override (module docstring)."""
    env = os.environ.get(ENV, "")
    if env == "0":
        return False, f"{ENV}=0"
    if jax.default_backend() != "cpu":
        return False, f"backend {jax.default_backend()}"
    if head_dim % 16 or jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return False, f"head_dim {head_dim} / dtype {jnp.dtype(dtype).name} not supported"
    if env != "1" and jax.device_count() != 1:
        return False, f"{jax.device_count()} devices (no sharding rule)"
    if not available():
        return False, f"build failed: {_state.get('error', '')[:200]}"
    return True, f"{ENV}=1" if env == "1" else "single CPU device"


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _attrs(hd, window):
    return dict(scale=np.float32(hd**-0.5), window=np.int64(window or 0), threads=np.int64(_threads()))


def _fwd_call(q, k, v, seg, pos, window):
    b, t, h, hd = q.shape
    out, lse = jax.ffi.ffi_call(
        "sft_attention_fwd",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
    )(q, k, v, seg, pos, **_attrs(hd, window))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attn(q, k, v, seg, pos, window):
    return _fwd_call(q, k, v, seg, pos, window)[0]


def _attn_fwd(q, k, v, seg, pos, window):
    out, lse = _fwd_call(q, k, v, seg, pos, window)
    return out, (q, k, v, seg, pos, out, lse)


def _attn_bwd(window, res, dout):
    q, k, v, seg, pos, out, lse = res
    dq, dk, dv = jax.ffi.ffi_call(
        "sft_attention_bwd",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(v.shape, v.dtype)),
    )(q, k, v, seg, pos, out, lse, dout.astype(q.dtype), **_attrs(q.shape[-1], window))
    z = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (integer inputs)
    return dq, dk, dv, z(seg), z(pos)


_attn.defvjp(_attn_fwd, _attn_bwd)


def attention(q, k, v, segment_ids, positions, *, dtype, sliding_window=None):
    """q [B,T,H,hd], k/v [B,T,KV,hd] -> [B,T,H*hd] in `dtype` (the function of
    `flash_attention.segment_attention`). Call only where `status(hd, dtype)` allows it."""
    b, t, h, hd = q.shape
    dt = jnp.dtype(dtype)
    o = _attn(q.astype(dt), k.astype(dt), v.astype(dt), segment_ids.astype(jnp.int32),
              positions.astype(jnp.int32), int(sliding_window or 0))
    return o.reshape(b, t, h * hd)

"""`model.kernels=tokamax`: the training attention (`model.attention=flash`) from tokamax, a maintained JAX
kernel library (Google, PyPI `tokamax`; optional extra `pip install 'sft-jax[gpu]'` / `[tpu]`, pinned 0.0.12).

`attention(q, k, v, segment_ids, positions, *, dtype, sliding_window)` computes what
`flash_attention.segment_attention` computes for every non-padding query: causal by slot, within the
query's segment, GQA, softmax scale hd^-0.5. The mask is given to tokamax as its `Mask(k_start, is_causal)`:
`k_start[t]` = the first slot of the contiguous run of equal segment ids that holds slot t, so query t sees
keys k_start[t] .. t. That is the packed-sequence mask when every segment is ONE contiguous run of its row
(what `sft_jax.data` packing writes); tokamax's GPU/TPU kernels skip the key blocks left of k_start and
right of the diagonal, and never hold a [T, T] mask. Differences, none visible to training: padding queries
(segment 0) attend to their padding run instead of getting 0 (no real query sees a padding key, padding
carries no loss), as the Pallas kernel does.

Implementations, the first that accepts the call (tokamax raises NotImplementedError otherwise):
GPU `mosaic` (Mosaic GPU, sm90/sm100), `triton` (Pallas Triton); TPU `mosaic` (Pallas Mosaic TPU); then
tokamax's `xla` (its XLA reference, every backend; what the CPU tests run, tokamax has no interpret mode
for its attention kernels). Only the `xla` path is tested here; the GPU/TPU kernels wait for a lent device
(`bench/tokamax_check.py`). No sliding window (tokamax's `local_window_size` counts slots, our window
positions) and no logit soft-capping: the model's training path then runs the XLA flash kernel instead
(declared in `kernels.ATTENTION_KERNELS`, decided by `kernels.training_attention`, logged); called directly
with a window, this function raises.
Under the step's mesh the kernel runs per device on its rows and heads (`jax.shard_map`, as the Pallas
kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

VERSION = "0.0.12"  # the release this glue is written and tested against (pyproject's [gpu]/[tpu] extras)


@functools.lru_cache(maxsize=1)
def status() -> tuple[bool, str]:
    """(importable, why): whether tokamax imports here, and its version or the import error."""
    try:
        import tokamax
    except Exception as e:  # noqa: BLE001 - any failure to import means: not available
        return False, f"tokamax not importable ({type(e).__name__}: {e}); pip install 'tokamax=={VERSION}'"
    return True, f"tokamax {tokamax.__version__}"


def _implementations():
    from tokamax._src.ops.attention import api

    backend = jax.default_backend()
    names = []
    if backend == "gpu":
        names = ["mosaic_gpu", "triton"]
    elif backend == "tpu":
        names = ["mosaic_tpu"]
    names.append("xla")
    return [(n, api.IMPLEMENTATIONS[n]) for n in names if n in api.IMPLEMENTATIONS]


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: the first slot of the contiguous run of equal segment ids each slot belongs to."""
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    change = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(change, idx, 0), axis=1)


def attention(q, k, v, segment_ids, positions=None, *, dtype, sliding_window=None, implementation=None):
    """q [B,T,H,hd], k/v [B,T,KV,hd], segment_ids [B,T] -> [B,T,H*hd] in `dtype`. `implementation`: one
    tokamax implementation name (tests), default the backend's list (module docstring)."""
    ok, why = status()
    if not ok:
        raise ValueError(f"model.kernels='tokamax': {why}")
    if sliding_window:
        raise ValueError("model.kernels='tokamax' has no sliding window here (tokamax's window counts slots, "
                         "ours positions): use model.kernels=reference (or cpu) with model.attention=flash")
    from tokamax._src.ops.attention import base
    from sft_jax.kernels.pallas_attention import _per_shard

    _absl_flags_parsed()

    b, t, h, hd = q.shape
    dt = jnp.dtype(dtype)
    impls = _implementations() if implementation is None else [(implementation, _by_name(implementation))]

    def local(q, k, v, seg):
        mask = base.Mask(k_start=segment_starts(seg)[:, None, :], is_causal=True)
        errors = []
        for name, impl in impls:
            try:
                return impl(q, k, v, mask=mask, logits_scale=hd**-0.5)
            except NotImplementedError as e:
                errors.append(f"{name}: {e}")
        raise ValueError("model.kernels='tokamax': no tokamax attention implementation accepts this call: "
                         + "; ".join(errors))

    o = _per_shard(local, q.astype(dt), k.astype(dt), v.astype(dt), segment_ids.astype(jnp.int32))
    return o.astype(dt).reshape(b, t, h * hd)


def _absl_flags_parsed() -> None:
    """tokamax reads its options from absl flags and, when nothing parsed them yet, parses `sys.argv` itself,
    which fails on any other program's arguments (pytest's, `sft_jax.train --config.x=...`). Mark absl's flags
    parsed with their defaults (program name only) when no absl program did."""
    import sys

    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])


def _by_name(name):
    from tokamax._src.ops.attention import api

    if name not in api.IMPLEMENTATIONS:
        raise ValueError(f"tokamax attention implementation {name!r} is not available here "
                         f"(have {sorted(api.IMPLEMENTATIONS)})")
    return api.IMPLEMENTATIONS[name]

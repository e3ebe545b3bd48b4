"""`model.attention=pallas`: the training attention as jax's Pallas (Triton) flash-attention kernel, for GPUs.

`attention(q, k, v, segment_ids, *, dtype, ...)` computes the same function as
`flash_attention.segment_attention` for every non-padding query (causal, segment-block-diagonal, GQA; float32
accumulation) with `jax.experimental.pallas.ops.gpu.attention.mha`: a fused forward and a fused backward
(its own `custom_vjp`), tiles of `block` queries x `block` keys held on chip, the [B, H, T, T] scores never
in HBM. sft_jax's `flash` implementation is XLA loops of block dots, portable but not tuned for GPUs; this
is the GPU candidate to compare against it (`bench/accel_mfu.py --policy attention=pallas`).

Differences, none visible to training:
* Padding queries (segment 0) attend to the other padding slots of their row instead of getting output 0.
  No real query sees a padding key (segment ids differ), and padding positions carry no loss, so the loss
  and every gradient are the same.
* Grouped-query attention: the kernel wants as many K/V heads as query heads; K and V are repeated per
  group (`jnp.repeat`: the backward sums the groups' gradients back).

Limits (each a clear error at trace time): GPU backend only (tests run the kernel on CPU through Pallas'
interpreter by setting `INTERPRET = True`); no sliding window (use `flash`); T must be a multiple of the
block size (`model.attention_block`, default 128, or the whole length when T <= 128). Under the train step's
mesh the kernel runs per device on its rows (data, fsdp) and heads (tensor) through `jax.shard_map`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INTERPRET = False  # tests: run the Pallas kernel through its CPU interpreter
DEFAULT_BLOCK = 128
BACKWARD_BLOCK = 32  # the kernel's own default for its dK/dV and dQ passes


def _block(t: int, requested: int) -> int:
    c = min(requested or DEFAULT_BLOCK, t)  # a row shorter than a block is one block
    if t % c:
        raise ValueError(
            f"attention='pallas' needs the sequence length ({t}) to be a multiple of the block size ({c}): "
            f"set model.attention_block to a divisor of {t} (a multiple of 16), or pad rows to a multiple of {c}"
        )
    return c


def attention(q, k, v, segment_ids, *, dtype, sliding_window=None, block: int = 0):
    """q [B,T,H,hd], k/v [B,T,KV,hd], segment_ids [B,T] -> [B,T,H*hd] in `dtype`."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    if sliding_window:
        raise ValueError("attention='pallas' has no sliding window: use model.attention='flash' for this model")
    if jax.default_backend() != "gpu" and not INTERPRET:
        raise ValueError(
            f"attention='pallas' is the GPU (Triton) kernel; the default backend is {jax.default_backend()!r}: "
            "use model.attention='flash'"
        )
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    c = _block(t, block)
    bw = min(BACKWARD_BLOCK, c)
    dt = jnp.dtype(dtype)
    sizes = pallas_mha.BlockSizes(block_q=c, block_k=c, block_q_dkv=bw, block_kv_dkv=bw, block_q_dq=bw,
                                  block_kv_dq=bw)

    def local(q, k, v, seg):
        if g > 1:
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        return pallas_mha.mha(q, k, v, seg, sm_scale=hd**-0.5, causal=True, block_sizes=sizes, interpret=INTERPRET)

    o = _per_shard(local, q.astype(dt), k.astype(dt), v.astype(dt), segment_ids.astype(jnp.int32))
    return o.reshape(b, t, h * hd)


def _per_shard(fn, q, k, v, seg):
    """`fn` on each device's block of rows (mesh axes data, fsdp) and heads (tensor) under the step's mesh
    (`jax.shard_map`): the kernel has no sharding rule of its own, and attention needs nothing across rows or
    heads. Without a mesh of several devices, `fn` directly."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, seg)
    rows = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1) or None
    heads = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
    spec = P(rows, None, heads, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                         check_vma=False)(q, k, v, seg)

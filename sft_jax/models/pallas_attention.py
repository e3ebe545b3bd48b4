"""`model.attention = "pallas"`: the training attention as jax's Pallas (Triton) flash-attention kernel, for GPUs.

`attention(q, k, v, segment_ids, *, dtype, ...)` computes the same function as
`attention.segment_attention` for every non-padding query (causal, segment-block-diagonal, GQA; float32
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
block size (`model.attention_block`, default 128, or the whole length when T <= 128). One device or a
data-parallel mesh: the Pallas call has no sharding rule, so under a sharded mesh XLA gathers its operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INTERPRET = False  # tests: run the Pallas kernel through its CPU interpreter
DEFAULT_BLOCK = 128
BACKWARD_BLOCK = 32  # the kernel's own default for its dK/dV and dQ passes


def _block(t: int, requested: int) -> int:
    c = requested or min(DEFAULT_BLOCK, t)
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
    k, v = k.astype(dt), v.astype(dt)
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    sizes = pallas_mha.BlockSizes(block_q=c, block_k=c, block_q_dkv=bw, block_kv_dkv=bw, block_q_dq=bw,
                                  block_kv_dq=bw)
    o = pallas_mha.mha(q.astype(dt), k, v, segment_ids.astype(jnp.int32), sm_scale=hd**-0.5, causal=True,
                       block_sizes=sizes, interpret=INTERPRET)
    return o.reshape(b, t, h * hd)

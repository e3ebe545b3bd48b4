"""`model.attention=flash`: block-sparse causal attention for the training path (XLA), with a hand-written backward.

`segment_attention(q, k, v, segment_ids, positions, ...)` computes the same function as dense
causal, segment-block-diagonal attention (`llama.attend` with the training mask), but

* only visits (query block, key block) pairs that can hold an unmasked score: key block j <= query
  block i (causal) and the segment-id ranges of the two blocks overlap (packing: a query never sees
  another example's keys). The ranges are taken over the whole (local) batch, so a pair is skipped
  when no row needs it. For a row packed with several examples this skips most of the off-diagonal
  blocks; for one example per row it is plain causal block skipping. The range test is conservative
  (a superset of the needed pairs), so any segment layout is correct; the element-wise mask is
  always applied inside a visited block.
* never materialises the [B, H, T, T] scores or probabilities: the forward pass is an online
  softmax over key blocks (FlashAttention-2 style) that saves only the output and the per-query
  log-sum-exp; the backward pass recomputes each block's probabilities from them
  (dS = P * (dP - rowsum(dO * O))), visiting the same pairs.

Accumulation is float32 whatever the compute dtype. Queries whose row holds no key (padding,
segment 0) get output 0 and zero gradients. With more than `UNROLL` (4) blocks per row the loops are
`lax.fori_loop`s with data-dependent bounds, so the pair skipping happens at run time without
recompiling per batch. With at most `UNROLL` blocks (e.g. T <= 512 with 128-slot blocks) the loops
are unrolled at trace time and every causal pair is computed (the element-wise mask handles the
rest): static slices instead of while loops and dynamic slices, 12-30% faster attention on CPU
(bench/README.md "Intel Xeon"); the skipping matters most for long packed rows, which have many
blocks, and unrolling many blocks costs compile time.

It is a drop-in for the reference `models.llama.attend` with the training mask (tests assert equal values
and gradients). With `model.kernels=cpu` on a single CPU device the model hands the same computation to
the native C++ kernel instead (`native_attention.py`); this implementation serves TPU/GPU, multi-device
meshes and machines without a compiler.

Shapes: q [B, T, H, hd], k/v [B, T, KV, hd] (grouped-query: H % KV == 0), segment_ids and
positions [B, T] int32 -> [B, T, H * hd] in `dtype`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
_NEG = -1e30


def block_size(b: int, h: int, t: int, requested: int = 0) -> int:
    """Block size for batch b, h query heads, length t. `requested` when it divides t; else the
    largest of 256/128/64 that divides t and keeps one block's f32 scores (b*h*c*c*4 bytes) within
    2 MiB, i.e. in cache on a CPU (measured on 2-core Zen 5, fwd+bwd of one layer: B 8 x T 512,
    8 heads: c 64 79 ms, 128 90 ms, 256 132 ms; B 2 x T 2048, 4 heads: c 256 85 ms, 128 106 ms);
    at least 64; the whole length when t is not a multiple of 64 (one block: no skipping)."""
    if requested and t % requested == 0:
        return requested
    for c in (256, 128, 64):
        if t % c == 0 and t > c and (b * h * c * c * 4 <= 2 * 2**20 or c == 64):
            return c
    return t


def _pair_bounds(seg: jax.Array, nb: int, c: int):
    """For n blocks of c slots: kv_lo[i] = first key block query block i must visit,
    q_hi[j] = last query block that must visit key block j (exclusive bounds as ranges
    kv_lo[i]..i and j..q_hi[j]). Empty ranges (kv_lo[i] = i + 1, q_hi[j] = j - 1) for blocks
    whose slots are all padding."""
    s = seg.reshape(seg.shape[0], nb, c)
    big = jnp.iinfo(jnp.int32).max
    smin = jnp.min(jnp.where(s > 0, s, big), axis=(0, 2))  # [nb] over the batch
    smax = jnp.max(jnp.where(s > 0, s, 0), axis=(0, 2))
    # need[i, j]: ranges of query block i and key block j overlap, j <= i
    i = jnp.arange(nb)[:, None]
    j = jnp.arange(nb)[None, :]
    need = (smin[:, None] <= smax[None, :]) & (smin[None, :] <= smax[:, None]) & (j <= i)
    need = need & (smin[:, None] <= smax[:, None]) & (smin[None, :] <= smax[None, :])
    ar = jnp.arange(nb)
    kv_lo = jnp.where(need.any(1), jnp.argmax(need, axis=1), ar + 1).astype(jnp.int32)
    q_hi = jnp.where(need.any(0), nb - 1 - jnp.argmax(need[::-1, :], axis=0), ar - 1).astype(jnp.int32)
    return kv_lo, q_hi


def _mask(seg_q, seg_k, pos_q, pos_k, lo_q, lo_k, window):
    """[B, cq, ck] bool: same nonzero segment, causal by slot, within the sliding window."""
    cq, ck = seg_q.shape[1], seg_k.shape[1]
    iq = lo_q + jnp.arange(cq)
    ik = lo_k + jnp.arange(ck)
    m = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0) & (iq[:, None] >= ik[None, :])[None]
    if window is not None:
        m = m & (pos_q[:, :, None] - pos_k[:, None, :] < window)
    return m


def _sl(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


# Up to this many blocks per row, the block loops are unrolled at trace time (static slices, no
# while loops) and every causal pair is computed (no run-time skipping; the mask zeroes the rest).
# Measured on a 2-core Xeon, one layer fwd+bwd, T 512, 8 heads: 1 row, c 128 (4 blocks): 21 -> 15 ms,
# c 256: 17 -> 15 ms; 8 rows, c 64 (8 blocks, 36 pairs): 216 -> 182 ms, but unrolling 8 blocks made the
# 31M model's step compile 9.6 -> 33 s (trace 2.8 -> 7.2 s, XLA 6.8 -> 26 s): not worth ~5% of a step.
# At 4 blocks (10 pairs) the compile time is unchanged.
UNROLL = 4


def _loop(lo, hi, body, init):
    """`lax.fori_loop(lo, hi, body, init)`, unrolled in Python when both bounds are static ints."""
    if isinstance(lo, int) and isinstance(hi, int):
        for i in range(lo, hi):
            init = body(i, init)
        return init
    return lax.fori_loop(lo, hi, body, init)


def _fwd_impl(q, k, v, seg, pos, window, dtype):
    window, cap = window if isinstance(window, tuple) else (window, None)  # (sliding window, logit soft-cap)
    # block-major layout: q [nb, B, KV, c, G, hd]; k, v [nb, B, KV, c, hd] (a block is q[i]: a
    # contiguous slice, no strided copy per visited pair)
    nb, b, kvh, c, g, hd = q.shape
    scale = hd**-0.5
    kv_lo, _ = _pair_bounds(seg, nb, c)
    static = nb <= UNROLL

    def q_block(i, carry):
        out, lse = carry
        lo = i * c
        qi = q[i]
        sq, pq = _sl(seg, lo, c, 1), _sl(pos, lo, c, 1)

        def kv_block(j, st):
            m, l, acc = st
            lk = j * c
            kj, vj = k[j], v[j]
            msk = _mask(sq, _sl(seg, lk, c, 1), pq, _sl(pos, lk, c, 1), lo, lk, window)[:, None, :, None, :]
            s = jnp.einsum("bkqgd,bksd->bkqgs", qi, kj, preferred_element_type=F32) * scale
            if cap is not None:  # Gemma 2: scores -> cap * tanh(scores / cap)
                s = jnp.tanh(s / cap) * cap
            s = jnp.where(msk, s, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(msk, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(p, axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum(
                "bkqgs,bksd->bkqgd", p.astype(dtype), vj, preferred_element_type=F32)
            return m_new, l, acc

        init = (jnp.full((b, kvh, c, g), _NEG, F32), jnp.zeros((b, kvh, c, g), F32),
                jnp.zeros((b, kvh, c, g, hd), F32))
        m, l, acc = _loop(0 if static else kv_lo[i], i + 1, kv_block, init)
        ok = l > 0
        o = acc / jnp.where(ok, l, 1.0)[..., None]
        lse_i = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0)
        return out.at[i].set(o.astype(dtype)), lse.at[i].set(lse_i)

    out = jnp.zeros(q.shape, dtype)
    lse = jnp.zeros(q.shape[:-1], F32)
    return _loop(0, nb if static else jnp.int32(nb), q_block, (out, lse))


def _bwd_impl(q, k, v, seg, pos, out, lse, dout, window, dtype):
    window, cap = window if isinstance(window, tuple) else (window, None)
    nb, b, kvh, c, g, hd = q.shape
    scale = hd**-0.5
    _, q_hi = _pair_bounds(seg, nb, c)
    static = nb <= UNROLL
    # D_i = rowsum(dO * O)
    dsum = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1)  # [nb, B, KV, c, G]

    def k_block(j, carry):
        dq, dk, dv = carry
        lk = j * c
        kj, vj = k[j], v[j]
        sk, pk = _sl(seg, lk, c, 1), _sl(pos, lk, c, 1)

        def q_block(i, st):
            dq, dkj, dvj = st
            lo = i * c
            qi, doi = q[i], dout[i]
            msk = _mask(_sl(seg, lo, c, 1), sk, _sl(pos, lo, c, 1), pk, lo, lk, window)[:, None, :, None, :]
            s = jnp.einsum("bkqgd,bksd->bkqgs", qi, kj, preferred_element_type=F32) * scale
            if cap is not None:
                t_ = jnp.tanh(s / cap)
                s = t_ * cap
            p = jnp.where(msk, jnp.exp(s - lse[i][..., None]), 0.0)
            dp = jnp.einsum("bkqgd,bksd->bkqgs", doi, vj, preferred_element_type=F32)
            ds = p * (dp - dsum[i][..., None])
            if cap is not None:  # d(cap tanh(s / cap)) / ds = 1 - tanh^2
                ds = ds * (1.0 - t_ * t_)
            ds = ds * scale
            dvj = dvj + jnp.einsum("bkqgs,bkqgd->bksd", p.astype(dtype), doi, preferred_element_type=F32)
            dkj = dkj + jnp.einsum("bkqgs,bkqgd->bksd", ds.astype(dtype), qi, preferred_element_type=F32)
            dq = dq.at[i].add(jnp.einsum("bkqgs,bksd->bkqgd", ds.astype(dtype), kj, preferred_element_type=F32))
            return dq, dkj, dvj

        z = jnp.zeros((b, kvh, c, hd), F32)
        dq, dkj, dvj = _loop(j, nb if static else q_hi[j] + 1, q_block, (dq, z, z))
        return dq, dk.at[j].set(dkj), dv.at[j].set(dvj)

    init = (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    dq, dk, dv = _loop(0, nb if static else jnp.int32(nb), k_block, init)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attn(q, k, v, seg, pos, window, dtype):
    return _fwd_impl(q, k, v, seg, pos, window, dtype)[0]


def _attn_fwd(q, k, v, seg, pos, window, dtype):
    out, lse = _fwd_impl(q, k, v, seg, pos, window, dtype)
    return out, (q, k, v, seg, pos, out, lse)


def _attn_bwd(window, dtype, res, dout):
    q, k, v, seg, pos, out, lse = res
    dq, dk, dv = _bwd_impl(q, k, v, seg, pos, out, lse, dout, window, dtype)
    z = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (integer inputs)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), z(seg), z(pos)


_attn.defvjp(_attn_fwd, _attn_bwd)


def segment_attention(q, k, v, segment_ids, positions, *, dtype, sliding_window=None, block: int = 0,
                      softcap: float | None = None):
    """See the module docstring. q [B,T,H,hd], k/v [B,T,KV,hd] -> [B,T,H*hd]; `softcap` (Gemma 2):
    scores -> softcap * tanh(scores / softcap) before the mask and softmax."""
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    c = block_size(b, h, t, block)
    nb = t // c
    # block-major layouts [nb, B, KV, c, ...]
    qh = q.astype(dtype).reshape(b, nb, c, kvh, g, hd).transpose(1, 0, 3, 2, 4, 5)
    kh = k.astype(dtype).reshape(b, nb, c, kvh, hd).transpose(1, 0, 3, 2, 4)
    vh = v.astype(dtype).reshape(b, nb, c, kvh, hd).transpose(1, 0, 3, 2, 4)
    o = _attn(qh, kh, vh, segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
              sliding_window if softcap is None else (sliding_window, float(softcap)),
              jnp.dtype(dtype))
    return o.transpose(1, 0, 3, 2, 4, 5).reshape(b, t, h * hd)


def visited_pairs(segment_ids, block: int) -> tuple[int, int]:
    """(pairs visited, causal pairs) for a [B, T] batch at block size `block`: how much of the
    causal block triangle the pair skipping leaves (for tests and benchmarks). This is what the loop path
    visits; rows of at most `UNROLL` blocks compute every causal pair."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    nb = seg.shape[1] // block
    kv_lo, _ = _pair_bounds(seg, nb, block)
    visited = int(jnp.sum(jnp.maximum(jnp.arange(nb) + 1 - kv_lo, 0)))
    return visited, nb * (nb + 1) // 2

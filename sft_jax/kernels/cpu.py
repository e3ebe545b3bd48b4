"""The `cpu` kernel set: drop-ins for reference functions of `models/llama.py`, tuned for XLA:CPU.

Each function computes what its reference computes (tests/test_kernels.py asserts values and
gradients: float32 to 1e-5 relative; bfloat16 to 2e-2) and differs only in how XLA:CPU runs it:

* `matmul` / `logits_matmul` (reference `x @ w`): hand-written backward whose weight gradient is a
  token-major 2-D dot (`_wgrad`); autodiff's version lets XLA:CPU lay the [tokens, out] output
  gradient out transposed: ~0.4 s of a 3.8 s full fine-tuning step on a 31M model (bench/README.md).
* `rope_tables` / `rope` (reference `llama.rope_tables` / `llama.apply_rotary_pos_emb`): the tables
  behind a `lax.cond` fusion barrier (XLA duplicated the cos/sin evaluation into every consumer),
  the rotation with a one-pass backward.
* `fused_qkv` / `fused_gate_up` (reference: three / two separate projections, then `silu(g) * u`):
  the projections of one input as ONE matmul, the LoRA-family low-rank terms riding in the same dot
  (`[x | x A_1 | x A_2 ..] @ [W ; B_1 0 .. ; 0 B_2 ..]`), the q/k/v split and SwiGLU with one-pass
  backwards, a method's per-column output scale (DoRA) applied after the dot. Used when the method
  states every part as `Hooks.low_rank` (or leaves it alone);
  otherwise the model calls the method's `linear` per projection.
* `linear` (reference `Hooks.linear`): a low-rank projection as one dot `[x | x A] @ [W ; s B]`.
* `attend_causal` (reference `llama.attend` on the training path): causal block skipping.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sft_jax.models.hooks import Hooks, LinearCall, LowRank, dropout

Array = Any
F32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)
_TOKENS = (((0,), (0,)), ((), ()))  # dot_general: contract the leading (token) dims


# ------------------------------------------------------------------ dots
def _pref(dtype):
    """Accumulate/return 16-bit dots in float32: XLA:CPU then runs them as native bf16 kernels
    (~2x the f32 rate on AVX512_BF16; bf16 -> bf16 dots are upcast to f32 instead)."""
    return F32 if jnp.dtype(dtype).itemsize < 4 else None


def _dot(x, w):
    """x [..., in] . w [in, *out] -> [..., *out] in x's dtype, as one 2-D dot (XLA:CPU sends dots
    with several free dims to a slow generic kernel that has no bf16 x bf16 -> f32)."""
    out = w.shape[1:]
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1), (((1,), (0,)), ((), ())),
                        preferred_element_type=_pref(x.dtype))
    return y.astype(x.dtype).reshape(*x.shape[:-1], *out)


def _wgrad(x, dy, out_nd):
    """sum over tokens of x (x) dy: x [..., in], dy [..., *out] -> [in, *out] (float32 for 16-bit
    inputs), both as token-major 2-D operands contracted over their leading dim.

    16-bit on CPU: XLA:CPU has no native bf16 kernel for a dot contracting the leading dim of both
    operands; it converts both to float32 (~300 GFLOP/s where a native bf16 dot runs at ~850-950).
    So x is first transposed to [in, tokens] explicitly, through a blocked reshape that XLA cannot
    fold back into the dot's dimension numbers (a plain `x.T` is folded), and the dot becomes a
    plain [in, tokens] @ [tokens, out] (measured 2.8-3.0x faster for [4096 x 512..1376] operands,
    transpose included; no gain in float32, so float32 keeps the direct form). When out < in (a LoRA
    A gradient, out = r) the narrow dy is transposed instead and the small result after the dot:
    -12% of a bf16 LoRA step of the 31M model (bench/README.md)."""
    out_shape = dy.shape[dy.ndim - out_nd:]
    x2 = x.reshape(-1, x.shape[-1])
    n, k = x2.shape
    dy2 = dy.reshape(n, -1)
    pref = _pref(x.dtype)
    blk = next((c for c in (64, 32, 16, 8) if n % c == 0), 0)
    if pref is not None and blk and jax.default_backend() == "cpu":
        m = dy2.shape[1]
        if m < k:
            dyt = dy2.reshape(n // blk, blk, m).transpose(2, 0, 1).reshape(m, n)
            dwt = lax.dot_general(dyt, x2, (((1,), (0,)), ((), ())), preferred_element_type=pref)
            dw = lax.optimization_barrier(dwt).T
        else:
            xt = x2.reshape(n // blk, blk, k).transpose(2, 0, 1).reshape(k, n)
            dw = lax.dot_general(xt, dy2, (((1,), (0,)), ((), ())), preferred_element_type=pref)
    else:
        dw = lax.dot_general(x2, dy2, _TOKENS, preferred_element_type=pref)
    return dw.reshape(k, *out_shape)


def _dgrad(dy, w):
    """dy [..., *out] . w [in, *out]^T -> [..., in] in dy's dtype (one 2-D dot)."""
    out_nd = w.ndim - 1
    lead = dy.shape[:dy.ndim - out_nd]
    d = lax.dot_general(dy.reshape(-1, math.prod(w.shape[1:])), w.reshape(w.shape[0], -1),
                        (((1,), (1,)), ((), ())), preferred_element_type=_pref(dy.dtype))
    return d.astype(dy.dtype).reshape(*lead, w.shape[0])


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
    """`x @ w` (x [..., in], w [in, *out]) in x's dtype, with the token-major backward."""
    return _dot(x, w)


def _matmul_fwd(x, w):
    return _dot(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dw = _wgrad(x, dy, w.ndim - 1)
    return _dgrad(dy, w).astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def logits_matmul(x: Array, w: Array) -> Array:
    """`x @ w` returned in float32 whatever x's dtype (the LM head), with `matmul`'s backward."""
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return y.reshape(*x.shape[:-1], w.shape[1])


def _logits_fwd(x, w):
    return logits_matmul(x, w), (x, w)


def _logits_bwd(res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    return _dgrad(dy, w).astype(x.dtype), _wgrad(x, dy, 1).astype(w.dtype)


logits_matmul.defvjp(_logits_fwd, _logits_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def low_rank_matmul(x: Array, ha: Array, w: Array, b: Array, scale: float) -> Array:
    """`x @ w + scale * ha @ b` (x [..., in], ha = dropout(x) @ A [..., r], w [in, *out],
    b [r, *out]) as ONE dot: `[x | ha] @ [w ; scale * b]`. The rank-r product alone is an
    output-bound dot (K = r) that cost as much as the main one on XLA:CPU; folded in, it adds r to K.
    The backward is one dot for [dx | d(ha)] and token-major weight-gradient dots (the base weight's
    is dropped by XLA when the base is frozen)."""
    return _dot(jnp.concatenate([x, ha], axis=-1), _wcat(w, b, scale))


def _wcat(w, b, scale):
    return jnp.concatenate([w, b * jnp.asarray(scale, b.dtype)], axis=0)


def _low_rank_matmul_fwd(x, ha, w, b, scale):
    return low_rank_matmul(x, ha, w, b, scale), (x, ha, w, b)


def _low_rank_matmul_bwd(scale, res, dy):
    x, ha, w, b = res
    d = _dgrad(dy, _wcat(w, b, scale))
    n_in = x.shape[-1]
    dx, dha = d[..., :n_in], d[..., n_in:]
    dw = _wgrad(x, dy, w.ndim - 1)
    db = _wgrad(ha, dy, b.ndim - 1) * scale
    return dx.astype(x.dtype), dha.astype(ha.dtype), dw.astype(w.dtype), db.astype(b.dtype)


low_rank_matmul.defvjp(_low_rank_matmul_fwd, _low_rank_matmul_bwd)


# ------------------------------------------------------------------ elementwise
@jax.custom_vjp
def swiglu(gu: Array) -> Array:
    """silu(g) * u for g, u = gu[..., 0], gu[..., 1] (gu [..., I, 2]): one fused pass forward; the
    backward recomputes from gu and writes the [..., I, 2] cotangent in one pass (float32 math)."""
    g, u = gu[..., 0].astype(F32), gu[..., 1].astype(F32)
    return (g * jax.nn.sigmoid(g) * u).astype(gu.dtype)


def _swiglu_fwd(gu):
    return swiglu(gu), gu


def _swiglu_bwd(gu, dh):
    g, u = gu[..., 0].astype(F32), gu[..., 1].astype(F32)
    sg = jax.nn.sigmoid(g)
    d = dh.astype(F32)
    dgu = jnp.stack([d * u * sg * (1.0 + g * (1.0 - sg)), d * g * sg], axis=-1)
    return (dgu.astype(gu.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """(cos, sin) [B, T, 1, hd/2] float32, evaluated inside a `lax.cond` whose predicate XLA cannot
    fold: the conditional is a fusion boundary, so XLA cannot duplicate the cos/sin evaluation into
    each consumer (it did, recomputing them per head in every layer's q/k fusions, forward and
    backward; `optimization_barrier` does not stop it on CPU)."""
    inv = jnp.asarray(inv_freq, F32)

    def tables(p):
        freqs = p.astype(F32)[..., None] * inv  # [B, T, hd/2]
        return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]

    always = jnp.min(positions, initial=0) > jnp.iinfo(jnp.int32).min  # true, but not a constant
    return lax.cond(always, tables, tables, positions)


@jax.custom_vjp
def rope(x, cos, sin):
    """Rotate the (x1, x2) halves of the last dim by the angles whose cos/sin are given (float32).
    The backward is the inverse rotation, written as one pass (autodiff's version pads and adds
    the two half-slices' cotangents); cos/sin get no gradient (they come from integer positions)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rope_fwd(x, cos, sin):
    return rope(x, cos, sin), (cos, sin)


def _rope_bwd(res, dy):
    cos, sin = res
    half = dy.shape[-1] // 2
    d1, d2 = dy[..., :half], dy[..., half:]
    dx = jnp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)


rope.defvjp(_rope_fwd, _rope_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_qkv(qkv, g):
    """[B, T, KV, G+2, hd] -> q [B, T, KV, G, hd], k, v [B, T, KV, hd]; the backward writes the
    fused cotangent with one concatenation (autodiff's: three pads and two adds)."""
    return qkv[:, :, :, :g], qkv[:, :, :, g], qkv[:, :, :, g + 1]


def _split_qkv_fwd(qkv, g):
    return split_qkv(qkv, g), None


def _split_qkv_bwd(g, _, cts):
    dq, dk, dv = cts
    return (jnp.concatenate([dq, dk[:, :, :, None], dv[:, :, :, None]], axis=3),)


split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


# ------------------------------------------------------------------ projections
def _adapter_input(call: LinearCall, lr: LowRank, a: Array) -> Array:
    """`dropout(x) @ A` in the compute dtype."""
    dt = call.dtype
    return matmul(dropout(call.x.astype(dt), lr.dropout, call), a.astype(dt))


def linear(hooks: Hooks, call: LinearCall) -> Array:
    """`hooks.linear(call)`, as one dot `[x | dropout(x) A] @ [W ; s B]` when the method states the
    projection as `low_rank`."""
    lr = hooks.low_rank(call) if hooks.fusable(call) else None
    if lr is None:
        return hooks.linear(call)
    dt = call.dtype
    y = low_rank_matmul(call.x.astype(dt), _adapter_input(call, lr, lr.a), hooks.base_kernel(call), lr.b.astype(dt),
                    float(lr.scale))
    if lr.out_scale is not None:
        y = (y * lr.out_scale).astype(dt)
    b = hooks.bias(call)
    if b is not None:
        y = y + b.astype(dt)
    return y


def fusable(hooks: Hooks, calls: Sequence[LinearCall]) -> bool:
    """Whether `fused` can compute these projections: every part fusable, and the low-rank parts
    share one scale and one dropout rate."""
    if not all(hooks.fusable(c) for c in calls):
        return False
    lrs = {(float(lr.scale), float(lr.dropout)) for lr in (hooks.low_rank(c) for c in calls) if lr is not None}
    return len(lrs) <= 1


def fused(hooks: Hooks, calls: Sequence[LinearCall], shapes: Sequence[tuple], axis: int) -> Array:
    """Several projections of the same input as ONE matmul (one dot forward, one for the input
    gradient, one token-major weight-gradient dot): part i's kernel [D, out_i] is viewed as
    [D, *shapes[i]] and the parts are concatenated along `axis` of those out shapes (the shapes
    agree elsewhere). Low-rank parts ride in the same dot. Returns y [..., *fused out shape] in the
    compute dtype. Concatenating along a per-head / per-feature axis keeps a sharding of the heads
    (or of the MLP features) a sharding of the fused output. Requires `fusable(hooks, calls)`."""
    x = calls[0].x
    dt = calls[0].dtype
    d = x.shape[-1]
    cat = lambda xs, lead: jnp.concatenate(xs, axis=lead + axis)  # noqa: E731
    w = cat([hooks.base_kernel(c).reshape(d, *sh) for c, sh in zip(calls, shapes)], 1)
    lrs = [hooks.low_rank(c) for c in calls]
    if all(lr is None for lr in lrs):
        y = matmul(x.astype(dt), w)
    else:
        a_s, rows, parts = [], [], []
        for i, lr in enumerate(lrs):
            if lr is None:
                continue
            a_s.append(lr.a)
            parts.append((calls[i], lr))
            r = lr.b.shape[0]
            rows.append(cat([lr.b.astype(dt).reshape(r, *sh) if j == i else jnp.zeros((r, *sh), dt)
                             for j, sh in enumerate(shapes)], 1))
        call0, lr0 = parts[0]
        if call0.deterministic or lr0.dropout == 0:
            # one dot for all the adapters' A: x @ [A_1 | A_2 ..] (same input, no dropout masks)
            ha = _adapter_input(call0, lr0, jnp.concatenate(a_s, axis=-1))
        else:  # an independent dropout mask per adapter, as peft
            ha = jnp.concatenate([_adapter_input(c, lr, lr.a) for c, lr in parts], axis=-1)
        y = low_rank_matmul(x.astype(dt), ha, w, jnp.concatenate(rows, axis=0), float(lr0.scale))
        if any(lr is not None and lr.out_scale is not None for lr in lrs):  # per-column scales (DoRA)
            col = cat([jnp.ones(sh, F32) if lr is None or lr.out_scale is None else lr.out_scale.astype(F32).reshape(sh)
                       for lr, sh in zip(lrs, shapes)], 0)
            y = (y * col).astype(dt)
    biases = [hooks.bias(c) for c in calls]
    if any(b is not None for b in biases):
        y = y + cat([jnp.zeros(sh, dt) if b is None else b.astype(dt).reshape(sh) for b, sh in zip(biases, shapes)], 0)
    return y


def fused_qkv(hooks: Hooks, calls: Sequence[LinearCall], num_kv_heads: int, head_dim: int):
    """(q [B, T, H, hd], k, v [B, T, KV, hd]) of the q/k/v projections as one matmul over
    [D, KV, G+2, hd] (per KV head its G query heads, then its key and its value head), or None
    when the parts cannot be fused."""
    if not fusable(hooks, calls):
        return None
    kvh, hd = num_kv_heads, head_dim
    g = calls[0].features // (kvh * hd)
    qkv = fused(hooks, calls, [(kvh, g, hd), (kvh, 1, hd), (kvh, 1, hd)], axis=1)
    q, k, v = split_qkv(qkv, g)
    b, t = q.shape[:2]
    return q.reshape(b, t, kvh * g, hd), k, v


def fused_gate_up(hooks: Hooks, gate: LinearCall, up: LinearCall):
    """`silu(gate(x)) * up(x)` as one matmul over [D, I, 2] (columns interleaved g0 u0 g1 u1 ...,
    so that a sharding of I stays a sharding of the fused output) and the fused SwiGLU, or None
    when the parts cannot be fused."""
    if not fusable(hooks, (gate, up)):
        return None
    n = gate.features
    return swiglu(fused(hooks, (gate, up), [(n, 1), (n, 1)], axis=1))


# ------------------------------------------------------------------ attention
def _causal_chunk(t: int) -> int:
    """Query/key block size for `attend_causal` (0 = no blocking): at most 8 blocks of >= 128."""
    chunk = max(128, t // 8)
    return chunk if t > chunk and t % chunk == 0 else 0


def attend_causal(reference, q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
    """`reference(q, k, v, mask, dtype)` (the model's dense attention) for the training path, where
    keys are the same slots as the queries and the mask is causal by slot: query block i is scored
    only against key blocks 0..i, so the upper-right blocks of the T x T scores (all masked) are
    never computed. Saves (n-1)/2n of the attention FLOPs and score memory for n blocks (-13% step
    time measured on CPU for a 31M model at T=512, bench/README.md)."""
    t = q.shape[1]
    chunk = _causal_chunk(t)
    if not chunk or k.shape[1] != t:
        return reference(q, k, v, mask, dtype)
    outs = []
    for i in range(t // chunk):
        lo, hi = i * chunk, (i + 1) * chunk
        outs.append(reference(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi], dtype))
    return jnp.concatenate(outs, axis=1)

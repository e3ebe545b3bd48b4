"""One Flax Linen module family for Llama 2/3, Mistral, Qwen2/2.5 and Qwen3.

Layout and policy
-----------------
* Parameters are plain pytrees (see BUILD_NOTES.md "Module interfaces"); kernels are
  `[in, out]`.  Every parameter is created through `nn.with_logical_partitioning`
  (names: vocab, embed, heads, kv_heads, mlp, norm, and `layers` for the scanned axis),
  so `param_logical_axes(config)` and sharding rules need no table of their own.
* Compute dtype (`config.dtype`) and parameter dtype (`config.param_dtype`) are separate;
  RMSNorm, RoPE, the attention softmax and the logits are float32.
* Attention takes explicit `positions` and `segment_ids`: it is causal and block-diagonal
  by segment; segment 0 is padding (its rows attend to nothing, giving finite garbage,
  never NaN).  Mistral/Qwen sliding windows are applied in the mask
  (`q_pos - k_pos < sliding_window`, as transformers).
* LoRA: a dense module adds `lora_scale * dropout(x) @ A @ B` when the `lora` collection
  holds `A`/`B` at its path (same paths as the params; a leading layer axis with
  `scan_layers`).  Dropout uses the rng named 'dropout', only when not deterministic.

KV cache (generation)
---------------------
`init_cache(config, batch, max_len)` returns
``{'k': [L, B, S, KV, hd], 'v': [L, B, S, KV, hd], 'positions': [B, S] int32, 'index': int32}``
where `positions[b, s]` is the RoPE position of the token held in slot `s` of row `b`
(-1 = empty / padding) and `index` is the next slot to write (shared by all rows).
`forward_with_cache(params, config, input_ids [B, T], positions [B, T], cache,
segment_ids=None)` writes the T new tokens into slots `index .. index+T-1`, marks
slots of tokens whose `segment_ids` is 0 as empty, and lets each query attend to every
non-empty slot of its row whose position is <= its own (and within the sliding window).
Slot order therefore does not matter, only the stored positions, so a batch of prompts
of different lengths can be prefilled right-padded (positions 0..len-1, padding with
segment id 0) or left-padded; each decode step then feeds one token per row with that
row's own next position (e.g. `len_b + step`).  With right padding the prefill logits
to read for row b are at index `len_b - 1`.  All shapes are static, so prefill and the
decode step each compile once.  The caller must keep `index + T <= max_len`
(`dynamic_update_slice` clamps otherwise).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sft_jax.models import pallas_attention
from sft_jax.models.attention import segment_attention
from sft_jax.models.config import ModelConfig

Array = Any
F32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)


def _wlc(x, axes):
    return nn.with_logical_constraint(x, axes)


# ------------------------------------------------------------------ RoPE
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float32), with `linear` or `llama3` scaling."""
    hd = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(
        np.float32
    )
    rs = config.rope_scaling
    if not rs:
        return inv
    rt = rs.get("rope_type", rs.get("type", "default"))
    if rt == "linear":
        return (inv / np.float32(rs["factor"])).astype(np.float32)
    if rt == "llama3":
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * np.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """(cos, sin) [B, T, 1, hd/2] float32 for positions [B, T], computed once per forward pass and
    shared by every layer. They are evaluated inside a `lax.cond` whose predicate XLA cannot fold:
    the conditional is a fusion boundary, so XLA cannot duplicate the cos/sin evaluation into each
    consumer (it did, recomputing them per head in every layer's q/k fusions, forward and backward;
    `optimization_barrier` does not stop it on CPU)."""
    inv = jnp.asarray(inv_freq, F32)

    def tables(p):
        freqs = p.astype(F32)[..., None] * inv  # [B, T, hd/2]
        return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]

    always = jnp.min(positions, initial=0) > jnp.iinfo(jnp.int32).min  # true, but not a constant
    return lax.cond(always, tables, tables, positions)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray, dtype) -> Array:
    """Rotate-half RoPE (the Hugging Face layout). x [B, T, N, hd], positions [B, T]."""
    cos, sin = rope_tables(positions, inv_freq)
    return _rope(x.astype(F32), cos, sin).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split_qkv(qkv, g):
    """[B, T, KV, G+2, hd] -> q [B, T, KV, G, hd], k, v [B, T, KV, hd]; the backward writes the
    fused cotangent with one concatenation (autodiff's: three pads and two adds)."""
    return qkv[:, :, :, :g], qkv[:, :, :, g], qkv[:, :, :, g + 1]


def _split_qkv_fwd(qkv, g):
    return _split_qkv(qkv, g), None


def _split_qkv_bwd(g, _, cts):
    dq, dk, dv = cts
    return (jnp.concatenate([dq, dk[:, :, :, None], dv[:, :, :, None]], axis=3),)


_split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


@jax.custom_vjp
def _rope(x, cos, sin):
    """Rotate the (x1, x2) halves of the last dim by the angles whose cos/sin are given (float32).
    The backward is the inverse rotation, written as one pass (autodiff's version pads and adds
    the two half-slices' cotangents); cos/sin get no gradient (they come from integer positions)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rope_fwd(x, cos, sin):
    return _rope(x, cos, sin), (cos, sin)


def _rope_bwd(res, dy):
    cos, sin = res
    half = dy.shape[-1] // 2
    d1, d2 = dy[..., :half], dy[..., half:]
    dx = jnp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope.defvjp(_rope_fwd, _rope_bwd)


# ------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    eps: float
    dtype: Any = F32
    param_dtype: Any = F32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x = x.astype(F32)
        y = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(F32)).astype(self.dtype)


class Dense(nn.Module):
    """`x @ kernel (+ bias)`, plus the LoRA term when the `lora` collection has A/B here."""

    features: int
    kernel_axes: tuple
    use_bias: bool = False
    dtype: Any = F32
    param_dtype: Any = F32
    lora_scale: Any = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    weights_only: bool = False  # return (kernel, bias, lora A/B) instead of applying them

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        b = None
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[-1:]),
                (self.features,),
                self.param_dtype,
            )
        ab = None
        if self.has_variable("lora", "A"):
            ab = (self.get_variable("lora", "A"), self.get_variable("lora", "B"))
        if self.weights_only:
            return kernel, b, ab
        dt = self.dtype
        if ab is None:
            y = matmul(x.astype(dt), kernel.astype(dt))
        else:
            y = lora_matmul(x.astype(dt), _lora_ha(x, ab[0], self), kernel.astype(dt), ab[1].astype(dt),
                            float(self.lora_scale))
        if b is not None:
            y = y + b.astype(dt)
        return y


def _lora_ha(x, a, mod):
    """`dropout(x) @ A` in the compute dtype; called from `mod`'s compact method (the dropout layer
    is created there)."""
    h = x
    if not mod.deterministic and mod.lora_dropout > 0:
        h = nn.Dropout(rate=mod.lora_dropout, rng_collection="dropout")(h, deterministic=False)
    dt = jnp.dtype(mod.dtype) if isinstance(mod, Dense) else mod.dt
    return matmul(h.astype(dt), a.astype(dt))  # A's gradient through `_wgrad`


_TOKENS = (((0,), (0,)), ((), ()))  # dot_general: contract the leading (token) dims


def _pref(dtype):
    """Accumulate/return 16-bit dots in float32: XLA:CPU then runs them as native bf16 kernels
    (~2x the f32 rate on AVX512_BF16; bf16 -> bf16 dots are upcast to f32 instead), and TPU/GPU
    accumulate in f32 anyway."""
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
            # narrow output (a LoRA A gradient: m = r): transpose dy, not x, and the small result
            # (dw^T = dy^T x; the barrier keeps XLA from folding the transpose back into the dot)
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
    """`x @ w` (x [..., in], w [in, *out]) with a hand-written backward whose weight gradient is
    `dot_general(x2d, dy2d)` over the token dim. Autodiff's version lets XLA:CPU lay the [tokens,
    out] output gradient out transposed, written with a stride by the (e.g. SiLU-backward) fusion
    that produces it: ~0.4 s of a 3.8 s full fine-tuning step on a 31M model (bench/README.md)."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x: Array, ha: Array, w: Array, b: Array, scale: float) -> Array:
    """`x @ w + scale * ha @ b` (x [..., in], ha = dropout(x) @ A [..., r], w [in, *out],
    b [r, *out]) as ONE dot: `[x | ha] @ [w ; scale * b]`. The rank-r product alone is an
    output-bound dot (K = r) that cost as much as the main one on XLA:CPU; folded in, it adds r to K.
    The backward is one dot for [dx | d(ha)] and token-major weight-gradient dots (the base weight's
    is dropped by XLA when the base is frozen)."""
    return _dot(jnp.concatenate([x, ha], axis=-1), _wcat(w, b, scale))


def _wcat(w, b, scale):
    return jnp.concatenate([w, b * jnp.asarray(scale, b.dtype)], axis=0)


def _lora_matmul_fwd(x, ha, w, b, scale):
    return lora_matmul(x, ha, w, b, scale), (x, ha, w, b)


def _lora_matmul_bwd(scale, res, dy):
    x, ha, w, b = res
    d = _dgrad(dy, _wcat(w, b, scale))
    n_in = x.shape[-1]
    dx, dha = d[..., :n_in], d[..., n_in:]
    dw = _wgrad(x, dy, w.ndim - 1)
    db = _wgrad(ha, dy, b.ndim - 1) * scale
    return dx.astype(x.dtype), dha.astype(ha.dtype), dw.astype(w.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def attend(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
    """GQA attention. q [B,T,H,hd], k/v [B,S,KV,hd], mask [B,T,S] bool -> [B,T,H*hd]."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=F32) * (hd**-0.5)
    s = jnp.where(mask[:, None, None, :, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(dtype), v.astype(dtype), preferred_element_type=F32)
    return o.astype(dtype).reshape(b, t, h * hd)


def _causal_chunk(t: int) -> int:
    """Query/key block size for `attend_causal` (0 = no blocking): at most 8 blocks of >= 128."""
    chunk = max(128, t // 8)
    return chunk if t > chunk and t % chunk == 0 else 0


def attend_causal(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
    """`attend` for the training path, where keys are the same slots as the queries and the mask is
    causal by slot: query block i is scored only against key blocks 0..i, so the upper-right blocks
    of the T x T scores (all masked) are never computed. Same math and mask as `attend`; saves
    (n-1)/2n of the attention FLOPs and score memory for n blocks (-13% step time measured on CPU
    for a 31M model at T=512, bench/README.md)."""
    b, t, h, hd = q.shape
    chunk = _causal_chunk(t)
    if not chunk or k.shape[1] != t:
        return attend(q, k, v, mask, dtype)
    outs = []
    for i in range(t // chunk):
        lo, hi = i * chunk, (i + 1) * chunk
        outs.append(attend(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi], dtype))
    return jnp.concatenate(outs, axis=1)


class _Base(nn.Module):
    config: ModelConfig
    lora_scale: Any = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @property
    def dt(self):
        return jnp.dtype(self.config.dtype)

    @property
    def pdt(self):
        return jnp.dtype(self.config.param_dtype)

    def dense(self, features, axes, use_bias, name, weights_only=False):
        return Dense(
            features,
            axes,
            use_bias=use_bias,
            dtype=self.dt,
            param_dtype=self.pdt,
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            deterministic=self.deterministic,
            weights_only=weights_only,
            name=name,
        )

    def norm(self, name):
        return RMSNorm(self.config.rms_norm_eps, dtype=self.dt, param_dtype=self.pdt, name=name)

    def fused(self, x, parts, shapes, axis):
        """Several projections of the same input as ONE matmul (one dot forward, one for the input
        gradient, one token-major weight-gradient dot): part i's kernel [D, out_i] is viewed as
        [D, *shapes[i]] and the parts are concatenated along `axis` of those out shapes (the
        shapes agree elsewhere). With LoRA, every adapter rides in the same dot:
        `[x | x A_1 | x A_2 ..] @ [W ; B_1 0 .. ; 0 B_2 ..]`. `parts` are `Dense(weights_only=True)`
        results (kernel, bias, (A, B) or None). Returns y [..., *fused out shape] in the compute dtype.
        Concatenating along a per-head / per-feature axis keeps a sharding of the heads (or of the
        MLP features) a sharding of the fused output."""
        dt = self.dt
        d = x.shape[-1]
        cat = lambda xs, lead: jnp.concatenate(xs, axis=lead + axis)  # noqa: E731
        w = cat([k.astype(dt).reshape(d, *sh) for (k, _, _), sh in zip(parts, shapes)], 1)
        if all(ab is None for _, _, ab in parts):
            y = matmul(x.astype(dt), w)
        else:
            a_s, rows = [], []
            for i, (_, _, ab) in enumerate(parts):
                if ab is None:
                    continue
                a_s.append(ab[0])
                r = ab[1].shape[0]
                rows.append(cat([ab[1].astype(dt).reshape(r, *sh) if j == i else jnp.zeros((r, *sh), dt)
                                 for j, sh in enumerate(shapes)], 1))
            if self.deterministic or self.lora_dropout == 0:
                # one dot for all the adapters' A: x @ [A_1 | A_2 ..] (same input, no dropout masks)
                ha = _lora_ha(x, jnp.concatenate(a_s, axis=-1), self)
            else:  # an independent dropout mask per adapter, as peft
                ha = jnp.concatenate([_lora_ha(x, a, self) for a in a_s], axis=-1)
            y = lora_matmul(x.astype(dt), ha, w, jnp.concatenate(rows, axis=0), float(self.lora_scale))
        if any(bias is not None for _, bias, _ in parts):
            y = y + cat([jnp.zeros(sh, dt) if bias is None else bias.astype(dt).reshape(sh)
                         for (_, bias, _), sh in zip(parts, shapes)], 0)
        return y


class Attention(_Base):
    @nn.compact
    def __call__(self, x, rope, mask, cache_index=None, cache=None):
        """x [B, T, D]; rope = `rope_tables(positions, ...)`; mask as built by `Llama`."""
        c = self.config
        b, t, _ = x.shape
        hd = c.head_dim
        kvh, g = c.num_kv_heads, c.num_heads // c.num_kv_heads
        # q, k and v as one matmul over [D, KV, G+2, hd]: per KV head its G query heads, then its
        # key and its value head (the grouping `attend` uses: query head h reads KV head h // G)
        parts = [self.dense(c.num_heads * hd, ("embed", "heads"), c.attention_bias, "q_proj", True)(x),
                 self.dense(kvh * hd, ("embed", "kv_heads"), c.attention_bias, "k_proj", True)(x),
                 self.dense(kvh * hd, ("embed", "kv_heads"), c.attention_bias, "v_proj", True)(x)]
        qkv = self.fused(x, parts, [(kvh, g, hd), (kvh, 1, hd), (kvh, 1, hd)], axis=1)  # [B, T, KV, G+2, hd]
        q, k, v = _split_qkv(qkv, g)
        q = q.reshape(b, t, c.num_heads, hd)
        if c.qk_norm:
            q = self.norm("q_norm")(q)
            k = self.norm("k_norm")(k)
        cos, sin = rope
        q = _wlc(_rope(q.astype(F32), cos, sin).astype(self.dt), ("act_batch", "act_length", "act_heads", None))
        k = _wlc(_rope(k.astype(F32), cos, sin).astype(self.dt), ("act_batch", "act_length", "act_kv_heads", None))
        v = _wlc(v, ("act_batch", "act_length", "act_kv_heads", None))
        new_cache = None
        if cache is not None:
            ck, cv = cache
            ck = lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            k, v = ck, cv
            new_cache = (ck, cv)
        if cache is not None:
            o = attend(q, k, v, mask, self.dt)
        elif c.attention == "flash":
            # training path: block-sparse causal + segment attention, [B,H,T,T] never materialised
            seg, pos = mask
            o = segment_attention(q, k, v, seg, pos, dtype=self.dt, sliding_window=c.sliding_window,
                                  block=c.attention_block)
        elif c.attention == "pallas":  # the same function as jax's Pallas (Triton) GPU kernel
            o = pallas_attention.attention(q, k, v, mask[0], dtype=self.dt, sliding_window=c.sliding_window,
                                           block=c.attention_block)
        else:
            o = attend_causal(q, k, v, mask, self.dt)
        o = self.dense(c.hidden_size, ("heads", "embed"), c.attention_out_bias, "o_proj")(o)
        return o, new_cache


class Mlp(_Base):
    @nn.compact
    def __call__(self, x):
        c = self.config
        # gate and up as one matmul over [D, I, 2], columns interleaved (g0 u0 g1 u1 ...) so that a
        # sharding of I stays a sharding of the fused output; SwiGLU reads the pairs
        n = c.intermediate_size
        parts = [self.dense(n, ("embed", "mlp"), c.mlp_bias, "gate_proj", True)(x),
                 self.dense(n, ("embed", "mlp"), c.mlp_bias, "up_proj", True)(x)]
        gu = self.fused(x, parts, [(n, 1), (n, 1)], axis=1)  # [..., I, 2]
        h = _wlc(swiglu(gu), ("act_batch", "act_length", "act_mlp"))
        return self.dense(c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")(h)


class DecoderLayer(_Base):
    @nn.compact
    def __call__(self, x, rope, mask, cache_index=None, cache=None):
        kw = dict(config=self.config, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  deterministic=self.deterministic)
        h, new_cache = Attention(**kw, name="attn")(self.norm("input_norm")(x), rope, mask, cache_index, cache)
        x = x + h
        x = x + Mlp(**kw, name="mlp")(self.norm("post_attn_norm")(x))
        x = _wlc(x, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(_Base):
    """The decoder.  `__call__` returns float32 logits [B, T, V] (or the final-normed hidden
    states [B, T, D] in the compute dtype when `return_hidden`); with `cache` it returns
    `(logits, new_cache)`."""

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, embed_noise=None, return_hidden=False,
                 cache=None):
        c = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = positions.astype(jnp.int32)
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        cache_index = None
        if cache is None and c.attention in ("flash", "pallas"):
            mask = (seg, positions)  # the attention builds its mask block by block
        elif cache is None:
            idx = jnp.arange(t)
            mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (idx[:, None] >= idx[None, :])
            if c.sliding_window is not None:
                mask = mask & (positions[:, :, None] - positions[:, None, :] < c.sliding_window)
        else:
            valid = seg != 0
            cache_index = jnp.asarray(cache["index"], jnp.int32)
            kv_pos = lax.dynamic_update_slice(
                cache["positions"], jnp.where(valid, positions, -1).astype(jnp.int32), (0, cache_index)
            )
            mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= positions[:, :, None]) & valid[:, :, None]
            if c.sliding_window is not None:
                mask = mask & (positions[:, :, None] - kv_pos[:, None, :] < c.sliding_window)

        embedding = Embed(c, name="embed")()  # param path embed/embedding
        x = jnp.take(embedding, input_ids, axis=0).astype(self.dt)
        if embed_noise is not None:
            x = x + embed_noise.astype(self.dt)
        x = _wlc(x, ("act_batch", "act_length", "act_embed"))

        rope = rope_tables(positions, rope_inv_freq(c))
        kw = dict(config=c, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  deterministic=self.deterministic)
        layer_cls = DecoderLayer
        if c.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        layer_caches = None if cache is None else (cache["k"], cache["v"])
        if c.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, new_caches = stack(**kw, name="layers")(x, rope, mask, cache_index, layer_caches)
        else:
            outs = []
            for i in range(c.num_layers):
                lc = None if cache is None else (cache["k"][i], cache["v"][i])
                x, nc = layer_cls(**kw, name=f"layers_{i}")(x, rope, mask, cache_index, lc)
                outs.append(nc)
            new_caches = None if cache is None else (
                jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]))
        x = self.norm("final_norm")(x)
        if return_hidden:
            out = x
        else:
            if c.tie_embeddings:
                kernel = embedding.T
            else:
                kernel = LMHead(c, name="lm_head")()
            out = logits_matmul(x, kernel.astype(self.dt))  # float32 [B, T, V]
            out = _wlc(out, ("act_batch", "act_length", "act_vocab"))
        if cache is None:
            return out
        new_cache = {"k": new_caches[0], "v": new_caches[1], "positions": kv_pos, "index": cache_index + t}
        return out, new_cache


class Embed(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self):
        c = self.config
        return self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            jnp.dtype(c.param_dtype),
        )


class LMHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self):
        c = self.config
        return self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
            (c.hidden_size, c.vocab_size),
            jnp.dtype(c.param_dtype),
        )


# ------------------------------------------------------------------ functional API
def _dummy_ids():
    return jnp.zeros((1, 1), jnp.int32)


def init_params(config: ModelConfig, rng) -> dict:
    """Random parameters (plain dict, unboxed) in `config.param_dtype`."""

    @functools.partial(jax.jit)
    def _init(r):
        return nn.meta.unbox(Llama(config).init(r, _dummy_ids())["params"])

    return _init(rng)


def abstract_params(config: ModelConfig, boxed: bool = False) -> dict:
    """Shapes/dtypes of the params (jax.ShapeDtypeStruct leaves); `boxed` keeps nn.Partitioned."""
    tree = jax.eval_shape(lambda: Llama(config).init(jax.random.PRNGKey(0), _dummy_ids())["params"])
    return tree if boxed else nn.meta.unbox(tree)


def param_logical_axes(config: ModelConfig) -> dict:
    """Tree with the params' structure whose leaves are tuples of logical axis names."""
    boxed = abstract_params(config, boxed=True)
    return jax.tree.map(
        lambda x: tuple(x.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def lm_head_kernel(params: dict, config: ModelConfig) -> Array:
    """[D, V] output projection (the embedding transposed when tied)."""
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def _variables(params, lora):
    v = {"params": params}
    if lora is not None:
        v["lora"] = lora
    return v


def forward(params, config: ModelConfig, input_ids, positions=None, segment_ids=None, *, lora=None,
            lora_scale=1.0, lora_dropout=0.0, embed_noise=None, dropout_rng=None, deterministic=True,
            return_hidden=False):
    """Logits float32 [B, T, V] (or final-normed hidden [B, T, D] when `return_hidden`)."""
    rngs = {}
    if not deterministic and lora is not None and lora_dropout > 0:
        if dropout_rng is None:
            raise ValueError("forward: lora_dropout > 0 with deterministic=False needs dropout_rng")
        rngs["dropout"] = dropout_rng
    model = Llama(config, lora_scale=lora_scale, lora_dropout=lora_dropout, deterministic=deterministic)
    return model.apply(_variables(params, lora), input_ids, positions, segment_ids, embed_noise, return_hidden,
                       rngs=rngs or None)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache (see the module docstring for the layout)."""
    dt = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "positions": jnp.full((batch, max_len), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def forward_with_cache(params, config: ModelConfig, input_ids, positions, cache, *, segment_ids=None, lora=None,
                       lora_scale=1.0):
    """Prefill or decode step: `(logits float32 [B, T, V], new_cache)`.

    `segment_ids` (optional, [B, T]): 0 marks padding tokens, which are not stored as valid
    cache slots and attend to nothing; any other value marks a real token.
    """
    model = Llama(config, lora_scale=lora_scale)
    return model.apply(_variables(params, lora), input_ids, positions, segment_ids, None, False, cache)

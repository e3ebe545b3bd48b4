"""Llama 2/3, Mistral, Qwen2/2.5 and Qwen3 in Flax Linen: a port of transformers' `modeling_llama.py`
(and of the Mistral/Qwen2/Qwen3 variants it covers).

Reading guide (HF name -> here): `LlamaRotaryEmbedding` + `modeling_rope_utils` -> `models/rope.py`
(`rope.tables`; `rope_inv_freq`/`rope_tables`/`rotate_half`/`apply_rotary_pos_emb` re-exported
here); `eager_attention_forward` -> `attend`;
`LlamaAttention` -> `Attention` (q/k/v/o projections, Qwen3's q/k norms); `LlamaMLP` -> `Mlp`
(`down(silu(gate(x)) * up(x))`); `LlamaRMSNorm` -> `RMSNorm`; `LlamaDecoderLayer` -> `DecoderLayer`;
`LlamaForCausalLM` -> `Llama`.

Layout and policy
-----------------
* Parameters are plain pytrees; kernels are `[in, out]`. Every parameter is created through
  `nn.with_logical_partitioning` (names: vocab, embed, heads, kv_heads, mlp, norm, and `layers` for
  the scanned axis), so `param_logical_axes(config)` and sharding rules need no table of their own.
* Compute dtype (`config.dtype`) and parameter dtype (`config.param_dtype`) are separate;
  RMSNorm, RoPE, the attention softmax and the logits are float32.
* Attention takes explicit `positions` and `segment_ids`: it is causal and block-diagonal by
  segment; segment 0 is padding (its rows attend to nothing, giving finite garbage, never NaN).
  Mistral/Qwen sliding windows are applied in the mask (`q_pos - k_pos < sliding_window`).
* Extension points (models/hooks.py): every projection goes through `Linear`, which hands the
  input, the frozen kernel/bias and the method's variables at its path to `hooks.linear`; the model
  also calls `hooks.embed`, `hooks.attention_kv`, `hooks.sublayer_out` and `hooks.final_hidden`.
  The default `Hooks` is the identity: the plain model. The model knows no method.
* Kernels (sft_jax/kernels): `config.kernels` selects drop-ins for the reference functions below
  (`kernels.resolve`); `config.attention` selects the attention algorithm (dense | flash | pallas).

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sft_jax import kernels as kernels_lib
from sft_jax.models import rope as rope_lib
from sft_jax.models.config import ModelConfig
import dataclasses

from sft_jax.models.hooks import COLLECTIONS, NO_HOOKS, SHARED_SEGMENT, Hooks, LinearCall, Site, SublayerSite, reference_matmul

Array = Any
F32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)


def _wlc(x, axes):
    return nn.with_logical_constraint(x, axes)


# ------------------------------------------------------------------ RoPE (models/rope.py)
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] (float32) of the length-independent rope types
    (`rope.inv_freq`; dynamic/longrope: their unscaled / short frequencies)."""
    return rope_lib.inv_freq(config)


rope_tables = rope_lib.reference_tables
rotate_half = rope_lib.rotate_half
apply_rotary_pos_emb = rope_lib.apply_rotary_pos_emb


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray, dtype) -> Array:
    """RoPE of x [B, T, N, hd] at positions [B, T] (reference path), in `dtype`."""
    cos, sin = rope_tables(positions, inv_freq)
    return apply_rotary_pos_emb(x.astype(F32), cos, sin).astype(dtype)


# ------------------------------------------------------------------ attention
def attend(q: Array, k: Array, v: Array, mask: Array, dtype, softcap: float | None = None) -> Array:
    """GQA attention (HF's eager attention). q [B,T,H,hd], k/v [B,S,KV,hd], mask [B,T,S] bool
    -> [B,T,H*hd]; scores and softmax in float32; `softcap` (Gemma 2): scores -> cap * tanh(scores / cap)."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=F32) * (hd**-0.5)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(mask[:, None, None, :, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(dtype), v.astype(dtype), preferred_element_type=F32)
    return o.astype(dtype).reshape(b, t, h * hd)


def training_mask(segment_ids: Array, positions: Array, sliding_window: int | None) -> Array:
    """[B, T, T] bool: same nonzero segment (or a key of segment SHARED_SEGMENT, the virtual tokens a
    method prepends to the row, which every non-padding query sees), causal by slot, within the
    sliding window."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t)
    seg = segment_ids
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == SHARED_SEGMENT)
    mask = same & (seg[:, :, None] != 0) & (idx[:, None] >= idx[None, :])
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - positions[:, None, :] < sliding_window)
    return mask


def softcap_logits(logits: Array, cap: float | None) -> Array:
    """Gemma 2's final logit soft-capping: cap * tanh(logits / cap) (identity for None)."""
    return logits if cap is None else jnp.tanh(logits / cap) * cap


def by_kind(sliding, fn):
    """`fn(is_sliding)` for a layer: `sliding` is a Python bool (unrolled layers, or all layers alike) or a
    traced bool (scanned layers of mixed kinds: `lax.cond`, so only the layer's own branch runs)."""
    if isinstance(sliding, (bool, np.bool_)):
        return fn(bool(sliding))
    return lax.cond(sliding, lambda: fn(True), lambda: fn(False))


def pick(pair, sliding):
    """One of (full, sliding) for a layer (a pytree pair of arrays; `jnp.where` when `sliding` is traced)."""
    if pair is None or not isinstance(pair, PerKind):
        return pair
    if isinstance(sliding, (bool, np.bool_)):
        return pair.sliding if sliding else pair.full
    return jax.tree.map(lambda a, b: jnp.where(sliding, b, a), pair.full, pair.sliding)


class PerKind(tuple):
    """(full-attention value, sliding-attention value): what `Llama` builds once for mixed layer types."""

    def __new__(cls, full, sliding):
        return super().__new__(cls, (full, sliding))

    @property
    def full(self):
        return self[0]

    @property
    def sliding(self):
        return self[1]


jax.tree_util.register_pytree_node(PerKind, lambda p: ((p[0], p[1]), None), lambda _, c: PerKind(*c))


def lm_logits(x: Array, w: Array) -> Array:
    """x [..., D] @ w [D, V] -> float32 logits."""
    return jnp.einsum("...d,dv->...v", x, w.astype(x.dtype), preferred_element_type=F32)


# ------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    eps: float
    dtype: Any = F32
    param_dtype: Any = F32
    offset: bool = False  # Gemma: y * (1 + w), w initialised to zeros

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param(
            "scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x = x.astype(F32)
        y = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        w = scale.astype(F32)
        return (y * (1.0 + w if self.offset else w)).astype(self.dtype)


def _site_variables(module: nn.Module) -> dict:
    """The calling module's variables in the method collections."""
    return {col: module.variables[col] for col in COLLECTIONS if col in module.variables}


class _Base(nn.Module):
    config: ModelConfig
    hooks: Hooks = NO_HOOKS
    deterministic: bool = True

    @property
    def dt(self):
        return jnp.dtype(self.config.dtype)

    @property
    def pdt(self):
        return jnp.dtype(self.config.param_dtype)

    @property
    def kernels(self) -> kernels_lib.KernelSet:
        return kernels_lib.resolve(self.config)

    def site(self) -> Site:
        return Site(variables=_site_variables(self), path=tuple(self.path), dtype=self.dt,
                    deterministic=self.deterministic, make_rng=lambda: self.make_rng("dropout"))

    def sublayer_site(self, residual) -> SublayerSite:
        return SublayerSite(variables=_site_variables(self), path=tuple(self.path), dtype=self.dt,
                            deterministic=self.deterministic, make_rng=lambda: self.make_rng("dropout"),
                            residual=residual)

    def sub(self, cls, name):
        return cls(config=self.config, hooks=self.hooks, deterministic=self.deterministic, name=name)

    def linear(self, features, axes, use_bias, name):
        return Linear(config=self.config, hooks=self.hooks, deterministic=self.deterministic, features=features,
                      kernel_axes=axes, use_bias=use_bias, name=name)

    def apply_linear(self, call: LinearCall) -> Array:
        ks = self.kernels
        return ks.linear(self.hooks, call) if ks.linear else self.hooks.linear(call)

    def norm(self, name):
        return RMSNorm(self.config.rms_norm_eps, dtype=self.dt, param_dtype=self.pdt, offset=self.config.gemma,
                       name=name)


class Linear(_Base):
    """One projection's weights and method variables, as a `LinearCall` for `hooks.linear` (the
    caller applies it, so that a kernel can fuse projections of the same input). The kernel is read
    only when the params tree holds it (a method may keep the base weight elsewhere)."""

    features: int = 0
    kernel_axes: tuple = ()
    use_bias: bool = False

    @nn.compact
    def __call__(self, x) -> LinearCall:
        kernel = None
        if self.is_initializing() or self.has_variable("params", "kernel"):
            kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.kernel_axes),
                                (x.shape[-1], self.features), self.pdt)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[-1:]),
                              (self.features,), self.pdt)
        site = self.site()
        return LinearCall(variables=site.variables, path=site.path, dtype=site.dtype, deterministic=site.deterministic,
                          make_rng=site.make_rng, x=x, kernel=kernel, bias=bias, features=self.features,
                          matmul=self.kernels.matmul or reference_matmul)


class Attention(_Base):
    @nn.compact
    def __call__(self, x, rope, mask, cache_index=None, cache=None, sliding=None):
        """x [B, T, D]; rope = (cos, sin) tables; mask as built by `Llama` (a [B, T, S] bool array,
        or (segment_ids, positions) for the flash/pallas training attention), both already picked for
        this layer's kind; `sliding`: does this layer use the sliding window (Python or traced bool)."""
        c, ks = self.config, self.kernels
        if sliding is None:
            sliding = c.layer_sliding[0]
        win = lambda s: c.sliding_window if s else None  # noqa: E731
        cap = c.attn_logit_softcapping
        b, t, _ = x.shape
        hd = c.head_dim
        if c.fused_projections:  # Phi-3: one qkv_proj [D, (H + 2 KV) hd], rows q | k | v (as in the checkpoint)
            nq, nkv = c.num_heads * hd, c.num_kv_heads * hd
            qkv = self.apply_linear(self.linear(nq + 2 * nkv, ("embed", "heads"), c.attention_bias, "qkv_proj")(x))
            qkv = (qkv[..., :nq].reshape(b, t, c.num_heads, hd), qkv[..., nq:nq + nkv].reshape(b, t, c.num_kv_heads, hd),
                   qkv[..., nq + nkv:].reshape(b, t, c.num_kv_heads, hd))
        else:
            calls = [self.linear(c.num_heads * hd, ("embed", "heads"), c.attention_bias, "q_proj")(x),
                     self.linear(c.num_kv_heads * hd, ("embed", "kv_heads"), c.attention_bias, "k_proj")(x),
                     self.linear(c.num_kv_heads * hd, ("embed", "kv_heads"), c.attention_bias, "v_proj")(x)]
            qkv = ks.qkv(self.hooks, calls, c.num_kv_heads, hd) if ks.qkv else None
        if qkv is None:
            q, k, v = (self.apply_linear(call) for call in calls)
            q = q.reshape(b, t, c.num_heads, hd)
            k = k.reshape(b, t, c.num_kv_heads, hd)
            v = v.reshape(b, t, c.num_kv_heads, hd)
        else:
            q, k, v = qkv
        if c.qk_norm:
            q = self.norm("q_norm")(q)
            k = self.norm("k_norm")(k)
        cos, sin = rope
        q = _wlc(rope_lib.rotate(q.astype(F32), cos, sin, ks.rope).astype(self.dt),
                 ("act_batch", "act_length", "act_heads", None))
        k = _wlc(rope_lib.rotate(k.astype(F32), cos, sin, ks.rope).astype(self.dt),
                 ("act_batch", "act_length", "act_kv_heads", None))
        v = _wlc(v, ("act_batch", "act_length", "act_kv_heads", None))
        if c.query_pre_attn_scalar is not None and float(c.query_pre_attn_scalar) != float(hd):
            # Gemma: scores scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5 (folded into q,
            # so every attention kernel applies it)
            q = (q.astype(F32) * (hd**0.5 * float(c.query_pre_attn_scalar) ** -0.5)).astype(self.dt)
        k, v, prefix = self.hooks.attention_kv(k, v, self.site())
        new_cache = None
        if cache is not None:
            ck, cv = cache
            ck = lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            k, v = ck, cv
            new_cache = (ck, cv)
        if prefix is not None:  # extra key/value slots every real query sees: the dense path
            if isinstance(mask, tuple):
                seg_, pos_ = mask
                mask = by_kind(sliding, lambda s: training_mask(seg_, pos_, win(s)))
            sees = jnp.broadcast_to(mask.any(-1, keepdims=True), (*mask.shape[:2], prefix.k.shape[1]))
            k = jnp.concatenate([prefix.k.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix.v.astype(v.dtype), v], axis=1)
            o = attend(q, k, v, jnp.concatenate([sees, mask], axis=-1), self.dt, cap)
        elif cache is not None:
            o = attend(q, k, v, mask, self.dt, cap)
        elif isinstance(mask, tuple):  # attention=flash|pallas: a kernel builds the mask block by block
            # which kernel runs (and which falls back or refuses, e.g. for soft-capping) is the kernels' decision
            kernel, _ = kernels_lib.training_attention(c, ks)
            seg, pos = mask
            o = by_kind(sliding, lambda s: kernel.fn(q, k, v, seg, pos, dtype=self.dt, sliding_window=win(s),
                                                     softcap=cap, block=c.attention_block))
        elif ks.dense_attention:  # kernels=cpu: causal block skipping around the reference (which soft-caps)
            o = ks.dense_attention(functools.partial(attend, softcap=cap), q, k, v, mask, self.dt)
        else:
            o = attend(q, k, v, mask, self.dt, cap)
        o = self.apply_linear(self.linear(c.hidden_size, ("heads", "embed"), c.attention_out_bias, "o_proj")(o))
        return o, new_cache


class Mlp(_Base):
    @nn.compact
    def __call__(self, x):
        c, ks = self.config, self.kernels
        n = c.intermediate_size
        if c.fused_projections:  # Phi-3: one gate_up_proj [D, 2 I], columns gate | up
            gu = self.apply_linear(self.linear(2 * n, ("embed", "mlp"), c.mlp_bias, "gate_up_proj")(x)).astype(F32)
            h = _wlc((nn.silu(gu[..., :n]) * gu[..., n:]).astype(self.dt), ("act_batch", "act_length", "act_mlp"))
            return self.apply_linear(self.linear(c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")(h))
        gate = self.linear(n, ("embed", "mlp"), c.mlp_bias, "gate_proj")(x)
        up = self.linear(n, ("embed", "mlp"), c.mlp_bias, "up_proj")(x)
        h = ks.gate_up(self.hooks, gate, up) if ks.gate_up and c.hidden_act == "silu" else None
        if h is None:
            g = self.apply_linear(gate).astype(F32)
            act = nn.silu(g) if c.hidden_act == "silu" else nn.gelu(g, approximate=True)  # Gemma: GeGLU (gelu tanh)
            h = (act * self.apply_linear(up).astype(F32)).astype(self.dt)
        h = _wlc(h, ("act_batch", "act_length", "act_mlp"))
        return self.apply_linear(self.linear(c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")(h))


class DecoderLayer(_Base):
    @nn.compact
    def __call__(self, x, rope, mask, cache_index=None, cache=None, sliding=None):
        """`sliding`: this layer's kind when the model mixes kinds (a traced bool under scan_layers);
        `rope`/`mask` may then be `PerKind` pairs, picked here."""
        c = self.config
        if sliding is None:
            sliding = c.layer_sliding[0]
        rope, mask = pick(rope, sliding), pick(mask, sliding)
        h, new_cache = self.sub(Attention, "attn")(self.norm("input_norm")(x), rope, mask, cache_index, cache, sliding)
        if c.gemma:  # Gemma: post-attention norm on the sublayer output, then a pre-MLP norm
            h = self.norm("post_attn_norm")(h)
            x = x + self.hooks.sublayer_out("attn", h, self.sublayer_site(x))
            h = self.norm("post_ffw_norm")(self.sub(Mlp, "mlp")(self.norm("pre_ffw_norm")(x)))
            x = x + self.hooks.sublayer_out("mlp", h, self.sublayer_site(x))
            x = _wlc(x, ("act_batch", "act_length", "act_embed"))
            return x, new_cache
        x = x + self.hooks.sublayer_out("attn", h, self.sublayer_site(x))
        h = self.sub(Mlp, "mlp")(self.norm("post_attn_norm")(x))
        x = x + self.hooks.sublayer_out("mlp", h, self.sublayer_site(x))
        x = _wlc(x, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(_Base):
    """The decoder. `__call__` returns float32 logits [B, T, V] (or the final-normed hidden
    states [B, T, D] in the compute dtype when `return_hidden`); with `cache` it returns
    `(logits, new_cache)`."""

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, embed_noise=None, return_hidden=False,
                 cache=None, decode=False):
        c, ks = self.config, self.kernels
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = positions.astype(jnp.int32)
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

        embedding = Embed(c, name="embed")()  # param path embed/embedding
        x = jnp.take(embedding, input_ids, axis=0).astype(self.dt)
        if c.gemma:  # HF: * sqrt(hidden) as a tensor of the compute dtype
            x = x * jnp.asarray(c.hidden_size**0.5, self.dt)
        if embed_noise is not None:
            x = x + embed_noise.astype(self.dt)
        root = dataclasses.replace(self.site(), decode=bool(decode and cache is not None))
        x, positions, seg = self.hooks.embed(x, input_ids, positions, seg, root)
        x = _wlc(x, ("act_batch", "act_length", "act_embed"))
        t = x.shape[1]

        cache_index = None
        kinds = c.layer_sliding
        mixed = c.mixed_layers
        win = c.sliding_window if kinds[0] else None
        if cache is None and c.attention in ("flash", "pallas") and not self.hooks.embed_slots():
            mask = (seg, positions)  # the attention builds its mask block by block
        elif cache is None:
            mask = training_mask(seg, positions, win)
            if mixed:
                mask = PerKind(training_mask(seg, positions, None), training_mask(seg, positions, c.sliding_window))
        else:
            valid = seg != 0
            cache_index = jnp.asarray(cache["index"], jnp.int32)
            kv_pos = lax.dynamic_update_slice(
                cache["positions"], jnp.where(valid, positions, -1).astype(jnp.int32), (0, cache_index)
            )
            mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= positions[:, :, None]) & valid[:, :, None]
            if mixed:
                mask = PerKind(mask, mask & (positions[:, :, None] - kv_pos[:, None, :] < c.sliding_window))
            elif win is not None:
                mask = mask & (positions[:, :, None] - kv_pos[:, None, :] < win)

        rope = rope_lib.tables(c, positions, seg, per_segment=cache is None, tables_fn=ks.rope_tables)
        if c.local_rope is not None:  # Gemma 3: sliding layers rotate with their own base
            rope = PerKind(rope, rope_lib.tables(c.local_rope, positions, seg, per_segment=cache is None,
                                                 tables_fn=ks.rope_tables))
        layer_cls = DecoderLayer
        if c.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        kw = dict(config=c, hooks=self.hooks, deterministic=self.deterministic)
        layer_caches = None if cache is None else (cache["k"], cache["v"])
        if c.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0, **{col: 0 for col in COLLECTIONS}},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0) + ((0,) if mixed else ()),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            extra = (jnp.asarray(kinds),) if mixed else ()
            x, new_caches = stack(**kw, name="layers")(x, rope, mask, cache_index, layer_caches, *extra)
        else:
            outs = []
            for i in range(c.num_layers):
                lc = None if cache is None else (cache["k"][i], cache["v"][i])
                x, nc = layer_cls(**kw, name=f"layers_{i}")(x, rope, mask, cache_index, lc, kinds[i] if mixed else None)
                outs.append(nc)
            new_caches = None if cache is None else (
                jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]))
        x = self.hooks.final_hidden(self.norm("final_norm")(x), root)
        if return_hidden:
            out = x
        else:
            kernel = embedding.T if c.tie_embeddings else LMHead(c, name="lm_head")()
            out = (ks.logits_matmul or lm_logits)(x, kernel.astype(self.dt))  # float32 [B, T, V]
            out = softcap_logits(out, c.final_logit_softcapping)
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

    @jax.jit
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


def _variables(params, method_vars):
    return {"params": params, **(method_vars or {})}


def forward(params, config: ModelConfig, input_ids, positions=None, segment_ids=None, *, method: Hooks | None = None,
            method_vars: dict | None = None, embed_noise=None, dropout_rng=None, deterministic=True,
            return_hidden=False):
    """Logits float32 [B, T, V] (or final-normed hidden [B, T, D] when `return_hidden`).

    `method`: the extension-point hooks (a `peft.base.Method`; None = the plain model);
    `method_vars`: its variable collections (`method.variables(trainable, frozen)` without
    "params"); `dropout_rng`: the 'dropout' stream when not `deterministic`."""
    rngs = {"dropout": dropout_rng} if (not deterministic and dropout_rng is not None) else None
    model = Llama(config, hooks=method or NO_HOOKS, deterministic=deterministic)
    return model.apply(_variables(params, method_vars), input_ids, positions, segment_ids, embed_noise, return_hidden,
                       rngs=rngs)


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


def forward_with_cache(params, config: ModelConfig, input_ids, positions, cache, *, segment_ids=None,
                       method: Hooks | None = None, method_vars: dict | None = None, decode: bool = False):
    """Prefill or decode step: `(logits float32 [B, T, V], new_cache)`.

    `decode`: True for the steps after the prefill (a method's prepended virtual tokens,
    `Hooks.embed_slots`, are written at prefill only; the cache needs that many extra slots).

    `segment_ids` (optional, [B, T]): 0 marks padding tokens, which are not stored as valid
    cache slots and attend to nothing; any other value marks a real token.
    """
    model = Llama(config, hooks=method or NO_HOOKS)
    return model.apply(_variables(params, method_vars), input_ids, positions, segment_ids, None, False, cache, decode)

"""Rotary position embeddings: a port of transformers' `modeling_rope_utils.py` (+ the rotary modules).

Rope types (`ModelConfig.rope_scaling["rope_type"]`, None = `default`):

* `default`, `linear`, `llama3`, `yarn`: one inverse-frequency vector for every position
  (`inv_freq(config)`, numpy float32, computed once at trace time). `yarn` also scales cos/sin by its
  `attention_factor` (given, or `0.1 * ln(factor) + 1`, or the `mscale`/`mscale_all_dim` ratio), with
  `beta_fast`/`beta_slow` (32/1), `truncate` (True) and `original_max_position_embeddings`.
* `dynamic` (dynamic NTK) and `longrope`: the frequencies depend on the sequence length `L`:
  `dynamic` raises the base to `base * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2))` once
  `L > max_position_embeddings`; `longrope` divides the frequencies by `long_factor` when
  `L > original_max_position_embeddings`, else by `short_factor`, and scales cos/sin by
  `attention_factor` (given, or `sqrt(1 + ln(factor) / ln(original_max))`, factor defaulting to
  `max_position_embeddings / original_max_position_embeddings`).

Which `L` (the semantics matched, see `sequence_lengths`): transformers takes
`L = max(position_ids) + 1` of the *current forward call*, over the whole batch. Here `L` is
that maximum per sequence: per (row, segment) on the training path (so packed == unpacked) and
per row with the KV cache (the row's largest position among the tokens of this call: the prompt
at prefill, the new token at decode; keys already in the cache keep the rotation they were
written with, exactly as in transformers). For a batch of one unpacked sequence this is
transformers' value; for a batch whose rows sit on different sides of the boundary transformers
would apply the batch maximum to every row. Two further transformers details, documented rather
than copied: its `dynamic` module remembers the longest length seen (`max_seq_len_cached`) across
calls until a call shorter than `max_position_embeddings` resets it, so on one model instance a
later call of intermediate length reuses the earlier, longer frequencies; and Phi-3's
`prepare_inputs_for_generation` drops the KV cache and re-encodes the whole sequence when a
decode first crosses `original_max_position_embeddings` (longrope short -> long), which
`sampling.generate` reproduces (`reencode_at(config)`).

Tables are (cos, sin) [B, T, 1, rotary_dim/2] float32; `apply_rotary_pos_emb` rotates the first
`rotary_dim` features of each head (Phi-3's `partial_rotary_factor`) in transformers' rotate-half
layout and passes the rest through.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
F32 = jnp.float32

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_type(config) -> str:
    rs = config.rope_scaling
    if not rs:
        return "default"
    return rs.get("rope_type", rs.get("type", "default"))


def rotary_dim(config) -> int:
    """Features of each head that are rotated (transformers: `int(head_dim * partial_rotary_factor)`)."""
    return int(config.head_dim * getattr(config, "partial_rotary_factor", 1.0))


def depends_on_length(config) -> bool:
    return rope_type(config) in LENGTH_DEPENDENT


def _base_inv(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _original_max(config) -> int:
    rs = config.rope_scaling or {}
    return int(rs.get("original_max_position_embeddings") or config.max_position_embeddings)


def _longrope_factor(config) -> float:
    rs = config.rope_scaling
    f = rs.get("factor")
    return float(f) if f is not None else config.max_position_embeddings / _original_max(config)


def _yarn_mscale(scale, mscale=1.0):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def attention_scaling(config) -> float:
    """The factor cos and sin are multiplied by (1.0 except for yarn and longrope)."""
    rt = rope_type(config)
    rs = config.rope_scaling or {}
    if rt == "yarn":
        if rs.get("attention_factor") is not None:
            return float(rs["attention_factor"])
        factor = rs.get("factor")
        if factor is None:
            factor = config.max_position_embeddings / _original_max(config)
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            return float(_yarn_mscale(factor, rs["mscale"]) / _yarn_mscale(factor, rs["mscale_all_dim"]))
        return float(_yarn_mscale(factor))
    if rt == "longrope":
        if rs.get("attention_factor") is not None:
            return float(rs["attention_factor"])
        factor = _longrope_factor(config)
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(_original_max(config)))
    return 1.0


def _yarn_inv(config, dim: int) -> np.ndarray:
    rs = config.rope_scaling
    base = float(config.rope_theta)
    factor = rs.get("factor")
    orig = _original_max(config)
    if factor is None:
        factor = config.max_position_embeddings / orig
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rot):
        return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extra_factor = (1 - ramp).astype(np.float32)
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interpolation * (1 - extra_factor) + extrapolation * extra_factor).astype(np.float32)


def inv_freq(config, seq_len: int | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] float32 for a sequence of length `seq_len` (only
    `dynamic`/`longrope` look at it; None = their short / unscaled frequencies)."""
    dim = rotary_dim(config)
    inv = _base_inv(config.rope_theta, dim)
    rs = config.rope_scaling
    rt = rope_type(config)
    if rt == "default":
        return inv
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
    if rt == "yarn":
        return _yarn_inv(config, dim)
    if rt == "longrope":
        long = seq_len is not None and seq_len > _original_max(config)
        ext = np.asarray(rs["long_factor" if long else "short_factor"], np.float32)
        return (1.0 / (ext * (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
                       )).astype(np.float32)
    if rt == "dynamic":
        return np.asarray(_dynamic_inv(config, jnp.asarray(seq_len or 0, jnp.int32)), np.float32)
    raise ValueError(f"unknown rope type {rt!r}")


def _dynamic_inv(config, seq_len: Array) -> Array:
    """transformers' `_compute_dynamic_ntk_parameters` in float32, for lengths of any shape ->
    [..., rotary_dim/2]."""
    dim = rotary_dim(config)
    mpe = config.max_position_embeddings
    factor = float(config.rope_scaling["factor"])
    length = jnp.maximum(seq_len.astype(jnp.int32), mpe).astype(F32)
    base = F32(config.rope_theta) * ((F32(factor) * length / F32(mpe)) - F32(factor - 1)) ** F32(dim / (dim - 2))
    expo = jnp.arange(0, dim, 2, dtype=F32) / F32(dim)
    return 1.0 / (base[..., None] ** expo)


def sequence_lengths(positions: Array, segment_ids: Array, per_segment: bool) -> Array:
    """[B, T] int32: the length L each token's frequencies are chosen by (module docstring):
    max position + 1 over the token's (row, segment) when `per_segment` (training), else over the
    row's tokens with a nonzero segment id (KV-cache calls). Segment ids are 0..T (grain's packing
    numbers them 1..k per row)."""
    b, t = positions.shape
    valid = segment_ids != 0
    pos = jnp.where(valid, positions, -1).astype(jnp.int32)
    if not per_segment:
        return jnp.broadcast_to(jnp.max(pos, axis=1, keepdims=True) + 1, (b, t))
    ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + jnp.clip(segment_ids, 0, t)).reshape(-1)
    seg_max = jax.ops.segment_max(pos.reshape(-1), ids, num_segments=b * (t + 1))
    return (seg_max[ids] + 1).reshape(b, t)


def reference_tables(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """(cos, sin) [B, T, 1, d/2] float32 for positions [B, T]; `inv_freq` is [d/2] or per token
    [B, T, d/2] (transformers' `cat(freqs, freqs)` is applied in `apply_rotary_pos_emb`)."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]


def tables(config, positions: Array, segment_ids: Array, *, per_segment: bool = True,
           tables_fn: Callable | None = None) -> tuple[Array, Array]:
    """The (cos, sin) tables every layer of one forward pass uses. `tables_fn(positions, inv_freq)`
    computes them (the reference `reference_tables` or a kernel's, e.g. `kernels.cpu.rope_tables`);
    `per_segment`: training path (True) or a KV-cache call (False), see `sequence_lengths`."""
    fn = tables_fn or reference_tables
    rt = rope_type(config)
    if rt == "longrope":
        lengths = sequence_lengths(positions, segment_ids, per_segment)
        short, long = inv_freq(config), inv_freq(config, _original_max(config) + 1)
        inv = jnp.where((lengths > _original_max(config))[..., None], jnp.asarray(long), jnp.asarray(short))
    elif rt == "dynamic":
        inv = _dynamic_inv(config, sequence_lengths(positions, segment_ids, per_segment))
    else:
        inv = inv_freq(config)
    cos, sin = fn(positions, inv)
    scale = attention_scaling(config)
    if scale != 1.0:
        cos, sin = cos * F32(scale), sin * F32(scale)
    return cos, sin


def reencode_at(config) -> int | None:
    """The position whose decode step re-encodes the whole sequence (transformers' Phi-3 drops its
    KV cache when the sequence first grows past `original_max_position_embeddings` with longrope);
    None for every other model."""
    if config.model_type == "phi3" and rope_type(config) == "longrope":
        return _original_max(config)
    return None


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary_pos_emb(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE (the Hugging Face layout): x [B, T, N, hd] float32, cos/sin [B, T, 1, hd/2]."""
    cos = jnp.concatenate([cos, cos], axis=-1)
    sin = jnp.concatenate([sin, sin], axis=-1)
    return x * cos + rotate_half(x) * sin


def rotate(x: Array, cos: Array, sin: Array, rotate_fn: Callable | None = None) -> Array:
    """`rotate_fn` (default `apply_rotary_pos_emb`) on the first 2 * cos.shape[-1] features of x,
    the rest passed through (partial rotary)."""
    fn = rotate_fn or apply_rotary_pos_emb
    rd = 2 * cos.shape[-1]
    if rd == x.shape[-1]:
        return fn(x, cos, sin)
    return jnp.concatenate([fn(x[..., :rd], cos, sin), x[..., rd:]], axis=-1)

"""Batched generation with the model's KV cache: prefill once, then jitted one-token steps.

`generate(params, config, prompts, ...)` takes token-id prompts of different lengths, right-pads
them into one static-shape batch (prompt length rounded up to a bucket so that nearby lengths
share a compilation), prefills the cache, then decodes inside one `lax.while_loop` until every
row has produced an end token or `max_new_tokens`. Greedy when `temperature == 0`; otherwise
temperature, top-k and top-p (nucleus) sampling from a seeded key.

`generate_no_cache` is the reference: it recomputes the whole sequence for every new token.
Tests check that both give the same greedy tokens.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import sharding
from sft_jax.models import llama, rope
from sft_jax.models.config import ModelConfig


def _bucket(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _sample(logits, key, temperature: float, top_k: int, top_p: float):
    """logits [B, V] float32 -> token ids [B]."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0.0 < top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@contextlib.contextmanager
def mesh_rules(mesh):
    """While tracing: `mesh` (abstract) and the logical-axis rules, so the model's sharding
    constraints apply (tensor-parallel activations); nothing when `mesh` is None."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(sharding.LOGICAL_RULES)):
        yield


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p", "method", "mesh"),
)
def _generate_jit(params, method_vars, ids, lengths, eos_ids, key, *, config, max_new_tokens, temperature, top_k,
                  top_p, method, mesh=None):
    with mesh_rules(mesh):
        return _generate_body(params, method_vars, ids, lengths, eos_ids, key, config=config,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              method=method)


def _generate_body(params, method_vars, ids, lengths, eos_ids, key, *, config, max_new_tokens, temperature, top_k,
                   top_p, method):
    b, p = ids.shape
    slots = method.embed_slots() if method is not None else 0  # virtual tokens a method prepends at prefill
    cache = llama.init_cache(config, b, p + max_new_tokens + slots)
    ar = jnp.arange(p, dtype=jnp.int32)[None, :]
    seg = (ar < lengths[:, None]).astype(jnp.int32)
    positions = jnp.where(seg > 0, ar, 0)
    logits, cache = llama.forward_with_cache(params, config, ids, positions, cache, segment_ids=seg, method=method,
                                             method_vars=method_vars)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0, :]
    key, sub = jax.random.split(key)
    tok = _sample(last, sub, temperature, top_k, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    done = jnp.zeros((b,), bool)

    def is_eos(t):
        return jnp.any(t[:, None] == eos_ids[None, :], axis=-1)

    def cond(state):
        i, _, _, done, _, _, _ = state
        return jnp.logical_and(i < max_new_tokens, jnp.logical_not(jnp.all(done)))

    reencode = rope.reencode_at(config)
    total = p + max_new_tokens
    seq = jnp.zeros((b, total), jnp.int32).at[:, :p].set(ids)  # prompt + tokens fed so far (re-encoding)

    def step(tok, pos, cache, seq, i):
        return llama.forward_with_cache(params, config, tok[:, None], pos, cache, segment_ids=jnp.ones_like(pos),
                                        method=method, method_vars=method_vars, decode=True)

    def reencode_step(tok, pos, cache, seq, i):
        # transformers' Phi-3 (longrope): the first decode past original_max_position_embeddings drops
        # the cache and encodes the whole sequence again (every row's own length decides its factors)
        ar = jnp.arange(total, dtype=jnp.int32)[None, :]
        n = lengths + i + 1
        seg_all = (ar < n[:, None]).astype(jnp.int32)
        fresh = llama.init_cache(config, b, total + slots, dtype=cache["k"].dtype)
        lg, fresh = llama.forward_with_cache(params, config, seq, jnp.where(seg_all > 0, ar, 0), fresh,
                                             segment_ids=seg_all, method=method, method_vars=method_vars)
        fresh["index"] = jnp.asarray(p + i + 1 + slots, jnp.int32)  # slots >= p + i + 1 are empty: decode continues there
        return jnp.take_along_axis(lg, (n - 1)[:, None, None], axis=1), fresh

    def body(state):
        i, tok, out, done, cache, key, seq = state
        out = out.at[:, i].set(jnp.where(done, 0, tok))
        done = jnp.logical_or(done, is_eos(tok))
        pos = (lengths + i)[:, None]
        seq = seq.at[jnp.arange(b), lengths + i].set(tok, mode="drop")
        if reencode is None:
            logits, cache = step(tok, pos, cache, seq, i)
        else:
            logits, cache = jax.lax.cond(jnp.any(pos[:, 0] == reencode), reencode_step, step, tok, pos, cache, seq, i)
        key, sub = jax.random.split(key)
        nxt = _sample(logits[:, 0, :], sub, temperature, top_k, top_p)
        return i + 1, nxt, out, done, cache, key, seq

    i, _, out, done, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, out, done, cache, key, seq))
    return out, i


def _trim(row: np.ndarray, n: int, eos: set[int], keep_eos: bool) -> list[int]:
    res = []
    for t in row[:n].tolist():
        if t in eos:
            if keep_eos:
                res.append(t)
            break
        res.append(t)
    return res


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, method=None, method_vars=None, keep_eos: bool = False,
             mesh=None) -> list[list[int]]:
    """New tokens for each prompt (stopping at the first end token, which is dropped unless
    `keep_eos`). Prompts may differ in length; all rows decode together. `method`/`method_vars`: a
    fine-tuning method's hooks and variables (`Method.model_inputs`), None for plain params.
    `mesh`: decode with the weights tensor-parallel over it (`sharding.shard_params`; already placed
    params stay put)."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    lengths = np.array([len(p) for p in prompts], np.int32)
    p = _bucket(int(lengths.max()))
    ids = np.zeros((len(prompts), p), np.int32)
    for i, pr in enumerate(prompts):
        ids[i, : len(pr)] = pr
    eos = sorted({int(e) for e in eos_ids}) or [-1]
    if mesh is not None:
        params = sharding.shard_params(params, config, mesh)
        if method_vars:
            method_vars = jax.device_put(method_vars, sharding.replicated(mesh))
    out, n = _generate_jit(
        params, method_vars, jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(eos, jnp.int32),
        jax.random.PRNGKey(seed), config=config, max_new_tokens=int(max_new_tokens),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), method=method,
        mesh=mesh,
    )
    out = np.asarray(out)
    n = int(n)
    return [_trim(out[i], n, set(eos), keep_eos) for i in range(len(prompts))]


def generate_no_cache(params, config: ModelConfig, prompt: Sequence[int], *, max_new_tokens: int,
                      eos_ids: Sequence[int] = (), method=None, method_vars=None) -> list[int]:
    """Greedy reference by full recomputation (slow; for tests)."""
    total = _bucket(len(prompt) + max_new_tokens)
    fwd = jax.jit(lambda prm, mv, x, pos, seg: llama.forward(prm, config, x, pos, seg, method=method, method_vars=mv))
    seq = list(prompt)
    out: list[int] = []
    eos = {int(e) for e in eos_ids}
    for _ in range(max_new_tokens):
        x = np.zeros((1, total), np.int32)
        seg = np.zeros((1, total), np.int32)
        x[0, : len(seq)] = seq
        seg[0, : len(seq)] = 1
        pos = np.where(seg > 0, np.arange(total)[None, :], 0).astype(np.int32)
        logits = fwd(params, method_vars, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
        t = int(np.argmax(np.asarray(logits[0, len(seq) - 1])))
        if t in eos:
            break
        out.append(t)
        seq.append(t)
    return out

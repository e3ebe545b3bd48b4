"""The block-sparse training attention (`sft_jax.kernels.flash_attention`) against the dense reference:
same outputs and gradients for packed rows, padding, GQA, sliding windows, odd lengths, bf16;
pair skipping really skips; the model uses it and agrees with `attention="dense"`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.kernels import flash_attention as attention
from sft_jax.models import llama
from sft_jax.kernels.flash_attention import segment_attention, visited_pairs
from sft_jax.models.config import ModelConfig


@pytest.fixture(params=["unrolled", "loop"])
def loops(request, monkeypatch):
    """Both implementations of the block loops: unrolled at trace time (every causal pair, the
    default for <= `attention.UNROLL` blocks) and `fori_loop`s with run-time pair skipping."""
    monkeypatch.setattr(attention, "UNROLL", 64 if request.param == "unrolled" else 0)
    return request.param


def _packed(rng, b, t, mean, pad_tail=True):
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        i, s = 0, 1
        while i < t:
            n = min(int(rng.integers(max(1, mean // 4), 2 * mean)), t - i)
            if pad_tail and i > 0 and rng.random() < 0.2:
                break  # the rest of the row is padding (segment 0)
            seg[r, i:i + n] = s
            pos[r, i:i + n] = np.arange(n)
            i += n
            s += 1
    return seg, pos


def _dense(q, k, v, seg, pos, window, dtype):
    t = q.shape[1]
    idx = jnp.arange(t)
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (idx[:, None] >= idx[None, :])
    if window is not None:
        mask = mask & (pos[:, :, None] - pos[:, None, :] < window)
    return llama.attend(q, k, v, mask, dtype)


def _both(b, t, h, kvh, hd, seg, pos, window=None, block=0, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kvh, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kvh, hd)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((b, t, h * hd)), jnp.float32)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    valid = (seg != 0)[:, :, None]  # padding queries: dense gives garbage, flash gives 0; both unused

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v).astype(jnp.float32), 0.0) * w)

    ref = loss(lambda q, k, v: _dense(q, k, v, seg, pos, window, dtype))
    new = loss(lambda q, k, v: segment_attention(q, k, v, seg, pos, dtype=dtype, sliding_window=window,
                                                 block=block))
    r = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(q, k, v)
    n = jax.jit(jax.value_and_grad(new, argnums=(0, 1, 2)))(q, k, v)
    out_r = jnp.where(valid, _dense(q, k, v, seg, pos, window, dtype), 0)
    out_n = jnp.where(valid, segment_attention(q, k, v, seg, pos, dtype=dtype, sliding_window=window,
                                               block=block), 0)
    return out_r, out_n, r, n


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.mark.parametrize("b,t,h,kvh,block,mean,window", [
    (2, 256, 4, 2, 64, 40, None),     # packed rows, GQA 2, several blocks
    (3, 128, 4, 4, 16, 12, None),     # many short segments, MHA, tiny blocks
    (2, 192, 6, 2, 32, 50, 24),       # sliding window smaller than a segment
    (1, 100, 2, 1, 0, 30, None),      # length not a multiple of 64: one block
    (4, 128, 2, 1, 0, 500, None),     # one example per row (no packing), padding tails
])
def test_flash_matches_dense(b, t, h, kvh, block, mean, window, loops):
    rng = np.random.default_rng(t + b)
    seg, pos = _packed(rng, b, t, mean)
    out_r, out_n, (lr, gr), (ln, gn) = _both(b, t, h, kvh, 32, seg, pos, window, block)
    assert _rel(out_r, out_n) < 2e-6
    assert abs(float(lr) - float(ln)) <= 1e-5 * abs(float(lr))
    for a, c in zip(gr, gn):
        assert _rel(a, c) < 2e-5


def test_flash_bf16_close_to_dense_bf16(loops):
    rng = np.random.default_rng(1)
    seg, pos = _packed(rng, 2, 128, 30)
    out_r, out_n, (lr, gr), (ln, gn) = _both(2, 128, 4, 2, 32, seg, pos, None, 32, jnp.bfloat16)
    assert _rel(out_r, out_n) < 2e-2
    for a, c in zip(gr, gn):
        assert _rel(a, c) < 3e-2


def test_noncontiguous_segment_ids_are_still_exact(loops):
    # segment ids that come back (1 2 1 2 ...) break the contiguous-range picture; the range test
    # must stay conservative (visit more), never drop a needed pair
    t = 128
    seg = np.tile(np.repeat(np.array([1, 2], np.int32), 16), t // 32)[None]
    pos = np.arange(t, dtype=np.int32)[None]
    out_r, out_n, (lr, gr), (ln, gn) = _both(1, t, 2, 1, 16, seg, pos, None, 16)
    assert _rel(out_r, out_n) < 2e-6
    for a, c in zip(gr, gn):
        assert _rel(a, c) < 2e-5


def test_all_padding_row_gives_zero_and_finite_grads(loops):
    seg = np.zeros((2, 64), np.int32)
    seg[0, :40] = 1
    pos = np.where(seg > 0, np.arange(64), 0).astype(np.int32)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 64, 1, 16)), jnp.float32)
    f = lambda q: jnp.sum(segment_attention(q, kv, kv, jnp.asarray(seg), jnp.asarray(pos),  # noqa: E731
                                            dtype=jnp.float32, block=16) ** 2)
    o = segment_attention(q, kv, kv, jnp.asarray(seg), jnp.asarray(pos), dtype=jnp.float32, block=16)
    assert float(jnp.max(jnp.abs(o[1]))) == 0.0 and float(jnp.max(jnp.abs(o[0, 40:]))) == 0.0
    g = jax.grad(f)(q)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g[1]))) == 0.0


def test_pair_skipping_skips():
    t, c = 2048, 128
    nb = t // c
    one = np.ones((1, t), np.int32)  # one example: the causal triangle
    assert visited_pairs(one, c) == (nb * (nb + 1) // 2, nb * (nb + 1) // 2)
    seg = np.repeat(np.arange(1, 9, dtype=np.int32), 256)[None]  # 8 examples of 256 slots
    visited, total = visited_pairs(seg, c)
    assert visited == 8 * 3 and total == 136  # each example: its own 2x2 causal blocks
    half = seg.copy()
    half[:, 1024:] = 0  # padding blocks are not visited at all
    assert visited_pairs(half, c)[0] == 4 * 3


@pytest.mark.parametrize("window", [None, 6])
def test_model_flash_equals_dense(window):
    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, sliding_window=window, attention_block=16)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    seg, pos = _packed(rng, 2, 64, 12)
    ids = jnp.asarray(rng.integers(0, 97, (2, 64)), jnp.int32)

    def loss(p, c):
        logits = llama.forward(p, c, ids, jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(jnp.where(jnp.asarray(seg)[..., None] > 0, logits, 0.0) ** 2) * 1e-3

    lf, gf = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
    ld, gd = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg.replace(attention="dense"))))(params)
    assert abs(float(lf) - float(ld)) <= 1e-5 * abs(float(ld))
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gd)):
        assert _rel(a, b) < 1e-4

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.loss import chunked_cross_entropy_sums, cross_entropy_sums


def _np_ce(logits, targets, mask, z=0.0):
    lg = logits.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(lg - m).sum(-1)))
    ce = lse - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    return ((ce + z * lse**2) * mask).sum(), (ce * mask).sum(), ((lg.argmax(-1) == targets) * mask).sum(), mask.sum()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 13, 16, 50
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    kernel = rng.normal(size=(d, v)).astype(np.float32) / 4
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) > 0.3).astype(np.float32)
    return hidden, kernel, targets, mask


@pytest.mark.parametrize("z", [0.0, 1e-3])
def test_ce_matches_numpy(data, z):
    hidden, kernel, targets, mask = data
    logits = hidden @ kernel
    got = cross_entropy_sums(jnp.asarray(logits), targets, mask, z_loss=z)
    ref = _np_ce(logits, targets, mask, z)
    for k, r in zip(("loss_sum", "ce_sum", "correct", "tokens"), ref):
        np.testing.assert_allclose(float(got[k]), r, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 5, 13, 64])
def test_chunked_equals_full_with_grads(data, chunk):
    hidden, kernel, targets, mask = data

    def full(h, w):
        s = cross_entropy_sums(h @ w, targets, mask, z_loss=1e-3)
        return s["loss_sum"] / s["tokens"], s

    def chunked(h, w):
        s = chunked_cross_entropy_sums(h, w, targets, mask, chunk_size=chunk, z_loss=1e-3)
        return s["loss_sum"] / s["tokens"], s

    (lf, sf), gf = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
    (lc, sc), gc = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, kernel)
    np.testing.assert_allclose(lc, lf, rtol=1e-6)
    for k in sf:
        np.testing.assert_allclose(sc[k], sf[k], rtol=1e-6)
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_lowers_temp_memory_128k_vocab():
    """Compiled (not run) loss+grad for a 128k vocab: chunking must cut XLA's temp buffer size."""
    b, t, d, v = 2, 256, 64, 131072
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    tg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    m = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def full(h, w, tg, m):
        s = cross_entropy_sums(h @ w, tg, m)
        return s["loss_sum"] / s["tokens"]

    def chunked(h, w, tg, m):
        s = chunked_cross_entropy_sums(h, w, tg, m, chunk_size=32)
        return s["loss_sum"] / s["tokens"]

    def temp(f):
        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        return g.lower(h, w, tg, m).compile().memory_analysis().temp_size_in_bytes

    t_full, t_chunk = temp(full), temp(chunked)
    print(f"temp bytes: full={t_full} chunked(32)={t_chunk}")
    assert t_chunk < t_full / 4, (t_full, t_chunk)

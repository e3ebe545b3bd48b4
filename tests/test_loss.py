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


def _dots(jaxpr) -> int:
    n = 0
    for eq in jaxpr.eqns:
        n += eq.primitive.name == "dot_general"
        for v in eq.params.values():
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    n += _dots(j.jaxpr)
                elif hasattr(j, "eqns"):
                    n += _dots(j)
    return n


@pytest.mark.parametrize("kernel_grad", [True, False])
def test_chunked_is_fused_and_frozen_kernel(data, kernel_grad):
    """loss + grads trace to one pass of lm-head products (logits, d hidden, d kernel only when the kernel
    trains): nothing is recomputed in the backward. A frozen kernel (`kernel_grad=False`, LoRA) gets a
    zero gradient and the same loss and hidden gradient."""
    hidden, kernel, targets, mask = data

    def f(h, w):
        s = chunked_cross_entropy_sums(h, w, targets, mask, chunk_size=5, z_loss=1e-3, kernel_grad=kernel_grad)
        return s["loss_sum"] / s["tokens"]

    g = jax.value_and_grad(f, argnums=(0, 1))
    assert _dots(jax.make_jaxpr(g)(hidden, kernel).jaxpr) == (3 if kernel_grad else 2)
    assert _dots(jax.make_jaxpr(f)(hidden, kernel).jaxpr) == 1  # no gradient asked: logits only
    np.testing.assert_allclose(f(hidden, kernel), g(hidden, kernel)[0], rtol=1e-6)
    (l, (gh, gw)) = g(hidden, kernel)
    (lf, (ghf, gwf)) = jax.value_and_grad(
        lambda h, w: (lambda s: s["loss_sum"] / s["tokens"])(cross_entropy_sums(h @ w, targets, mask, z_loss=1e-3)),
        argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(l, lf, rtol=1e-6)
    np.testing.assert_allclose(gh, ghf, rtol=1e-5, atol=1e-7)
    if kernel_grad:
        np.testing.assert_allclose(gw, gwf, rtol=1e-5, atol=1e-7)
    else:
        assert not np.any(np.asarray(gw))


def test_chunked_bf16_hidden(data):
    hidden, kernel, targets, mask = data
    hb = jnp.asarray(hidden, jnp.bfloat16)

    def f(fn):
        return jax.value_and_grad(lambda h, w: (lambda s: s["loss_sum"] / s["tokens"])(fn(h, w)), argnums=(0, 1))(
            hb, kernel)

    lc, (ghc, gwc) = f(lambda h, w: chunked_cross_entropy_sums(h, w, targets, mask, chunk_size=4))
    lf, (ghf, gwf) = f(lambda h, w: cross_entropy_sums(
        jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32), targets, mask))
    assert ghc.dtype == jnp.bfloat16
    np.testing.assert_allclose(lc, lf, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ghc, np.float32), np.asarray(ghf, np.float32), rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(gwc, gwf, rtol=2e-2, atol=2e-3)

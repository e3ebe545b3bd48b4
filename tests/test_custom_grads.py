"""The model's hand-written backward passes (`llama.matmul`, `llama.lora_matmul`, `llama.swiglu`)
equal autodiff of the plain formulas, in float32 and bfloat16, for 2-D and 3-D weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models.llama import lora_matmul, matmul, swiglu


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.mark.parametrize("out", [(40,), (20, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 5e-6), (jnp.bfloat16, 1e-1)])
def test_custom_grads_equal_autodiff(dtype, tol, out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 10, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, *out)), jnp.float32) * 0.2
    w2 = jnp.asarray(rng.standard_normal((24, *out)), jnp.float32) * 0.2
    a = jnp.asarray(rng.standard_normal((24, 4)), jnp.float32) * 0.2
    b = jnp.asarray(rng.standard_normal((4, *out)), jnp.float32) * 0.2
    c = jnp.asarray(rng.standard_normal((3, 10, *out)), jnp.float32)
    c2 = jnp.asarray(rng.standard_normal((3, 10, 20)), jnp.float32)

    def head(y):
        if y.shape[-2:] == (20, 2):  # exercise swiglu on the [.., I, 2] layout too
            return jnp.sum(swiglu(y).astype(jnp.float32) * c2)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    def ref_head(y):
        if y.shape[-2:] == (20, 2):
            g, u = y[..., 0].astype(jnp.float32), y[..., 1].astype(jnp.float32)
            return jnp.sum(jax.nn.silu(g) * u * c2)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    def ours(x, w, w2, a, b):
        xd = x.astype(dtype)
        ha = jnp.dot(xd, a.astype(dtype))
        y = matmul(xd, w2.astype(dtype)) + lora_matmul(xd, ha, w.astype(dtype), b.astype(dtype), 2.5)
        return head(y)

    def ref(x, w, w2, a, b):
        xd = x.astype(dtype)
        t = jnp.dot(jnp.dot(xd, a.astype(dtype)), b.astype(dtype).reshape(4, -1)).reshape(*xd.shape[:-1], *out)
        base = jnp.dot(xd, w.astype(dtype).reshape(24, -1)).reshape(*xd.shape[:-1], *out)
        base2 = jnp.dot(xd, w2.astype(dtype).reshape(24, -1)).reshape(*xd.shape[:-1], *out)
        return ref_head(base2 + base + 2.5 * t)

    lo, go = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3, 4)))(x, w, w2, a, b)
    lr, gr = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4)))(x, w, w2, a, b)
    assert abs(float(lo) - float(lr)) <= tol * max(1.0, abs(float(lr)))
    for g1, g2 in zip(go, gr):
        assert g1.shape == g2.shape and g1.dtype == g2.dtype
        assert _rel(g2, g1) < tol


@pytest.mark.parametrize("n_tok", [64, 40, 30])  # blocked-transpose path (64 = 64 x 1, 40 = 8 x 5); 30: direct form
@pytest.mark.parametrize("out", [(10, 2), (10, 3)])  # 20 < 24 inputs: dy is transposed; 30 > 24: x is
def test_wgrad_bf16_paths_equal_float64(n_tok, out):
    """`_wgrad` on 16-bit inputs (on CPU when the token count has a block divisor: the explicitly
    transposed [in, tokens] @ [tokens, out] form, or (dy^T x)^T when out < in; the direct
    token-contracting dot otherwise) equals the float64 product of the same bf16 values to
    float32-accumulation accuracy."""
    from sft_jax.models.llama import _wgrad

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n_tok, 24)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((n_tok, *out)), jnp.bfloat16)
    got = jax.jit(lambda x, dy: _wgrad(x, dy, 2))(x, dy)
    assert got.shape == (24, *out) and got.dtype == jnp.float32
    want = np.einsum("ti,tjk->ijk", np.asarray(x, np.float64), np.asarray(dy, np.float64))
    assert _rel(want, got) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 5e-6), (jnp.bfloat16, 2e-2)])
def test_logits_matmul_equals_einsum(dtype, tol):
    """The LM head (`logits_matmul`: float32 logits from 16-bit operands, hand-written backward)
    equals autodiff of `einsum(..., preferred_element_type=float32)`."""
    from sft_jax.models.llama import logits_matmul

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 32, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 50)), jnp.float32) * 0.2
    tgt = jnp.asarray(rng.integers(0, 50, (2, 32)))

    def loss(f):
        def run(x, w):
            logits = f(x.astype(dtype), w.astype(dtype))
            assert logits.dtype == jnp.float32
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))
        return run

    ref = loss(lambda x, w: jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32))
    lo, go = jax.jit(jax.value_and_grad(loss(logits_matmul), argnums=(0, 1)))(x, w)
    lr, gr = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(x, w)
    assert abs(float(lo) - float(lr)) <= 1e-6 * max(1.0, abs(float(lr)))
    for g1, g2 in zip(go, gr):
        assert g1.shape == g2.shape and g1.dtype == g2.dtype
        assert _rel(g2, g1) < tol

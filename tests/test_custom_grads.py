"""The model's hand-written backward passes (`llama.matmul`, `llama.lora_delta`) equal autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models.llama import lora_delta, matmul


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_matmul_and_lora_delta_grads_equal_autodiff(dtype, tol):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 10, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((24, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 40)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((3, 10, 40)), jnp.float32)

    def ours(x, w, a, b):
        xd = x.astype(dtype)
        y = matmul(xd, w.astype(dtype)) + lora_delta(xd, a.astype(dtype), b.astype(dtype), 2.5)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    def ref(x, w, a, b):
        xd = x.astype(dtype)
        y = jnp.dot(xd, w.astype(dtype)) + 2.5 * jnp.dot(jnp.dot(xd, a.astype(dtype)), b.astype(dtype))
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    lo, go = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(x, w, a, b)
    lr, gr = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2, 3)))(x, w, a, b)
    assert abs(float(lo) - float(lr)) <= tol * max(1.0, abs(float(lr))) * 10
    for g1, g2 in zip(go, gr):
        assert g1.shape == g2.shape and g1.dtype == g2.dtype
        assert _rel(g2, g1) < tol * 5

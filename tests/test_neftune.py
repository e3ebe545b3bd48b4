import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.neftune import neftune_noise, segment_lengths


def test_noise_per_segment_bound_formula_and_padding():
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    d, alpha = 8, 5.0
    rng = jax.random.PRNGKey(3)
    noise = np.asarray(neftune_noise(rng, jnp.asarray(seg), d, alpha, jnp.float32))
    assert noise.shape == (2, 12, d)
    np.testing.assert_array_equal(np.asarray(segment_lengths(jnp.asarray(seg)))[0, :9], [3, 3, 3, 2, 2, 4, 4, 4, 4])
    u = np.asarray(jax.random.uniform(rng, (2, 12, d), jnp.float32, -1.0, 1.0))
    for row in range(2):
        for s in set(seg[row].tolist()):
            idx = seg[row] == s
            if s == 0:
                assert np.all(noise[row, idx] == 0.0), "padding got noise"
                continue
            L = idx.sum()
            bound = alpha / np.sqrt(L * d)
            assert np.abs(noise[row, idx]).max() <= bound * (1 + 1e-6)
            assert np.abs(noise[row, idx]).max() > 0.5 * bound
            np.testing.assert_allclose(noise[row, idx], u[row, idx] * bound, rtol=1e-6)


def test_alpha_zero_disables():
    assert neftune_noise(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), 8, 0.0) is None


def test_dtype():
    n = neftune_noise(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), 8, 5.0, jnp.bfloat16)
    assert n.dtype == jnp.bfloat16

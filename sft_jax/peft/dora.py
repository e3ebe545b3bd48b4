"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) as pure JAX functions, as peft's `use_dora=True`.

A DoRA projection keeps LoRA's low-rank pair (A [in, r], B [r, out]; scale s = alpha / r, or alpha / sqrt(r)
for rsLoRA) and adds a learned magnitude vector m [out] over the column norms of the adapted weight:

    W' = m * (W + s A B) / ||W + s A B||_c          (||.||_c: the L2 norm of each output column, [out])

Layout: our kernels are [*lead, in, out] (peft/torch weights are [out, in]; `lead` is the layer axis of a
scanned base), so the column norm is taken over the `in` axis (-2).
As in peft (and section 4.3 of the paper), the norm is treated as a constant: it is computed from the current
A, B but gets no gradient.  At initialisation B = 0 and m = ||W||_c, so the layer equals the base layer.

Dropout (peft's `DoraLinearVariant.forward`): without dropout the output is `m / n * (x W + s x A B) + bias`;
with dropout the frozen path keeps the undropped input and only the DoRA correction sees the dropped one:
`x W + bias + (m / n - 1) * (x_d W) + m / n * s * (x_d A B)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _adapted(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + s A B in float32, [*lead, in, out]."""
    return kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """||W + s A B||_c: the L2 norm of every output column of the adapted kernel, [*lead, out], float32, no
    gradient.  `kernel` [*lead, in, out] (dequantised if the base is quantised), `a` [*lead, in, r],
    `b` [*lead, r, out]."""
    return jax.lax.stop_gradient(jnp.linalg.norm(_adapted(kernel, a, b, scale), axis=-2))


def init_magnitude(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """peft's initial magnitude vector: ||W + s A B||_c (= ||W||_c for the usual B = 0), float32 [*lead, out]."""
    return weight_norm(kernel, a, b, scale)


def _reference_matmul(u: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(u, w, preferred_element_type=jnp.float32).astype(u.dtype)


def dora_linear(
    x: jax.Array,
    kernel: jax.Array,
    a: jax.Array,
    b: jax.Array,
    magnitude: jax.Array,
    scale: float,
    *,
    bias: jax.Array | None = None,
    x_dropped: jax.Array | None = None,
    matmul=_reference_matmul,
) -> jax.Array:
    """The output of a DoRA projection: x [..., in] -> [..., out] in x's dtype (one layer: kernel [in, out],
    a [in, r], b [r, out], magnitude [out]).

    `x_dropped`: dropout(x) for training with adapter dropout (None: no dropout, the one-dot form).
    `matmul(u, w)`: the dot to use (the model's selected kernel; default `u @ w` in u's dtype with float32
    accumulation).  The matmuls run in x's dtype; the norm and the column scale in float32."""
    dt = x.dtype
    k, a_, b_ = kernel.astype(dt), a.astype(dt), b.astype(dt)
    col_scale = magnitude.astype(jnp.float32) / weight_norm(kernel, a, b, scale)
    if x_dropped is None:
        y = col_scale * (matmul(x, k) + scale * matmul(matmul(x, a_), b_))
    else:
        xd = x_dropped.astype(dt)
        y = matmul(x, k) + (col_scale - 1.0) * matmul(xd, k) + col_scale * scale * matmul(matmul(xd, a_), b_)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dt)


def merge(kernel: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float) -> jax.Array:
    """The plain kernel equal to the DoRA projection: m / ||W + s A B||_c * (W + s A B), [*lead, in, out] in
    the kernel's dtype (peft's `merge_unsafe`; the bias is unchanged)."""
    w = _adapted(kernel, a, b, scale)
    col_scale = magnitude.astype(jnp.float32) / jnp.linalg.norm(w, axis=-2)
    return (col_scale[..., None, :] * w).astype(kernel.dtype)

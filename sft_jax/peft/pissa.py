"""PiSSA (principal singular values and vectors adaptation, Meng et al. 2024) as pure JAX functions, as peft's
`init_lora_weights="pissa"` / `"pissa_niter_K"`.

PiSSA is LoRA with another initialisation: the r principal singular triplets of the base weight go into the
adapter and the rest stays in the frozen base.  With peft's orientation W_hf = kernel^T [out, in] = V S U^T:

    lora_A = sqrt(S_r / s) U_r^T  [r, in],   lora_B = V_r sqrt(S_r / s)  [out, r],
    W_res  = W - s B A                        (so that W_res + s B A = W: the first forward equals the base)

stored here in our layout as A = lora_A^T [in, r], B = lora_B^T [r, out], residual kernel [in, out].
`pissa_niter_K` replaces the full SVD by torch's randomised `svd_lowrank(W_hf, q=r, niter=K)` (Halko et al.
2009, algorithms 4.4 + 5.1), reimplemented below with a JAX random matrix.

Export: the trained adapter belongs to the residual base.  peft's documented conversion to a plain LoRA on the
original base (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`, `subtract_mutated_init`)
uses W + dW = W_res + s B A = W + s (B A - B0 A0), i.e. the rank-2r adapter A' = [A | A0], B' = [B ; -B0] with
alpha doubled (rsLoRA: alpha * sqrt(2)) so that the scale stays s.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def svd_lowrank_from(w: jax.Array, r_init: jax.Array, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """torch's `svd_lowrank(w, q, niter)` with its random test matrix given: `r_init` [*lead, n', q], where n' is
    the smaller of w's last two dimensions ([*lead, m, n]).  Returns U [*lead, m, q], S [*lead, q],
    V [*lead, n, q] with w ~ U diag(S) V^T."""
    tall = w.shape[-2] >= w.shape[-1]
    a = w if tall else _t(w)
    q_mat = jnp.linalg.qr(a @ r_init).Q
    for _ in range(niter):
        q_mat = jnp.linalg.qr(_t(a) @ q_mat).Q
        q_mat = jnp.linalg.qr(a @ q_mat).Q
    u, s, vh = jnp.linalg.svd(_t(q_mat) @ a, full_matrices=False)
    u = q_mat @ u
    v = _t(vh)
    return (u, s, v) if tall else (v, s, u)


def svd_lowrank(w: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomised rank-q SVD of w [*lead, m, n] (torch's `svd_lowrank`; standard-normal test matrices from
    `key`)."""
    r_init = jax.random.normal(key, (*w.shape[:-2], min(w.shape[-2:]), q), jnp.float32)
    return svd_lowrank_from(w, r_init, niter)


def pissa_init(
    kernel: jax.Array, rank: int, scale: float, *, niter: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A [*lead, in, r], B [*lead, r, out], residual kernel [*lead, in, out]) for a base kernel
    [*lead, in, out] (`lead`: the layer axis of a scanned base; every layer is decomposed on its own).

    niter None: the exact SVD (`init_lora_weights="pissa"`); an int K: the randomised one
    (`"pissa_niter_K"`, needs `key`).  The SVD runs in float32; A, B are float32, the residual has the
    kernel's dtype."""
    w_hf = _t(kernel.astype(jnp.float32))  # [*lead, out, in], peft's orientation
    if niter is None:
        v, s, uh = jnp.linalg.svd(w_hf, full_matrices=False)
        v_r, s_r, uh_r = v[..., :rank], s[..., :rank], uh[..., :rank, :]
    else:
        if key is None:
            raise ValueError("pissa_init: the randomised SVD (niter set) needs a key")
        v_r, s_r, u_r = svd_lowrank(w_hf, rank, niter, key)
        uh_r = _t(u_r)
    root = jnp.sqrt(s_r / scale)
    lora_a = root[..., :, None] * uh_r  # [*lead, r, in]
    lora_b = v_r * root[..., None, :]  # [*lead, out, r]
    a, b = _t(lora_a), _t(lora_b)
    residual = kernel.astype(jnp.float32) - scale * (a @ b)
    return a, b, residual.astype(kernel.dtype)


def to_plain_lora(
    a: jax.Array, b: jax.Array, a0: jax.Array, b0: jax.Array, alpha: float, rslora: bool = False
) -> tuple[jax.Array, jax.Array, float]:
    """A trained PiSSA adapter (A, B on the residual base; A0, B0 its initial value) as a plain LoRA adapter on
    the original base: (A' [in, 2r], B' [2r, out], alpha'), peft's `subtract_mutated_init` conversion."""
    a2 = jnp.concatenate([a, a0], axis=-1)
    b2 = jnp.concatenate([b, -b0], axis=-2)
    return a2, b2, alpha * (math.sqrt(2.0) if rslora else 2.0)


def original_kernel(residual: jax.Array, a0: jax.Array, b0: jax.Array, scale: float) -> jax.Array:
    """The base kernel PiSSA started from: W_res + s A0 B0 (exact up to float rounding)."""
    return (residual.astype(jnp.float32) + scale * (a0.astype(jnp.float32) @ b0.astype(jnp.float32))).astype(
        residual.dtype)

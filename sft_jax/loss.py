"""Masked next-token cross-entropy, normalised by the trainable tokens of the whole global batch.

Every function here returns *sums* (loss numerator, correct predictions, trainable token count);
the caller divides by the token count of the full global batch, computed once up front. That is
what makes gradient accumulation and data parallelism exact (GUIDE pitfall 4): a micro-batch or a
device never normalises by its own count.

`cross_entropy_sums` works on materialised logits; `chunked_cross_entropy_sums` takes the
final hidden states and the lm-head kernel and scans over chunks of the sequence, so the
[B, T, V] logits never exist whole (fused: each chunk's gradients are made in the same pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _token_terms(logits, targets, z_loss: float):
    """Per-token (ce + z-loss term, ce, correct) from float32 logits [..., V]."""
    logits = logits.astype(jnp.float32)
    # one max and one sum over V (jnp.argmax is a variadic (value, index) reduce that XLA:CPU runs
    # ~10x slower than a plain max: 68 ms of a 2.6 s step at V 8000); a token counts as correct
    # when its target's logit is the maximum (argmax, except that a tie also counts)
    mx = jnp.max(logits, axis=-1)
    m = jax.lax.stop_gradient(mx)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = lse - target_logit
    total = ce + z_loss * jnp.square(lse) if z_loss else ce
    correct = (jax.lax.stop_gradient(target_logit) >= m).astype(jnp.float32)
    return total, ce, correct


def cross_entropy_sums(logits, targets, loss_mask, *, z_loss: float = 0.0) -> dict:
    """Sums over trainable tokens of a [B, T, V] logits batch.

    Returns `{"loss_sum", "ce_sum", "correct", "tokens"}` (float32 scalars); `loss_sum` includes the
    z-loss term `z_loss * logsumexp^2`, `ce_sum` is the plain cross-entropy.
    """
    mask = loss_mask.astype(jnp.float32)
    total, ce, correct = _token_terms(logits, targets, z_loss)
    return {
        "loss_sum": jnp.sum(total * mask),
        "ce_sum": jnp.sum(ce * mask),
        "correct": jnp.sum(correct * mask),
        "tokens": jnp.sum(mask),
    }


def _capped(logits, softcap):
    """Gemma 2's final logit soft-capping (softcap * tanh(logits / softcap)) and its derivative factor."""
    if softcap is None:
        return logits, None
    t = jnp.tanh(logits / softcap)
    return t * softcap, 1.0 - t * t


def _chunk_terms(h, kernel, tgt, m, z_loss: float, kernel_grad: bool, softcap=None):
    """One chunk (h [B, c, D], tgt / m [B, c]): the three sums, d(loss_sum)/dh [B, c, D] (h's dtype) and
    d(loss_sum)/dkernel [D, V] (float32; None without `kernel_grad`)."""
    w = kernel.astype(h.dtype)
    logits, dcap = _capped(jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32), softcap)
    total, ce, correct = _token_terms(logits, tgt, z_loss)
    sums = jnp.stack([jnp.sum(total * m), jnp.sum(ce * m), jnp.sum(correct * m)])
    # d(total)/dlogits = softmax * (1 + 2 z lse) - onehot(target); times the mask
    mx = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - mx)
    se = jnp.sum(e, axis=-1, keepdims=True)
    p = e / se
    if z_loss:
        lse = mx + jnp.log(se)
        p = p * (1.0 + 2.0 * z_loss * lse)
    onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == tgt[..., None].astype(jnp.int32)
    dlogits = jnp.where(onehot, p - 1.0, p) * m[..., None]
    if dcap is not None:
        dlogits = dlogits * dcap
    dlogits = dlogits.astype(h.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32) if kernel_grad else None
    return sums, dh, dw


def _fused_scan(hs, kernel, ts, ms, z_loss, kernel_grad, softcap=None):
    d, v = kernel.shape

    def body(carry, xs):
        acc, dw = carry
        sums, dh, dw_c = _chunk_terms(*xs[:1], kernel, *xs[1:], z_loss, kernel_grad, softcap)
        return (acc + sums, dw + dw_c if kernel_grad else dw), dh

    dw0 = jnp.zeros((d, v), jnp.float32) if kernel_grad else jnp.zeros((), jnp.float32)
    (acc, dw), dhs = jax.lax.scan(body, (jnp.zeros((3,), jnp.float32), dw0), (hs, ts, ms))
    return acc, dhs, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_sums(hs, kernel, ts, ms, z_loss, kernel_grad, softcap=None):
    """Not differentiated (evaluation): the sums alone, no gradient work."""

    def body(acc, xs):
        h, tgt, m = xs
        logits = _capped(jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32),
                         softcap)[0]
        total, ce, correct = _token_terms(logits, tgt, z_loss)
        return acc + jnp.stack([jnp.sum(total * m), jnp.sum(ce * m), jnp.sum(correct * m)]), None

    return jax.lax.scan(body, jnp.zeros((3,), jnp.float32), (hs, ts, ms))[0]


def _fused_fwd(hs, kernel, ts, ms, z_loss, kernel_grad, softcap=None):
    acc, dhs, dw = _fused_scan(hs, kernel, ts, ms, z_loss, kernel_grad, softcap)
    return acc, (dhs, dw, kernel, ts, ms)


def _fused_bwd(z_loss, kernel_grad, softcap, res, g):
    dhs, dw, kernel, ts, ms = res
    gl = g[0]  # only loss_sum is differentiable (the caller stops the gradient of the others)
    dk = (gl * dw).astype(kernel.dtype) if kernel_grad else jnp.zeros_like(kernel)
    return ((gl * dhs.astype(jnp.float32)).astype(dhs.dtype), dk, np.zeros(ts.shape, jax.dtypes.float0),
            jnp.zeros_like(ms))


_fused_sums.defvjp(_fused_fwd, _fused_bwd)


def chunked_cross_entropy_sums(
    hidden, kernel, targets, loss_mask, *, chunk_size: int, z_loss: float = 0.0, kernel_grad: bool = True,
    softcap: float | None = None,
) -> dict:
    """Like `cross_entropy_sums(hidden @ kernel, ...)` without materialising [B, T, V].

    hidden: [B, T, D] (final-normed), kernel: [D, V]. The sequence is padded up to a multiple of
    `chunk_size` (padding has mask 0) and scanned chunk by chunk. Fused forward and backward (the
    Liger / "fused linear cross-entropy" scheme): each chunk's logits are made once, and the same pass
    turns them into the gradients of `loss_sum` with respect to the chunk's hidden states and the
    kernel, which the backward pass only scales by the incoming cotangent. So no [B, T, V] array, no
    recomputed lm-head product in the backward, at the cost of holding d(loss)/d(hidden) ([B, T, D])
    and d(loss)/d(kernel) ([D, V], float32) from the forward to the backward. Called without a gradient
    (evaluation) it computes the sums alone.

    Only `loss_sum` is differentiable; `ce_sum` and `correct` are returned under `stop_gradient`.
    `kernel_grad=False` treats the kernel as a constant (a frozen LM head, e.g. LoRA): its gradient is
    zero and its [D, V] accumulation is skipped. `softcap` (Gemma 2's final_logit_softcapping): the
    logits are softcap * tanh(logits / softcap), in the sums and the gradients.
    """
    b, t, d = hidden.shape
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    mask = loss_mask.astype(jnp.float32)
    if not kernel_grad:
        kernel = jax.lax.stop_gradient(kernel)
    h, tg, m = hidden, targets, mask
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tg = jnp.pad(tg, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    # [n, B, c, ...]: scan over the chunk axis (rows stay the batch axis: data sharding is kept)
    hs = h.reshape(b, n, chunk_size, d).swapaxes(0, 1)
    ts = tg.reshape(b, n, chunk_size).swapaxes(0, 1).astype(jnp.int32)
    ms = m.reshape(b, n, chunk_size).swapaxes(0, 1)
    acc = _fused_sums(hs, kernel, ts, ms, float(z_loss), bool(kernel_grad),
                      None if softcap is None else float(softcap))
    aux = jax.lax.stop_gradient(acc)
    return {"loss_sum": acc[0], "ce_sum": aux[1], "correct": aux[2], "tokens": jnp.sum(mask)}

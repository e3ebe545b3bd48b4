"""NEFTune (Jain et al. 2023): uniform noise added to the input embeddings during training only.

noise = U(-1, 1) * alpha / sqrt(L * d), with d the hidden size and L the *real* length of the
example the token belongs to: under packing, the number of tokens carrying its segment id in the
row (GUIDE pitfall 5: never the padded length). Padding (segment id 0) gets no noise.
The result is passed to the model forward as `embed_noise`; eval never calls this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_lengths(segment_ids) -> jax.Array:
    """[B, T] int32: for each token, the number of tokens in its row with the same segment id."""
    t = segment_ids.shape[-1]
    seg = segment_ids.astype(jnp.int32)
    counts = jax.vmap(lambda s: jnp.bincount(s, length=t + 1))(seg)  # [B, T+1]
    return jnp.take_along_axis(counts, seg, axis=-1)


def neftune_noise(rng, segment_ids, hidden_size: int, alpha: float, dtype=jnp.float32):
    """[B, T, hidden_size] noise for the input embeddings, or None when alpha == 0 (disabled)."""
    if not alpha:
        return None
    b, t = segment_ids.shape
    lengths = segment_lengths(segment_ids).astype(jnp.float32)
    real = segment_ids > 0
    scale = jnp.where(real, alpha / jnp.sqrt(jnp.maximum(lengths, 1.0) * hidden_size), 0.0)
    u = jax.random.uniform(rng, (b, t, hidden_size), jnp.float32, minval=-1.0, maxval=1.0)
    return (u * scale[..., None]).astype(dtype)

"""int8 weights in bitsandbytes' LLM.int8 weight format (`Int8Params`: row-wise absmax int8).

bitsandbytes (`Int8Params._quantize`) rounds the weight to float16, then quantises torch's `[out, in]`
weight per output row (`int8_vectorwise_quant`): `scale = max |w_row|` (float32),
`q = round_half_even(w * ((1 / scale) * 127))` as int8, and dequantises `q * scale * (1 / 127)` in float32.  We keep our kernel layout: codes `[in, out]` int8 and one
scale per output channel `[out]`, so the codes shard exactly like the kernel.  The outlier
decomposition of LLM.int8 (`threshold`) is a property of the activations at run time, not of the
stored weights, and is not used (as bitsandbytes with `llm_int8_threshold=0`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.quant.nf4 import _shardings_like, _spec_axes

INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' reciprocal of 127


@flax.struct.dataclass
class Int8Tensor:
    """A frozen kernel `[..., in, out]`: int8 `codes` (same shape) and float32 `scale` `[..., out]`."""

    codes: jnp.ndarray
    scale: jnp.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantised kernel's shape."""
        return tuple(np.shape(self.codes))

    def dequantize(self, dtype=jnp.float32) -> jnp.ndarray:
        """The kernel `[..., in, out]` in `dtype` (see `dequantize`)."""
        return dequantize(self, dtype)

    def shardings_like(self, kernel_sharding: jax.sharding.NamedSharding) -> "Int8Tensor":
        """Shardings of the fields from the kernel's: codes as the kernel, scales as its output axis."""
        return _shardings_like(self, logical_axes(self, _spec_axes(kernel_sharding, len(self.shape))), kernel_sharding)


def quantize_kernel(kernel: np.ndarray) -> Int8Tensor:
    """Row-wise (per output channel) absmax int8 of one kernel `[in, out]` (host NumPy), as bitsandbytes."""
    w = np.asarray(kernel).astype(np.float16).astype(np.float32)
    scale = np.abs(w).max(axis=0)
    # torch evaluates `127.0 / scale` as `scale.reciprocal() * 127.0` (two roundings)
    factor = (np.float32(1.0) / np.where(scale == 0, np.float32(1.0), scale)) * np.float32(127.0)
    codes = np.round(w * factor[None, :]).astype(np.int8)
    return Int8Tensor(codes=codes, scale=scale.astype(np.float32))


def dequantize(t: Int8Tensor, dtype=jnp.float32) -> jnp.ndarray:
    """The kernel `[..., in, out]` in `dtype`: float32 `q * scale * (1/127)` (bitsandbytes' values), then cast."""
    w = t.codes.astype(jnp.float32) * t.scale[..., None, :]
    return (w * INV_127).astype(dtype)


def abstract(kernel_shape: tuple[int, ...]) -> Int8Tensor:
    """`Int8Tensor` of `jax.ShapeDtypeStruct`s for a kernel `[*lead, in, out]`."""
    return Int8Tensor(codes=jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.int8),
                      scale=jax.ShapeDtypeStruct(tuple(kernel_shape[:-2]) + (kernel_shape[-1],), jnp.float32))


def logical_axes(t: Int8Tensor, kernel_axes: tuple) -> Int8Tensor:
    """Logical axis names of the fields from the kernel's `(*lead, in_axis, out_axis)`."""
    return t.replace(codes=tuple(kernel_axes), scale=tuple(kernel_axes[:-2]) + (kernel_axes[-1],))


def nbytes(shape: tuple[int, int]) -> int:
    """Bytes an `Int8Tensor` of a kernel `shape` `[in, out]` takes."""
    return shape[0] * shape[1] + 4 * shape[1]

"""NF4 weights in bitsandbytes' exact format (block size 64, double-quantised block scales).

Quantisation runs on the host in NumPy, one tensor at a time, and reproduces bitsandbytes
0.50.2's CPU path (`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True)`) byte for byte; dequantisation is JAX (jit-able, shardable) and gives
bitsandbytes' `dequantize_4bit` values bit for bit in float32.  The rules, from bitsandbytes'
source (`backends/default/ops.py` for the 4-bit codes, `csrc/cpu_ops.cpp` for the 8-bit scales):

* **Flattening.** bitsandbytes quantises torch's `[out, in]` weight row-major; our kernels are
  `[in, out]`, so a kernel is transposed first.  Blocks of 64 run along that flat order, so they
  cross rows when `in` is not a multiple of 64; the last block may be short.
* **Codes.** A block is scaled by `x * (1 / absmax)` (full blocks; the short last block divides
  `x / absmax`), clipped to [-1, 1], and mapped to the NF4 entry whose interval holds it, the
  boundaries being the float32 midpoints of neighbouring entries; a value exactly on a boundary
  takes the lower entry (`torch.bucketize`, right=False).  An odd count is padded with code 7 (0.0).
* **Packing.** Two codes a byte, the first (even flat index) in the high nibble.
* **Double quantisation** (`compress_statistics`).  The float32 block absmaxes get an offset
  `mean(absmax)`; `absmax - offset` is quantised with bitsandbytes' signed 8-bit dynamic code in
  blocks of 256 (each with its own float32 absmax), through its CPU kernel's 65536-entry lookup
  table: index `trunc((clip(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`, entry = the code whose midpoint
  interval holds `-1 + 2 i / 65535` (ties to the lower code).  Dequantised:
  `absmax = code8[q] * absmax2[block // 256] + offset`, then `w = nf4[code] * absmax`.

Storage layout (`NF4Tensor`): when `in` is a multiple of the block size, codes are `[out, in / 2]`
and scales `[out, in / block]` (bitsandbytes' flat bytes, reshaped: the same bytes), so they shard
along both weight axes like the kernel (transposed); otherwise codes and scales are flat
(`[ceil(n / 2)]`, `[ceil(n / block)]`), for small models only, replicated.  Leading axes (the
stacked layer axis of a scanned model) are allowed on every array field.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalised to [-1, 1].
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
NF4_ZERO = 7  # the code of 0.0, used to pad an odd element count
SCALE_BLOCK = 256  # bitsandbytes' block size for the double quantisation of the absmax scales
_LUT_SIZE = 65536


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace` (CPU): fused multiply-add from the start for the first half, from the end after."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = (np.float64(s) + step * i).astype(np.float32)
    hi = (np.float64(e) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, lo, hi)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (`functional.create_dynamic_map()`), 256 sorted float32 values."""
    data: list[float] = []
    for i in range(7):  # max_exponent_bits=7, total_bits=8, signed
        bounds = _torch_linspace(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-6 + i))  # a float32 tensor op in bitsandbytes
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


DYNAMIC_CODE = dynamic_code()


def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU lookup table: 65536 grid points in [-1, 1] -> index of the nearest dynamic code."""
    mid = np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1))
    return np.searchsorted(mid, grid, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()


@flax.struct.dataclass
class NF4Tensor:
    """A frozen kernel `[*lead, in, out]` (`shape`; static `kernel_shape` = `(in, out)`) stored as
    bitsandbytes NF4 with double-quantised scales.

    codes: uint8, two 4-bit codes a byte (high nibble first), torch `[out, in]` row-major order.
    scale_codes: uint8 8-bit codes of `absmax - scale_offset` per block of `block_size` values
    (float32 absmax itself when not `double_quant`).
    scale_absmax: float32 absmax per group of 256 scale codes.  scale_offset: float32 (per layer).
    """

    codes: jnp.ndarray
    scale_codes: jnp.ndarray
    scale_absmax: jnp.ndarray
    scale_offset: jnp.ndarray
    kernel_shape: tuple[int, int] = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False, default=64)
    double_quant: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def row_blocked(self) -> bool:
        """True when the 2-D `[out, in/2]` layout is used (`in` a multiple of the block size)."""
        return self.kernel_shape[0] % self.block_size == 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantised kernel's shape, with the leading (layer) axes of the stored arrays."""
        return tuple(np.shape(self.scale_offset)) + tuple(self.kernel_shape)

    def shardings_like(self, kernel_sharding: jax.sharding.NamedSharding) -> "NF4Tensor":
        """Shardings of the fields from the kernel's (see `logical_axes`; dims the mesh does not divide replicated)."""
        return _shardings_like(self, logical_axes(self, _spec_axes(kernel_sharding, len(self.shape))), kernel_sharding)

    def dequantize(self, dtype=jnp.float32) -> jnp.ndarray:
        """The kernel `[..., in, out]` in `dtype` (see `dequantize`)."""
        return dequantize(self, dtype)


def _scale_blocks(flat: np.ndarray, block: int) -> np.ndarray:
    """Scale `flat` in place to [-1, 1] per block, as bitsandbytes' `quantize_4bit` default kernel
    (`x * (1 / absmax)` for full blocks, `x / absmax` for the short last one); returns the absmaxes."""
    n = flat.size
    full = n - n % block
    head = flat[:full].reshape(-1, block)
    absmax = np.maximum(head.max(axis=1), -head.min(axis=1)) if full else np.zeros(0, np.float32)
    head *= (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38)))[:, None]
    if n % block:
        tail = flat[full:]
        tail_max = np.abs(tail).max()
        tail /= np.maximum(tail_max, np.float32(1e-38))
        absmax = np.append(absmax, tail_max)
    np.clip(flat, -1, 1, out=flat)
    return absmax.astype(np.float32)


def quantize_blockwise_8bit(x: np.ndarray, block: int = SCALE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' CPU `quantize_blockwise` with the dynamic code: (uint8 codes, float32 absmax per block)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    nb = -(-flat.size // block)
    padded = np.zeros(nb * block, np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(nb, block)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    inv = np.float32(1.0) / np.where(absmax == 0, np.float32(1.0), absmax)
    v = np.clip(blocks * inv[:, None], -1, 1)
    idx = ((v + np.float32(1.0)) * np.float32(0.5) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)).astype(np.uint16)
    q = np.where(absmax[:, None] == 0, 0, _DYNAMIC_LUT[idx]).astype(np.uint8)
    return q.reshape(-1)[: flat.size], absmax


def quantize_codes(weight: np.ndarray, block_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes NF4 of a torch-layout weight `[out, in]` without double quantisation:
    (packed uint8 codes [ceil(n/2)], float32 absmax [ceil(n/block)]), as `quantize_4bit(..., compress_statistics=False)`."""
    flat = np.array(weight, dtype=np.float32).reshape(-1)  # our copy, scaled in place
    if not np.isfinite(flat).all():
        raise ValueError("NF4 quantisation: the weight holds NaN or infinite values")
    absmax = _scale_blocks(flat, block_size)
    # code = number of boundaries strictly below the value (torch.bucketize, right=False); counted
    # with one comparison per boundary so that the work memory stays a byte per value
    q = np.full(flat.size + flat.size % 2, NF4_ZERO, np.uint8)
    q[: flat.size] = 0
    for b in (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2.0):
        q[: flat.size] += flat > b
    return (q[0::2] << 4) | q[1::2], absmax


def double_quantize(absmax: np.ndarray, offset: np.float32 | None = None) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """bitsandbytes' `compress_statistics`: (uint8 scale codes, float32 absmax per 256, float32 offset).

    The offset is the float32 mean of `absmax`.  torch sums float32 in an order that depends on the
    CPU's vector width and thread count, so its mean can differ from ours (the correctly rounded
    mean) by 1-2 units in the last place; pass bitsandbytes' own `offset` to reproduce its bytes."""
    if offset is None:
        offset = np.float32(np.asarray(absmax, np.float64).mean())
    codes, absmax2 = quantize_blockwise_8bit(np.asarray(absmax, np.float32) - np.float32(offset))
    return codes, absmax2, np.float32(offset)


def quantize_kernel(kernel: np.ndarray, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise one kernel `[in, out]` (host NumPy) into an `NF4Tensor` in the layout described above.

    Without `double_quant` the block absmaxes stay float32 in `scale_codes` (`scale_absmax` empty)."""
    kin, kout = kernel.shape
    codes, absmax = quantize_codes(np.asarray(kernel).T, block_size)
    if double_quant:
        scale_codes, scale_absmax, offset = double_quantize(absmax)
    else:
        scale_codes, scale_absmax, offset = absmax, np.zeros(0, np.float32), np.float32(0.0)
    if kin % block_size == 0:
        codes, scale_codes = codes.reshape(kout, kin // 2), scale_codes.reshape(kout, kin // block_size)
    return NF4Tensor(codes=codes, scale_codes=scale_codes, scale_absmax=scale_absmax, scale_offset=offset,
                     kernel_shape=(kin, kout), block_size=block_size, double_quant=double_quant)


def storage_shapes(shape: tuple[int, int], block_size: int = 64, double_quant: bool = True) -> dict[str, tuple[int, ...]]:
    """Array shapes of the `NF4Tensor` fields for a kernel of `shape` `[in, out]` (without leading axes)."""
    kin, kout = shape
    n = kin * kout
    blocks = -(-n // block_size)
    if kin % block_size == 0:
        codes, scales = (kout, kin // 2), (kout, kin // block_size)
    else:
        codes, scales = (-(-n // 2),), (blocks,)
    groups = -(-blocks // SCALE_BLOCK) if double_quant else 0
    return {"codes": codes, "scale_codes": scales, "scale_absmax": (groups,), "scale_offset": ()}


def abstract(kernel_shape: tuple[int, ...], block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """`NF4Tensor` of `jax.ShapeDtypeStruct`s for a kernel `[*lead, in, out]` (for shardings and memory plans)."""
    *lead, kin, kout = kernel_shape
    dtypes = {"codes": jnp.uint8, "scale_codes": jnp.uint8 if double_quant else jnp.float32,
              "scale_absmax": jnp.float32, "scale_offset": jnp.float32}
    fields = {k: jax.ShapeDtypeStruct(tuple(lead) + v, dtypes[k])
              for k, v in storage_shapes((kin, kout), block_size, double_quant).items()}
    return NF4Tensor(**fields, kernel_shape=(kin, kout), block_size=block_size, double_quant=double_quant)


def logical_axes(t: NF4Tensor, kernel_axes: tuple) -> NF4Tensor:
    """Logical axis names of each field from the kernel's `(*lead, in_axis, out_axis)`: the row-blocked
    codes and scale codes are `(*lead, out_axis, in_axis)` (the kernel transposed), flat fields unsharded."""
    *lead, ax_in, ax_out = kernel_axes
    lead = tuple(lead)
    two_d = lead + ((ax_out, ax_in) if t.row_blocked else (None,))
    return t.replace(codes=two_d, scale_codes=two_d, scale_absmax=lead + (None,), scale_offset=lead)


def _spec_axes(sharding: jax.sharding.NamedSharding, ndim: int) -> tuple:
    """A NamedSharding's spec as a tuple of `ndim` mesh-axis entries (None = replicated)."""
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _shardings_like(tree, axes_tree, kernel_sharding: jax.sharding.NamedSharding):
    """NamedShardings for a quantised tensor's fields, whose `axes_tree` holds mesh-axis entries taken
    from the kernel's spec; a dim its mesh axes do not divide is replicated."""
    mesh = kernel_sharding.mesh
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def one(axes, x):
        fixed = []
        for dim, ax in zip(np.shape(x), axes):
            names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            fixed.append(ax if dim % math.prod(sizes[a] for a in names) == 0 else None)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*fixed))

    return jax.tree.map(one, axes_tree, tree, is_leaf=lambda a: isinstance(a, tuple))


def _lead(x: jnp.ndarray, base_ndim: int) -> tuple[int, ...]:
    return tuple(x.shape[: x.ndim - base_ndim])


def block_absmax(t: NF4Tensor) -> jnp.ndarray:
    """Float32 block absmaxes `[..., blocks]` (from the double-quantised scales when `double_quant`)."""
    lead = _lead(t.scale_offset, 0)
    q = t.scale_codes.reshape(lead + (-1,))
    if not t.double_quant:
        return q
    nb = q.shape[-1]
    groups = t.scale_absmax.shape[-1]
    pad = groups * SCALE_BLOCK - nb
    vals = jnp.asarray(DYNAMIC_CODE)[jnp.pad(q, [(0, 0)] * len(lead) + [(0, pad)]).astype(jnp.int32)]
    vals = vals.reshape(lead + (groups, SCALE_BLOCK)) * t.scale_absmax[..., None]
    # bitsandbytes rounds the product before adding the offset.  XLA would contract `p + offset` into one
    # fused multiply-add (a different last bit); a select between them prevents that (scales are finite).
    vals = jnp.where(jnp.isfinite(vals), vals, jnp.float32(0.0))
    return vals.reshape(lead + (-1,))[..., :nb] + t.scale_offset[..., None]


def dequantize(t: NF4Tensor, dtype=jnp.float32) -> jnp.ndarray:
    """The kernel `[..., in, out]` in `dtype`: float32 `nf4[code] * absmax` (bitsandbytes' values), then cast."""
    kin, kout = t.kernel_shape
    lead = _lead(t.scale_offset, 0)
    c = t.codes
    idx = jnp.stack([c >> 4, c & 15], axis=-1).astype(jnp.int32)
    vals = jnp.asarray(NF4_CODE)[idx]
    absmax = block_absmax(t)
    n = kin * kout
    if t.row_blocked:
        w = vals.reshape(lead + (kout, kin // t.block_size, t.block_size))
        w = w * absmax.reshape(lead + (kout, kin // t.block_size, 1))
    else:
        flat = vals.reshape(lead + (-1,))
        blocks = absmax.shape[-1]
        flat = jnp.pad(flat[..., :n], [(0, 0)] * len(lead) + [(0, blocks * t.block_size - n)])
        w = (flat.reshape(lead + (blocks, t.block_size)) * absmax[..., None]).reshape(lead + (-1,))[..., :n]
    w = w.reshape(lead + (kout, kin)).astype(dtype)
    return jnp.swapaxes(w, -1, -2)


def nbytes(shape: tuple[int, int], block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes an `NF4Tensor` of a kernel `shape` takes (codes + scale codes + scale absmax + offset)."""
    s = storage_shapes(shape, block_size, double_quant)
    scale_bytes = 1 if double_quant else 4
    return math.prod(s["codes"]) + scale_bytes * math.prod(s["scale_codes"]) + 4 * math.prod(s["scale_absmax"]) + 4

"""sft_jax.quant against bitsandbytes 0.50.2 on CPU: NF4 bytes, scales and dequantised weights; int8.

bitsandbytes quantises torch's `[out, in]` weight; our kernels are `[in, out]`, so every
comparison quantises `kernel = weight.T`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import sharding
from sft_jax.quant import int8, nf4

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

# (out, in): rows a multiple of the block, rows not (blocks cross rows: stories260K's down_proj is
# [64, 172]), a short last block with an odd element count, more than 256 blocks (several scale groups)
SHAPES = [(128, 64), (256, 128), (64, 172), (7, 9), (300, 700), (2048, 64)]


def _weight(shape, seed, outliers=False):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.002, 2.0)).astype(np.float32)
    if outliers:
        w[:, : min(3, shape[1])] *= 40.0
        w[0, 0] = 0.0
    return w


def _bnb(w, compress):
    q, st = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=compress)
    return q, st


def test_code_books_are_bitsandbytes():
    np.testing.assert_array_equal(nf4.NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(nf4.DYNAMIC_CODE, bnbf.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("outliers", [False, True], ids=["normal", "outliers"])
def test_nf4_bytes_and_scales_equal_bitsandbytes(shape, outliers):
    w = _weight(shape, seed=shape[0] * 7 + shape[1], outliers=outliers)
    q_plain, st_plain = _bnb(w, compress=False)
    codes, absmax = nf4.quantize_codes(w)
    np.testing.assert_array_equal(codes, q_plain.numpy().reshape(-1))  # packing: high nibble first
    np.testing.assert_array_equal(absmax, st_plain.absmax.numpy())

    q, st = _bnb(w, compress=True)
    bnb_offset = np.float32(st.offset.item())
    ours_codes, ours_absmax2, ours_offset = nf4.double_quantize(absmax)
    # torch's float32 mean sums in a CPU-dependent order: equal to ours within 2 ulp
    assert abs(ours_offset - bnb_offset) <= 2 * np.spacing(bnb_offset)
    # given bitsandbytes' offset, the 8-bit scale codes and their absmax are its bytes exactly
    s_codes, s_absmax2, _ = nf4.double_quantize(absmax, offset=bnb_offset)
    np.testing.assert_array_equal(s_codes, st.absmax.numpy())
    np.testing.assert_array_equal(s_absmax2, st.state2.absmax.numpy())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nf4_dequantise_equals_bitsandbytes(shape):
    w = _weight(shape, seed=shape[0] + 3 * shape[1], outliers=True)
    q, st = _bnb(w, compress=True)
    ref = bnbf.dequantize_4bit(q, st).numpy()
    t = nf4.quantize_kernel(w.T)
    # bitsandbytes' own bytes in our layout dequantise to its weights bit for bit (jitted)
    t_bnb = t.replace(codes=q.numpy().reshape(t.codes.shape), scale_codes=st.absmax.numpy().reshape(t.scale_codes.shape),
                      scale_absmax=st.state2.absmax.numpy(), scale_offset=np.float32(st.offset.item()))
    np.testing.assert_array_equal(np.asarray(jax.jit(nf4.dequantize)(t_bnb)), ref.T)
    # ours (own offset, which may differ from torch's mean in its last bits): equal up to that
    ours = np.asarray(jax.jit(nf4.dequantize)(t))
    np.testing.assert_allclose(ours, ref.T, rtol=0, atol=2e-6 * np.abs(w).max())
    # and close to the original weights (NF4's error is bounded by half the widest code gap x absmax)
    assert np.abs(ours - w.T).max() <= 0.17 * np.abs(w).max()
    # the compute dtype: float32 values rounded once
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(t, jnp.bfloat16)), ours.astype(jnp.bfloat16))


def test_nf4_without_double_quant_equals_bitsandbytes():
    w = _weight((96, 128), seed=5)
    q, st = _bnb(w, compress=False)
    t = nf4.quantize_kernel(w.T, double_quant=False)
    assert t.scale_codes.dtype == np.float32 and t.scale_absmax.size == 0
    np.testing.assert_array_equal(np.asarray(t.dequantize()), bnbf.dequantize_4bit(q, st).numpy().T)
    assert nf4.nbytes((128, 96), double_quant=False) == 96 * 64 + 4 * 96 * 2 + 4


def test_nf4_layout_storage_shapes_and_stacked_layers():
    for kin, kout in [(128, 96), (172, 64), (9, 7)]:
        t = nf4.quantize_kernel(_weight((kout, kin), seed=kin).T)
        shapes = nf4.storage_shapes((kin, kout))
        assert t.row_blocked == (kin % 64 == 0)
        for field, shape in shapes.items():
            assert np.shape(getattr(t, field)) == shape, field
        assert nf4.nbytes((kin, kout)) == sum(np.asarray(getattr(t, f)).nbytes for f in shapes)
    # a leading layer axis (scanned models): stacked fields dequantise per layer
    ws = [_weight((64, 128), seed=s) for s in range(3)]
    ts = [nf4.quantize_kernel(w.T) for w in ws]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *ts)
    out = np.asarray(jax.jit(nf4.dequantize)(stacked))
    assert out.shape == (3, 128, 64)
    for i, t in enumerate(ts):
        np.testing.assert_array_equal(out[i], np.asarray(t.dequantize()))
    with pytest.raises(ValueError, match="NaN or infinite"):
        nf4.quantize_codes(np.array([[1.0, np.nan]], np.float32))


def test_nf4_dequantise_sharded_like_the_kernel():
    """Codes sharded over (fsdp, tensor) on 8 devices dequantise to the one-device kernel."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    w = _weight((256, 512), seed=11)  # kernel [512, 256]: 8 blocks a row
    t = nf4.quantize_kernel(w.T)
    spec = jax.sharding.PartitionSpec
    ns = lambda *p: jax.sharding.NamedSharding(mesh, spec(*p))  # noqa: E731
    placed = jax.device_put(t, nf4.NF4Tensor(codes=ns("tensor", "fsdp"), scale_codes=ns("tensor", "fsdp"),
                                             scale_absmax=ns(), scale_offset=ns(), kernel_shape=t.kernel_shape))
    f = jax.jit(nf4.dequantize, out_shardings=ns("fsdp", "tensor"))
    out = f(placed)
    assert out.sharding.spec == spec("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(t.dequantize()))


@pytest.mark.parametrize("shape", [(64, 128), (300, 70), (5, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_equals_bitsandbytes_vectorwise(shape):
    w = _weight(shape, seed=shape[0], outliers=True)
    w[1] = 0.0  # an all-zero row
    # bitsandbytes' Int8Params rounds the weight to float16 first
    cb, scb, _ = bnbf.int8_vectorwise_quant(torch.from_numpy(w.copy()).to(torch.float16))
    t = int8.quantize_kernel(w.T)
    np.testing.assert_array_equal(t.codes, cb.numpy().T)
    np.testing.assert_array_equal(t.scale, scb.numpy())
    ref = bnbf.int8_vectorwise_dequant(cb, scb).numpy()
    np.testing.assert_array_equal(np.asarray(jax.jit(int8.dequantize)(t)), ref.T)
    assert int8.nbytes(w.T.shape) == t.codes.nbytes + t.scale.nbytes

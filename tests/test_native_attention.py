"""The native CPU attention kernel (sft_jax/kernels/attention_cpu.cc) against the XLA implementation
(`kernels.flash_attention.segment_attention`, itself tested against the reference `llama.attend`).

Same function: values and the gradients of q, k, v for packed rows, GQA, sliding windows, segment ids
that repeat (non-contiguous), padding rows, lengths that are not a multiple of the 64-slot block, head
dims 16..128, float32 and bfloat16; then a whole model's loss and gradients with each attention. The
kernel is built with the system's g++ at first use; CI has one, so a failed build fails here (skipped
only where no g++ exists)."""

from __future__ import annotations

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import kernels
from sft_jax.kernels import flash_attention as A
from sft_jax.kernels import native_attention as N

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler to build the native kernel")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert N.available(), N._state.get("error")


def packed(B, T, H, KV, hd, seed=0, contiguous=True, pad_row=False):
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, T, H, hd)).astype(np.float32)
    k = r.standard_normal((B, T, KV, hd)).astype(np.float32)
    v = r.standard_normal((B, T, KV, hd)).astype(np.float32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, s = 0, 1
        while t < T - 5:
            n = min(int(r.integers(3, max(4, T // 2))), T - t - int(r.integers(0, 4)))
            if n <= 0:
                break
            seg[b, t:t + n] = s
            pos[b, t:t + n] = np.arange(n)
            t, s = t + n, s + 1
        if not contiguous:  # segment 1 again in the middle of the row: its keys include the first run
            seg[b, T // 2:T // 2 + 7] = 1
    if pad_row:
        seg[-1] = 0
        pos[-1] = 0
    return q, k, v, seg, pos


def value_and_grads(fn, q, k, v, seg, pos, dtype, window):
    dout = np.random.default_rng(1).standard_normal((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))

    def loss(q, k, v):
        o = fn(q, k, v, seg, pos, dtype=dtype, sliding_window=window)
        return jnp.sum(o.astype(jnp.float32) * dout.astype(np.float32)), o

    (l, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        *(jnp.asarray(x, dtype) for x in (q, k, v)))
    return o.astype(jnp.float32), [x.astype(jnp.float32) for x in g]


def both(case, dtype=jnp.float32, window=None, **kw):
    data = packed(*case, **kw)
    ref = value_and_grads(A.segment_attention, *data, dtype, window)
    nat = value_and_grads(N.attention, *data, dtype, window)
    return ref, nat, data


def assert_close(ref, nat, tol):
    (o_r, g_r), (o_n, g_n) = ref, nat
    for name, a, b in zip(("out", "dq", "dk", "dv"), [o_r, *g_r], [o_n, *g_n]):
        scale = float(jnp.max(jnp.abs(a))) + 1e-6
        err = float(jnp.max(jnp.abs(a - b))) / scale
        assert err < tol, f"{name}: max |native - xla| / max |xla| = {err:.2e}"


@pytest.mark.parametrize("case,window,contiguous", [
    ((2, 128, 4, 2, 64), None, True),       # GQA, 2 blocks
    ((2, 200, 4, 1, 32), None, True),       # T not a multiple of 64, one KV head
    ((2, 130, 4, 4, 16), 17, True),         # sliding window (element-wise path), MHA
    ((2, 192, 4, 2, 64), None, False),      # a segment id in two runs (element-wise path)
    ((1, 96, 2, 1, 128), None, True),       # head dim 128
])
def test_matches_xla_float32(case, window, contiguous):
    ref, nat, _ = both(case, window=window, contiguous=contiguous)
    assert_close(ref, nat, 2e-6)


def test_matches_xla_bfloat16():
    ref, nat, _ = both((2, 256, 8, 4, 64), dtype=jnp.bfloat16)
    assert_close(ref, nat, 2e-2)  # both round q/k/v/out/grads to bf16 (2^-8 relative), math in f32


def test_padding_row_gets_zero_output_and_gradients():
    ref, nat, data = both((2, 128, 4, 2, 32), pad_row=True)
    assert_close(ref, nat, 2e-6)
    o, (dq, dk, dv) = nat
    assert float(jnp.abs(o[-1]).max()) == 0.0
    assert float(jnp.abs(dq[-1]).max()) == 0.0 and float(jnp.abs(dk[-1]).max()) == 0.0
    assert float(jnp.abs(dv[-1]).max()) == 0.0


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_model_loss_and_grads_match(monkeypatch, scan, remat):
    """A whole Llama (GQA, packed batch) with the kernel (`model.kernels=cpu`; the tests' 8 fake devices
    need the logged override SFT_JAX_NATIVE_ATTENTION=1) vs the XLA attention (`reference`): loss and
    every gradient, also with the layers scanned and rematerialised (the kernel's forward then runs
    again in the backward)."""
    from sft_jax.models import llama
    from sft_jax.models.config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                      scan_layers=scan, remat=remat, kernels="reference")
    params = llama.init_params(cfg, jax.random.key(0))
    _, _, _, seg, pos = packed(2, 160, 1, 1, 16, seed=3)
    ids = np.random.default_rng(4).integers(0, 128, seg.shape).astype(np.int32)

    def loss(p, cfg):
        logits = llama.forward(p, cfg, ids, positions=pos, segment_ids=seg)
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        nll = -jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * (seg[:, 1:] > 0)) / jnp.sum(seg[:, 1:] > 0)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l_x, g_x = grad(params, cfg)
    assert "sft_attention" not in grad.lower(params, cfg).as_text()
    monkeypatch.setenv(N.ENV, "1")
    native = cfg.replace(kernels="cpu")
    assert kernels.describe(native)["attention_impl"] == "native_cpu"
    assert kernels.describe(native)["override"] == f"{N.ENV}=1"
    assert "sft_attention_bwd" in grad.lower(params, native).as_text()
    l_n, g_n = grad(params, native)
    assert abs(float(l_x) - float(l_n)) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_x), jax.tree_util.tree_leaves(g_n)):
        err = float(jnp.max(jnp.abs(a - b))) / (float(jnp.max(jnp.abs(a))) + 1e-9)
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: {err:.2e}"


def test_build_failure_falls_back_to_xla(tmp_path, monkeypatch, caplog):
    """No usable compiler: a warning, `available()` False (so `kernels.resolve` keeps the XLA
    attention), and the XLA attention runs."""
    saved = dict(N._state)
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.delenv("SFT_JAX_NATIVE_ATTENTION", raising=False)
    N._state.clear()
    try:
        with caplog.at_level(logging.WARNING, logger=N.__name__):
            assert not N.available()
        assert "native CPU attention unavailable" in caplog.text and "failed" in caplog.text
        q, k, v, seg, pos = packed(1, 64, 2, 1, 16)
        o = A.segment_attention(q, k, v, seg, pos, dtype=jnp.float32)
        assert o.shape == (1, 64, 32) and bool(jnp.all(jnp.isfinite(o)))
    finally:
        N._state.clear()
        N._state.update(saved)


def test_required_build_failure_raises(tmp_path, monkeypatch):
    saved = dict(N._state)
    monkeypatch.setenv("SFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("SFT_JAX_NATIVE_ATTENTION", "1")
    N._state.clear()
    try:
        with pytest.raises(RuntimeError, match="failed"):
            N.available()
    finally:
        N._state.clear()
        N._state.update(saved)

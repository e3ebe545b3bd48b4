"""`model.attention = "pallas"` (jax's Pallas/Triton GPU flash-attention kernel) against sft_jax's `flash`.

The kernel runs here through Pallas' CPU interpreter (`pallas_attention.INTERPRET`): the same program a GPU
compiles, so values and gradients are checked without a GPU. Same function for every non-padding query:
values, q/k/v gradients (GQA, packed rows, a padding row), a whole Llama's loss and every gradient; and
the clear errors for what it does not do."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import peft
from sft_jax.kernels import flash_attention as A
from sft_jax.kernels import pallas_attention as P
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig


@pytest.fixture
def interpret():
    old = P.INTERPRET
    P.INTERPRET = True
    yield
    P.INTERPRET = old


def packed_batch(B, T, seed=0, pad_tail=0, pad_row=False):
    r = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, s = 0, 1
        while t < T - pad_tail:
            n = min(int(r.integers(5, T // 2)), T - pad_tail - t)
            seg[b, t:t + n], pos[b, t:t + n] = s, np.arange(n)
            t, s = t + n, s + 1
    if pad_row:
        seg[-1], pos[-1] = 0, 0
    return seg, pos


@pytest.mark.parametrize("h,kv,hd,dtype", [(4, 2, 32, jnp.float32), (4, 4, 16, jnp.float32), (8, 2, 64, jnp.bfloat16)])
def test_values_and_grads_match_flash(interpret, h, kv, hd, dtype):
    B, T = 3, 128
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.standard_normal((B, T, n, hd)), dtype) for n in (h, kv, kv))
    seg, pos = packed_batch(B, T, pad_tail=9, pad_row=True)
    real = jnp.asarray(seg > 0)[..., None]
    dout = jnp.asarray(r.standard_normal((B, T, h * hd)), jnp.float32) * real  # padding carries no loss

    def run(fn):
        def loss(q, k, v):
            o = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * dout), o

        (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return o.astype(jnp.float32) * real, [x.astype(jnp.float32) for x in g]

    o_ref, g_ref = run(lambda q, k, v: A.segment_attention(q, k, v, seg, pos, dtype=dtype))
    o_pal, g_pal = run(lambda q, k, v: P.attention(q, k, v, jnp.asarray(seg), dtype=dtype, block=64))
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    scale = float(jnp.max(jnp.abs(o_ref)))
    assert float(jnp.max(jnp.abs(o_pal - o_ref))) <= tol * scale
    for name, a, b in zip("qkv", g_pal, g_ref):
        err = float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b)))
        assert err <= tol, (name, err)


def test_llama_loss_and_grads_match_flash(interpret):
    mc = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=256)
    params = llama.init_params(mc, jax.random.key(0))
    B, T = 2, 128
    seg, pos = packed_batch(B, T, seed=3, pad_tail=11)
    r = np.random.default_rng(4)
    ids = jnp.asarray(r.integers(0, 97, (B, T)), jnp.int32)
    tgt = jnp.asarray(r.integers(0, 97, (B, T)), jnp.int32)
    w = jnp.asarray(seg > 0, jnp.float32)

    def loss_fn(cfg):
        def f(p):
            logits = llama.forward(p, cfg, ids, jnp.asarray(pos), jnp.asarray(seg))
            lp = jax.nn.log_softmax(logits, -1)
            nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
            return jnp.sum(nll * w) / jnp.sum(w)

        return jax.jit(jax.value_and_grad(f))(params)

    l_ref, g_ref = loss_fn(mc)
    l_pal, g_pal = loss_fn(dataclasses.replace(mc, attention="pallas", attention_block=64))
    assert abs(float(l_pal) - float(l_ref)) < 1e-5
    errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)), g_pal, g_ref)
    assert max(jax.tree.leaves(errs)) < 1e-4, errs


def test_clear_errors():
    q = jnp.zeros((1, 96, 2, 16))
    seg = jnp.ones((1, 96), jnp.int32)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="GPU"):
            P.attention(q, q, q, seg, dtype=jnp.float32)
    old = P.INTERPRET
    P.INTERPRET = True
    try:
        with pytest.raises(ValueError, match="sliding window"):
            P.attention(q, q, q, seg, dtype=jnp.float32, sliding_window=8)
        with pytest.raises(ValueError, match="multiple of the block size"):
            P.attention(q, q, q, seg, dtype=jnp.float32, block=64)
    finally:
        P.INTERPRET = old
    with pytest.raises(ValueError, match="flash|dense|pallas"):
        ModelConfig(attention="splash")


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2-fsdp2-tensor2"])
def test_train_step_on_meshes_matches_flash(interpret, shape):
    """The Pallas path under the train step's mesh (run per device through shard_map: rows over data/fsdp,
    heads over tensor) gives the single-device `flash` step's loss and updates."""
    from sft_jax import optim, sharding
    from sft_jax import config as config_lib
    from sft_jax.train_step import StepOptions, make_train_step

    mc = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=256, attention_block=32, kernels="reference")
    params = llama.init_params(mc, jax.random.key(0))
    B, T = 8, 64
    seg, pos = packed_batch(B, T, seed=5, pad_tail=3)
    r = np.random.default_rng(6)
    batch = {"inputs": r.integers(0, 97, (B, T)).astype(np.int32), "targets": r.integers(0, 97, (B, T)).astype(np.int32),
             "loss_mask": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos}
    cfg = config_lib.default_config()
    cfg.train.eps = 1e-3  # see test_train_step's accumulation test
    opt, sched = optim.make_optimizer(cfg.train, 10)
    method = peft.Lora(rank=4, alpha=8.0)
    trainable, frozen = method.init(params, mc, jax.random.key(1))
    out = []
    for attn, mshape in (("flash", (1, 1, 1)), ("pallas", shape)):
        n = int(np.prod(mshape))
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mshape)), jax.devices()[:n])
        steps = make_train_step(dataclasses.replace(mc, attention=attn), mesh, trainable=trainable, frozen=frozen,
                                optimizer=opt, schedule=sched, method=method, opts=StepOptions(), batch_size=B)
        sh = steps.shardings
        tr = jax.device_put(jax.tree.map(np.array, trainable), sh.trainable)  # the step donates it
        args = (tr, jax.device_put(frozen, sh.frozen), sharding.init_opt_state(opt, tr, sh.opt_state),
                jax.device_put(batch, sh.batch), jax.random.key(2))
        if attn == "pallas":  # per device: the kernel runs inside shard_map, not gathered by the partitioner
            assert "shard_map" in str(jax.make_jaxpr(steps.train_step)(*args))
        new, _, m = steps.train_step(*args)
        out.append((jax.tree.map(np.asarray, new), float(m["loss"]), float(m["grad_norm"])))
    (ref, l_ref, g_ref), (got, l_got, g_got) = out
    assert abs(l_got - l_ref) < 1e-5 * abs(l_ref) and abs(g_got - g_ref) < 1e-4 * g_ref
    errs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)), got, ref)
    assert max(jax.tree.leaves(errs)) < 1e-4, errs

"""model.kernels=tokamax: tokamax's attention (its XLA implementation on CPU: tokamax has no interpret
mode for its GPU/TPU attention kernels) against the flash reference, values and gradients; the model with
that set against the reference set. The GPU/TPU kernels wait for a lent device (bench/tokamax_check.py)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytest.importorskip("tokamax")

from sft_jax import kernels, peft  # noqa: E402
from sft_jax.kernels import flash_attention, tokamax_attention  # noqa: E402
from sft_jax.models import llama  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402

B, T, H, KV, HD = 2, 256, 4, 2, 16
SEG = np.array([[1] * 100 + [2] * 120 + [0] * 36, [1] * 30 + [2] * 200 + [3] * 26])
POS = np.concatenate([[np.r_[np.arange(100), np.arange(120), np.zeros(36)]],
                      [np.r_[np.arange(30), np.arange(200), np.arange(26)]]]).astype(np.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _qkv(dtype):
    r = np.random.default_rng(0)
    return tuple(jnp.asarray(r.normal(size=(B, T, n, HD)), dtype) for n in (H, KV, KV))


def test_segment_starts():
    got = np.asarray(tokamax_attention.segment_starts(jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 1, 1, 1]])))
    np.testing.assert_array_equal(got, [[0, 0, 2, 2, 2, 5, 5], [0, 0, 0, 0, 4, 4, 4]])


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_values_and_grads_equal_flash_reference(dtype, tol):
    """Causal, packed (k_start of each segment run), GQA; every non-padding query and the gradients of a
    loss over them (padding queries differ by design: they attend to their padding run). float32 <= 1e-5
    relative; bfloat16 2e-2 (stated)."""
    q, k, v = _qkv(dtype)
    seg, pos = jnp.asarray(SEG, jnp.int32), jnp.asarray(POS)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H * HD)), jnp.float32) * (seg > 0)[..., None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, pos, dtype=dtype).astype(jnp.float32) * w)

    ref = flash_attention.segment_attention
    ours = tokamax_attention.attention
    lr, gr = jax.value_and_grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    lo, go = jax.value_and_grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    real = np.asarray(SEG > 0)
    assert _rel(np.asarray(ours(q, k, v, seg, pos, dtype=dtype), np.float32)[real],
                np.asarray(ref(q, k, v, seg, pos, dtype=dtype), np.float32)[real]) < tol
    assert abs(float(lo) - float(lr)) <= tol * abs(float(lr))
    for a, b in zip(go, gr):
        assert _rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < tol


def test_refusals():
    q, k, v = _qkv(jnp.float32)
    seg = jnp.asarray(SEG, jnp.int32)
    with pytest.raises(ValueError, match="no sliding window"):
        tokamax_attention.attention(q, k, v, seg, jnp.asarray(POS), dtype=jnp.float32, sliding_window=64)
    with pytest.raises(ValueError, match="not available"):
        tokamax_attention.attention(q, k, v, seg, jnp.asarray(POS), dtype=jnp.float32, implementation="cudnnx")


def test_model_with_tokamax_set_equals_reference():
    """The whole model (LoRA on every projection, float32): kernels=tokamax == kernels=reference, loss and
    adapter gradients <= 1e-5 relative; describe reports it."""
    c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=256, attention="flash")
    params = llama.init_params(c, jax.random.PRNGKey(0))
    method = peft.Lora(rank=4, alpha=8.0)
    trainable, frozen = method.init(params, c, jax.random.PRNGKey(1))
    trainable = jax.tree.map(lambda x: x + 0.03 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, T)), jnp.int32)
    seg, pos = jnp.asarray(SEG, jnp.int32), jnp.asarray(POS)

    def run(cfg):
        def loss(t):
            logits = method.forward(t, frozen, cfg, ids, pos, seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * (seg > 0))
        return jax.jit(jax.value_and_grad(loss))(trainable)

    lr, gr = run(c.replace(kernels="reference"))
    lo, go = run(c.replace(kernels="tokamax"))
    assert abs(float(lo) - float(lr)) <= 1e-5 * abs(float(lr))
    for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gr)):
        assert _rel(a, b) < 1e-5
    d = kernels.describe(c.replace(kernels="tokamax"))
    assert d["kernels"] == "tokamax" and d["attention_impl"] == "tokamax" and d["tokamax"].startswith("tokamax 0.")
    assert kernels.resolved_name("auto") == ("cpu" if jax.default_backend() == "cpu" else "tokamax")


def test_train_step_on_mesh_matches_one_device():
    """kernels=tokamax under a (data 2, fsdp 2, tensor 2) mesh (per device through shard_map) gives the
    single-device reference step's loss, gradient norm and updated adapters."""
    import dataclasses

    from sft_jax import config as config_lib
    from sft_jax import optim, sharding
    from sft_jax.train_step import StepOptions, make_train_step
    from test_pallas_attention import packed_batch

    mc = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=256, kernels="reference", attention="flash")
    params = llama.init_params(mc, jax.random.key(0))
    b, t = 8, 64
    seg, pos = packed_batch(b, t, seed=5, pad_tail=3)
    r = np.random.default_rng(6)
    batch = {"inputs": r.integers(0, 97, (b, t)).astype(np.int32), "targets": r.integers(0, 97, (b, t)).astype(np.int32),
             "loss_mask": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos}
    cfg = config_lib.default_config()
    cfg.train.eps = 1e-3
    opt, sched = optim.make_optimizer(cfg.train, 10)
    method = peft.Lora(rank=4, alpha=8.0)
    trainable, frozen = method.init(params, mc, jax.random.key(1))
    out = []
    for ks, mshape in (("reference", (1, 1, 1)), ("tokamax", (2, 2, 2))):
        n = int(np.prod(mshape))
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mshape)), jax.devices()[:n])
        steps = make_train_step(dataclasses.replace(mc, kernels=ks), mesh, trainable=trainable, frozen=frozen,
                                optimizer=opt, schedule=sched, method=method, opts=StepOptions(), batch_size=b)
        sh = steps.shardings
        tr = jax.device_put(jax.tree.map(np.array, trainable), sh.trainable)
        args = (tr, jax.device_put(frozen, sh.frozen), sharding.init_opt_state(opt, tr, sh.opt_state),
                jax.device_put(batch, sh.batch), jax.random.key(2))
        new, _, m = steps.train_step(*args)
        out.append((jax.tree.map(np.asarray, new), float(m["loss"]), float(m["grad_norm"])))
    (ref, l_ref, g_ref), (got, l_got, g_got) = out
    assert abs(l_got - l_ref) < 1e-5 * abs(l_ref) and abs(g_got - g_ref) < 1e-4 * g_ref
    errs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)), got, ref)
    assert max(jax.tree.leaves(errs)) < 1e-4, errs

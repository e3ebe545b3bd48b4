"""Every kernel of `sft_jax.kernels` equals the reference function it replaces: values and gradients,
float32 to <= 1e-5 relative (5e-6 where stated), bfloat16 to the stated tolerance (bf16 rounding of
differently ordered sums: 2e-2 for single ops, 1e-1 for chains of dots).

The op-level tests check the custom-VJP dots (`matmul`, `low_rank_matmul`, `logits_matmul`), SwiGLU,
RoPE and the q/k/v split; the model-level tests check the whole `cpu` set (fused projections with
and without low-rank terms, causal block skipping) against `model.kernels=reference`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import kernels, peft
from sft_jax.kernels import cpu
from sft_jax.kernels.cpu import low_rank_matmul, matmul, swiglu
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.mark.parametrize("out", [(40,), (20, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 5e-6), (jnp.bfloat16, 1e-1)])
def test_custom_grads_equal_autodiff(dtype, tol, out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 10, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, *out)), jnp.float32) * 0.2
    w2 = jnp.asarray(rng.standard_normal((24, *out)), jnp.float32) * 0.2
    a = jnp.asarray(rng.standard_normal((24, 4)), jnp.float32) * 0.2
    b = jnp.asarray(rng.standard_normal((4, *out)), jnp.float32) * 0.2
    c = jnp.asarray(rng.standard_normal((3, 10, *out)), jnp.float32)
    c2 = jnp.asarray(rng.standard_normal((3, 10, 20)), jnp.float32)

    def head(y):
        if y.shape[-2:] == (20, 2):  # exercise swiglu on the [.., I, 2] layout too
            return jnp.sum(swiglu(y).astype(jnp.float32) * c2)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    def ref_head(y):
        if y.shape[-2:] == (20, 2):
            g, u = y[..., 0].astype(jnp.float32), y[..., 1].astype(jnp.float32)
            return jnp.sum(jax.nn.silu(g) * u * c2)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    def ours(x, w, w2, a, b):
        xd = x.astype(dtype)
        ha = jnp.dot(xd, a.astype(dtype))
        y = matmul(xd, w2.astype(dtype)) + low_rank_matmul(xd, ha, w.astype(dtype), b.astype(dtype), 2.5)
        return head(y)

    def ref(x, w, w2, a, b):
        xd = x.astype(dtype)
        t = jnp.dot(jnp.dot(xd, a.astype(dtype)), b.astype(dtype).reshape(4, -1)).reshape(*xd.shape[:-1], *out)
        base = jnp.dot(xd, w.astype(dtype).reshape(24, -1)).reshape(*xd.shape[:-1], *out)
        base2 = jnp.dot(xd, w2.astype(dtype).reshape(24, -1)).reshape(*xd.shape[:-1], *out)
        return ref_head(base2 + base + 2.5 * t)

    lo, go = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3, 4)))(x, w, w2, a, b)
    lr, gr = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4)))(x, w, w2, a, b)
    assert abs(float(lo) - float(lr)) <= tol * max(1.0, abs(float(lr)))
    for g1, g2 in zip(go, gr):
        assert g1.shape == g2.shape and g1.dtype == g2.dtype
        assert _rel(g2, g1) < tol


@pytest.mark.parametrize("n_tok", [64, 40, 30])  # blocked-transpose path (64 = 64 x 1, 40 = 8 x 5); 30: direct form
@pytest.mark.parametrize("out", [(10, 2), (10, 3)])  # 20 < 24 inputs: dy is transposed; 30 > 24: x is
def test_wgrad_bf16_paths_equal_float64(n_tok, out):
    """`_wgrad` on 16-bit inputs (on CPU when the token count has a block divisor: the explicitly
    transposed [in, tokens] @ [tokens, out] form, or (dy^T x)^T when out < in; the direct
    token-contracting dot otherwise) equals the float64 product of the same bf16 values to
    float32-accumulation accuracy."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n_tok, 24)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((n_tok, *out)), jnp.bfloat16)
    got = jax.jit(lambda x, dy: cpu._wgrad(x, dy, 2))(x, dy)
    assert got.shape == (24, *out) and got.dtype == jnp.float32
    want = np.einsum("ti,tjk->ijk", np.asarray(x, np.float64), np.asarray(dy, np.float64))
    assert _rel(want, got) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 5e-6), (jnp.bfloat16, 2e-2)])
def test_logits_matmul_equals_einsum(dtype, tol):
    """The LM head (`logits_matmul`: float32 logits from 16-bit operands, hand-written backward)
    equals autodiff of `einsum(..., preferred_element_type=float32)`."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 32, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 50)), jnp.float32) * 0.2
    tgt = jnp.asarray(rng.integers(0, 50, (2, 32)))

    def loss(f):
        def run(x, w):
            logits = f(x.astype(dtype), w.astype(dtype))
            assert logits.dtype == jnp.float32
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))
        return run

    ref = loss(llama.lm_logits)
    lo, go = jax.jit(jax.value_and_grad(loss(cpu.logits_matmul), argnums=(0, 1)))(x, w)
    lr, gr = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(x, w)
    assert abs(float(lo) - float(lr)) <= 1e-6 * max(1.0, abs(float(lr)))
    for g1, g2 in zip(go, gr):
        assert g1.shape == g2.shape and g1.dtype == g2.dtype
        assert _rel(g2, g1) < tol


def _grads(f, *args):
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))(*args)


def test_rope_and_tables_equal_reference():
    """`cpu.rope_tables` (behind a lax.cond) and `cpu.rope` (one-pass backward) equal HF's
    rotate-half `apply_rotary_pos_emb` on the reference tables, values and input gradient."""
    c = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                    "original_max_position_embeddings": 64})
    inv = llama.rope_inv_freq(c)
    pos = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 12)), jnp.int32)
    ref_tab, cpu_tab = llama.rope_tables(pos, inv), jax.jit(lambda p: cpu.rope_tables(p, inv))(pos)
    for a, b in zip(ref_tab, cpu_tab):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 4, 16)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((2, 12, 4, 16)), jnp.float32)
    cos, sin = ref_tab
    lr, gr = _grads(lambda x: jnp.sum(jnp.sin(llama.apply_rotary_pos_emb(x, cos, sin)) * w), x)
    lo, go = _grads(lambda x: jnp.sum(jnp.sin(cpu.rope(x, cos, sin)) * w), x)
    assert _rel(lr, lo) < 1e-6 and _rel(gr[0], go[0]) < 1e-6


def test_split_qkv_equals_slicing():
    qkv = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 2, 4, 8)), jnp.float32)
    w = [jnp.asarray(np.random.default_rng(i).standard_normal(s), jnp.float32)
         for i, s in enumerate([(2, 5, 2, 2, 8), (2, 5, 2, 8), (2, 5, 2, 8)])]

    def head(parts):
        return sum(jnp.sum(jnp.sin(p) * wi) for p, wi in zip(parts, w))

    lr, gr = _grads(lambda t: head((t[:, :, :, :2], t[:, :, :, 2], t[:, :, :, 3])), qkv)
    lo, go = _grads(lambda t: head(cpu.split_qkv(t, 2)), qkv)
    assert _rel(lr, lo) < 1e-6 and _rel(gr[0], go[0]) < 1e-6


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  attention_bias=True, attention_out_bias=True, mlp_bias=True, max_position_embeddings=256)


def _low_rank_dots(config, method, trainable, frozen, ids):
    """How many `cpu.low_rank_matmul` calls (a base dot with low-rank terms folded in) the forward pass makes."""
    jaxpr = jax.make_jaxpr(lambda t: method.forward(t, frozen, config, ids))(trainable)
    return str(jaxpr).count("name=low_rank_matmul")


def _model_loss_and_grads(config, method, trainable, frozen, ids, seg, pos, deterministic=True):
    def loss(trainable):
        logits = method.forward(trainable, frozen, config, ids, pos, seg, deterministic=deterministic,
                                dropout_rng=jax.random.PRNGKey(7))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * (seg > 0))

    return jax.jit(jax.value_and_grad(loss))(trainable)


@pytest.mark.parametrize("attention,method_name,scan", [("dense", "lora", False), ("flash", "lora_q_v", True),
                                                        ("dense", "full", True), ("flash", "full", False),
                                                        ("dense", "dora", False), ("flash", "dora_q_v", True),
                                                        ("dense", "qdora", True)])
def test_cpu_kernel_set_equals_reference_model(attention, method_name, scan):
    """The whole `cpu` set (custom-VJP dots, fused q/k/v and gate/up with the adapters in the same
    dot, RoPE, SwiGLU, causal block skipping; native attention for flash on one device) gives the
    reference model's loss and gradients (float32), with full fine-tuning, LoRA on every projection
    and LoRA on some (a fused dot mixing adapted and plain parts); DoRA / QDoRA (the fused dot, then the
    per-column scale m / ||W + s A B||_c of `LowRank.out_scale`)."""
    c = CFG.replace(scan_layers=scan, attention=attention)
    params = llama.init_params(c, jax.random.PRNGKey(0))
    method = {"full": peft.Full(), "lora": peft.Lora(rank=4, alpha=8.0),
              "lora_q_v": peft.Lora(rank=2, alpha=4.0, targets="q_proj,v_proj"),
              "dora": peft.Dora(rank=4, alpha=8.0), "dora_q_v": peft.Dora(rank=2, alpha=4.0, targets="q_proj,v_proj"),
              "qdora": peft.QDora(rank=4, alpha=8.0)}[method_name]
    trainable, frozen = method.init(params, c, jax.random.PRNGKey(1))
    trainable = jax.tree.map(lambda x: x + 0.03 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
    rng = np.random.default_rng(0)
    t = 256  # > 128: causal block skipping and flash blocks are exercised
    ids = jnp.asarray(rng.integers(0, 64, (2, t)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 120 + [0] * 36], 2, axis=0), jnp.int32)
    pos = jnp.asarray(np.where(seg > 0, np.concatenate([np.arange(100), np.arange(120), np.zeros(36)]), 0), jnp.int32)
    lr, gr = _model_loss_and_grads(c.replace(kernels="reference"), method, trainable, frozen, ids, seg, pos)
    lo, go = _model_loss_and_grads(c.replace(kernels="cpu"), method, trainable, frozen, ids, seg, pos)
    assert kernels.resolve(c.replace(kernels="cpu")).name == "cpu"
    if method_name != "full":  # every adapted projection takes a fused low-rank dot (DoRA too: LowRank.out_scale)
        lora = peft.Lora(rank=method.rank, alpha=method.alpha, targets=method.targets)
        lt, lf = lora.init(params, c, jax.random.PRNGKey(1))
        want = _low_rank_dots(c.replace(kernels="cpu"), lora, lt, lf, ids)
        assert want > 0 and _low_rank_dots(c.replace(kernels="cpu"), method, trainable, frozen, ids) == want
    assert abs(float(lo) - float(lr)) <= 1e-5 * abs(float(lr))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gr), jax.tree.leaves(go)):
        assert _rel(a, b) < 1e-5, jax.tree_util.keystr(path)


def _compiled_step_dots(config, method):
    """Dot instructions in the compiled full train step (forward, backward, AdamW) of `method`."""
    import re

    import optax

    from sft_jax import train_step as ts

    params = llama.init_params(config, jax.random.PRNGKey(0))
    trainable, frozen = method.init(params, config, jax.random.PRNGKey(1))
    opt = optax.adamw(1e-3)
    b, t = 2, 64  # T <= 128: no causal block skipping, the dense attention is 2 dots forward, 4 backward
    batch = {"inputs": jnp.zeros((b, t), jnp.int32), "targets": jnp.zeros((b, t), jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.float32), "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
    step = jax.jit(ts.build_train_step(config, opt, None, method))
    text = step.lower(trainable, frozen, opt.init(trainable), batch, jax.random.PRNGKey(0)).compile().as_text()
    return len(re.findall(r"= \S+ dot\(", text))


def test_full_fine_tuning_takes_the_fused_cpu_projections():
    """Full fine-tuning (the identity hooks) under `kernels=cpu` computes each layer's q/k/v and gate/up
    projections as ONE dot each, as the pre-redesign model did (issue 17 item 7: the compiled full-FT
    step of the bench shapes is instruction for instruction the old tree's, bench/README.md). Per layer:
    4 projection dots forward (q/k/v fused, o, gate/up fused, down) + 8 backward (input and weight
    gradients) + 6 attention dots; the LM head 1 + 2: 18 L + 3. The reference set has 7 projections:
    27 L + 3."""
    c = CFG.replace(attention="dense", attention_bias=False, attention_out_bias=False, mlp_bias=False)
    n = c.num_layers
    assert _compiled_step_dots(c.replace(kernels="cpu"), peft.Full()) == 18 * n + 3
    assert _compiled_step_dots(c.replace(kernels="reference"), peft.Full()) == 27 * n + 3


def test_cpu_kernel_set_bf16_and_dropout():
    """bfloat16 compute (f32 accumulation in the cpu dots; stated tolerance 2e-2 on the loss, 5e-2 on
    gradients) and LoRA dropout in training: the fused path draws each adapter's mask from the same
    per-module stream as the reference, so the two agree (and differ from the deterministic loss)."""
    c = CFG.replace(attention="dense", dtype="bfloat16")
    params = llama.init_params(c, jax.random.PRNGKey(0))
    method = peft.Lora(rank=4, alpha=8.0, dropout=0.2)
    trainable, frozen = method.init(params, c, jax.random.PRNGKey(1))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 32)), jnp.int32)
    seg, pos = jnp.ones((2, 32), jnp.int32), jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
    lr, gr = _model_loss_and_grads(c.replace(kernels="reference"), method, trainable, frozen, ids, seg, pos, False)
    lo, go = _model_loss_and_grads(c.replace(kernels="cpu"), method, trainable, frozen, ids, seg, pos, False)
    assert abs(float(lo) - float(lr)) <= 2e-2 * abs(float(lr))
    ld = method.forward(trainable, frozen, c, ids, pos, seg)  # deterministic: no dropout
    assert abs(float(jnp.mean(jax.nn.log_softmax(ld)[..., 3])) - float(lo)) > 1e-4 * abs(float(lo))
    for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(go)):
        assert _rel(a, b) < 5e-2


def test_describe_and_auto():
    c = CFG.replace(kernels="auto")
    d = kernels.describe(c)
    assert d["requested"] == "auto" and d["kernels"] == ("cpu" if jax.default_backend() == "cpu" else "reference")
    assert d["attention"] == "flash" and d["attention_impl"] in ("native_cpu", "xla_blocks")
    assert kernels.describe(CFG.replace(kernels="reference"))["attention_impl"] == "xla_blocks"
    with pytest.raises(ValueError, match="kernels must be"):
        CFG.replace(kernels="fast")

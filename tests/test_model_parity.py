"""Logit parity of sft_jax's Llama family against transformers (torch, CPU), per family.

Tiny random models are built here with transformers, saved with `save_pretrained`
(safetensors) and loaded with `sft_jax.models.hf_io.load_hf`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_jax import peft  # noqa: E402
from sft_jax.models import forward  # noqa: E402
from sft_jax.models.hf_io import load_hf  # noqa: E402

B, T = 3, 12
LENGTHS = (12, 9, 5)  # right padding
F32_TOL = 1e-4
BF16_TOL = 0.15  # bf16 compute (f32 params) vs HF float32: measured max 0.053-0.099 with max |logit| 4.3-5.1

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

FAMILIES = {
    "llama2": lambda: transformers.LlamaConfig(**_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama31": lambda: transformers.LlamaConfig(
        **_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "llama32_tied": lambda: transformers.LlamaConfig(
        **_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=4, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=False),
}

_HF_CLASSES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}


def make_hf_model(hf_config, seed=0):
    """A tiny HF model with O(1) random weights (norm scales around 1, nonzero biases)."""
    torch.manual_seed(seed)
    cls = getattr(transformers, _HF_CLASSES[hf_config.model_type])
    model = cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(B, T)).astype(np.int32)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _jit_forward():
    return jax.jit(forward, static_argnums=1)


def jax_logits(params, config, ids, mask, positions=None):
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return np.asarray(_jit_forward()(params, config, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))


def max_valid_diff(a, b, mask):
    m = mask.astype(bool)
    return float(np.max(np.abs(a[m] - b[m])))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (name, saved directory, HF float32 logits on `batch()`), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = make_hf_model(FAMILIES[name]())
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d)
            ids, mask = batch()
            cache[name] = (name, str(d), hf_logits(model, ids, mask))
        return cache[name]

    return get


@pytest.fixture(params=list(FAMILIES))
def family(request, build):
    return build(request.param)


def test_f32_parity(family):
    """The plain model (no method; `model.kernels=auto`, i.e. the cpu set here) and the model through
    the `full` method with the reference kernels both give HF's logits."""
    name, path, ref = family
    config, params = load_hf(path)
    ids, mask = batch()
    out = jax_logits(params, config, ids, mask)
    assert out.dtype == np.float32
    assert np.isfinite(out).all(), "padding rows produced non-finite logits"
    d = max_valid_diff(out, ref, mask)
    print(f"{name}: f32 max |diff| vs HF = {d:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert d <= F32_TOL, f"{name}: max |diff| {d:.2e} > {F32_TOL}"
    full = peft.Full()
    tr, fr = full.init(params, config, jax.random.PRNGKey(0))
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape)
    via_full = np.asarray(jax.jit(full.forward, static_argnums=2)(tr, fr, config.replace(kernels="reference"),
                                                                   jnp.asarray(ids), pos, jnp.asarray(mask)))
    d_ref = max_valid_diff(via_full, ref, mask)
    assert d_ref <= F32_TOL, f"{name}: reference kernels + full method: max |diff| {d_ref:.2e} > {F32_TOL}"
    assert np.abs(ref).max() > 1.0  # the comparison is not vacuous
    if name == "mistral":  # the sliding window (4 < T) changes the result, so the test exercises it
        assert config.sliding_window == 4
        no_window = jax_logits(params, config.replace(sliding_window=None), ids, mask)
        assert max_valid_diff(no_window, ref, mask) > 1e-2


def test_bf16_compute_parity(family):
    name, path, ref = family
    config, params = load_hf(path, param_dtype="float32", dtype="bfloat16")
    ids, mask = batch()
    out = jax_logits(params, config, ids, mask)
    assert out.dtype == np.float32
    d = max_valid_diff(out, ref, mask)
    print(f"{name}: bf16-compute max |diff| vs HF f32 = {d:.3e}")
    assert d <= BF16_TOL, f"{name}: bf16 max |diff| {d:.3e} > {BF16_TOL}"


@pytest.mark.parametrize("name", ["llama31", "mistral", "qwen3"])
@pytest.mark.parametrize("scan,remat", [(True, "none"), (True, "full"), (False, "save_dots"), (True, "save_dots")])
def test_scan_and_remat_match_unscanned(build, name, scan, remat):
    name, path, _ = build(name)
    config, params = load_hf(path)
    config_s, params_s = load_hf(path, scan_layers=scan, remat=remat)
    if scan:
        assert params_s["layers"]["attn"]["q_proj"]["kernel"].shape[0] == config.num_layers
    ids, mask = batch()
    ref = jax_logits(params, config, ids, mask)
    out = jax_logits(params_s, config_s, ids, mask)
    assert max_valid_diff(out, ref, mask) <= 1e-5


@pytest.mark.parametrize("name", ["llama2", "mistral", "qwen3"])
def test_packing_equals_separate(build, name):
    """One row holding three examples (segments 1,2,3, positions restarting, trailing padding)."""
    name, path, _ = build(name)
    config, params = load_hf(path)
    rng = np.random.default_rng(1)
    lens = (5, 4, 2)
    exs = [rng.integers(3, 128, size=n).astype(np.int32) for n in lens]
    ids = np.zeros((1, T), np.int32)
    seg = np.zeros((1, T), np.int32)
    pos = np.zeros((1, T), np.int32)
    o = 0
    for s, e in enumerate(exs, start=1):
        ids[0, o:o + len(e)] = e
        seg[0, o:o + len(e)] = s
        pos[0, o:o + len(e)] = np.arange(len(e))
        o += len(e)
    packed = jax_logits(params, config, ids, seg, pos)
    assert np.isfinite(packed).all()
    o = 0
    for e in exs:
        alone_ids = np.zeros((1, T), np.int32)
        alone_ids[0, :len(e)] = e
        alone_mask = (np.arange(T) < len(e)).astype(np.int32)[None]
        alone = jax_logits(params, config, alone_ids, alone_mask)
        d = np.abs(packed[0, o:o + len(e)] - alone[0, :len(e)]).max()
        assert d <= 1e-5, f"{name}: packed vs alone differ by {d:.2e}"
        o += len(e)


def _lora_tree(params, rank, rng, scanned):
    """A `lora` collection mirroring the params paths: {A: [in, r], B: [r, out]} at every dense kernel."""
    def walk(t):
        out = {}
        for k, v in t.items():
            if isinstance(v, dict):
                sub = walk(v)
                if sub:
                    out[k] = sub
            elif k == "kernel" and t is not params.get("lm_head"):
                lead = v.shape[:1] if scanned else ()
                fin, fout = v.shape[-2:]
                out["A"] = jnp.asarray(rng.standard_normal(lead + (fin, rank)).astype(np.float32) * 0.3)
                out["B"] = jnp.asarray(rng.standard_normal(lead + (rank, fout)).astype(np.float32) * 0.3)
        return out

    tree = {k: walk(v) for k, v in params.items() if k.startswith("layers")}
    return {k: v for k, v in tree.items() if v}


@pytest.mark.parametrize("scan,up_only", [(False, False), (True, False), (False, True)])
def test_lora_collection_equals_merged_weights(build, scan, up_only):
    """LoRA through the extension points == forward with W + scale * A @ B merged; dropout path runs;
    grads flow.
    `up_only`: the MLP's fused gate/up dot with an adapter on one of the two."""
    _, path, _ = build("qwen2")
    config, params = load_hf(path, scan_layers=scan, remat="full" if scan else "none")
    lora = _lora_tree(params, 4, np.random.default_rng(0), scan)
    if up_only:
        for layer in lora.values():
            del layer["mlp"]["gate_proj"]
    assert "q_proj" in lora["layers" if scan else "layers_0"]["attn"]
    method = peft.Lora(rank=4, alpha=2.0)
    scale = method.scale
    assert scale == 0.5
    merged = jax.tree.map(lambda x: x, params)
    for lk, layer in lora.items():
        for mod, dense in layer.items():
            for name, ab in dense.items():
                k = merged[lk][mod][name]["kernel"]
                merged[lk][mod][name]["kernel"] = k + scale * jnp.matmul(ab["A"], ab["B"])
    ids, mask = batch()
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    f = jax.jit(functools.partial(method.forward, model_config=config))
    with_lora = np.asarray(f(lora, params, input_ids=ids, positions=pos, segment_ids=mask))
    ref = jax_logits(merged, config, ids, mask)
    assert max_valid_diff(with_lora, ref, mask) <= 1e-4
    # dropout on the LoRA input: different from deterministic, finite; gradients reach A and B
    def loss(lo, rng):
        out = peft.Lora(rank=4, alpha=2.0, dropout=0.5).forward(lo, params, config, ids, pos, mask,
                                                                dropout_rng=rng, deterministic=False)
        return jnp.mean(out**2)

    l1, g = jax.jit(jax.value_and_grad(loss))(lora, jax.random.PRNGKey(0))
    assert np.isfinite(float(l1))
    for mod, name in (("attn", "q_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
        gq = g["layers" if scan else "layers_0"][mod][name]
        assert float(jnp.abs(gq["A"]).max()) > 0 and float(jnp.abs(gq["B"]).max()) > 0


def test_hidden_noise_and_lm_head_kernel(build):
    from sft_jax.models import lm_head_kernel

    for name in ("llama2", "llama32_tied"):
        _, path, _ = build(name)
        config, params = load_hf(path)
        ids, mask = batch()
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        fwd = jax.jit(forward, static_argnums=1, static_argnames="return_hidden")
        hidden = fwd(params, config, ids, pos, mask, return_hidden=True)
        assert hidden.shape == (B, T, config.hidden_size)
        logits = hidden @ lm_head_kernel(params, config)
        ref = jax_logits(params, config, ids, mask)
        assert max_valid_diff(np.asarray(logits), ref, mask) <= 1e-5
        noise = jnp.zeros((B, T, config.hidden_size)).at[:, 0].set(1.0)
        noisy = np.asarray(fwd(params, config, ids, pos, mask, embed_noise=noise))
        assert np.abs(noisy - ref)[mask.astype(bool)].max() > 1e-3


def test_blocked_causal_attention_equals_dense():
    """The training path skips the all-masked upper-right blocks: same outputs and gradients as
    dense attention, with packed segments and padding in the mask."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sft_jax.kernels import cpu
    from sft_jax.models import llama

    attend_causal = functools.partial(cpu.attend_causal, llama.attend)
    b, t, h, kv, hd = 2, 512, 4, 2, 16
    assert cpu._causal_chunk(t) == 128
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    seg[0, :200], seg[0, 200:450] = 1, 2  # two packed examples, then padding
    seg[1, :] = 1
    idx = np.arange(t)
    mask = jnp.asarray((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (idx[:, None] >= idx[None, :]))

    dense = llama.attend(q, k, v, mask, jnp.float32)
    blocked = attend_causal(q, k, v, mask, jnp.float32)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), atol=1e-6, rtol=1e-6)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask, jnp.float32)))

    g_dense = jax.grad(loss(llama.attend), argnums=(0, 1, 2))(q, k, v)
    g_block = jax.grad(loss(attend_causal), argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(g_block, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)

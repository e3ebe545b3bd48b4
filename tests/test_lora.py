import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import lora
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def scanned():
    c = CFG.replace(scan_layers=True)
    return c, llama.init_params(c, jax.random.PRNGKey(0))


def _names(paths):
    return sorted("/".join(p) for p in paths)


def test_target_specs(params):
    all_lin = lora.target_paths(params, "all-linear")
    assert len(all_lin) == 2 * 7 and not any(p[-1] == "lm_head" for p in all_lin)
    assert _names(lora.target_paths(params, "q_proj,v_proj")) == [
        "layers_0/attn/q_proj", "layers_0/attn/v_proj", "layers_1/attn/q_proj", "layers_1/attn/v_proj"]
    assert _names(lora.target_paths(params, r"layers_1/mlp/(up|down)_proj")) == [
        "layers_1/mlp/down_proj", "layers_1/mlp/up_proj"]
    with pytest.raises(ValueError, match="matches no dense module"):
        lora.target_paths(params, "nothing_here")


def test_init_shapes_bounds_and_scale(params):
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
    tr = lora.init_lora(params, cfg, jax.random.PRNGKey(1))
    a = tr["layers_0"]["mlp"]["down_proj"]["A"]
    b = tr["layers_0"]["mlp"]["down_proj"]["B"]
    assert a.shape == (48, 4) and b.shape == (4, 32) and a.dtype == jnp.float32
    assert float(jnp.abs(a).max()) <= 1 / math.sqrt(48) and float(jnp.abs(a).max()) > 0.8 / math.sqrt(48)
    assert float(jnp.abs(b).max()) == 0.0
    assert cfg.scale == 2.0 and lora.LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0
    # B = 0: identical forward
    ids = jnp.arange(10)[None] % 64
    np.testing.assert_array_equal(llama.forward(params, CFG, ids, lora=tr, lora_scale=cfg.scale),
                                  llama.forward(params, CFG, ids))


def test_logical_axes_and_merge(params):
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets="q_proj,down_proj")
    tr = lora.init_lora(params, cfg, jax.random.PRNGKey(1))
    tr = jax.tree.map(lambda x: x + 0.05, tr)  # nonzero B
    ax = lora.lora_logical_axes(tr, llama.param_logical_axes(CFG))
    assert ax["layers_0"]["attn"]["q_proj"] == {"A": ("embed", None), "B": (None, "heads")}
    assert ax["layers_1"]["mlp"]["down_proj"] == {"A": ("mlp", None), "B": (None, "embed")}
    merged = lora.merge(params, tr, cfg.scale)
    ids = (jnp.arange(12)[None] * 7) % 64
    np.testing.assert_allclose(llama.forward(merged, CFG, ids),
                               llama.forward(params, CFG, ids, lora=tr, lora_scale=cfg.scale), rtol=1e-5, atol=1e-5)
    assert lora.merge({}, params, 1.0) is params  # full fine-tuning


def test_scanned_base(scanned):
    c, p = scanned
    cfg = lora.LoraConfig(rank=2, alpha=4.0, targets="all-linear")
    tr = lora.init_lora(p, cfg, jax.random.PRNGKey(2))
    assert tr["layers"]["attn"]["k_proj"]["A"].shape == (2, 32, 2)
    assert tr["layers"]["attn"]["k_proj"]["B"].shape == (2, 2, 16)
    ax = lora.lora_logical_axes(tr, llama.param_logical_axes(c))
    assert ax["layers"]["attn"]["k_proj"] == {"A": ("layers", "embed", None), "B": ("layers", None, "kv_heads")}
    tr = jax.tree.map(lambda x: x + 0.05, tr)
    ids = (jnp.arange(12)[None] * 5) % 64
    np.testing.assert_allclose(llama.forward(lora.merge(p, tr, cfg.scale), c, ids),
                               llama.forward(p, c, ids, lora=tr, lora_scale=cfg.scale), rtol=1e-5, atol=1e-5)


def test_split_trainable(params):
    tr, fr = lora.split_trainable(params, lora.LoraConfig(rank=0), jax.random.PRNGKey(0))
    assert fr == {} and jax.tree.structure(tr) == jax.tree.structure(params)
    tr, fr = lora.split_trainable(params, lora.LoraConfig(rank=2, targets="q_proj"), jax.random.PRNGKey(0))
    assert fr is params and lora.count_params(tr) == 2 * (32 * 2 + 2 * 32)

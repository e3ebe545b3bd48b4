"""Attention kernels declare what they support (`kernels.ATTENTION_KERNELS`) and `kernels.training_attention`
decides for the model: a kernel set's drop-in that lacks a capability is skipped with a logged reason (also in
`describe`, i.e. run_info.json), the requested algorithm lacking it is a `ModelConfigError` naming the field.
Tiny random configs (f32), no transformers needed."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import kernels
from sft_jax.kernels import native_attention
from sft_jax.models import forward, llama
from sft_jax.models.config import ModelConfig, ModelConfigError

_BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=128)
GEMMA2 = ModelConfig(model_type="gemma2", hidden_act="gelu_pytorch_tanh", attn_logit_softcapping=2.0,
                     final_logit_softcapping=5.0, query_pre_attn_scalar=24, tie_embeddings=True, sliding_window=8,
                     layer_types=("sliding_attention", "full_attention"), **_BASE)
GEMMA3 = GEMMA2.replace(model_type="gemma3_text", attn_logit_softcapping=None, final_logit_softcapping=None,
                        qk_norm=True, rope_local_base_freq=10_000.0)
LLAMA = ModelConfig(**_BASE)
MISTRAL = ModelConfig(model_type="mistral", sliding_window=8, **_BASE)
NATIVE = native_attention.status(16, "float32")[0]


def test_declared_capabilities():
    k = kernels.ATTENTION_KERNELS
    assert all(k[n].softcap and k[n].sliding_window and k[n].per_layer_windows for n in ("dense", "dense_cpu", "xla_blocks"))
    assert not k["native_cpu"].softcap and k["native_cpu"].sliding_window and k["native_cpu"].per_layer_windows
    assert not (k["tokamax"].softcap or k["tokamax"].sliding_window or k["tokamax"].per_layer_windows)
    assert not (k["pallas"].softcap or k["pallas"].sliding_window or k["pallas"].per_layer_windows)
    assert all(x.segment_ids for x in k.values())
    assert kernels.attention_needs(GEMMA2) == {"segment_ids": "packed rows (segment_ids)",
                                               "softcap": "attn_logit_softcapping=2.0",
                                               "sliding_window": "sliding_window=8",
                                               "per_layer_windows": "layer_types (1 sliding, 1 full layers)"}


@pytest.mark.parametrize("config,attention,kernel_set,impl,fallback", [
    (LLAMA, "flash", "cpu", "native_cpu" if NATIVE else "xla_blocks", None),
    (GEMMA3, "flash", "cpu", "native_cpu" if NATIVE else "xla_blocks", None),  # windows per layer: native has them
    (GEMMA2, "flash", "cpu", "xla_blocks", "native_cpu" if NATIVE else None),  # soft-capping: native has none
    (GEMMA2, "flash", "reference", "xla_blocks", None),
    (GEMMA2, "flash", "tokamax", "xla_blocks", "tokamax"),
    (GEMMA3, "flash", "tokamax", "xla_blocks", "tokamax"),  # tokamax: no sliding window
    (MISTRAL, "flash", "tokamax", "xla_blocks", "tokamax"),
    (LLAMA, "flash", "tokamax", "tokamax", None),
    (GEMMA2, "dense", "cpu", "dense_cpu", None),  # the cpu wrapper soft-caps through the reference
    (GEMMA2, "dense", "reference", "dense", None),
    (LLAMA, "pallas", "reference", "pallas", None),
])
def test_choice_and_fallback(config, attention, kernel_set, impl, fallback):
    if kernel_set == "tokamax" and not kernels.tokamax_attention.status()[0]:
        pytest.skip("tokamax not importable")
    d = kernels.describe(config.replace(attention=attention, kernels=kernel_set))
    assert d["attention_impl"] == impl, d
    if fallback is None:
        assert "attention_fallback" not in d, d
    else:
        assert d["attention_fallback"].startswith(f"{fallback} (model.kernels={kernel_set}") and "does not support" in d[
            "attention_fallback"] and d["attention_fallback"].endswith(f"using {impl}"), d


@pytest.mark.parametrize("config,field", [(GEMMA2, "attn_logit_softcapping=2.0"), (MISTRAL, "sliding_window=8"),
                                          (GEMMA3, "sliding_window=8, layer_types")])
def test_pallas_refuses_naming_the_field(config, field):
    from sft_jax.cli import EXIT_BAD_INPUT, exit_code

    c = config.replace(attention="pallas")
    with pytest.raises(ModelConfigError, match="model.attention=pallas does not support " + field) as e:
        kernels.describe(c)
    assert "use model.attention=flash or dense" in str(e.value) and exit_code(e.value) == EXIT_BAD_INPUT
    with pytest.raises(ModelConfigError, match="model.attention=pallas does not support"):  # the model asks too
        jax.eval_shape(lambda p: forward(p, c, jnp.zeros((1, 16), jnp.int32)), llama.abstract_params(config))


def _packed():
    seg = np.array([[1] * 20 + [2] * 9 + [0] * 3, [1] * 32], np.int32)
    pos = np.array([list(range(20)) + list(range(9)) + [0] * 3, list(range(32))], np.int32)
    ids = np.random.default_rng(0).integers(0, 64, seg.shape).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.slow
def test_softcap_flash_equals_dense_and_fallbacks_compute_it(caplog):
    """Gemma 2's soft-capping through every training path (the XLA flash kernel in place of native / tokamax,
    the cpu set's dense wrapper) == the dense reference, <= 1e-5 on real tokens (the flash kernel's soft-capped
    gradients: tests/test_gemma.py); an explicitly requested set's fallback is logged as a warning."""
    ids, pos, seg = _packed()
    params = llama.init_params(GEMMA2, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 4.0, params)  # large scores: the cap bites
    real = np.asarray(seg) > 0

    def run(c):
        return np.asarray(jax.jit(forward, static_argnums=1)(params, c, ids, pos, seg))

    ref = run(GEMMA2.replace(attention="dense", kernels="reference"))
    nocap = run(GEMMA2.replace(attention="dense", kernels="reference", attn_logit_softcapping=None))
    assert float(np.abs(nocap - ref)[real].max()) > 1e-3  # the cap matters here
    cases = [("flash", "reference"), ("flash", "cpu"), ("dense", "cpu")]
    if kernels.tokamax_attention.status()[0]:
        cases.append(("flash", "tokamax"))
    kernels._logged.clear()
    with caplog.at_level(logging.INFO, logger="sft_jax.kernels"):
        for att, ks in cases:
            d = float(np.abs(run(GEMMA2.replace(attention=att, kernels=ks)) - ref)[real].max())
            assert d <= 1e-5, (att, ks, d)
    if kernels.tokamax_attention.status()[0]:
        assert any(r.levelno == logging.WARNING and "tokamax (model.kernels=tokamax) does not support "
                   "attn_logit_softcapping=2.0" in r.getMessage() for r in caplog.records), caplog.text
    if NATIVE:
        assert "native_cpu (model.kernels=cpu" in caplog.text

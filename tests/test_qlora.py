"""peft.method=qlora: the frozen NF4/int8 base against transformers' bitsandbytes base, trees, merge.

Tiny random HF Llama with hidden 128 / intermediate 256 (bitsandbytes' CPU kernel needs every
projection's output size divisible by its block), float32, saved once per module.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax import peft, sharding
from sft_jax.models import hf_io, llama
from sft_jax.peft.base import MethodConfigError
from sft_jax.peft.lora import adapter_leaves
from sft_jax.peft.qlora import QLora, base_paths
from sft_jax.quant import Int8Tensor, NF4Tensor

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

PROJ = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
       [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
OURS = {"self_attn": "attn", "mlp": "mlp"}


def make_hf(path, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def load_bnb(path, quant_type="nf4"):
    """transformers' bitsandbytes base on CPU (float32 compute)."""
    if quant_type == "nf4":
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    else:
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                             dtype=torch.float32)


def bnb_weight(module):
    """The dequantised float32 [out, in] weight of a bitsandbytes Linear4bit / Linear8bitLt."""
    import bitsandbytes.functional as F

    w = module.weight
    if hasattr(w, "quant_state"):
        return F.dequantize_4bit(w.data, w.quant_state).float().numpy()
    return F.int8_vectorwise_dequant(w.data, w.SCB).float().numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora_hf")
    make_hf(path)
    return str(path)


def _method(**kw):
    cfg = peft.config_section()
    cfg.method = "qlora"
    for k, v in kw.items():
        cfg.qlora[k] = v
    return peft.from_config(cfg)


def test_config_fields_and_errors():
    m = _method(quant_type="int8")
    assert isinstance(m, QLora) and m.quant_type == "int8" and m.rank == 16
    assert peft.from_run_config(m.run_config()) == m
    with pytest.raises(MethodConfigError, match="peft.qlora.quant_type"):
        _method(quant_type="fp4")
    with pytest.raises(MethodConfigError, match="peft.qlora.block_size"):
        _method(block_size=100)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_frozen_base_equals_transformers_bitsandbytes_base(hf_dir, quant_type):
    """Quantised while loading (`load_transform`): every decoder projection dequantises to the weight
    transformers' bitsandbytes model holds (the 4-bit codes byte for byte; values within the
    double-quant offset's last bit, see BUILD_NOTES); embeddings, norms and the head stay float."""
    m = _method(quant_type=quant_type)
    _, params = hf_io.load_hf(hf_dir, transform=m.load_transform())
    frozen = m.frozen_base(params, None, jax.random.key(0))
    bnb = load_bnb(hf_dir, quant_type)
    cls = NF4Tensor if quant_type == "nf4" else Int8Tensor
    for i in range(2):
        layer = bnb.model.layers[i]
        for hf_sub, name in PROJ:
            module = getattr(getattr(layer, hf_sub), name)
            t = frozen["quant"][f"layers_{i}"][OURS[hf_sub]][name]["kernel"]
            assert isinstance(t, cls)
            assert "kernel" not in frozen["params"][f"layers_{i}"][OURS[hf_sub]][name]
            ref = bnb_weight(module)
            got = np.asarray(t.dequantize()).T
            if quant_type == "nf4":
                np.testing.assert_array_equal(np.asarray(t.codes).reshape(-1), module.weight.data.numpy().reshape(-1))
                np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
            else:
                np.testing.assert_array_equal(got, ref)
    assert frozen["params"]["lm_head"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(frozen["params"]["embed"]["embedding"]),
                                  bnb.model.embed_tokens.weight.detach().numpy())


def test_frozen_base_of_float_params_equals_quantise_on_load(hf_dir):
    m = _method()
    _, plain = hf_io.load_hf(hf_dir, scan_layers=True)
    _, loaded = hf_io.load_hf(hf_dir, scan_layers=True, transform=m.load_transform())
    a = m.frozen_base(plain, None, jax.random.key(0))
    b = m.frozen_base(loaded, None, jax.random.key(0))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a["quant"]["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 256, 128)


def test_trees_axes_and_merge(hf_dir):
    m = _method()
    config, params = hf_io.load_hf(hf_dir)
    trainable, frozen = m.init(params, config, jax.random.key(1))
    # all-linear: one adapter per quantised projection
    assert sorted(base_paths(params)) == sorted(p for p, _ in adapter_leaves(trainable))
    # B != 0 so that the merge is not the base
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)
    axes = m.frozen_axes(frozen, llama.param_logical_axes(config))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = sharding.logical_shardings(axes, mesh, frozen)
    placed = jax.device_put(frozen, sh)
    assert placed["quant"]["layers_0"]["mlp"]["up_proj"]["kernel"].codes.sharding.spec[0] is not None
    merged = m.merge(trainable, frozen, config)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    t = frozen["quant"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    ab = trainable["layers_1"]["mlp"]["down_proj"]
    want = np.asarray(t.dequantize()) + m.scale * np.asarray(ab["A"]) @ np.asarray(ab["B"])
    np.testing.assert_allclose(np.asarray(merged["layers_1"]["mlp"]["down_proj"]["kernel"]), want, rtol=1e-6,
                               atol=1e-7)
    assert m.count_trainable(trainable) == sum(x.size for x in jax.tree.leaves(trainable))

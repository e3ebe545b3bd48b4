"""peft.method=qdora: DoRA on the frozen NF4 / int8 base against PEFT's `use_dora=True` on transformers'
bitsandbytes base (peft/tuners/lora/bnb.py + dora.py: the column norm from the dequantised weight).

Tiny random HF Llama (hidden 128 / intermediate 256, float32), built once per module; the helpers are
test_qlora's (bitsandbytes' bfloat16 CPU inference kernel turned off there, see `load_bnb`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax import peft
from sft_jax.models import hf_io
from sft_jax.peft.lora import adapter_leaves
from sft_jax.peft.qdora import QDora

from test_qlora import OURS, PROJ, _batch, _int8_dequantised_base, _mean_ce, load_bnb
from test_qlora import _method as _qlora_method
from test_qlora import hf_dir  # noqa: F401  (the module's tiny HF Llama fixture, built once here too)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def _method(**kw):
    return _qlora_method("qdora", **kw)


def test_config_and_run_config():
    m = _method(quant_type="int8")
    assert isinstance(m, QDora) and m.quant_type == "int8" and m.rank == 16
    assert peft.from_run_config(m.run_config()) == m
    assert m.run_config()["qlora"]["quant_type"] == "int8"  # the base format stays peft.qlora.*
    assert m.describe().startswith("QDoRA: int8")


def _peft_dora(hf_dir, quant_type="nf4", seed=0):
    """PEFT DoRA (all-linear, r 8, alpha 16) on transformers' bitsandbytes NF4 base (int8: on bitsandbytes'
    dequantised int8 weights, as test_qlora), with random B and a perturbed magnitude (so that every
    tensor has a gradient and the column scale is not 1). Returns (model, the initial magnitudes)."""
    from peft import LoraConfig, get_peft_model

    base = load_bnb(hf_dir) if quant_type == "nf4" else _int8_dequantised_base(hf_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            use_dora=True))
    init = {n: p.detach().clone().numpy() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model, init


def _ours(peft_model, hf_dir, tmp_path, quant_type="nf4"):
    peft_model.save_pretrained(tmp_path / "adapter")
    config, params = hf_io.load_hf(hf_dir, transform=_method(quant_type=quant_type).load_transform())
    trainable, method = QDora.load_peft(str(tmp_path / "adapter"), params)
    assert isinstance(method, QDora)
    method = dataclasses.replace(method, quant_type=quant_type)
    frozen = method.frozen_base(params, config, jax.random.key(0))
    return method, trainable, frozen, config, params


@pytest.mark.parametrize("quant_type,kernels", [("nf4", "cpu"), ("nf4", "reference"), ("int8", "cpu")])
def test_one_step_parity_with_peft_dora_on_bitsandbytes(hf_dir, tmp_path, quant_type, kernels):
    """Initial magnitudes (||dequantised W||_c), loss and every A / B / magnitude gradient: ours on our
    quantised base (fused CPU kernels and the reference set) vs PEFT's DoRA on bitsandbytes' base, float32.
    Tolerance 2e-5 relative (the NF4 bases differ only by the double-quant offset's last bit)."""
    peft_model, init = _peft_dora(hf_dir, quant_type)
    method, trainable, frozen, config, params = _ours(peft_model, hf_dir, tmp_path, quant_type)
    config = config.replace(kernels=kernels)

    # our magnitude init from our quantised base == PEFT's from bnb's dequantised weight
    fresh = method.init_trainable(params, frozen, config, jax.random.key(1))
    for i in range(2):
        for hf_sub, name in PROJ:
            ref = init[f"base_model.model.model.layers.{i}.{hf_sub}.{name}.lora_magnitude_vector.default.weight"]
            got = np.asarray(fresh[f"layers_{i}"][OURS[hf_sub]][name]["magnitude"])
            np.testing.assert_allclose(got, ref, rtol=2e-6)

    ids = _batch()
    out = peft_model(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long())
    out.loss.backward()
    loss, grads = jax.value_and_grad(
        lambda tr: _mean_ce(method.forward(tr, frozen, config, jnp.asarray(ids)), jnp.asarray(ids)))(trainable)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=2e-5)
    named = dict(peft_model.named_parameters())
    n = 0
    for i in range(2):
        for hf_sub, name in PROJ:
            g = grads[f"layers_{i}"][OURS[hf_sub]][name]
            prefix = f"base_model.model.model.layers.{i}.{hf_sub}.{name}"
            for ours, theirs, tr in (("A", "lora_A.default.weight", True), ("B", "lora_B.default.weight", True),
                                     ("magnitude", "lora_magnitude_vector.default.weight", False)):
                ref = named[f"{prefix}.{theirs}"].grad.numpy()
                ref = ref.T if tr else ref
                np.testing.assert_allclose(np.asarray(g[ours]), ref, rtol=0, atol=2e-5 * np.abs(ref).max(),
                                           err_msg=f"{prefix} {ours}")
                n += 1
    assert n == 42


@pytest.mark.slow
def test_peft_export_on_bitsandbytes_base_and_merged_export(hf_dir, tmp_path):
    """`save_peft` (use_dora, lora_magnitude_vector) -> PeftModel.from_pretrained on transformers' NF4 base:
    logits equal ours (<= 1e-4); `merge` (dequantised base, DoRA merged) saved with save_hf -> plain
    transformers: equal logits."""
    import json

    from peft import PeftModel

    peft_model, _ = _peft_dora(hf_dir, seed=3)
    method, trainable, frozen, config, _ = _ours(peft_model, hf_dir, tmp_path)
    ids = _batch(seed=1)
    ours = np.asarray(method.forward(trainable, frozen, config, jnp.asarray(ids)))

    out = tmp_path / "export"
    method.save_peft(str(out), trainable, frozen, config, base_model_name_or_path=hf_dir)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    served = PeftModel.from_pretrained(load_bnb(hf_dir), str(out))
    with torch.no_grad():
        theirs = served(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

    merged = method.merge(trainable, frozen, config)
    assert len(list(adapter_leaves(trainable))) == 14
    hf_io.save_hf(str(tmp_path / "merged"), config, merged, dtype="float32")
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        theirs = plain(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_dora_is_not_stacked_by_the_multi_adapter_server():
    """DoRA's LowRank carries a per-column scale (and needs the base kernel for it): the server's
    multi-adapter stacking (x A B terms only) refuses it instead of serving a wrong model; LoRA stacks."""
    from sft_jax.models import llama
    from sft_jax.models.config import ModelConfig
    from sft_jax.serve.adapters import NotStackable, low_rank_parts

    c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=64)
    params = llama.init_params(c, jax.random.PRNGKey(0))
    for method in (peft.Dora(rank=2, alpha=4.0), peft.Lora(rank=2, alpha=4.0)):
        trainable, frozen = method.init(params, c, jax.random.PRNGKey(1))
        variables = method.variables(trainable, frozen)
        if isinstance(method, peft.Dora):
            with pytest.raises(NotStackable, match="dora"):
                low_rank_parts(method, variables, c)
        else:
            assert len(low_rank_parts(method, variables, c)) == 7

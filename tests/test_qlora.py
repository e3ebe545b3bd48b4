"""peft.method=qlora: the frozen NF4/int8 base against transformers' bitsandbytes base, trees, merge.

Tiny random HF Llama with hidden 128 / intermediate 256 (bitsandbytes' CPU kernel needs every
projection's output size divisible by its block), float32, saved once per module.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax import peft, sharding
from sft_jax.config import default_config
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
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                              dtype=torch.float32)
    # On AVX512-BF16 CPUs bitsandbytes' inference path (eval mode, input without grad) repacks the
    # weight for a bfloat16 kernel whatever bnb_4bit_compute_dtype says (~0.5% off in the logits);
    # turn it off so that both sides compute in float32 (bnb's MatMul4Bit: dequantise, then a float32 dot).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


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


def _method(method="qlora", **kw):
    """peft.from_config of `method` with these peft.qlora.* fields."""
    cfg = default_config().peft
    cfg.method = method
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


# ------------------------------------------------------------------ the model on the quantised base vs PEFT on bitsandbytes
def _int8_dequantised_base(hf_dir):
    """transformers' float32 model whose projections hold bitsandbytes' dequantised int8 weights.

    bitsandbytes' LLM.int8 matmul also quantises the activations (row-wise int8, float16 outlier
    columns); QLoRA-int8 here quantises only the frozen weights (dequantised in the compute dtype), so
    its float32 reference is the dequantised weights in a plain model."""
    plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    q = load_bnb(hf_dir, "int8")
    with torch.no_grad():
        for (name, module), (_, qmod) in zip(plain.named_modules(), q.named_modules()):
            if hasattr(qmod.weight if hasattr(qmod, "weight") else None, "SCB"):
                module.weight.copy_(torch.from_numpy(bnb_weight(qmod)))
    return plain


def _peft_on_bnb(hf_dir, seed=0, quant_type="nf4"):
    """PEFT LoRA (all-linear, r 8, alpha 16) on transformers' bitsandbytes NF4 base (int8: on the
    dequantised int8 weights, see `_int8_dequantised_base`), with random B (so that every adapter has
    a gradient and changes the output)."""
    from peft import LoraConfig, get_peft_model

    base = load_bnb(hf_dir) if quant_type == "nf4" else _int8_dequantised_base(hf_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ours_from_peft(peft_model, hf_dir, tmp_path, quant_type="nf4"):
    """Our (method, trainable, frozen, config): the adapter read back from PEFT's own save, the base
    quantised by us while loading."""
    peft_model.save_pretrained(tmp_path / "adapter")
    config, params = hf_io.load_hf(hf_dir, transform=_method(quant_type=quant_type).load_transform())
    trainable, method = QLora.load_peft(str(tmp_path / "adapter"), params)
    method = dataclasses.replace(method, quant_type=quant_type)
    frozen = method.frozen_base(params, config, jax.random.key(0))
    return method, trainable, frozen, config


def _batch(seed=0, b=2, t=16, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


def _mean_ce(logits, ids):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_one_step_parity_with_peft_on_bitsandbytes(hf_dir, tmp_path, quant_type):
    """Loss and every adapter gradient on the same tokens: ours on our quantised base vs PEFT on
    bitsandbytes' NF4 base (float32 compute on both sides) or on its dequantised int8 weights.
    Tolerance 2e-5 relative (measured: <= 1e-6 for NF4): the NF4 bases differ only by the double-quant
    offset's last bit (int8 is bit-equal), the products' summation order differs (torch vs XLA)."""
    peft_model = _peft_on_bnb(hf_dir, quant_type=quant_type)
    method, trainable, frozen, config = _ours_from_peft(peft_model, hf_dir, tmp_path, quant_type)
    ids = _batch()
    out = peft_model(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long())
    out.loss.backward()

    def loss_fn(tr):
        return _mean_ce(method.forward(tr, frozen, config, jnp.asarray(ids)), jnp.asarray(ids))

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=2e-5)
    named = dict(peft_model.named_parameters())
    n = 0
    for i in range(2):
        for hf_sub, name in PROJ:
            g = grads[f"layers_{i}"][OURS[hf_sub]][name]
            prefix = f"base_model.model.model.layers.{i}.{hf_sub}.{name}"
            for ours, theirs in (("A", "lora_A"), ("B", "lora_B")):
                ref = named[f"{prefix}.{theirs}.default.weight"].grad.numpy().T
                scale = np.abs(ref).max()
                np.testing.assert_allclose(np.asarray(g[ours]), ref, rtol=0, atol=2e-5 * scale, err_msg=prefix)
                n += 1
    assert n == 28
    if quant_type == "int8":  # bitsandbytes' own LLM.int8 matmul (int8 activations too): close, not equal
        with torch.no_grad():
            real = _peft_on_bnb_int8_loss(hf_dir, peft_model, ids)
        np.testing.assert_allclose(float(loss), real, rtol=5e-4)


def _peft_on_bnb_int8_loss(hf_dir, peft_model, ids):
    """The loss of the same adapter on transformers' real bitsandbytes 8-bit base."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from peft import LoraConfig, get_peft_model

    real = get_peft_model(load_bnb(hf_dir, "int8"),
                          LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    set_peft_model_state_dict(real, get_peft_model_state_dict(peft_model))
    return real(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss.item()


@pytest.mark.slow
def test_peft_export_loads_on_bitsandbytes_base_and_merged_export_in_transformers(hf_dir, tmp_path):
    """`save_peft` -> PeftModel.from_pretrained on transformers' NF4 base: logits equal ours (<= 1e-4);
    `merge` (dequantised base + adapter) saved with save_hf -> plain transformers model: equal logits."""
    from peft import PeftModel

    peft_model = _peft_on_bnb(hf_dir, seed=3)
    method, trainable, frozen, config = _ours_from_peft(peft_model, hf_dir, tmp_path)
    ids = _batch(seed=1)
    ours = np.asarray(method.forward(trainable, frozen, config, jnp.asarray(ids)))

    out = tmp_path / "export"
    method.save_peft(str(out), trainable, frozen, config, base_model_name_or_path=hf_dir)
    served = PeftModel.from_pretrained(load_bnb(hf_dir), str(out))
    with torch.no_grad():
        theirs = served(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

    merged = method.merge(trainable, frozen, config)
    hf_io.save_hf(str(tmp_path / "merged"), config, merged, dtype="float32")
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        theirs = plain(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_train_step_equal_across_meshes():
    """One QLoRA (NF4) train step on 8 fake devices (data 2, fsdp 2, tensor 2) gives the one-device loss,
    gradient norm and updated adapters; the NF4 codes are sharded like the kernels."""
    import ml_collections

    from sft_jax.models.config import ModelConfig
    from sft_jax.optim import make_optimizer
    from sft_jax.train_step import StepOptions, make_train_step

    cfg = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    method = QLora(rank=4, alpha=8.0, targets="all-linear")
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(0)))
    trainable, frozen = method.init(params, cfg, jax.random.key(1))
    trainable = jax.tree.map(lambda x: np.asarray(x) + 0.02, trainable)  # B != 0: both A and B move
    rng = np.random.default_rng(0)
    seq = rng.integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((8, 16), np.float32),
             "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
    tcfg = ml_collections.ConfigDict(dict(lr=1e-2, end_lr=0.0, schedule="constant", warmup_steps=0, b1=0.9,
                                          b2=0.999, eps=1e-3, weight_decay=0.0, grad_clip=1.0))
    opt, sched = make_optimizer(tcfg, 10)
    results = []
    for shape in [(1, 1, 1), (2, 2, 2)]:
        n = int(np.prod(shape))
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n])
        steps = make_train_step(cfg, mesh, trainable=trainable, frozen=frozen, optimizer=opt, schedule=sched,
                                method=method, opts=StepOptions(), batch_size=8)
        sh = steps.shardings
        tr = jax.device_put(trainable, sh.trainable)
        fr = jax.device_put(frozen, sh.frozen)
        st = sharding.init_opt_state(opt, tr, sh.opt_state)
        new, _, m = steps.train_step(tr, fr, st, jax.device_put(batch, sh.batch), jax.random.key(0))
        results.append((jax.tree.map(np.asarray, new), float(m["loss"]), float(m["grad_norm"])))
        if shape == (2, 2, 2):
            codes = fr["quant"]["layers_0"]["mlp"]["up_proj"]["kernel"].codes  # [out, in/2]: (mlp, embed)
            assert "tensor" in str(codes.sharding.spec) and "fsdp" in str(codes.sharding.spec)
    ref, loss, gnorm = results[0]
    for new, l2, g2 in results[1:]:
        assert abs(l2 - loss) <= 1e-5 * abs(loss) and abs(g2 - gnorm) <= 1e-5 * abs(gnorm)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.slow
def test_8b_qlora_plan(repo_dir):
    """`sft_jax.plan` for configs/llama3_8b_qlora.py on a TPU v5e-8 (no weights): the frozen base per
    device is the NF4 projections (4.13 bits a weight with double quantisation) plus the bf16
    embeddings, head and norms, sharded 8 ways (configs/llama3_8b_lora.py: the bf16 base, 2.0 GB)."""
    import json

    from sft_jax.quant import nf4
    from test_plan import _run

    r, _ = _run(repo_dir, "--config=configs/llama3_8b_qlora.py", "--target=tpu-v5e-8", "--json", timeout=600)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    p = json.loads(r.stdout)
    h, f, kv, v, n_layers = 4096, 14336, 1024, 128256, 32
    proj = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    nf4_bytes = n_layers * sum(nf4.nbytes(s) for s in proj)
    bf16_bytes = 2 * (2 * v * h + (2 * n_layers + 1) * h)
    frozen = p["state_per_device"]["frozen_params"]
    assert abs(frozen - (nf4_bytes + bf16_bytes) / 8) < 0.01 * frozen, (frozen, nf4_bytes, bf16_bytes)
    assert frozen < 0.4 * 8_030_261_248 * 2 / 8  # vs the bf16 base of the LoRA recipe
    assert p["model"]["params"] == 8_030_261_248 and p["fits"]
    assert p["run"]["method"]["method"] == "qlora"

"""The `bitfit` method (sft_jax.peft.bitfit) on tiny random HF Llama / Qwen2 models, in f32.

Trainable count; zero-init (bias-free base) and base-bias init == base logits; one step's loss and every
bias gradient vs transformers with only the biases trainable (a Llama with attention biases and a bias-free
one); merged export in transformers (Llama widened to attention_bias / mlp_bias; Qwen2 q/k/v) and the
families' refusals naming the projection; kernels=cpu (fused q/k/v and gate/up dots) == reference; data /
fsdp / tensor meshes give the one-device steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from helpers import assert_equal_across_meshes, mesh_step_results, rel
from sft_jax import config as config_lib
from sft_jax import peft as methods
from sft_jax.kernels import cpu as cpu_kernels
from sft_jax.models import hf_io, llama
from sft_jax.peft.bitfit import BitFit, bias_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.array([[1, 17, 40, 9, 25, 7, 3, 30, 12, 41, 5, 60], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 20, 39]])
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64,
             tie_word_embeddings=False)


def _save(model, d):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
            if p.ndim == 1 and p.abs().max() == 0:  # the checkpoint's biases: nonzero, so their init is checked
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"biased": Llama with q/k/v/o biases, "plain": bias-free Llama, "qwen2": Qwen2 (q/k/v biases)}."""
    torch.manual_seed(0)
    out = {}
    for name, cfg in [("biased", transformers.LlamaConfig(**SIZES, attention_bias=True)),
                      ("plain", transformers.LlamaConfig(**SIZES)),
                      ("qwen2", transformers.Qwen2Config(**SIZES))]:
        cls = transformers.Qwen2ForCausalLM if name == "qwen2" else transformers.LlamaForCausalLM
        out[name] = _save(cls(cfg).float(), tmp_path_factory.mktemp(f"tiny_{name}"))
    return out


def _hf(path, cls=None, **overrides):
    cls = cls or transformers.LlamaForCausalLM
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager", **overrides).eval()


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def _hf_name(path):
    layer, group, proj = path
    return f"model.layers.{layer.split('_')[1]}.{'self_attn' if group == 'attn' else 'mlp'}.{proj}.bias"


def _moved(trainable, seed=3):
    """The trainable tree with every bias moved off its init (as after training)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda b: jnp.asarray(np.asarray(b) + 0.3 * rng.standard_normal(b.shape), jnp.float32),
                        trainable)


@pytest.fixture(scope="module")
def trained(bases):
    """name -> (config, params, method, moved trainable, frozen) for the two Llama bases."""
    out = {}
    for name in ("biased", "plain"):
        config, params = hf_io.load_hf(str(bases[name]))
        method = BitFit()
        trainable, frozen = method.init(params, config, jax.random.key(0))
        out[name] = (config, params, method, _moved(trainable), frozen)
    return out


def test_config_round_trip_and_defaults():
    sec = config_lib.default_config().peft
    sec.method = "bitfit"
    m = methods.from_config(sec)
    assert type(m) is BitFit and m.targets == "all-linear"
    assert methods.from_run_config(m.run_config()) == m
    assert m.run_config() == {"method": "bitfit", "bitfit": {"targets": "all-linear"}}


@pytest.mark.parametrize("name", ["biased", "plain"])
def test_init_count_and_identity(bases, name):
    config, params = hf_io.load_hf(str(bases[name]))
    method = BitFit()
    trainable, frozen = method.init(params, config, jax.random.key(0))
    ref = _hf(bases[name], attention_bias=True, mlp_bias=True)  # every projection with a bias
    assert method.count_trainable(trainable) == sum(p.numel() for n, p in ref.named_parameters()
                                                    if n.endswith(".bias")) == 2 * (32 + 16 + 16 + 32 + 48 + 48 + 32)
    q = trainable["layers_1"]["attn"]["q_proj"]["bias"]
    assert q.shape == (32,) and q.dtype == jnp.float32
    if name == "biased":  # the checkpoint's bias where it has one, zeros elsewhere
        np.testing.assert_array_equal(q, params["layers_1"]["attn"]["q_proj"]["bias"])
        assert np.abs(np.asarray(q)).max() > 0
    else:
        assert not np.asarray(q).any()
    assert not np.asarray(trainable["layers_0"]["mlp"]["down_proj"]["bias"]).any()
    assert rel(method.forward(trainable, frozen, config, jnp.asarray(IDS)),
               llama.forward(params, config, jnp.asarray(IDS))) < 1e-6
    sub, _ = BitFit(targets="q_proj,down_proj").init(params, config, jax.random.key(0))
    assert sorted("/".join(p) for p, _ in bias_leaves(sub)) == [
        f"layers_{i}/{g}" for i in range(2) for g in ("attn/q_proj", "mlp/down_proj")]
    with pytest.raises(methods.MethodConfigError, match="peft.bitfit.targets"):
        BitFit(targets="nothing_here").init(params, config, jax.random.key(0))
    with pytest.raises(methods.MethodConfigError, match="lm_head"):
        BitFit(targets="lm_head").init(params, config, jax.random.key(0))


@pytest.mark.parametrize("name", ["biased", "plain"])
def test_one_step_loss_and_bias_gradients_match_transformers(bases, trained, name):
    """transformers with a bias on every projection (ours copied in), only biases requires_grad."""
    config, _, method, trainable, frozen = trained[name]
    ref = _hf(bases[name], attention_bias=True, mlp_bias=True)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for path, b in bias_leaves(trainable):
            params[_hf_name(path)].copy_(torch.tensor(np.asarray(b)))
    for n, p in params.items():
        p.requires_grad_(n.endswith(".bias"))
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    out = ref(input_ids=torch.tensor(inputs)).logits
    loss_t = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.tensor(targets).reshape(-1))
    loss_t.backward()

    def loss_fn(tr):  # the default kernels (cpu on this backend: fused q/k/v and gate/up dots)
        logits = method.forward(tr, frozen, config, jnp.asarray(inputs))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    assert rel(loss, loss_t.item()) < 1e-5
    n = 0
    for path, g in bias_leaves(grads):
        assert rel(g, params[_hf_name(path)].grad.numpy()) < 1e-5, path
        n += 1
    assert n == 14
    assert all(p.grad is None for k, p in params.items() if not k.endswith(".bias"))


def test_merged_export_loads_in_transformers(bases, trained, tmp_path):
    for name in ("biased", "plain"):
        config, params, method, trainable, frozen = trained[name]
        ours = np.asarray(method.forward(trainable, frozen, config, jnp.asarray(IDS)))
        assert rel(ours, llama.forward(params, config, jnp.asarray(IDS))) > 1e-3
        mc = method.merged_config(trainable, config)
        assert mc.attention_bias and mc.attention_out_bias and mc.mlp_bias
        hf_io.save_hf(str(tmp_path / name), mc, method.merge(trainable, frozen, config))
        hc = json.loads((tmp_path / name / "config.json").read_text())
        assert hc["attention_bias"] is True and hc["mlp_bias"] is True
        assert rel(_torch_logits(_hf(tmp_path / name)), ours) < 1e-4
    # a subset on the bias-free base: attention_bias covers q/k/v/o, the untrained k/o get zeros; no mlp_bias
    config, params, _, _, _ = trained["plain"]
    method = BitFit(targets="q_proj,v_proj")
    tr, fr = method.init(params, config, jax.random.key(0))
    tr = _moved(tr)
    mc = method.merged_config(tr, config)
    assert mc.attention_bias and mc.attention_out_bias and not mc.mlp_bias
    merged = method.merge(tr, fr, config)
    assert not np.asarray(merged["layers_0"]["attn"]["k_proj"]["bias"]).any()
    assert "bias" not in merged["layers_0"]["mlp"]["up_proj"]
    hf_io.save_hf(str(tmp_path / "sub"), mc, merged)
    ours = np.asarray(method.forward(tr, fr, config, jnp.asarray(IDS)))
    assert rel(_torch_logits(_hf(tmp_path / "sub")), ours) < 1e-4
    # scanned layout: the same merge (layer axis on the biases)
    cfg_s, sparams = hf_io.load_hf(str(bases["plain"]), scan_layers=True)
    trs, frs = BitFit().init(sparams, cfg_s, jax.random.key(0))
    trs = _moved(trs)
    assert trs["layers"]["mlp"]["gate_proj"]["bias"].shape == (2, 48)
    ours_s = BitFit().forward(trs, frs, cfg_s, jnp.asarray(IDS))
    merged_s = BitFit().merge(trs, frs, cfg_s)
    assert rel(llama.forward(merged_s, BitFit().merged_config(trs, cfg_s), jnp.asarray(IDS)), ours_s) < 1e-5
    with pytest.raises(methods.PeftFormatError, match="no BitFit"):
        method.save_peft(str(tmp_path / "peft"), tr, fr, config)


def test_qwen2_merges_qkv_and_refuses_o_proj_and_mlp(bases, tmp_path):
    config, params = hf_io.load_hf(str(bases["qwen2"]))
    assert config.model_type == "qwen2" and config.attention_bias and not config.attention_out_bias
    tr, fr = BitFit().init(params, config, jax.random.key(0))
    with pytest.raises(methods.NotMergeable, match=r"down_proj.*qwen2.*o_proj and the MLP never"):
        BitFit().merge(tr, fr, config)
    method = BitFit(targets="k_proj,q_proj,v_proj")
    tr, fr = method.init(params, config, jax.random.key(0))
    np.testing.assert_array_equal(tr["layers_0"]["attn"]["k_proj"]["bias"], params["layers_0"]["attn"]["k_proj"]["bias"])
    tr = _moved(tr)
    assert method.merged_config(tr, config) is config
    ours = np.asarray(method.forward(tr, fr, config, jnp.asarray(IDS)))
    hf_io.save_hf(str(tmp_path / "q"), config, method.merge(tr, fr, config))
    assert rel(_torch_logits(_hf(tmp_path / "q", transformers.Qwen2ForCausalLM)), ours) < 1e-4
    with pytest.raises(methods.NotMergeable, match=r"o_proj \(layers_0/attn/o_proj\).*qwen2"):
        m = BitFit(targets="o_proj")
        m.merged_config(m.init(params, config, jax.random.key(0))[0], config)


@pytest.mark.parametrize("family,proj,expect", [
    ("qwen3", "o_proj", {"attention_bias": True, "attention_out_bias": True, "mlp_bias": False}),
    ("qwen3", "up_proj", "Qwen3Config's attention_bias covers q/k/v/o only"),
    ("mistral", "q_proj", "MistralConfig has no bias flags"),
    ("gemma2", "k_proj", "Gemma"),
    ("llama", "down_proj", {"attention_bias": False, "attention_out_bias": False, "mlp_bias": True}),
])
def test_merged_config_per_family(trained, family, proj, expect):
    config = trained["plain"][0].replace(model_type=family, qk_norm=family == "qwen3")
    group = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "attn"
    tree = {"layers_0": {group: {proj: {"bias": jnp.zeros((4,))}}}}
    if isinstance(expect, str):
        with pytest.raises(methods.NotMergeable, match=f"{proj}.*{family}.*{expect}"):
            BitFit().merged_config(tree, config)
    else:
        mc = BitFit().merged_config(tree, config)
        assert {k: getattr(mc, k) for k in expect} == expect


def test_cpu_kernels_equal_reference_and_stay_fused(trained, monkeypatch):
    config, _, method, trainable, frozen = trained["plain"]
    inputs, targets = jnp.asarray(IDS[:, :-1]), jnp.asarray(IDS[:, 1:])
    calls = []
    fused = cpu_kernels.fused
    monkeypatch.setattr(cpu_kernels, "fused", lambda *a, **k: calls.append(1) or fused(*a, **k))
    res = {}
    for kernels in ("reference", "cpu"):
        c = config.replace(kernels=kernels)

        def loss_fn(tr, c=c):
            logp = jax.nn.log_softmax(method.forward(tr, frozen, c, inputs), axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

        res[kernels] = jax.value_and_grad(loss_fn)(trainable)
    assert len(calls) == 2 * 2  # per layer the q/k/v and the gate/up dot took the fused kernel
    assert rel(res["cpu"][0], res["reference"][0]) < 1e-5
    for a, b in zip(jax.tree.leaves(res["cpu"][1]), jax.tree.leaves(res["reference"][1])):
        assert rel(a, b) < 1e-5



def test_equal_across_meshes(trained):
    config, _, method, trainable, frozen = trained["biased"]
    assert_equal_across_meshes(mesh_step_results(config, method, trainable, frozen))

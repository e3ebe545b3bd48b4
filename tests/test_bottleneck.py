"""The `bottleneck` method (sft_jax.peft.bottleneck) and sft_jax's own adapter format (sft_jax.adapter_format).

A torch reference of AdapterHub's placement on a tiny random HF Llama (forward hooks on `self_attn` / `mlp`,
the Pfeiffer adapter reading the residual stream captured at `post_attention_layernorm`'s input) with our
(moved-from-init) weights: logits, loss and every gradient <= 1e-5 rel in f32, for both styles, kernels=cpu
and reference, scanned and unscanned layers; zero init == the base exactly; data / fsdp / tensor meshes ==
one device; merged / PEFT exports refuse; `--format=adapter` round trips for bottleneck and LoRA (scanned
run, unscanned load and back) and a mismatched base is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax import adapter_format
from helpers import assert_equal_across_meshes, mesh_step_results, rel
from sft_jax import config as config_lib
from sft_jax import peft as methods
from sft_jax.export import export_adapter
from sft_jax.models import hf_io, llama
from sft_jax.peft.bottleneck import Bottleneck
from sft_jax.peft.lora import Lora
from sft_jax.workdir import Run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.array([[1, 17, 40, 9, 25, 7, 3, 30, 12, 41, 5, 60], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 20, 39]])
CASES = [("houlsby", "auto"), ("pfeiffer", "auto"), ("houlsby", "gelu")]
TORCH_ACT = {"silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
             "tanh": torch.tanh}


def _hf_config(hidden=32):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                                    max_position_embeddings=64, tie_word_embeddings=False)


def _save_random(d, seed, hidden=32):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(hidden)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
    model.save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _save_random(tmp_path_factory.mktemp("tiny_llama_bn"), 0)


@pytest.fixture(scope="module")
def base(base_dir):
    return hf_io.load_hf(str(base_dir))


def _moved(method, params, config, seed=3):
    """The method's init with every leaf moved off it (up off zero), deterministic."""
    trainable, frozen = method.init(params, config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves), frozen


def _stack(trainable):
    return adapter_format.stack_layers(jax.tree.map(np.asarray, trainable))


class _TorchAdapters:
    """AdapterHub's placement on the HF model: torch copies of our adapter weights (requires_grad)."""

    def __init__(self, model, trainable, method):
        self.p, self.handles = {}, []
        act = TORCH_ACT[method.act_name]
        for i, layer in enumerate(model.model.layers):
            for kind in method.kinds:
                node = trainable[f"layers_{i}"][f"bottleneck_{kind}"]
                self.p[(i, kind)] = {f"{pr}_{leaf}": torch.tensor(np.asarray(node[pr][leaf]), requires_grad=True)
                                     for pr in ("down", "up") for leaf in ("kernel", "bias")}
            state = {}

            def f(z, i=i, kind="mlp"):
                q = self.p[(i, kind)]
                return act(z @ q["down_kernel"] + q["down_bias"]) @ q["up_kernel"] + q["up_bias"]

            if "attn" in method.kinds:  # Houlsby: after the attention output projection, on its output
                self.handles.append(layer.self_attn.register_forward_hook(
                    lambda mod, args, out, f=f: (out[0] + f(out[0], kind="attn"),) + tuple(out[1:])))
            if method.style == "houlsby":
                self.handles.append(layer.mlp.register_forward_hook(lambda mod, args, out, f=f: out + f(out)))
            else:  # Pfeiffer: original_ln_before, no Llama LN: the adapter reads residual + h, its residual is h
                self.handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
                    lambda mod, args, state=state: state.__setitem__("res", args[0])))
                self.handles.append(layer.mlp.register_forward_hook(
                    lambda mod, args, out, f=f, state=state: out + f(state["res"] + out)))

    def grads(self):
        return {k: {n: t.grad.numpy() for n, t in v.items()} for k, v in self.p.items()}


def _hf(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def _loss_and_grads(method, config, inputs, targets):
    """jit((trainable, frozen) -> ((loss, logits), grads))."""
    def loss_fn(tr, fr):
        logits = method.forward(tr, fr, config, jnp.asarray(inputs))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)), logits

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _logits(method, config, ids=IDS):
    """(trainable, frozen) -> logits, jitted; method None: the plain base (frozen = its params)."""
    def f(t, fr):
        if method is None:
            return llama.forward(fr, config, jnp.asarray(ids))
        return method.forward(t, fr, config, jnp.asarray(ids))

    return lambda tr, fr: np.asarray(jax.jit(f)(tr, fr))


def test_config_fields_defaults_and_errors():
    sec = config_lib.default_config().peft
    sec.method = "bottleneck"
    m = methods.from_config(sec)
    assert type(m) is Bottleneck and (m.style, m.size, m.reduction_factor, m.activation) == ("houlsby", 0, 16.0,
                                                                                             "auto")
    assert m.act_name == "silu" and Bottleneck(style="pfeiffer").act_name == "relu"
    assert methods.from_run_config(m.run_config()) == m
    assert m.bottleneck_size(4096) == 256 and Bottleneck(size=64).bottleneck_size(4096) == 64
    assert Bottleneck(reduction_factor=100).bottleneck_size(64) == 1
    for bad, field in ((dict(style="parallel"), "peft.bottleneck.style"), (dict(size=-1), "peft.bottleneck.size"),
                       (dict(activation="swish"), "peft.bottleneck.activation"),
                       (dict(reduction_factor=0.0), "peft.bottleneck.reduction_factor")):
        with pytest.raises(methods.MethodConfigError, match=field):
            Bottleneck(**bad)
    cfg = config_lib.default_config()
    cfg.peft.bottleneck.style = "parallel"
    with pytest.raises(config_lib.ConfigError, match="peft.bottleneck.style"):
        config_lib.validate(cfg)


@pytest.mark.parametrize("scan", [False, True])
def test_zero_init_is_the_base_exactly(base_dir, scan):
    config, params = hf_io.load_hf(str(base_dir), scan_layers=scan)
    ref = _logits(None, config)({}, params)
    for style in ("houlsby", "pfeiffer"):
        m = Bottleneck(style=style)
        trainable, frozen = m.init(params, config, jax.random.key(0))
        n_sites = 2 if style == "houlsby" else 1
        d, b = config.hidden_size, m.bottleneck_size(config.hidden_size)
        assert m.count_trainable(trainable) == config.num_layers * n_sites * (2 * d * b + b + d)
        assert np.array_equal(_logits(m, config)(trainable, frozen), ref), style


@pytest.mark.parametrize("style,activation", CASES)
def test_loss_and_gradients_match_the_torch_reference(base_dir, base, style, activation):
    config, params = base
    method = Bottleneck(style=style, size=6, activation=activation)
    trainable, frozen = _moved(method, params, config)
    model = _hf(base_dir)
    ad = _TorchAdapters(model, jax.tree.map(np.asarray, trainable), method)
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    out = model(input_ids=torch.tensor(inputs)).logits
    loss_t = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.tensor(targets).reshape(-1))
    loss_t.backward()
    tgrads = ad.grads()
    ref_logits = out.detach().numpy()
    assert rel(ref_logits, _logits(None, config, inputs)(trainable, params)) > 1e-2  # the adapters matter

    runs = [(config.replace(kernels="cpu"), params, trainable, False)]
    if activation == "auto":  # both styles: the reference kernels and scanned layers too
        scanned_config, scanned_params = hf_io.load_hf(str(base_dir), scan_layers=True)
        runs += [(config.replace(kernels="reference"), params, trainable, False),
                 (scanned_config, scanned_params, _stack(trainable), True)]
    for cfg, p, tr, scanned in runs:
        (loss, logits), grads = _loss_and_grads(method, cfg, inputs, targets)(tr, p)
        assert rel(logits, ref_logits) < 1e-5, (cfg.kernels, scanned)
        assert rel(loss, loss_t.item()) < 1e-5, (cfg.kernels, scanned)
        if scanned:
            grads = adapter_format.unstack_layers(jax.tree.map(np.asarray, grads))
        n = 0
        for (i, kind), tg in tgrads.items():
            node = grads[f"layers_{i}"][f"bottleneck_{kind}"]
            for name, g in tg.items():
                pr, leaf = name.split("_")
                assert rel(node[pr][leaf], g) < 1e-5, (cfg.kernels, scanned, i, kind, name)
                n += 1
        assert n == config.num_layers * len(method.kinds) * 4



def test_equal_across_meshes(base):
    config, params = base
    method = Bottleneck(style="houlsby", size=8)
    trainable, frozen = _moved(method, params, config)
    assert_equal_across_meshes(mesh_step_results(config, method, trainable, frozen))


def test_merged_and_peft_exports_refuse(base, tmp_path):
    config, params = base
    method = Bottleneck()
    trainable, frozen = method.init(params, config, jax.random.key(0))
    with pytest.raises(methods.NotMergeable, match="nonlinear.*--format=adapter"):
        method.merge(trainable, frozen, config)
    with pytest.raises(methods.PeftFormatError, match="no bottleneck-adapter type.*--format=adapter"):
        method.save_peft(str(tmp_path / "p"), trainable, frozen, config)


def _run(method, trainable, frozen, config, base_dir, seed):
    return Run(config_dict={"train": {"seed": seed}}, model_config=config, frozen=frozen, trainable=trainable,
               method=method, tokenizer=None, eos_ids=[2], step=7, base_model=str(base_dir),
               tokenizer_path="/nonexistent", template="chatml")


@pytest.mark.parametrize("method", [Bottleneck(style="pfeiffer", size=5), Lora(rank=4, alpha=8.0)],
                         ids=["bottleneck", "lora"])
def test_adapter_format_round_trip(base_dir, method, tmp_path):
    """Trained scanned, written unscanned; read onto an unscanned and a scanned base: the same logits."""
    config_s, params_s = hf_io.load_hf(str(base_dir), scan_layers=True)
    trainable, frozen = _moved(method, params_s, config_s)
    ours = _logits(method, config_s)(trainable, frozen)
    meta = export_adapter(_run(method, trainable, frozen, config_s, base_dir, 5), str(tmp_path / "a"))
    assert meta["trainable_params"] == method.count_trainable(trainable) and meta["method_seed"] == 5
    on_disk = json.loads((tmp_path / "a" / adapter_format.CONFIG_FILE).read_text())
    assert on_disk["format"] == "sft_jax_adapter" and on_disk["format_version"] == 1
    assert on_disk["method"] == method.run_config() and on_disk["layout"] == "unscanned"
    assert on_disk["template"] == "chatml" and on_disk["eos_ids"] == [2] and on_disk["step"] == 7
    assert on_disk["base_model"]["fingerprint"] == adapter_format.base_fingerprint(str(base_dir))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / adapter_format.WEIGHTS_FILE), framework="numpy") as f:
        names = sorted(f.keys())
    assert all(n.startswith(("layers_0/", "layers_1/")) for n in names), names
    assert adapter_format.is_adapter_dir(str(tmp_path / "a")) and not adapter_format.is_adapter_dir(str(base_dir))
    for scan in (False, True):
        config, params = hf_io.load_hf(str(base_dir), scan_layers=scan)
        back, tr, fr, cfg, _ = adapter_format.load_adapter(str(tmp_path / "a"), str(base_dir), config, params)
        assert back == method
        assert rel(_logits(back, cfg)(tr, fr), ours) < 1e-5, scan


def test_adapter_format_refuses_a_mismatched_base_and_full(base_dir, base, tmp_path):
    config, params = base
    method = Bottleneck(size=4)
    trainable, frozen = _moved(method, params, config)
    export_adapter(_run(method, trainable, frozen, config, base_dir, 0), str(tmp_path / "a"))
    wider = _save_random(tmp_path / "wider", 0, hidden=48)
    cw, pw = hf_io.load_hf(str(wider))
    with pytest.raises(adapter_format.AdapterFormatError, match="hidden_size=32.*this base has hidden_size=48"):
        adapter_format.load_adapter(str(tmp_path / "a"), str(wider), cw, pw)
    other = _save_random(tmp_path / "other", 1)
    co, po = hf_io.load_hf(str(other))
    with pytest.raises(adapter_format.AdapterFormatError, match="another base.*same shapes but other weights"):
        adapter_format.load_adapter(str(tmp_path / "a"), str(other), co, po)
    full = methods.get("full")()
    with pytest.raises(adapter_format.AdapterFormatError, match="no frozen base.*--format=merged"):
        export_adapter(_run(full, params, {}, config, base_dir, 0), str(tmp_path / "f"))

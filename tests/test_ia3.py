"""The `ia3` method (sft_jax.peft.ia3) on a tiny random HF Llama, against peft's IA3 in f32.

Trainable count vs peft's; one step's loss and gradients vs peft's model with the same (moved-from-init)
scaling vectors; PEFT export loaded by `PeftModel.from_pretrained`; merged export in transformers;
peft -> sft_jax round trip; scanned layers; data / fsdp / tensor meshes give the one-device step.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax import config as config_lib
from sft_jax import peft as methods
from sft_jax.models import hf_io, llama
from sft_jax.peft.ia3 import IA3, ia3_leaves

from helpers import IDS, assert_equal_across_meshes, mesh_step_results, rel, save_tiny_llama
from helpers import hf_llama as _hf, hf_module as _hf_module, torch_logits as _torch_logits

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["k_proj", "v_proj", "down_proj", "q_proj", "up_proj"]
FF = ["down_proj", "up_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_ia3"), attention_bias=True, nonzero_biases=True)


@pytest.fixture(scope="module")
def trained(base_dir):
    """(config, params, method, trainable, frozen, peft model) with the same moved-from-init vectors."""
    config, params = hf_io.load_hf(str(base_dir))
    method = IA3(targets=",".join(TARGETS), feedforward=",".join(FF))
    trainable, frozen = method.init(params, config, jax.random.key(0))
    pm = peft.get_peft_model(_hf(base_dir), peft.IA3Config(target_modules=TARGETS, feedforward_modules=FF))
    mods = dict(pm.named_modules())
    g = torch.Generator().manual_seed(3)
    for path, leaf in ia3_leaves(trainable):
        w = mods["base_model.model." + _hf_module(path)].ia3_l["default"]
        with torch.no_grad():
            w.add_(0.5 * torch.randn(w.shape, generator=g))
        kind = next(iter(leaf))
        leaf[kind] = jnp.asarray(w.detach().numpy().reshape(-1))
    return config, params, method, trainable, frozen, pm


def test_config_round_trip_and_defaults():
    sec = config_lib.default_config().peft
    sec.method = "ia3"
    m = methods.from_config(sec)
    assert type(m) is IA3 and m.targets == "k_proj,v_proj,down_proj" and m.feedforward == "down_proj"
    assert methods.from_run_config(m.run_config()) == m


def test_init_is_identity_and_count_matches_peft(base_dir):
    config, params = hf_io.load_hf(str(base_dir))
    method = IA3()
    trainable, frozen = method.init(params, config, jax.random.key(0))
    pm = peft.get_peft_model(_hf(base_dir), peft.IA3Config())  # peft's Llama defaults
    assert method.count_trainable(trainable) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable["layers_0"]["mlp"]["down_proj"]["scale_in"].shape == (48,)
    assert trainable["layers_0"]["attn"]["k_proj"]["scale_out"].shape == (16,)
    # ones: the base model (up to the fused CPU kernels' summation order on the untouched projections)
    assert rel(method.forward(trainable, frozen, config, jnp.asarray(IDS)),
               llama.forward(params, config, jnp.asarray(IDS))) < 1e-5
    with pytest.raises(methods.MethodConfigError, match="peft.ia3.targets"):
        IA3(targets="nothing_here").init(params, config, jax.random.key(0))


def test_one_step_loss_and_gradients_match_peft(trained):
    config, _, method, trainable, frozen, pm = trained
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    pm.train()
    pm.zero_grad()
    out = pm(input_ids=torch.tensor(inputs)).logits
    loss_t = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.tensor(targets).reshape(-1))
    loss_t.backward()

    def loss_fn(tr):
        logits = method.forward(tr, frozen, config, jnp.asarray(inputs))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    assert rel(loss, loss_t.item()) < 1e-5
    mods = dict(pm.named_modules())
    n = 0
    for path, leaf in ia3_leaves(grads):
        tg = mods["base_model.model." + _hf_module(path)].ia3_l["default"].grad.numpy().reshape(-1)
        assert rel(next(iter(leaf.values())), tg) < 1e-5, path
        n += 1
    assert n == 2 * len(TARGETS)
    pm.eval()


def test_peft_and_merged_exports_give_our_logits(trained, base_dir, tmp_path):
    config, params, method, trainable, frozen, _ = trained
    ours = np.asarray(method.forward(trainable, frozen, config, jnp.asarray(IDS)))
    assert rel(ours, llama.forward(params, config, jnp.asarray(IDS))) > 1e-3
    modules = method.save_peft(str(tmp_path / "adapter"), trainable, frozen, config,
                               base_model_name_or_path=str(base_dir))
    assert len(modules) == 2 * len(TARGETS)
    loaded = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path / "adapter")).eval()
    assert loaded.peft_config["default"].peft_type == peft.PeftType.IA3
    assert rel(_torch_logits(loaded), ours) < 1e-4
    hf_io.save_hf(str(tmp_path / "merged"), config, method.merge(trainable, frozen, config))
    assert rel(_torch_logits(_hf(tmp_path / "merged")), ours) < 1e-4
    tree, back = IA3.load_peft(str(tmp_path / "adapter"), params)
    assert rel(back.forward(tree, params, config, jnp.asarray(IDS)), ours) < 1e-5
    cfg2, sparams = hf_io.load_hf(str(base_dir), scan_layers=True)
    tree_s, back_s = IA3.load_peft(str(tmp_path / "adapter"), sparams)
    assert rel(back_s.forward(tree_s, sparams, cfg2, jnp.asarray(IDS)), ours) < 1e-5
    assert rel(llama.forward(back_s.merge(tree_s, sparams, cfg2), cfg2, jnp.asarray(IDS)), ours) < 1e-5


def test_equal_across_meshes(trained):
    config, _, method, trainable, frozen, _ = trained
    assert_equal_across_meshes(mesh_step_results(config, method, trainable, frozen))

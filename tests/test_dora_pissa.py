"""The `dora` and `pissa` methods (sft_jax.peft) on a tiny random HF Llama, against peft 0.21 in f32.

Initial trees vs peft's (DoRA's magnitude, PiSSA's residual base and A0/B0); logits vs peft's model with the
same adapter weights; one step's loss and gradients vs peft's; PEFT export loaded by `PeftModel.from_pretrained`
on the (original) base; merged export in transformers; peft -> sft_jax round trip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax import config as config_lib
from sft_jax import generate
from sft_jax import peft as methods
from sft_jax.models import hf_io, llama
from sft_jax.peft.dora import Dora
from sft_jax.peft.lora import Lora, adapter_leaves
from sft_jax.peft.pissa import Pissa

from helpers import IDS, assert_equal_across_meshes, mesh_step_results, rel, run_module, save_tiny_llama
from helpers import hf_llama as _hf, hf_module as _hf_module, torch_logits as _torch_logits

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RANK, ALPHA = 4, 8.0
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random HF Llama (q/k/v biases off, untied) saved with save_pretrained."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _peft_model(base_dir, **cfg):
    torch.manual_seed(1)
    return peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=NAMES,
                                                              lora_dropout=0.0, **cfg))


def _logits(method, trainable, frozen, config, ids=IDS):
    return method.forward(trainable, frozen, config, jnp.asarray(ids))


def _peft_modules(pm):
    mods = dict(pm.named_modules())
    return lambda path: mods["base_model.model." + _hf_module(path)]


def _perturb_peft(pm, dora):
    """Move peft's adapters away from their init (B != 0, magnitude != ||W||), deterministically."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.add_(0.2 * torch.randn(mod.lora_B["default"].weight.shape, generator=g))
                if dora:
                    mod.lora_magnitude_vector["default"].weight.mul_(
                        1 + 0.3 * torch.rand(mod.lora_magnitude_vector["default"].weight.shape, generator=g))


def _copy_from_peft(trainable, pm):
    """Our trainable tree with peft's current adapter values (A, B, magnitude)."""
    mod = _peft_modules(pm)
    out = jax.tree.map(lambda x: x, trainable)
    for path, leaf in adapter_leaves(out):
        m = mod(path)
        leaf["A"] = jnp.asarray(m.lora_A["default"].weight.detach().numpy().T)
        leaf["B"] = jnp.asarray(m.lora_B["default"].weight.detach().numpy().T)
        if "magnitude" in leaf:
            leaf["magnitude"] = jnp.asarray(m.lora_magnitude_vector["default"].weight.detach().numpy())
    return out


def _load(base_dir):
    return hf_io.load_hf(str(base_dir))


# ------------------------------------------------------------------ config and trees
def test_config_and_run_config_round_trip():
    sec = config_lib.default_config().peft
    assert "dora" not in sec and sec.pissa.niter == 0  # DoRA and PiSSA read peft.lora.*
    sec.lora.rank, sec.lora.rslora, sec.pissa.niter = 8, True, 4
    for name, cls in (("dora", Dora), ("pissa", Pissa)):
        sec.method = name
        m = methods.from_config(sec)
        assert type(m) is cls and m.rank == 8 and m.rslora
        assert methods.from_run_config(m.run_config()) == m
    assert methods.from_config(sec).niter == 4
    sec.pissa.niter = -1
    with pytest.raises(methods.MethodConfigError, match="peft.pissa.niter"):
        methods.from_config(sec)


def test_dora_initial_magnitude_matches_peft(base_dir):
    config, params = _load(base_dir)
    pm = _peft_model(base_dir, use_dora=True)
    method = Dora(rank=RANK, alpha=ALPHA, targets=",".join(NAMES))
    trainable, frozen = method.init(params, config, jax.random.key(0))
    mod = _peft_modules(pm)
    leaves = list(adapter_leaves(trainable))
    assert len(leaves) == 2 * len(NAMES)
    for path, leaf in leaves:
        assert set(leaf) == {"A", "B", "magnitude"}
        assert rel(leaf["magnitude"], mod(path).lora_magnitude_vector["default"].weight.detach().numpy()) < 1e-6
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert method.count_trainable(trainable) == n_peft


@pytest.mark.parametrize("niter", [0, 2])
def test_pissa_frozen_base_matches_peft(base_dir, niter):
    config, params = _load(base_dir)
    method = Pissa(rank=RANK, alpha=ALPHA, targets=",".join(NAMES), niter=niter)
    trainable, frozen = method.init(params, config, jax.random.key(0))
    assert set(frozen) == {"params", "init"}
    if niter:  # randomised: A0 B0 close to the exact decomposition for this spectrum, residual + s A0 B0 = W
        for path, leaf in adapter_leaves(trainable):
            w = hf_io._get(params, path)["kernel"]
            res = hf_io._get(frozen["params"], path)["kernel"]
            assert rel(res + method.scale * leaf["A"] @ leaf["B"], w) < 1e-5
        return
    pm = _peft_model(base_dir, init_lora_weights="pissa")
    mod = _peft_modules(pm)
    for path, leaf in adapter_leaves(trainable):
        m = mod(path)
        pa, pb = m.lora_A["default"].weight.detach().numpy().T, m.lora_B["default"].weight.detach().numpy().T
        # two float32 SVDs (torch's and XLA's LAPACK calls) agree to ~1e-5 relative on the principal part
        assert rel(leaf["A"] @ leaf["B"], pa @ pb) < 5e-5
        assert rel(hf_io._get(frozen["params"], path)["kernel"], m.base_layer.weight.detach().numpy().T) < 5e-5
        # the trainable tree starts at A0, B0
        assert rel(leaf["A"], frozen["init"][path[0]][path[1]][path[2]]["A"]) == 0
    # untouched weights are the base's
    assert rel(frozen["params"]["embed"]["embedding"], params["embed"]["embedding"]) == 0


# ------------------------------------------------------------------ forward, one step, export
def _trained(name, base_dir):
    """(method, our trainable, our frozen, peft model) with the same, moved-away-from-init adapter weights."""
    config, params = _load(base_dir)
    if name == "dora":
        method = Dora(rank=RANK, alpha=ALPHA, targets=",".join(NAMES))
        pm = _peft_model(base_dir, use_dora=True)
    else:
        method = Pissa(rank=RANK, alpha=ALPHA, targets=",".join(NAMES))
        pm = _peft_model(base_dir, init_lora_weights="pissa")
    trainable, frozen = method.init(params, config, jax.random.key(0))
    if name == "pissa":  # peft's own residual base and initial adapter (the SVD's signs are free)
        mod = _peft_modules(pm)
        for path, leaf in adapter_leaves(frozen["init"]):
            m = mod(path)
            hf_io._get(frozen["params"], path)["kernel"] = jnp.asarray(m.base_layer.weight.detach().numpy().T)
            leaf["A"] = jnp.asarray(m.lora_A["default"].weight.detach().numpy().T)
            leaf["B"] = jnp.asarray(m.lora_B["default"].weight.detach().numpy().T)
    _perturb_peft(pm, dora=name == "dora")
    return config, params, method, _copy_from_peft(trainable, pm), frozen, pm.eval()


def _ce(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@pytest.mark.parametrize("name", ["dora", "pissa"])
def test_identity_at_init(base_dir, name):
    """DoRA (B = 0, m = ||W||) and PiSSA (W_res + s A0 B0 = W) start at the base model's logits."""
    config, params = _load(base_dir)
    method = Dora(rank=RANK, alpha=ALPHA) if name == "dora" else Pissa(rank=RANK, alpha=ALPHA)
    trainable, frozen = method.init(params, config, jax.random.key(0))
    assert rel(_logits(method, trainable, frozen, config), llama.forward(params, config, jnp.asarray(IDS))) < 1e-5


@pytest.mark.parametrize("name", ["dora", "pissa"])
def test_one_step_loss_and_gradients_match_peft(base_dir, name):
    config, _, method, trainable, frozen, pm = _trained(name, base_dir)
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    assert rel(_logits(method, trainable, frozen, config, inputs), _torch_logits(pm, inputs)) < 1e-5

    pm.train()
    out = pm(input_ids=torch.tensor(inputs)).logits
    loss_t = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.tensor(targets).reshape(-1))
    loss_t.backward()

    def loss_fn(tr):
        return _ce(method.forward(tr, frozen, config, jnp.asarray(inputs), deterministic=False,
                                  dropout_rng=jax.random.key(1)), jnp.asarray(targets))

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    assert rel(loss, loss_t.item()) < 1e-5
    mod = _peft_modules(pm)
    names = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"}
    n = 0
    for path, leaf in adapter_leaves(grads):
        m = mod(path)
        for k, g in leaf.items():
            tg = getattr(m, names[k])["default"].weight.grad.numpy()
            assert rel(g, tg.T if k in "AB" else tg) < 1e-5, (path, k)
            n += 1
    assert n == 2 * len(NAMES) * (3 if name == "dora" else 2)


@pytest.mark.parametrize("name", ["dora", "pissa"])
def test_peft_and_merged_exports_give_our_logits(base_dir, name, tmp_path):
    config, params, method, trainable, frozen, _ = _trained(name, base_dir)
    ours = np.asarray(_logits(method, trainable, frozen, config))
    # PEFT adapter on the ORIGINAL base (PiSSA: converted to the rank-2r plain LoRA)
    modules = method.save_peft(str(tmp_path / "adapter"), trainable, frozen, config,
                               base_model_name_or_path=str(base_dir))
    assert len(modules) == 2 * len(NAMES)
    loaded = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path / "adapter")).eval()
    cfg = loaded.peft_config["default"]
    assert cfg.use_dora == (name == "dora") and cfg.r == (RANK if name == "dora" else 2 * RANK)
    assert rel(_torch_logits(loaded), ours) < 1e-4
    # merged plain weights in transformers
    hf_io.save_hf(str(tmp_path / "merged"), config, method.merge(trainable, frozen, config))
    assert rel(_torch_logits(_hf(tmp_path / "merged")), ours) < 1e-4
    # and back: the adapter read by sft_jax gives the same logits on the original base
    tree, back = type(method).load_peft(str(tmp_path / "adapter"), params)
    assert type(back) is (Dora if name == "dora" else Lora)
    assert rel(_logits(back, tree, params, config), ours) < 1e-4


def test_dora_load_peft_rejects_plain_lora(base_dir, tmp_path):
    config, params = _load(base_dir)
    lora = Lora(rank=RANK, alpha=ALPHA)
    tr, fr = lora.init(params, config, jax.random.key(0))
    lora.save_peft(str(tmp_path / "lora"), tr, fr, config)
    with pytest.raises(methods.PeftFormatError, match="use_dora"):
        Dora.load_peft(str(tmp_path / "lora"), params)


@pytest.mark.parametrize("name", ["dora", "pissa"])
def test_equal_across_meshes(base_dir, name):
    """One train step on the data / fsdp / tensor meshes of 8 fake devices gives the one-device result."""
    config, _, method, trainable, frozen, _ = _trained(name, base_dir)
    assert_equal_across_meshes(mesh_step_results(config, method, trainable, frozen))


@pytest.mark.parametrize("name", ["dora", "pissa"])
def test_scanned_layers(base_dir, name):
    """The stacked layout (scan_layers): identity at init, and the merged kernels compute the method's
    logits (norms / SVDs / merges per layer along the leading axis)."""
    config, params = hf_io.load_hf(str(base_dir), scan_layers=True)
    method = Dora(rank=RANK, alpha=ALPHA) if name == "dora" else Pissa(rank=RANK, alpha=ALPHA, niter=2)
    trainable, frozen = method.init(params, config, jax.random.key(0))
    base = np.asarray(llama.forward(params, config, jnp.asarray(IDS)))
    assert rel(_logits(method, trainable, frozen, config), base) < 1e-5
    keys = iter(jax.random.split(jax.random.key(1), 64))
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key in ("B", "magnitude") else x,
        trainable)
    ours = np.asarray(_logits(method, moved, frozen, config))
    assert rel(ours, base) > 1e-3
    assert rel(llama.forward(method.merge(moved, frozen, config), config, jnp.asarray(IDS)), ours) < 1e-5


def _cli(cwd, *args, timeout=900):
    return run_module(*args, cwd=cwd, timeout=timeout).stdout


@pytest.fixture(scope="module")
def cli_base(stories260k_cli):
    """stories260K converted with `python -m sft_jax.convert llama2c`, once per session (conftest; read-only:
    the runs resize the vocabulary into their own work directory's base_model)."""
    return stories260k_cli


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dora", "pissa"])
def test_cli_train_export_generate_on_stories260k(shared_dir, repo_dir, cli_base, tmp_path, name):
    """`python -m sft_jax.train` with peft.method=dora|pissa on stories260K (converted with sft_jax.convert):
    held-out loss falls in a few dozen steps; the PEFT export loads in peft on the (unchanged) base and the merged
    export in transformers, both with the workdir's logits; generate runs from the workdir."""
    base = cli_base
    wd = tmp_path / "wd"
    _cli(repo_dir, "sft_jax.train", "--config=configs/lima.py", f"--workdir={wd}", f"--config.model.path={base}",
         f"--config.data.path={shared_dir / 'data' / 'alpaca_en_demo.json'}", "--config.data.template=chatml",
         "--config.data.max_length=256", "--config.data.eval_fraction=0.1", "--config.train.steps=30",
         "--config.train.epochs=0", "--config.train.batch_size=8", "--config.train.lr=5e-3",
         "--config.train.end_lr=5e-3", "--config.train.warmup_steps=0", "--config.model.dtype=float32",
         "--config.model.param_dtype=float32", "--config.model.remat=none", f"--config.peft.method={name}",
         "--config.peft.lora.rank=8", "--config.peft.lora.alpha=16", "--config.eval.every_steps=0",
         "--config.eval.max_batches=4", "--config.eval.num_generations=0", "--config.checkpoint.every_steps=0")
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.05, summary
    run = json.loads((wd / "run.json").read_text())
    assert run["peft"]["method"] == name

    gen = generate.load_workdir(str(wd))
    ids = np.array([[1, 403, 29, 96, 77, 310, 49, 8, 120, 261]])
    ours = np.asarray(llama.forward(gen.params, gen.config, jnp.asarray(ids), method=gen.method,
                                    method_vars=gen.method_vars))
    _cli(repo_dir, "sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'peft'}", "--format=peft")
    _cli(repo_dir, "sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'merged'}", "--format=merged")
    # chatml's tokens were added to the tokenizer: the run resized the vocab and saved that base, which the
    # adapter names as its base model
    peft_base = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    loaded = peft.PeftModel.from_pretrained(_hf(peft_base), str(tmp_path / "peft")).eval()
    assert rel(_torch_logits(loaded, ids), ours) < 1e-4
    assert rel(_torch_logits(_hf(tmp_path / "merged"), ids), ours) < 1e-4
    out = json.loads(_cli(repo_dir, "sft_jax.generate", f"--workdir={wd}", "--prompt=Tell me a story.", "--max_new_tokens=12",
                          "--json"))
    assert len(out["generations"][0]["ids"]) > 0

"""Work directory: run.json round trip, load_run of a tiny trained run (partial and full restore), errors.

`make_tiny_run` builds a real work directory with the project's components (init_params ->
save_hf as the base, a chatml tokenizer, a method's init, a few optax steps over `llama.forward`,
Checkpointer.save of {"trainable", "opt_state", "step", "rng"}, write_run_json), independent of
the trainer CLI; test_export.py and test_generate.py reuse it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import peft
from sft_jax.checkpoint import Checkpointer
from sft_jax.config import default_config
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig
from sft_jax.models.hf_io import save_hf
from sft_jax.optim import make_optimizer
from sft_jax.workdir import WorkdirError, available_steps, load_run, method_rng, read_run_json, write_run_json


def tiny_tokenizer():
    from sft_jax.data.templates import prepare_tokenizer
    from sft_jax.data.testing import tiny_fast_tokenizer

    tok, _ = prepare_tokenizer(tiny_fast_tokenizer(400), "chatml", add_tokens=True)
    return tok


def make_tiny_run(workdir, *, rank: int = 4, steps: int = 3, save_steps=(3,), seed: int = 0, rslora: bool = False,
                  targets: str = "all-linear"):
    """A trained tiny Llama run in `workdir` (LoRA when rank > 0, else full fine-tuning).
    Returns dict(config=ModelConfig, base=params, trainable=final tree, tokenizer, eos_ids)."""
    workdir = str(workdir)
    tok = tiny_tokenizer()
    mc = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = llama.init_params(mc, jax.random.PRNGKey(seed))
    base_dir = os.path.join(workdir, "base_model")
    save_hf(base_dir, mc, params)
    tok.save_pretrained(os.path.join(workdir, "tokenizer"))

    cfg = default_config()
    cfg.model.path = base_dir
    cfg.data.template = "chatml"
    cfg.peft.method = "lora" if rank > 0 else "full"
    if rank > 0:
        cfg.peft.lora.rank, cfg.peft.lora.alpha, cfg.peft.lora.rslora, cfg.peft.lora.targets = rank, 8.0, rslora, targets
    cfg.train.lr, cfg.train.steps, cfg.train.warmup_steps = 2e-2, steps, 0
    method = peft.from_config(cfg.peft)
    trainable, frozen = method.init(params, mc, method_rng(cfg.to_dict()))
    opt, _ = make_optimizer(cfg.train, total_steps=steps)
    opt_state = opt.init(trainable)

    def loss_fn(tr, x):
        logits = method.forward(tr, frozen, mc, x[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))

    @jax.jit
    def step_fn(tr, os_, x):
        g = jax.grad(loss_fn)(tr, x)
        up, os_ = opt.update(g, os_, tr)
        import optax

        return optax.apply_updates(tr, up), os_

    rng = np.random.default_rng(seed)
    ckpt = Checkpointer(workdir, keep=5, async_save=False)
    saved = {}
    for s in range(1, steps + 1):
        x = jnp.asarray(rng.integers(3, len(tok), size=(4, 17)), jnp.int32)
        trainable, opt_state = step_fn(trainable, opt_state, x)
        if s in save_steps:
            state = {"trainable": trainable, "opt_state": opt_state, "step": jnp.int32(s), "rng": jax.random.key(s)}
            ckpt.save(s, state, meta={"step": s}, force=True)
            ckpt.wait()
            saved[s] = (trainable, opt_state)
    ckpt.close()
    from sft_jax.data.templates import stop_token_ids

    eos_ids = stop_token_ids(tok, "chatml")
    write_run_json(workdir, base_model=base_dir, template="chatml", method=method, model_policy=cfg.model,
                   eos_ids=eos_ids, config=cfg)
    return dict(config=mc, base=params, trainable=trainable, saved=saved, tokenizer=tok, eos_ids=eos_ids, method=method)


_SHARED: dict = {}


def shared_lora_run(tmp_path_factory):
    """One trained LoRA run (rsLoRA, r=4, alpha=8, checkpoints of steps 2 and 3) shared by the
    workdir/export/generate tests of a session (read-only: nothing writes into it)."""
    if "lora" not in _SHARED:
        wd = tmp_path_factory.mktemp("wd_lora")
        _SHARED["lora"] = (wd, make_tiny_run(wd, steps=3, save_steps=(2, 3), rslora=True))
    return _SHARED["lora"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_lora_run(tmp_path_factory)


def _eq(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_run_json_round_trip(tmp_path):
    cfg = default_config()
    base = tmp_path / "base_model"
    base.mkdir()
    p = write_run_json(tmp_path, base_model=str(base), template="chatml",
                       method=peft.Lora(rank=8, alpha=16, rslora=True, targets="q_proj,v_proj"),
                       model_policy={"dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True},
                       eos_ids=[5, 2], config=cfg)
    run = read_run_json(tmp_path)
    assert json.load(open(p)) == run
    assert run["format"] == 2 and run["base_model"] == "base_model"  # inside the workdir: kept relative
    assert run["peft"] == {"method": "lora", "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "rslora": True,
                                                      "targets": "q_proj,v_proj"}}
    assert run["model"] == {"dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True, "kernels": "auto"}
    assert run["eos_ids"] == [5, 2] and run["tokenizer"] == "tokenizer" and run["template"] == "chatml"
    assert run["config"] == json.loads(json.dumps(cfg.to_dict()))


def test_load_run_latest_and_explicit_step(tiny_run):
    wd, made = tiny_run
    assert available_steps(wd) == [2, 3]
    run = load_run(wd)
    assert run.step == 3 and run.method == made["method"]
    assert _eq(run.trainable, made["saved"][3][0])
    assert _eq(run.frozen, made["base"])
    b = run.trainable["layers_0"]["attn"]["q_proj"]["B"]
    assert float(jnp.abs(b).max()) > 0  # trained: B moved off zero
    assert run.opt_state is None and run.eos_ids == made["eos_ids"]
    tok = run.tokenizer
    assert tok.convert_ids_to_tokens(run.eos_ids) == ["<|im_end|>", "</s>"]
    assert "<|im_start|>" in run.chat_template()
    run2 = load_run(wd, step=2)
    assert run2.step == 2 and _eq(run2.trainable, made["saved"][2][0])


def test_load_run_with_opt_state(tiny_run):
    wd, made = tiny_run
    run = load_run(wd, with_opt_state=True, load_tokenizer=False)
    want = made["saved"][3][1]
    assert jax.tree.structure(run.opt_state) == jax.tree.structure(want)
    assert _eq(run.opt_state, want)
    assert np.asarray(run.rng).dtype == np.uint32  # raw key data, as saved


def test_load_run_errors(tiny_run, tmp_path):
    wd, _ = tiny_run
    with pytest.raises(WorkdirError, match="work directory not found"):
        load_run(tmp_path / "nope")
    with pytest.raises(WorkdirError, match=r"step 7 not found .*available: 2, 3"):
        load_run(wd, step=7)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkdirError, match="run.json not found"):
        load_run(empty)
    import shutil

    shutil.copy(wd / "run.json", empty / "run.json")
    os.symlink(wd / "base_model", empty / "base_model")  # base_model is relative to the workdir
    with pytest.raises(WorkdirError, match="no checkpoints"):
        load_run(empty)

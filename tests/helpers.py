"""Shared test scaffolding (imported by the test modules as `helpers`; not collected: no test_ prefix).

* `rel`: max relative difference.
* CLI subprocesses: `cli_env` (the environment of a `python -m sft_jax.*` child: one CPU device, the
  session's XLA cache from conftest), `run_module` (`python -m ...`, asserting exit 0), `kill_at_checkpoint`
  (start a training, SIGKILL it once a checkpoint of step >= N exists).
* Tiny random HF Llama for the method-vs-peft tests: `save_tiny_llama`, `hf_llama`, `torch_logits`, `hf_module`.
* `mesh_step_results`: two train steps of a method on the data / fsdp / tensor meshes of 8 fake devices.
* Tiny random HF models of other families (test_gemma, test_rope_phi3): `save_random_hf`, `lazy_builder`,
  `rand_ids`, `hf_logits_1d`, `jit_forward`.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def rel(a, b) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------ CLI subprocesses
def cli_env(devices: int | None = 1, **extra) -> dict:
    """os.environ for a CLI child: `devices` fake CPU devices (None: as this process, i.e. conftest's 8), CPU
    platform, the session's compilation cache (conftest), no tokenizer threads; `extra` on top."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["SFT_JAX_COMPILATION_CACHE"] = os.environ.get("SFT_JAX_COMPILATION_CACHE", "off")  # conftest: the session's cache
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def run_module(*args, cwd=REPO, env=None, timeout=900, ok=True) -> subprocess.CompletedProcess:
    """`python -m ARGS` in `cwd` (default: the checkout) with `cli_env()`; exit 0 asserted unless ok=False."""
    p = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=cli_env() if env is None else env,
                       capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{args[:2]} exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def kill_at_checkpoint(cmd, workdir, min_step: int, *, cwd=REPO, env=None, deadline_s: float = 600) -> None:
    """Start `cmd` (an argv list), SIGKILL it as soon as `workdir/checkpoints/<step>` with step >= min_step
    exists; fails the test if the run ends before that."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=cli_env() if env is None else env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + deadline_s
    try:
        while time.time() < deadline:
            ck = pathlib.Path(workdir) / "checkpoints"
            done = [p for p in ck.iterdir() if p.name.isdigit()] if ck.exists() else []
            if any(int(p.name) >= min_step for p in done):
                break
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------ tiny random HF Llama (methods vs peft)
IDS = np.array([[1, 17, 40, 9, 25, 7, 3, 30, 12, 41, 5, 60], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 20, 39]])


def save_tiny_llama(d, *, attention_bias: bool = False, nonzero_biases: bool = False) -> pathlib.Path:
    """A tiny random HF Llama (vocab 64, hidden 32, 2 layers, GQA 4/2, untied) saved with save_pretrained into
    `d`; matrices x5 (larger than the 0.02 init, so that adapters change the logits visibly); with
    `nonzero_biases` the (zero-initialised) biases get 0.1 N(0, 1)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   **({"attention_bias": True} if attention_bias else {}))
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
            if nonzero_biases and p.ndim == 1 and p.abs().max() == 0:
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(str(d), safe_serialization=True)
    return pathlib.Path(d)


def hf_llama(path):
    """transformers' LlamaForCausalLM from `path`, float32, eager attention, eval mode."""
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def torch_logits(model, ids=IDS):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def hf_module(path) -> str:
    """Our module path ('layers_0', 'attn', 'q_proj') -> the HF module name."""
    layer, group, proj = path
    return f"model.layers.{layer.split('_')[1]}.{'self_attn' if group == 'attn' else 'mlp'}.{proj}"


# ------------------------------------------------------------------ meshes
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]


def mesh_step_results(config, method, trainable, frozen, meshes=MESHES):
    """Two train steps (batch 16 x 16 random tokens, adam lr 1e-2) on each (data, fsdp, tensor) mesh of the fake
    CPU devices -> [(trainable after the steps as numpy, loss 1, loss 2)] in `meshes` order."""
    import jax
    import ml_collections

    from sft_jax import sharding
    from sft_jax.optim import make_optimizer
    from sft_jax.train_step import make_train_step

    rng = np.random.default_rng(0)
    seq = rng.integers(0, config.vocab_size, size=(16, 17)).astype(np.int32)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((16, 16), np.float32),
             "segment_ids": np.ones((16, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (16, 16)).copy()}
    tcfg = ml_collections.ConfigDict(dict(lr=1e-2, end_lr=0.0, schedule="constant", warmup_steps=0, b1=0.9,
                                          b2=0.999, eps=1e-3, weight_decay=0.0, grad_clip=1.0))
    opt, sched = make_optimizer(tcfg, 10)
    results = []
    for shape in meshes:
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:int(np.prod(shape))])
        steps = make_train_step(config, mesh, trainable=trainable, frozen=frozen, optimizer=opt, schedule=sched,
                                method=method, batch_size=16)
        sh = steps.shardings
        tr = jax.device_put(jax.tree.map(np.asarray, trainable), sh.trainable)
        st = sharding.init_opt_state(opt, tr, sh.opt_state)
        fr = jax.device_put(frozen, sh.frozen)
        new, st, m = steps.train_step(tr, fr, st, jax.device_put(batch, sh.batch), jax.random.key(0))
        new, st, m2 = steps.train_step(new, fr, st, jax.device_put(batch, sh.batch), jax.random.key(1))
        results.append((jax.tree.map(np.asarray, new), float(m["loss"]), float(m2["loss"])))
    return results


def assert_equal_across_meshes(results, meshes=MESHES, tol=1e-5):
    """The loss falls on the first mesh; every other mesh gives its losses and trees within `tol` (relative)."""
    import jax

    ref, l1, l2 = results[0]
    assert l2 < l1
    for (tree, a, b), shape in zip(results[1:], meshes[1:]):
        assert rel(a, l1) <= tol and rel(b, l2) <= tol, shape
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
            assert rel(x, y) <= tol, shape


# ------------------------------------------------------------------ tiny random HF models of other families
def hf_model_class(path, classes: dict):
    """transformers' class for the model_type of `path`/config.json (`classes`: model_type -> class name)."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        return getattr(transformers, classes[json.load(f)["model_type"]])


def save_random_hf(cfg, classes: dict, d, *, norm, other=0.15, eager=False) -> None:
    """transformers' model for `cfg` with parameters drawn again (seed 0): norms `norm(p)`, the rest
    `other` N(0, 1); saved into `d`."""
    import torch
    import transformers

    torch.manual_seed(0)
    if eager:
        cfg._attn_implementation = "eager"
    model = getattr(transformers, classes[cfg.model_type])(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(norm(p) if "norm" in n else other * torch.randn_like(p))
    model.save_pretrained(d)


def lazy_builder(tmp_path_factory, make):
    """get(name) -> a directory made once with make(name, dir) (for a module-scoped fixture)."""
    cache = {}

    def get(name):
        if name not in cache:
            d = str(tmp_path_factory.mktemp(name))
            make(name, d)
            cache[name] = d
        return cache[name]

    return get


def rand_ids(n, seed=0, low=3, high=96):
    return np.random.default_rng(seed).integers(low, high, size=n).astype(np.int32)


def hf_logits_1d(model, ids):
    """transformers' logits [T, V] (float32 numpy) of one sequence `ids` [T]."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


@functools.lru_cache(maxsize=None)
def jit_forward():
    """jax.jit(sft_jax.models.forward) with the model config static."""
    import jax

    from sft_jax.models import forward

    return jax.jit(forward, static_argnums=1)


def hf_greedy(model, prompt, n):
    """transformers' greedy continuation (n new tokens, no eos stop) of one prompt (a list of ids)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], dtype=torch.long), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def assert_safetensors_equal(dir_a, dir_b) -> dict:
    """`model.safetensors` of two directories: the same tensor names, bitwise equal values -> dir_b's tensors."""
    from safetensors.numpy import load_file

    a, b = (load_file(os.path.join(str(d), "model.safetensors")) for d in (dir_a, dir_b))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    return b

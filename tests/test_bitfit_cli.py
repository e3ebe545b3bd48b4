"""`python -m sft_jax.train --config.peft.method=bitfit` on stories260K (converted with sft_jax.convert): held-out
loss falls; SIGKILL after a checkpoint and resume gives the uninterrupted run's losses bitwise; `--format=merged`
(a bias-free Llama widened to attention_bias / mlp_bias) has the workdir's logits in transformers and its greedy
continuation is `sft_jax.generate --workdir`'s; `--format=peft` refuses with the reason; `--format=gguf` carries the biases (llama.cpp's reading). One trained run shared by
the module; the conversion is conftest's `stories260k_cli`; exports and generation run in-process (their `main`), the trainer as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import kill_at_checkpoint, run_module

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow




def _train_args(shared_dir, base, wd):
    return ["sft_jax.train", "--config=configs/lima.py", f"--workdir={wd}", f"--config.model.path={base}",
            f"--config.data.path={shared_dir / 'data' / 'alpaca_en_demo.json'}", "--config.data.template=chatml",
            "--config.data.max_length=256", "--config.data.eval_fraction=0.1", "--config.train.steps=20",
            "--config.train.epochs=0", "--config.train.batch_size=8", "--config.train.lr=2e-2",
            "--config.train.end_lr=2e-2", "--config.train.warmup_steps=0", "--config.train.weight_decay=0",
            "--config.model.dtype=float32", "--config.model.param_dtype=float32", "--config.model.remat=none",
            "--config.peft.method=bitfit", "--config.eval.every_steps=0", "--config.eval.max_batches=4",
            "--config.eval.num_generations=0", "--config.checkpoint.every_steps=5",
            "--config.checkpoint.async_save=False"]


def _losses(wd):
    with open(wd / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


@pytest.fixture(scope="module")
def run(shared_dir, stories260k_cli, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bitfit_cli")
    base = stories260k_cli  # read-only (conftest)
    assert not json.loads((base / "config.json").read_text()).get("attention_bias")  # a bias-free family
    wd = tmp / "wd"
    run_module(*_train_args(shared_dir, base, wd))
    return tmp, base, wd


def test_eval_loss_falls_and_resume_is_exact(run, shared_dir, repo_dir):
    tmp, base, wd = run
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.1, summary
    assert json.loads((wd / "run.json").read_text())["peft"] == {"method": "bitfit", "bitfit": {"targets": "all-linear"}}
    wd2 = tmp / "killed"
    kill_at_checkpoint([sys.executable, "-m", *_train_args(shared_dir, base, wd2)], wd2, 5, cwd=repo_dir)
    assert max(_losses(wd2)) < 20
    run_module(*_train_args(shared_dir, base, wd2))  # resume=auto
    assert _losses(wd2) == _losses(wd)  # bitwise, every step


def test_exports_and_generate(run, capsys):
    import jax.numpy as jnp

    from sft_jax import export, generate
    from sft_jax.models import llama

    tmp, _, wd = run
    gen = generate.load_workdir(str(wd))
    ids = np.array([[1, 403, 29, 96, 77, 310, 49, 8, 120, 261]])
    ours = np.asarray(llama.forward(gen.params, gen.config, jnp.asarray(ids), method=gen.method,
                                    method_vars=gen.method_vars))
    assert export.main([f"--workdir={wd}", f"--out={tmp / 'merged'}", "--format=merged"]) == 0
    hc = json.loads((tmp / "merged" / "config.json").read_text())
    assert hc["attention_bias"] is True and hc["mlp_bias"] is True
    from sft_jax.cli import run_cli

    capsys.readouterr()
    assert run_cli(export.main, [f"--workdir={wd}", f"--out={tmp / 'peft'}", "--format=peft"],
                   "python -m sft_jax.export") == 2  # the CLI's path: one line on stderr, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the PEFT library has no BitFit method" in err[0], err
    assert not (tmp / "peft").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "merged"), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert float(np.max(np.abs(got - ours)) / np.max(np.abs(ours))) < 1e-4
    assert float(np.max(np.abs(ours - np.asarray(llama.forward(gen.params, gen.config, jnp.asarray(ids)))))) > 1e-3
    # GGUF: the merged export converted; llama.cpp's llama graph adds the optional q/k/v/o and FFN biases
    # (test_gguf_export's numpy reader of the file, the llama.cpp way, is the reference)
    from test_gguf_export import _llama_cpp_forward

    assert export.main([f"--workdir={wd}", f"--out={tmp / 'gguf'}", "--format=gguf", "--dtype=f32"]) == 0
    got = _llama_cpp_forward(tmp / "gguf" / "model-f32.gguf", ids)
    assert float(np.max(np.abs(got - ours)) / np.max(np.abs(ours))) < 1e-4
    capsys.readouterr()
    assert generate.main([f"--workdir={wd}", "--prompt=Tell me a story.", "--max_new_tokens=12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["generations"][0]
    assert len(out["ids"]) > 0
    with torch.no_grad():
        p = torch.tensor([out["prompt_ids"]])
        cont = hf.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=len(out["ids"]),
                           do_sample=False)[0, p.shape[1]:].tolist()
    assert cont == out["ids"]

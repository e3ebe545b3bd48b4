"""`python -m sft_jax.train --config.peft.method=ia3` on stories260K (converted with sft_jax.convert): held-out
loss falls; SIGKILL after a checkpoint and resume gives the uninterrupted run's losses bitwise; the PEFT export
loads with `PeftModel.from_pretrained` and continues greedily as `sft_jax.generate`; the merged export has the
workdir's logits in transformers. One trained run shared by the module."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from helpers import kill_at_checkpoint, run_module

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _cli(cwd, *args, timeout=900):
    return run_module(*args, cwd=cwd, timeout=timeout).stdout


def _train_args(shared_dir, base, wd):
    return ["sft_jax.train", "--config=configs/lima.py", f"--workdir={wd}", f"--config.model.path={base}",
            f"--config.data.path={shared_dir / 'data' / 'alpaca_en_demo.json'}", "--config.data.template=chatml",
            "--config.data.max_length=256", "--config.data.eval_fraction=0.1", "--config.train.steps=20",
            "--config.train.epochs=0", "--config.train.batch_size=8", "--config.train.lr=3e-2",
            "--config.train.end_lr=3e-2", "--config.train.warmup_steps=0", "--config.model.dtype=float32",
            "--config.model.param_dtype=float32", "--config.model.remat=none", "--config.peft.method=ia3",
            "--config.eval.every_steps=0", "--config.eval.max_batches=4", "--config.eval.num_generations=0",
            "--config.checkpoint.every_steps=5", "--config.checkpoint.async_save=False"]


def _losses(wd):
    with open(wd / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


@pytest.fixture(scope="module")
def run(shared_dir, repo_dir, tmp_path_factory, stories260k_cli):
    tmp = tmp_path_factory.mktemp("ia3_cli")
    base = stories260k_cli  # converted with `python -m sft_jax.convert llama2c` once per session (conftest)
    wd = tmp / "wd"
    _cli(repo_dir, *_train_args(shared_dir, base, wd))
    return tmp, base, wd


def test_eval_loss_falls_and_resume_is_exact(run, shared_dir, repo_dir):
    tmp, base, wd = run
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.1, summary
    assert json.loads((wd / "run.json").read_text())["peft"]["method"] == "ia3"
    wd2 = tmp / "killed"
    kill_at_checkpoint([sys.executable, "-m", *_train_args(shared_dir, base, wd2)], wd2, 5, cwd=repo_dir)
    assert max(_losses(wd2)) < 20
    _cli(repo_dir, *_train_args(shared_dir, base, wd2))  # resume=auto
    assert _losses(wd2) == _losses(wd)  # bitwise, every step


def test_exports_and_generate(run, repo_dir):
    import jax.numpy as jnp

    from sft_jax import generate
    from sft_jax.models import llama

    tmp, _, wd = run
    gen = generate.load_workdir(str(wd))
    ids = np.array([[1, 403, 29, 96, 77, 310, 49, 8, 120, 261]])
    ours = np.asarray(llama.forward(gen.params, gen.config, jnp.asarray(ids), method=gen.method,
                                    method_vars=gen.method_vars))
    _cli(repo_dir, "sft_jax.export", f"--workdir={wd}", f"--out={tmp / 'peft'}", "--format=peft")
    _cli(repo_dir, "sft_jax.export", f"--workdir={wd}", f"--out={tmp / 'merged'}", "--format=merged")

    def hf(p):
        return transformers.LlamaForCausalLM.from_pretrained(str(p), dtype=torch.float32,
                                                             attn_implementation="eager").eval()

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    peft_base = json.loads((tmp / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    pm = peft.PeftModel.from_pretrained(hf(peft_base), str(tmp / "peft")).eval()
    with torch.no_grad():
        assert rel(pm(input_ids=torch.tensor(ids)).logits.numpy(), ours) < 1e-4
        assert rel(hf(tmp / "merged")(input_ids=torch.tensor(ids)).logits.numpy(), ours) < 1e-4
    out = json.loads(_cli(repo_dir, "sft_jax.generate", f"--workdir={wd}", "--prompt=Tell me a story.",
                          "--max_new_tokens=10", "--json"))["generations"][0]
    assert len(out["ids"]) > 0
    with torch.no_grad():
        p = torch.tensor([out["prompt_ids"]])
        cont = pm.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=len(out["ids"]),
                           do_sample=False)[0, p.shape[1]:].tolist()
    assert cont == out["ids"]

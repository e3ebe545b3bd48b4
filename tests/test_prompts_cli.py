"""Prompt tuning, P-tuning and prefix tuning end to end through the CLIs on the real stories260K base
(`../shared`, converted with `sft_jax.convert llama2c`): train with the configs/ presets (eval loss
falls), generate from the work directory and from the PEFT export (`--model --adapter`), export PEFT (merged export refuses with the reason), and
the PEFT adapter on the transformers base continues greedily as `sft_jax.generate` does; an exact
resume after SIGKILL (prompt tuning: the method that lengthens the input; the others save and restore
their trainable trees through the same path)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from helpers import kill_at_checkpoint, run_module
from test_train import _metrics, _train_losses

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = [1, 100, 200, 300, 42]
STEPS = 30
VIRTUAL = {"prompt_tuning": 10, "p_tuning": 10, "prefix_tuning": 0}


def _run(*args, timeout=900, ok=True):
    return run_module(*args, timeout=timeout, ok=ok)


@pytest.fixture(scope="module")
def stories(stories260k_cli):
    """stories260K converted with `python -m sft_jax.convert llama2c`, once per session (conftest)."""
    return stories260k_cli


def _args(method, workdir, base, data):
    n = f"--config.peft.{method}.num_virtual_tokens=10"
    return ["sft_jax.train", f"--config=configs/lima_{method}.py", f"--workdir={workdir}",
            f"--config.model.path={base}", f"--config.data.path={data}", n,
            "--config.data.template=chatml", "--config.data.max_length=128", f"--config.train.steps={STEPS}",
            "--config.train.batch_size=8", "--config.train.warmup_steps=2", "--config.model.dtype=float32",
            "--config.model.param_dtype=float32", "--config.model.remat=none", "--config.eval.every_steps=15",
            "--config.eval.max_batches=2", "--config.eval.num_generations=0", "--config.checkpoint.every_steps=5",
            "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def runs(stories, shared_dir, tmp_path_factory):
    """{method: work directory} trained STEPS steps with the preset."""
    out = {}
    for method in VIRTUAL:
        wd = tmp_path_factory.mktemp(method) / "run"
        _run(*_args(method, wd, stories, shared_dir / "data/lima.json"))
        out[method] = wd
    return out


def _generate(*source) -> list[int]:
    out = _run("sft_jax.generate", *source, f"--prompt_ids={','.join(map(str, PROMPT))}",
               "--temperature=0", "--max_new_tokens=24", "--json").stdout
    return json.loads(out.strip().splitlines()[-1])["generations"][0]["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(VIRTUAL))
def test_train_generate_export_and_peft_continuation(runs, tmp_path, method):
    wd = runs[method]
    evals = [r["eval_loss"] for r in _metrics(wd) if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.05, evals
    run = json.loads((wd / "run.json").read_text())
    assert run["peft"]["method"] == method
    ours = _generate(f"--workdir={wd}")
    assert len(ours) >= 8
    merged = _run("sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'merged'}", "--format=merged", ok=False)
    assert merged.returncode != 0 and "no merged model" in (merged.stdout + merged.stderr)
    _run("sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'adapter'}", "--format=peft")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING",
                                "prefix_tuning": "PREFIX_TUNING"}[method]

    # sft_jax.generate from the PEFT export on the base model gives the same continuation
    again = _generate(f"--model={wd / 'base_model'}", f"--adapter={tmp_path / 'adapter'}")
    n = min(len(again), len(ours))  # (the two sources may know different stop ids)
    assert n >= 8 and again[:n] == ours[:n], (again, ours)

    base = transformers.AutoModelForCausalLM.from_pretrained(str(wd / "base_model"), dtype=torch.float32)
    served = peft_lib.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = list(PROMPT)
    with torch.no_grad():  # PeftModel's forward on the whole sequence per token (see test_prompts.py on generate)
        for _ in range(len(ours)):
            lg = served(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            ids.append(int(lg[0, -1].argmax()))
    assert ids[len(PROMPT):] == ours


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning"])
def test_exact_resume_after_sigkill(runs, stories, shared_dir, tmp_path, method):
    ref = _train_losses(runs[method])
    assert len(ref) == STEPS
    wd = tmp_path / "killed"
    args = _args(method, wd, stories, shared_dir / "data/lima.json")
    kill_at_checkpoint([sys.executable, "-m", *args], wd, 10)
    assert max(r["step"] for r in _metrics(wd) if "loss" in r) < STEPS
    _run(*args)  # resume=auto
    losses = _train_losses(wd)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref, [(s, losses[s], ref[s]) for s in losses if losses[s] != ref[s]][:3]
    np.testing.assert_array_equal(sorted(losses), sorted(ref))

"""QLoRA (and QDoRA) end to end through the CLIs on the real stories260K base (`../shared`), converted with
`sft_jax.convert llama2c`: train a few dozen steps (eval loss falls), generate, export; the exported
adapter on transformers' bitsandbytes NF4 base (PEFT, CPU) continues greedily exactly as
`sft_jax.generate` does on the work directory.

stories260K's MLP is 172 wide, not a multiple of the 64-value block: bitsandbytes quantises the
flattened weight (blocks cross rows), and so do we (tests/test_quant.py). bitsandbytes' bfloat16 CPU
inference kernel is turned off on the transformers side (see test_qlora.load_bnb): its float32 path is
the one that computes what the adapter was trained on.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from helpers import run_module
from test_qlora import load_bnb
from test_train import _metrics

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
peft_lib = pytest.importorskip("peft")

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = [1, 100, 200, 300, 42]


def _run(*args, timeout=900):
    return run_module(*args, timeout=timeout).stdout


@pytest.fixture(scope="module")
def stories(stories260k_cli):
    """stories260K converted with `python -m sft_jax.convert llama2c`, once per session (conftest)."""
    return stories260k_cli


def _train(workdir, base, quant_type, data, method="qlora"):
    _run("sft_jax.train", "--config=configs/lima_lora.py", f"--workdir={workdir}", f"--config.model.path={base}",
         f"--config.data.path={data}",
         f"--config.peft.method={method}", f"--config.peft.qlora.quant_type={quant_type}",
         "--config.data.template=chatml", "--config.data.max_length=128", "--config.train.steps=30",
         "--config.train.batch_size=8", "--config.train.lr=2e-3", "--config.train.warmup_steps=2",
         "--config.model.dtype=float32", "--config.model.param_dtype=float32", "--config.model.remat=none",
         "--config.eval.every_steps=30", "--config.eval.max_batches=2", "--config.eval.num_generations=0",
         "--config.checkpoint.every_steps=30")
    evals = [r["eval_loss"] for r in _metrics(workdir) if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.3, evals
    run = json.loads((pathlib.Path(workdir) / "run.json").read_text())
    assert run["peft"]["method"] == method and run["peft"]["qlora"]["quant_type"] == quant_type


def _generate(workdir) -> list[int]:
    out = _run("sft_jax.generate", f"--workdir={workdir}", f"--prompt_ids={','.join(map(str, PROMPT))}",
               "--temperature=0", "--max_new_tokens=32", "--json")
    gen = json.loads(out.strip().splitlines()[-1])["generations"][0]
    return gen["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_qlora_nf4_cli_and_greedy_continuation_on_bitsandbytes(stories, shared_dir, tmp_path, method):
    """qlora: LoRA, qdora: DoRA (peft's use_dora on the bnb base) on the NF4 base."""
    wd = tmp_path / "run"
    _train(wd, stories, "nf4", shared_dir / "data/lima.json", method)
    ours = _generate(wd)
    assert len(ours) >= 8
    _run("sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'adapter'}", "--format=peft")
    _run("sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'merged'}", "--format=merged")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert bool(cfg.get("use_dora")) == (method == "qdora")

    base = wd / "base_model"  # the trainer added the chat template's tokens (vocab 514) and saved the base
    served = peft_lib.PeftModel.from_pretrained(load_bnb(str(base)), str(tmp_path / "adapter"))
    with torch.no_grad():
        out = served.generate(torch.tensor([PROMPT]), max_new_tokens=len(ours), do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(PROMPT):].tolist()
    assert theirs == ours, (theirs, ours)

    # the merged export (dequantised base + adapter) continues the same way in plain transformers
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        out = merged.generate(torch.tensor([PROMPT]), max_new_tokens=len(ours), do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert out[0, len(PROMPT):].tolist() == ours


@pytest.mark.slow
def test_qlora_int8_cli(stories, shared_dir, tmp_path):
    wd = tmp_path / "run"
    _train(wd, stories, "int8", shared_dir / "data/lima.json")
    assert len(_generate(wd)) >= 8
    _run("sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'adapter'}", "--format=peft")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])

"""`python -m sft_jax.train --config.peft.method=bottleneck` on stories260K (converted with sft_jax.convert):
held-out loss falls; SIGKILL after a checkpoint and resume gives the uninterrupted run's losses bitwise;
`sft_jax.export --format=adapter` + `sft_jax.generate --model=BASE --adapter=DIR` continues exactly as
`sft_jax.generate --workdir` (raw ids and a chat prompt); merged / peft / gguf exports refuse with the reason;
another base is refused. One trained run shared by the module (export and generate run their CLI `main`
in-process)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import kill_at_checkpoint, run_module

pytestmark = pytest.mark.slow

STEPS = 20
PROMPT_IDS = "1,403,29,96,77,310,49,8"




def _train_args(shared_dir, base, wd):
    return ["sft_jax.train", "--config=configs/lima.py", f"--workdir={wd}", f"--config.model.path={base}",
            f"--config.data.path={shared_dir / 'data' / 'alpaca_en_demo.json'}", "--config.data.template=chatml",
            "--config.data.max_length=256", "--config.data.eval_fraction=0.1", f"--config.train.steps={STEPS}",
            "--config.train.epochs=0", "--config.train.batch_size=8", "--config.train.lr=1e-2",
            "--config.train.end_lr=1e-2", "--config.train.warmup_steps=0", "--config.train.weight_decay=0.0",
            "--config.model.dtype=float32", "--config.model.param_dtype=float32", "--config.model.remat=none",
            "--config.peft.method=bottleneck", "--config.peft.bottleneck.size=16",
            "--config.eval.every_steps=0", "--config.eval.max_batches=4", "--config.eval.num_generations=0",
            "--config.checkpoint.every_steps=5", "--config.checkpoint.async_save=False"]


def _losses(wd):
    with open(wd / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


@pytest.fixture(scope="module")
def run(shared_dir, stories260k_cli, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bottleneck_cli")
    base = stories260k_cli  # read-only (conftest)
    wd = tmp / "wd"
    run_module(*_train_args(shared_dir, base, wd))
    return tmp, base, wd


def test_eval_loss_falls_and_resume_is_exact(run, shared_dir, repo_dir):
    tmp, base, wd = run
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.1, summary
    rc = json.loads((wd / "run.json").read_text())["peft"]
    assert rc["method"] == "bottleneck" and rc["bottleneck"]["style"] == "houlsby"
    wd2 = tmp / "killed"
    kill_at_checkpoint([sys.executable, "-m", *_train_args(shared_dir, base, wd2)], wd2, 5, cwd=repo_dir)
    assert max(_losses(wd2)) < STEPS
    run_module(*_train_args(shared_dir, base, wd2))  # resume=auto
    assert _losses(wd2) == _losses(wd)  # bitwise, every step


def _main(capsys, module, *argv):
    from sft_jax.cli import run_cli

    capsys.readouterr()
    code = run_cli(module.main, list(argv), f"python -m {module.__name__}")
    out = capsys.readouterr()
    return code, out.out, out.err


def _gen(capsys, *source, prompt=("--prompt_ids=" + PROMPT_IDS,)):
    from sft_jax import generate

    code, out, err = _main(capsys, generate, *source, *prompt, "--max_new_tokens=16", "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])["generations"][0]


def test_adapter_export_generates_as_the_workdir_and_other_formats_refuse(run, capsys):
    from sft_jax import adapter_format, export, generate

    tmp, base, wd = run
    code, out, err = _main(capsys, export, f"--workdir={wd}", f"--out={tmp / 'adapter'}", "--format=adapter")
    assert code == 0, err
    meta = adapter_format.read_config(str(tmp / "adapter"))
    assert meta["method"]["method"] == "bottleneck" and meta["dtype"] == "float32" and meta["step"] == STEPS
    trained_base = meta["base_model"]["path"]
    assert os.path.isfile(os.path.join(trained_base, "config.json"))
    for prompt in (("--prompt_ids=" + PROMPT_IDS,), ("--prompt=Tell me a story.",)):
        ours = _gen(capsys, f"--workdir={wd}", prompt=prompt)
        again = _gen(capsys, f"--model={trained_base}", f"--adapter={tmp / 'adapter'}", prompt=prompt)
        assert len(ours["ids"]) >= 4 and again["prompt_ids"] == ours["prompt_ids"]
        assert again["ids"] == ours["ids"], (again, ours)
    plain = _gen(capsys, f"--model={trained_base}")
    assert plain["ids"] != ours["ids"]  # the adapter changed the continuation

    for fmt, why in (("merged", "nonlinear"), ("gguf", "nonlinear"), ("peft", "no bottleneck-adapter type")):
        code, out, err = _main(capsys, export, f"--workdir={wd}", f"--out={tmp / fmt}", f"--format={fmt}")
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and why in lines[0] and "--format=adapter" in lines[0], (fmt, err)
        assert not (tmp / fmt).exists()
    if os.path.abspath(trained_base) != os.path.abspath(base):  # chatml's tokens resized the vocabulary
        code, out, err = _main(capsys, generate, f"--model={base}",
                               f"--adapter={tmp / 'adapter'}", "--prompt_ids=1,2", "--max_new_tokens=2")
        assert code == 2 and "vocab_size" in err, err

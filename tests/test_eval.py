"""sft_jax.eval: assistant-token loss equals transformers' on the merged weights, generation metrics
(exact match / ROUGE-L / stop rate / length / repetition) against the model's own generations,
--compare of a work directory with an HF dir (table and JSON), one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer

from sft_jax import eval as eval_lib
from sft_jax.data import pipeline
from sft_jax.models.hf_io import save_hf
from helpers import cli_env
from test_workdir import shared_lora_run

torch = pytest.importorskip("torch")

QUESTIONS = ["Hello there! How are you today?", "What is two plus two?", "Tell me a story about a dog.",
             "Name three colours.", "Is the sky blue?"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return shared_lora_run(tmp_path_factory)


@pytest.fixture(scope="module")
def model(lora_run):
    return eval_lib.load_workdir_model(str(lora_run[0]))


def _rows(answers):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(QUESTIONS, answers)]


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_repetition_and_generation_metrics():
    assert eval_lib.repeated_ngram_share([[1, 2, 3, 4, 1, 2, 3, 4]], n=4) == pytest.approx(1 / 5)
    assert eval_lib.repeated_ngram_share([[7] * 6], n=2) == pytest.approx(4 / 5)
    assert eval_lib.repeated_ngram_share([[1, 2]], n=4) == 0.0
    m = eval_lib.generation_metrics(["the cat sat.", "a  dog", "x"], [[1, 2, 3], [4, 5], [6]],
                                    ["stop", "length", "stop"], ["the cat sat", "a dog ran", "y"])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want_rouge = np.mean([1.0, scorer.score("a dog ran", "a  dog")["rougeL"].fmeasure, 0.0])
    assert m["exact_match"] == pytest.approx(1 / 3) and m["stop_rate"] == pytest.approx(2 / 3)
    assert m["rouge_l"] == pytest.approx(want_rouge) and m["mean_length"] == pytest.approx(2.0)


def test_loss_matches_transformers_on_merged_weights(lora_run, model, tmp_path):
    """The eval loss (trainer template + masking + eval step) == transformers' CE on the assistant tokens."""
    from transformers import AutoModelForCausalLM

    from sft_jax.workdir import load_run

    data = _write(tmp_path / "d.jsonl", _rows(["I am fine.", "Four.", "Once a dog ran.", "Red, green, blue.", "Yes."]))
    cfg = eval_lib.data_config(data, model.data_config)
    got = eval_lib.loss_metrics(model, cfg, num_examples=0, batch_size=2)

    run = load_run(str(lora_run[0]))
    save_hf(str(tmp_path / "merged"), run.model_config, run.merged_params())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), torch_dtype=torch.float32).eval()
    examples, _ = pipeline.examples_for_split(cfg, model.gen.tokenizer, "eval")
    ce = tokens = 0.0
    for ex in examples:
        with torch.no_grad():
            logits = hf(torch.tensor(np.asarray(ex["inputs"])[None])).logits[0].double()
        nll = -torch.log_softmax(logits, -1)[torch.arange(len(ex["targets"])), torch.tensor(np.asarray(ex["targets"]))]
        mask = torch.tensor(np.asarray(ex["loss_mask"]), dtype=torch.float64)
        ce += float((nll * mask).sum())
        tokens += float(mask.sum())
    assert got["tokens"] == int(tokens) and got["examples"] == len(QUESTIONS)
    assert got["loss"] == pytest.approx(ce / tokens, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(ce / tokens), rel=1e-3)


def test_generation_metrics_against_own_greedy_outputs(model, tmp_path):
    """References = the model's own greedy generations: exact match and ROUGE-L are 1, the stop rate
    is the share that ended on a stop id; wrong references score 0."""
    gen = model.gen
    outs = gen.generate_ids([gen.encode_prompt(q) for q in QUESTIONS], max_new_tokens=12)
    own = [gen.decode(o) for o, _ in outs]
    data = _write(tmp_path / "own.jsonl", _rows(own))
    res = eval_lib.evaluate(model, eval_lib.data_config(data, model.data_config), max_new_tokens=12, batch_size=2)
    assert res["exact_match"] == 1.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # 1 for every reference with a word
    assert res["rouge_l"] == pytest.approx(np.mean([scorer.score(t, t)["rougeL"].fmeasure for t in own]))
    assert res["stop_rate"] == pytest.approx(np.mean([why == "stop" for _, why in outs]))
    assert res["mean_length"] == pytest.approx(np.mean([len(o) for o, _ in outs]))
    assert res["repetition"] == pytest.approx(eval_lib.repeated_ngram_share([o for o, _ in outs]))
    wrong = _write(tmp_path / "wrong.jsonl", _rows(["zzqx " * 3] * len(QUESTIONS)))
    res2 = eval_lib.evaluate(model, eval_lib.data_config(wrong, model.data_config), max_new_tokens=12,
                             num_examples=3, batch_size=2)
    assert res2["generations"] == 3 and res2["examples"] == 3 and res2["exact_match"] == 0.0


def _env():
    return cli_env(devices=None)  # this process's fake devices, the session's XLA cache (conftest)


def test_cli_compare_workdir_with_hf_dir(lora_run, tmp_path, repo_dir, capsys):
    wd = str(lora_run[0])
    hf_dir = tmp_path / "base"
    shutil.copytree(os.path.join(wd, "base_model"), hf_dir)
    lora_run[1]["tokenizer"].save_pretrained(str(hf_dir))
    data = _write(tmp_path / "d.jsonl", _rows(["I am fine.", "Four.", "Once a dog ran.", "Red.", "Yes."]))
    out = tmp_path / "r.json"
    rc = eval_lib.main([f"--workdir={wd}", "--step=2", f"--data={data}", f"--compare={hf_dir}", f"--json={out}",
                        "--max_new_tokens=8", "--num_examples=4"])
    assert rc == 0
    table = capsys.readouterr().out
    assert f"{wd}@2" in table and str(hf_dir) in table and "stop_rate" in table and "rouge_l" in table
    res = json.loads(out.read_text())
    assert [m["name"] for m in res["models"]] == [f"{wd}@2", str(hf_dir)]
    a, b = (m["metrics"] for m in res["models"])
    assert a["examples"] == b["examples"] == 4 and a["tokens"] == b["tokens"]  # same data settings for both
    assert a["loss"] != b["loss"]  # the LoRA-trained model differs from its base

    for args, msg in [((f"--workdir={wd}",), "--data=FILE is required"),
                      ((f"--workdir={wd}", f"--data={tmp_path / 'nope.jsonl'}"), "does not exist"),
                      ((f"--workdir={wd}", "--step=7", f"--data={data}"), "step 7 not found"),
                      ((f"--workdir={wd}", "--step=best!", f"--data={data}"), "--step must be"),
                      ((f"--model={hf_dir}", f"--data={data}", f"--compare={tmp_path / 'x'}"), "--compare")]:
        assert eval_lib.run_cli(eval_lib.main, list(args), eval_lib.PROG) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    bad = tmp_path / "bad.jsonl"  # through the module entry point: one line, no traceback
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    p = subprocess.run([sys.executable, "-m", "sft_jax.eval", f"--model={hf_dir}", f"--data={bad}"], cwd=repo_dir,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "bad.jsonl" in p.stderr and "Traceback" not in p.stderr, p.stderr[-800:]
    assert len(p.stderr.strip().splitlines()) == 1


def test_trainer_reports_the_same_generation_metrics():
    from sft_jax import train

    setup = train._GenSetup(tokenizer=None, template="", stop_ids=[2], answers=["a b", "c", "d"],
                            prompts=[[{"role": "user", "content": q}] for q in ("q1", "q2", "q3")],
                            tasks=[None] * 3, tools=[None] * 3)
    texts, ids, finish = ["a b.", "x", "d"], [[5, 6], [7] * 6, [8]], ["stop", "length", "stop"]
    metrics, lines = train._generation_report(setup, texts, ids, finish, show=1)
    want = eval_lib.generation_metrics(texts, ids, finish, setup.answers)
    want.pop("generations")
    assert metrics == want and metrics["stop_rate"] == pytest.approx(2 / 3)
    assert lines[0].startswith("generations (3): stop rate 66.7%, ROUGE-L") and "user: q1" in lines[1]

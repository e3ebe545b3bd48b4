"""Generation: training template, KV cache == full recomputation, batched == one by one (API and CLI),
stop on the end-of-turn token, interactive history, and the stories260K greedy reference via the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sft_jax.generate import Generator, _interactive, load_workdir
from sft_jax.generate import main as generate_main
from sft_jax.sampling import generate_no_cache
from test_workdir import shared_lora_run

N = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_lora_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def gen(run_dir):
    return load_workdir(str(run_dir))


PROMPTS = ["Hello there! How are you today?", "What is two plus two?", "Tell me a story about a dog."]


def test_prompt_uses_training_template(gen):
    tok = gen.tokenizer
    ids = gen.encode_prompt(PROMPTS[0], system="Be nice.")
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": PROMPTS[0]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(gen.eos_ids) == ["<|im_end|>", "</s>"]
    assert gen.method is not None and gen.method.scale == 4.0  # rsLoRA: alpha / sqrt(r)


def test_kv_cache_equals_recompute_and_batched_equals_single(gen):
    prompts = [gen.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # different lengths in one batch
    batched = gen.generate_ids(prompts, max_new_tokens=N)
    for p, (ids, why) in zip(prompts, batched):
        ref = generate_no_cache(gen.params, gen.config, p, max_new_tokens=N, eos_ids=gen.eos_ids, method=gen.method,
                                method_vars=gen.method_vars)
        assert ids == ref
        assert gen.generate_ids([p], max_new_tokens=N) == [(ids, why)]
        assert (why == "length") == (len(ids) == N)


def test_stops_on_end_of_turn(gen):
    p = gen.encode_prompt(PROMPTS[1])
    (ids, why), = gen.generate_ids([p], max_new_tokens=8)
    j = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token not generated before
    g2 = Generator(**{**gen.__dict__, "eos_ids": [ids[j]]})  # pretend it ends the turn
    assert g2.generate_ids([p], max_new_tokens=8) == [(ids[:j], "stop")]


def test_cli_batched_equals_one_by_one(run_dir, gen, capsys):
    def cli(*extra, n=N):
        capsys.readouterr()
        assert generate_main([f"--workdir={run_dir}", f"--max_new_tokens={n}", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["generations"]

    batch = cli(*[f"--prompt={p}" for p in PROMPTS], "--prompt_ids=1,5,6,7")
    assert [g["prompt"] for g in batch] == PROMPTS + [None]
    assert batch[-1]["prompt_ids"] == [1, 5, 6, 7]
    for g in batch[:-1]:
        assert g["prompt_ids"] == gen.encode_prompt(g["prompt"])
        assert g["text"] == gen.tokenizer.decode(g["ids"], skip_special_tokens=True)
    # one by one (each CLI call reloads the run, so only a few)
    assert cli(f"--prompt={PROMPTS[1]}") == [batch[1]]
    assert cli("--prompt_ids=1,5,6,7") == [batch[-1]]
    capsys.readouterr()
    assert generate_main([f"--workdir={run_dir}", f"--max_new_tokens={N}", f"--prompt={PROMPTS[0]}"]) == 0
    assert capsys.readouterr().out == batch[0]["text"] + "\n"  # text mode prints the generation


def test_interactive_keeps_history(gen):
    seen = []
    orig = gen.encode_messages

    class G(Generator):
        def encode_messages(self, messages):
            seen.append([dict(m) for m in messages])
            return orig(messages)

    g = G(**gen.__dict__)
    out = io.StringIO()
    args = SimpleNamespace(system="Be brief.", max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    _interactive(g, args, stdin=io.StringIO("hello\nand again\n/reset\nfresh\n/exit\nignored\n"), stdout=out)
    assert [len(s) for s in seen] == [2, 4, 2]
    assert seen[1][:2] == seen[0] and seen[1][2]["role"] == "assistant" and seen[1][3]["content"] == "and again"
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fresh"}]
    assert "(history cleared)" in out.getvalue()


def test_stories260k_cli_reproduces_llama2c(shared_dir, tmp_path):
    from sft_jax.models.llama2c import convert_llama2c

    d = shared_dir / "assets" / "stories260K"
    expected = (d / "expected_greedy_200.txt").read_text()
    out = tmp_path / "s260"
    convert_llama2c(str(d / "stories260K.bin"), str(d / "tok512.model"), str(out))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "sft_jax.generate", f"--model={out}", "--prompt_ids=1",
                        "--max_new_tokens=200", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)["generations"][0]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(d / "tok512.model"))
    toks = g["ids"]
    if 1 in toks:  # llama2.c run.c stops early if BOS is sampled (as tests/test_llama2c.py compares)
        toks = toks[: toks.index(1)]
    assert sp.decode(toks) == expected
    assert g["text"] == expected

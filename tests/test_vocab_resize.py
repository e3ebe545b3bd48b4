"""Template tokens added to the tokenizer: the embedding grows only when the tokenizer outgrows it.

A model whose vocabulary is padded past its tokenizer (Gemma, Qwen) already has rows for the added ids; the
trainer used to "resize" it to the smaller tokenizer length (a shrink, which crashed in XLA).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _base(d, vocab):
    from sft_jax.data import testing

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok = testing.tiny_fast_tokenizer()
    tok.save_pretrained(d)
    return len(tok)


@pytest.mark.parametrize("pad", [112, 0])
def test_added_template_tokens_resize_only_when_needed(tmp_path, pad):
    from sft_jax import train
    from sft_jax.config import default_config
    from sft_jax.workdir import load_run

    n_tok = _base(str(tmp_path / "base"), 400 + pad)
    assert n_tok == 400
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("red", "blue", "green", "cat")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    c = default_config()
    c.model.init, c.model.path = "pretrained", str(tmp_path / "base")
    c.data.path, c.data.template, c.data.max_length, c.data.eval_fraction = str(data), "chatml", 32, 0.0
    c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 2, 8, 1e-2, 0
    c.peft.method = "lora"
    c.eval.every_steps, c.eval.num_generations = 0, 0
    c.checkpoint.async_save = False
    wd = tmp_path / "run"
    train.run(c, wd)
    run = load_run(wd, param_dtype="float32", dtype="float32", load_tokenizer=True)
    n_after = len(run.tokenizer)
    assert n_after > n_tok  # chatml's markers were added
    want = max(400 + pad, n_after)  # grown to the tokenizer, or the padded rows kept as they were
    assert run.model_config.vocab_size == want
    assert json.load(open(wd / "base_model" / "config.json"))["vocab_size"] == want
    losses = [json.loads(ln)["loss"] for ln in (wd / "metrics.jsonl").read_text().splitlines()
              if ln.strip() and "loss" in json.loads(ln)]
    assert len(losses) == 2 and np.isfinite(losses).all()

"""The embedded default's assets: data set, checkers, tokenizer, model config."""

import hashlib
import pathlib

import pytest

from sft_jax import tiny
from sft_jax.config import default_config


@pytest.fixture(scope="module")
def data():
    return tiny.make_tiny_dataset(seed=0, n_train=600, n_eval=80)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, data):
    return tiny.build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), data[0] + data[1])


def test_dataset_deterministic_and_shaped(data):
    train, ev = data
    assert (train, ev) == tiny.make_tiny_dataset(seed=0, n_train=600, n_eval=80)
    assert tiny.make_tiny_dataset(seed=1, n_train=600, n_eval=80)[0] != train
    assert len(train) == 600 and len(ev) == 80
    assert {r["task"] for r in train} == set(tiny.TASKS) == {r["task"] for r in ev}
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 2 for r in train)
    assert any(r["messages"][0]["role"] == "system" for r in train)
    for r in train + ev:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}


def test_heldout_disjoint(data):
    train, ev = data
    train_prompts = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    eval_prompts = [r["messages"][-2]["content"] for r in ev]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not train_prompts & set(eval_prompts)


def test_checkers_accept_reference_and_reject_wrong(data):
    train, ev = data
    for r in train + ev:
        prompt, ref = r["messages"][:-1], r["messages"][-1]["content"]
        assert tiny.score_answer(r["task"], prompt, ref)
        assert tiny.score_answer(r["task"], prompt, " " + ref + "<|im_end|>")
        assert not tiny.score_answer(r["task"], prompt, ref + " x")
        assert not tiny.score_answer(r["task"], prompt, "")
    u = lambda s: [{"role": "user", "content": s}]  # noqa: E731
    assert tiny.score_answer("add", u("What is 12 + 30?"), "42")
    assert not tiny.score_answer("add", u("What is 12 + 30?"), "43")
    assert tiny.score_answer("reverse", u("Reverse: a b c"), "c b a")
    assert not tiny.score_answer("reverse", u("Reverse: a b c"), "a b c")
    assert not tiny.score_answer("upper", u("Uppercase: cat"), "cat")
    assert tiny.score_answer("sort", u("Sort: 3 1 2"), "1 2 3")
    assert tiny.score_answer("count", u("Count the letter a in banana."), "3")
    assert tiny.score_answer("capital", u("Capital of Peru?"), "Lima")
    assert not tiny.score_answer("capital", u("Capital of Peru?"), "Paris")
    assert tiny.score_answer("next_letter", u("Next letter after y?"), "z")
    with pytest.raises(ValueError):
        tiny.score_answer("add", u("Uppercase: cat"), "CAT")


def test_tokenizer_round_trip_and_markers(tok_dir, data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 512
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [tiny.IM_START_ID]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [tiny.IM_END_ID]
    assert tok.eos_token_id == tiny.IM_END_ID and tok.pad_token_id == tiny.PAD_ID
    for r in data[1][:20]:
        text = tiny.render_chatml(r["messages"])
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        out = tok.apply_chat_template(
            r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert out["input_ids"] == ids
        trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert tok.decode(trained) == r["messages"][-1]["content"] + "<|im_end|>"
    for t in ["ünïcødé 你好 🙂", "  two\n\nlines\t"]:
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t


def test_tokenizer_deterministic(tok_dir, data, tmp_path):
    from transformers import AutoTokenizer

    other = tiny.build_tiny_tokenizer(tmp_path / "again", data[0] + data[1])
    digest = lambda d: hashlib.sha256((pathlib.Path(d) / "tokenizer.model").read_bytes()).hexdigest()  # noqa: E731
    assert digest(other) == digest(tok_dir)
    a, b = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(other)
    text = tiny.render_chatml(data[0][3]["messages"])
    assert a.encode(text) == b.encode(text)


def test_model_config_loads_in_transformers():
    import transformers

    cfg = tiny.tiny_model_config(default_config().model.tiny)
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 512
    hf = transformers.LlamaConfig(**cfg)
    assert hf.head_dim == 32 and hf.num_key_value_heads == 2
    with pytest.raises(ValueError):
        tiny.tiny_model_config({**dict(default_config().model.tiny), "num_heads": 3})


def test_tokenizer_uses_data_chatml_template(tok_dir):
    from transformers import AutoTokenizer

    from sft_jax.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.chat_template == get_template("chatml")
    msgs = [{"role": "user", "content": "Reverse: a b"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        tiny.render_chatml(msgs) + "<|im_start|>assistant\n"
    )
    # The inline fallback (used only without sft_jax.data) renders the same text.
    tok.chat_template = tiny.CHATML_TEMPLATE
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        tiny.render_chatml(msgs) + "<|im_start|>assistant\n"
    )


def test_every_table_fact_is_in_training():
    train, ev = tiny.make_tiny_dataset(seed=0, n_train=2000, n_eval=200)
    answers = {m["content"] for r in train for m in r["messages"] if m["role"] == "assistant"}
    for country, capital in tiny.CAPITALS.items():
        assert capital in answers, country
    for r in ev:
        if r["task"] in ("capital", "next_letter", "upper"):
            assert r["messages"][-1]["content"] in answers

"""The trainer's data accounting (issue 19) is exact for every run: a `train.steps` run's block equals an
epoch-counted run's (which reuses the epoch count's pass) on the same data, skips counted by reason, beyond
the first 1000 rows; the batched tokenization pass (`TokenizeFn.many` / `masking.encode_many`) equals the
per-row one.  In process (the trainer's data phase, no model), a tiny fast tokenizer."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from sft_jax import run_config, train
from sft_jax.config import default_config, validate
from sft_jax.data import masking, pipeline, templates
from sft_jax.data.templates import prepare_tokenizer
from sft_jax.data.testing import tiny_fast_tokenizer


def _turn(role, content):
    return {"role": role, "content": content}


def _rows(n: int) -> list[dict]:
    """n rows: most plain (some multi-turn, with a system prompt), and every skip reason and a truncation."""
    rows = []
    for i in range(n):
        k = i % 25
        if k == 3:
            rows.append({"messages": [_turn("user", f"q{i}"), _turn("assistant", "")]})  # empty_assistant
        elif k == 7:
            rows.append({"messages": [_turn("user", f"q{i}"), _turn("assistant", "a"), _turn("user", "?")]})
        elif k == 11:
            rows.append({"messages": [_turn("system", "s"), _turn("user", f"q{i}")]})  # no_assistant
        elif k == 13:  # the prompt fills max_length: nothing trainable is left after truncation
            rows.append({"messages": [_turn("user", "word " * 120), _turn("assistant", "yes")]})
        elif k == 17:  # a long answer: truncated
            rows.append({"messages": [_turn("user", f"q{i}"), _turn("assistant", "long answer " * 40)]})
        elif k == 19:
            rows.append({"messages": [_turn("system", "be brief"), _turn("user", f"what is {i}?"),
                                      _turn("assistant", f"{i}."), _turn("user", "and twice?"),
                                      _turn("assistant", f"{2 * i}.")]})
        else:
            rows.append({"messages": [_turn("user", f"what is {i} plus {i % 7}?"), _turn("assistant", f"{i + i % 7}")]})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("acct")
    (d / "tok").mkdir()
    tok, _ = prepare_tokenizer(tiny_fast_tokenizer(400), "chatml", add_tokens=True)
    tok.save_pretrained(str(d / "tok"))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(1100)))
    (d / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(60)))
    return d, tok


def _cfg(d: pathlib.Path, **train):
    cfg = default_config()
    cfg.model.init = "tiny"  # no model is built here: only the data phase runs
    cfg.data.path, cfg.data.tokenizer, cfg.data.template = str(d / "train.jsonl"), str(d / "tok"), "chatml"
    cfg.data.max_length, cfg.data.eval_fraction, cfg.data.max_skip_fraction = 100, 0.1, 0.5
    cfg.train.batch_size, cfg.eval.num_generations = 8, 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return run_config.parse(validate(cfg))


def _accounting(rc, tok, tmp_path):
    ctx = train.Context(rc, tmp_path, True, None)
    model = train.ModelParts(None, tok, None, None, None, "", [], None)
    return train._build_data(ctx, model, None)


def test_steps_run_accounting_equals_epoch_run(setup, tmp_path):
    d, tok = setup
    by_steps = _accounting(_cfg(d, steps=3, epochs=0), tok, tmp_path)
    by_epochs = _accounting(_cfg(d, steps=0, epochs=1), tok, tmp_path)
    assert by_steps.per_epoch is None and by_epochs.per_epoch > 0  # only the epoch run counted batches
    acc = by_steps.accounting
    assert acc == by_epochs.accounting and acc["partial"] == {}
    train_split, eval_split = acc["splits"]["train"], acc["splits"]["eval"]
    assert train_split["rows"] == 990 and eval_split["rows"] == 110  # every row, not the first 1000 only
    skipped = {k: train_split["skipped"].get(k, 0) + eval_split["skipped"].get(k, 0) for k in
               ("empty_assistant", "no_final_assistant", "no_assistant", "no_trainable_tokens")}
    assert skipped == {k: 44 for k in skipped}  # 1100 / 25 of each kind
    assert train_split["truncated"] + eval_split["truncated"] == 44
    assert train_split["examples"] + eval_split["examples"] == 1100 - 4 * 44
    block = pipeline.format_accounting(acc)
    assert "train: 990 rows read -> " in block and "partial" not in block and "first" not in block, block

    # the batched pass == one tokenizer call per row (TokenizeFn), example by example
    rc = _cfg(d, steps=3, epochs=0)
    fn = pipeline.TokenizeFn(tok, pipeline._template(tok, rc.data), max_length=100, truncation=rc.data.truncation,
                             train_on=rc.data.train_on)
    recs = [g[i] for g in pipeline.split_records(rc.data, "train") for i in range(len(g))][:300]
    for a, b in zip(fn.many(recs), [fn(r) for r in recs]):
        assert a.keys() == b.keys() and a["skip"] == b["skip"] and a["truncated"] == b["truncated"]
        for k in ("inputs", "targets", "loss_mask"):
            assert a[k].dtype == b[k].dtype and a[k].tolist() == b[k].tolist()


def test_named_eval_sets_and_streaming_partial(setup, tmp_path):
    d, tok = setup
    rc = _cfg(d, steps=2, epochs=0)
    rc = rc.replace(data=rc.data.replace(eval_path=f"a={d / 'other.jsonl'},b={d / 'other.jsonl'}"))
    acc = _accounting(rc, tok, tmp_path).accounting
    assert list(acc["splits"]) == ["train", "eval a", "eval b"] and acc["splits"]["train"]["rows"] == 1100
    assert acc["splits"]["eval a"] == acc["splits"]["eval b"] and acc["splits"]["eval a"]["rows"] == 60
    # a streaming source is not counted up front: its first rows, and the block says so
    part = pipeline.account_data(rc.data.replace(streaming=True), tok, limit=500,
                                 eval_configs=[("a", rc.data.replace(eval_path=str(d / "other.jsonl")))])
    assert part["partial"] == {"train": 500} and part["splits"]["train"]["rows"] == 500
    assert "train: 500 rows read (partial: its first 500 rows; a streaming" in pipeline.format_accounting(part)


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "plain"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "all"])
def test_encode_many_equals_encode(template, train_on):
    """Batched == per row for built-ins, and for a template without {% generation %} markers (prefix diff)."""
    tok, _ = prepare_tokenizer(tiny_fast_tokenizer(400), "chatml" if template == "plain" else template,
                               add_tokens=True)
    tmpl = templates.get_template("chatml" if template == "plain" else template)
    if template == "plain":
        tmpl = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tmpl)
        assert not templates.has_generation_markers(tmpl)
    convs = [{"messages": r["messages"], "source": f"x:{i}"} for i, r in enumerate(_rows(50))
             if r["messages"][-1]["role"] == "assistant"]
    many = masking.encode_many(tok, tmpl, convs, train_on)
    for c, (ids, mask) in zip(convs, many):
        ids1, mask1 = masking.encode(tok, tmpl, c["messages"], train_on)
        assert ids.tolist() == ids1.tolist() and mask.tolist() == mask1.tolist() and mask.dtype == mask1.dtype

"""Readers and formats: every format -> the same conversation; bad input -> DataError naming file/line/field."""

import json

import numpy as np
import pytest

from sft_jax.data import formats, templates, testing
from sft_jax.data.formats import DataError


def _write(path, rows, jsonl=True):
    with open(path, "w") as f:
        if jsonl:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        else:
            json.dump(rows, f, indent=2)
    return str(path)


def test_every_format_gives_the_same_conversation(tmp_path):
    rows = testing.conversation_rows()
    convs = {}
    for name, row in rows.items():
        for jsonl in (True, False):
            p = _write(tmp_path / f"{name}.{'jsonl' if jsonl else 'json'}", [row, row], jsonl)
            recs = formats.load_conversations(p)  # format auto-detected
            assert len(recs) == 2
            convs[(name, jsonl)] = recs[0]["messages"]
    for conv in convs.values():
        assert conv == testing.CONVERSATION


def test_prompt_completion_and_alpaca_input(tmp_path):
    p = _write(tmp_path / "pc.jsonl", [{"prompt": "Q?", "completion": "A.", "system": "S"}])
    assert formats.load_conversations(p)[0]["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    p = _write(tmp_path / "al.json", [{"instruction": "Do it", "input": "with this", "output": "Done"}], jsonl=False)
    assert formats.load_conversations(p)[0]["messages"] == [
        {"role": "user", "content": "Do it\nwith this"}, {"role": "assistant", "content": "Done"}]
    # default system prompt only where the row has none
    p = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    assert formats.load_conversations(p, system_prompt="SYS")[0]["messages"][0] == {"role": "system", "content": "SYS"}


def test_file_list_and_directory(tmp_path):
    rows = testing.synthetic_rows(5)
    d = tmp_path / "d"
    d.mkdir()
    a = _write(d / "a.jsonl", rows[:2])
    b = _write(d / "b.json", rows[2:], jsonl=False)
    assert len(formats.load_conversations(f"{a},{b}")) == 5
    assert len(formats.load_conversations(str(d))) == 5
    assert formats.expand_paths(str(d)) == [b.replace("b.json", "a.jsonl"), b]


def test_lima_three_files_identical_tokens_and_masks(shared_dir):
    from sft_jax.config import default_config
    from sft_jax.data import pipeline

    data = shared_dir / "data"
    per_file = [formats.load_conversations(str(data / f)) for f in
                ("lima.json", "lima_sharegpt.jsonl", "lima_messages.jsonl")]
    assert len(per_file[0]) == len(per_file[1]) == len(per_file[2]) == 1029
    assert sum(len(r["messages"]) > 2 for r in per_file[0]) == 29  # the multi-turn ones, history first
    for a, b, c in zip(*per_file):
        assert a["messages"] == b["messages"] == c["messages"], (a["source"], b["source"], c["source"])
    # token level, every row, through the pipeline's own tokenization (tok512 + chatml)
    tok = pipeline.load_tokenizer(str(shared_dir / "assets" / "stories260K" / "tok512.model"))
    tok, _ = templates.prepare_tokenizer(tok, "chatml", add_tokens=False)
    cfg = default_config().data
    cfg.template, cfg.max_length, cfg.eval_fraction = "chatml", 4096, 0.0
    outs = []
    for f in ("lima.json", "lima_sharegpt.jsonl", "lima_messages.jsonl"):
        cfg.path = str(data / f)
        outs.append(pipeline.examples_for_split(cfg, tok))
    assert outs[0][1].summary() == outs[1][1].summary() == outs[2][1].summary()
    for exs in zip(*(o[0] for o in outs)):
        for k in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(exs[0][k], exs[1][k])
            np.testing.assert_array_equal(exs[0][k], exs[2][k])


# ------------------------------------------------------------------------ bad input


def _err(path, match_all, fmt="auto"):
    with pytest.raises(DataError) as e:
        formats.load_conversations(str(path), fmt)
    msg = str(e.value)
    for m in match_all:
        assert m in msg, (m, msg)
    return msg


def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(testing.synthetic_rows(1)[0]) + "\n" + '{"messages": [\n')
    _err(p, [str(p) + ":2", "malformed JSON"])


def test_malformed_json_array(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    _err(p, [str(p) + ":3", "malformed JSON"])


def test_unknown_role(tmp_path):
    rows = testing.synthetic_rows(3)
    rows[2]["messages"][1]["role"] = "robot"
    p = _write(tmp_path / "r.jsonl", rows)
    _err(p, [f"{p}:3", "messages[1].role", "unknown role 'robot'"])
    p = _write(tmp_path / "s.jsonl", [{"conversations": [{"from": "alien", "value": "x"}]}])
    _err(p, [f"{p}:1", "conversations[0].from", "unknown role 'alien'"])


def test_non_string_content(tmp_path):
    rows = testing.synthetic_rows(2)
    rows[1]["messages"][0]["content"] = ["a", "list"]
    p = _write(tmp_path / "c.jsonl", rows)
    _err(p, [f"{p}:2", "messages[0].content", "must be a string"])
    p = _write(tmp_path / "a.json", [{"instruction": "x", "output": 3}], jsonl=False)
    _err(p, [f"{p}:2", "'output'", "must be a string"])


def test_missing_field(tmp_path):
    p = _write(tmp_path / "a.json", [{"instruction": "x", "output": "y"}, {"instruction": "x", "input": ""}], jsonl=False)
    _err(p, [f"{p}:", "missing field 'output'"], fmt="alpaca")
    p = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])
    _err(p, [f"{p}:1", "missing field 'messages[0].content'"])
    p = _write(tmp_path / "x.jsonl", [{"text": "hello"}])
    _err(p, [f"{p}:1", "cannot detect the row format"])


def test_invalid_utf8(tmp_path):
    p = tmp_path / "u.jsonl"
    good = json.dumps(testing.synthetic_rows(1)[0]).encode()
    p.write_bytes(good + b"\n" + good[:20] + b"\xff\xfe" + good[20:] + b"\n")
    _err(p, [f"{p}:2", "invalid UTF-8"])


def test_empty_file_and_missing_path(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n  \n")
    _err(p, [str(p), "empty file"])
    p = tmp_path / "e.json"
    p.write_text("[]")
    _err(p, [str(p), "empty file"])
    _err(tmp_path / "nope.jsonl", ["nope.jsonl", "no such file"])


def test_no_assistant_and_misplaced_system(tmp_path):
    p = _write(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    # issue 19: a counted skip (with its reason), an error naming file:line under data.strict=True
    assert formats.load_conversations(str(p), keep_skipped=False) == []
    assert [r["skip"] for r in formats.load_conversations(str(p), keep_skipped=True)] == ["no_assistant"]
    with pytest.raises(DataError, match=f"{p}:1: the conversation has no assistant message"):
        formats.load_conversations(str(p), strict=True)
    p = _write(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                                                   {"role": "assistant", "content": "a"}]}])
    _err(p, [f"{p}:1", "system message may only come first"])

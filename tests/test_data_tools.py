"""Tool calls and reasoning traces: readers, errors, and the built-in templates against the
families' published chat templates (tests/fixtures/chat_templates, rendered by transformers'
sandboxed renderer) -- same text, same masks, on the same conversations."""

import copy
import json
import pathlib

import numpy as np
import pytest

from sft_jax.config import default_config
from sft_jax.data import formats, masking, pipeline, templates, testing
from sft_jax.data import inspect as data_inspect
from sft_jax.data.formats import DataError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "chat_templates"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call(name, args, cid):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


# one call, its result, the answer (every family's format can hold it)
TOOL_CONV = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}, "call00001")]},
    {"role": "tool", "content": '{"temp": 21, "sky": "sunny"}', "tool_call_id": "call00001"},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
]
# Qwen: a system prompt, text before two parallel calls, two results, reasoning on both turns
QWEN_CONV = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Let me check both.", "reasoning_content": "Two cities: two calls.",
     "tool_calls": [_call("get_weather", {"city": "Paris"}, "c1"), _call("get_weather", {"city": "Rome"}, "c2")]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    {"role": "tool", "content": "rainy", "tool_call_id": "c2"},
    {"role": "assistant", "content": "Paris is sunny, Rome is rainy.", "reasoning_content": "Combine the results."},
]
REASON_CONV = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is four.", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "It is six.", "reasoning_content": "Three and three make six."},
]
# (built-in, published fixture, tool conversation)
FAMILIES = [("qwen2.5", "qwen2_5", QWEN_CONV), ("qwen3", "qwen3", QWEN_CONV),
            ("llama3.1", "llama3_1", TOOL_CONV), ("mistral-v0.3", "mistral_v0_3", TOOL_CONV)]


def _published(stem):
    return (FIXTURES / f"{stem}.jinja").read_text()


@pytest.fixture(scope="module")
def base_tok():
    return testing.tiny_fast_tokenizer()


def _tok(base_tok, name):
    tok, _ = templates.prepare_tokenizer(copy.deepcopy(base_tok), name)
    return tok


def _trainable_text(tok, ids, mask):
    return tok.decode([int(i) for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_fixtures_are_the_published_templates():
    trl = pytest.importorskip("trl")
    shipped = pathlib.Path(trl.__file__).parent / "chat_templates"
    for stem in ("qwen2_5", "qwen3", "llama3_1"):
        assert (shipped / f"{stem}.jinja").read_text() == _published(stem), stem


@pytest.mark.parametrize("name,stem,conv", FAMILIES)
def test_tool_conversations_render_and_mask_as_published(base_tok, name, stem, conv):
    tok, pub = _tok(base_tok, name), _published(stem)
    ours = tok.chat_template
    msgs = masking.prepare_messages(ours, conv, TOOLS)
    assert masking.render(tok, ours, msgs, tools=TOOLS) == masking.render(tok, pub, msgs, tools=TOOLS)
    for i, m in enumerate(msgs):  # every inference prompt (what generation continues) too
        if m["role"] == "assistant":
            assert (masking.render(tok, ours, msgs[:i], add_generation_prompt=True, tools=TOOLS)
                    == masking.render(tok, pub, msgs[:i], add_generation_prompt=True, tools=TOOLS)), (name, i)
    # masks: ours from {% generation %} markers == the published template's by prefix diff
    ids, mask = masking.encode(tok, ours, conv, tools=TOOLS, method="generation")
    ref_ids, ref_mask = masking.encode(tok, pub, conv, tools=TOOLS, method="prefix_diff")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    # loss on the calls and the answers, never on the results or the schema
    trained = _trainable_text(tok, ids, mask)
    assert "get_weather" in trained and "Paris" in trained and conv[-1]["content"] in trained
    assert "sunny" not in trained.replace(conv[-1]["content"], "") and "Get the weather" not in trained
    assert "Get the weather" in tok.decode(list(ids))


@pytest.mark.parametrize("name", [n for n, _, _ in FAMILIES])
def test_trained_tool_call_text_parses_back(base_tok, name):
    """What a tool-call turn trains on is what parse_tool_calls reads back from a generation."""
    tok = _tok(base_tok, name)
    conv = TOOL_CONV[:2]
    ids, mask = masking.encode(tok, tok.chat_template, conv, tools=TOOLS)
    calls = templates.parse_tool_calls(_trainable_text(tok, ids, mask), name)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert templates.parse_tool_calls("It is sunny.", name) == []


def test_generate_tools_file(tmp_path):
    from sft_jax.export import UsageError
    from sft_jax.generate import _read_tools

    (tmp_path / "tools.json").write_text(json.dumps([TOOLS[0]["function"]]))
    assert _read_tools(str(tmp_path / "tools.json")) == TOOLS
    (tmp_path / "bad.json").write_text('[{"type": "function"}]')
    with pytest.raises(UsageError, match="bad.json.*must be a function schema"):
        _read_tools(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name,stem", [(n, s) for n, s, _ in FAMILIES])
def test_plain_conversations_render_as_published(base_tok, name, stem):
    tok, pub = _tok(base_tok, name), _published(stem)
    conv = testing.CONVERSATION[1:] if name == "mistral-v0.3" else testing.CONVERSATION  # see templates.py
    assert masking.render(tok, tok.chat_template, conv) == masking.render(tok, pub, conv)
    prompt = testing.CONVERSATION[:-1]  # the inference prompt, with its system turn, for every family
    assert (masking.render(tok, tok.chat_template, prompt, add_generation_prompt=True)
            == masking.render(tok, pub, prompt, add_generation_prompt=True))


def _spans_after(text, header, end):
    """Char spans from after each ``header`` to the end of the next ``end`` (inclusive)."""
    spans, i = [], 0
    while (i := text.find(header, i)) >= 0:
        a = i + len(header)
        b = text.index(end, a) + len(end)
        spans.append((a, b))
        i = b
    return spans


def test_qwen3_reasoning_kept_on_last_turn_dropped_before(base_tok):
    tok, pub = _tok(base_tok, "qwen3"), _published("qwen3")
    text = masking.render(tok, tok.chat_template, REASON_CONV)
    assert text == masking.render(tok, pub, REASON_CONV)
    assert "Two and two" not in text and "<think>\nThree and three make six.\n</think>\n\nIt is six." in text
    # the mask: everything each assistant turn adds after "<|im_start|>assistant\n", through <|im_end|>
    # (the published template has no markers and is not prefix-stable here, so by its text)
    ids, mask = masking.encode(tok, tok.chat_template, REASON_CONV)
    ref_ids, ref_spans = masking._spans_to_mask(tok, text, _spans_after(text, "<|im_start|>assistant\n", "<|im_end|>"))
    ref = np.zeros(len(ref_ids), np.int8)
    for a, b in ref_spans:
        ref[a:b] = 1
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref)
    trained = _trainable_text(tok, ids, mask)
    assert "It is four.<|im_end|>" in trained and "Three and three make six." in trained


def test_reasoning_fields_think_prefix_and_drop(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nthe answer"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]},
    ]
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<think>t</think>a"}]}
    path = testing.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    testing.write_jsonl(str(tmp_path / "s.jsonl"), [sharegpt])
    recs = formats.load_conversations(f"{path},{tmp_path / 's.jsonl'}")
    assert recs[0]["messages"][1] == {"role": "assistant", "content": "the answer", "reasoning_content": "step one"}
    assert recs[1]["messages"][1]["reasoning_content"] == "r"
    assert recs[2]["messages"][1] == {"role": "assistant", "content": "a", "reasoning_content": "t"}
    dropped = formats.load_conversations(path, reasoning="drop")
    assert all("reasoning_content" not in m for r in dropped for m in r["messages"])
    assert dropped[0]["messages"][1]["content"] == "the answer"


def test_reasoning_on_templates_without_it_is_trained_inline(base_tok):
    """chatml does not render reasoning_content: it goes in front of the content, trained, every turn."""
    tok = _tok(base_tok, "chatml")
    ids, mask = masking.encode(tok, tok.chat_template, REASON_CONV)
    trained = _trainable_text(tok, ids, mask)
    assert "<think>\nTwo and two make four.\n</think>\n\nIt is four.<|im_end|>" in trained
    assert "<think>\nThree and three make six.\n</think>\n\nIt is six.<|im_end|>" in trained


def test_sharegpt_function_call_and_observation(tmp_path):
    row = {"conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21, "sky": "sunny"}'},
        {"from": "gpt", "value": "It is sunny and 21 degrees in Paris."}],
        "tools": json.dumps(TOOLS)}
    rec = formats.load_conversations(testing.write_jsonl(str(tmp_path / "s.jsonl"), [row]))[0]
    expect = copy.deepcopy(TOOL_CONV)
    del expect[1]["tool_calls"][0]["id"], expect[2]["tool_call_id"]
    assert rec["messages"] == expect and rec["tools"] == TOOLS
    # bare {"name", "parameters"} schemas are wrapped as OpenAI function tools
    assert formats.parse_tools([TOOLS[0]["function"]], "x") == TOOLS


def test_openai_string_arguments_and_per_file_tools_header(tmp_path):
    conv = copy.deepcopy(TOOL_CONV)
    conv[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'  # OpenAI sends JSON text
    own = [{"type": "function", "function": {"name": "other"}}]
    path = testing.write_jsonl(str(tmp_path / "t.jsonl"), [{"tools": TOOLS}, {"messages": conv},
                                                           {"messages": conv, "tools": own}])
    recs = formats.load_conversations(path)
    assert len(recs) == 2 and recs[0]["messages"] == TOOL_CONV and recs[0]["tools"] == TOOLS
    assert recs[1]["tools"] == own and recs[0]["source"].endswith("t.jsonl:2")


def _bad(tmp_path, row, match):
    # the file's format comes from its first row
    first = {"messages": TOOL_CONV} if "messages" in row else {"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = testing.write_jsonl(str(tmp_path / "bad.jsonl"), [first, row])
    with pytest.raises(DataError, match=match):
        formats.load_conversations(path)


def test_bad_tool_data_names_file_line_field(tmp_path):
    conv = copy.deepcopy(TOOL_CONV)
    conv[1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    _bad(tmp_path, {"messages": conv},
         r"bad.jsonl:2: field 'messages\[1\].tool_calls\[0\].function.arguments' is not valid JSON")
    _bad(tmp_path, {"messages": [TOOL_CONV[0], TOOL_CONV[2], TOOL_CONV[3]]},
         r"bad.jsonl:2: message 1: a tool result with no tool call before it")
    _bad(tmp_path, {"messages": [TOOL_CONV[0], {"role": "function", "content": "x"}, TOOL_CONV[3]]},
         r"bad.jsonl:2: field 'messages\[1\].role': unknown role 'function'")
    conv = copy.deepcopy(TOOL_CONV)
    conv[2]["tool_call_id"] = "call99999"
    _bad(tmp_path, {"messages": conv}, r"bad.jsonl:2: message 2: field 'tool_call_id' 'call99999' answers no")
    _bad(tmp_path, {"messages": TOOL_CONV, "tools": "{not json"}, r"bad.jsonl:2: field 'tools' is not valid JSON")
    _bad(tmp_path, {"messages": TOOL_CONV, "tools": [{"type": "function", "function": {}}]},
         r"bad.jsonl:2: field 'tools\[0\]' must be a function schema")
    conv = copy.deepcopy(TOOL_CONV)
    conv[1]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    _bad(tmp_path, {"messages": conv}, r"bad.jsonl:2: field .*arguments' must be a JSON object, got list")
    sg = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"},
                            {"from": "gpt", "value": "a"}]}
    _bad(tmp_path, sg, r"bad.jsonl:2: field 'conversations\[1\].value' is not valid JSON")


def _cfg(path, template, **kw):
    c = default_config().data
    c.path, c.template, c.max_length, c.eval_fraction = path, template, 2048, 0.0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_templates_that_cannot_render_tools_are_an_error(base_tok, tmp_path):
    path = testing.write_jsonl(str(tmp_path / "tools.jsonl"), [{"messages": TOOL_CONV, "tools": TOOLS}])
    with pytest.raises(DataError, match="tools.jsonl:1: the conversation has tool calls but the chat template"):
        pipeline.examples_for_split(_cfg(path, "chatml"), _tok(base_tok, "chatml"))
    conv = copy.deepcopy(TOOL_CONV)
    conv[1]["tool_calls"][0]["id"] = conv[2]["tool_call_id"] = "c1"  # Mistral wants 9 characters
    path = testing.write_jsonl(str(tmp_path / "ids.jsonl"), [{"messages": conv, "tools": TOOLS}])
    with pytest.raises(DataError, match="ids.jsonl:1: the chat template failed.*9 alphanumeric"):
        pipeline.examples_for_split(_cfg(path, "mistral-v0.3"), _tok(base_tok, "mistral-v0.3"))


def test_inspector_shows_tool_and_reasoning_masks(base_tok, tmp_path):
    tok_dir = tmp_path / "tok"
    base_tok.save_pretrained(str(tok_dir))
    path = testing.write_jsonl(str(tmp_path / "rows.jsonl"),
                               [{"messages": QWEN_CONV, "tools": TOOLS}, {"messages": REASON_CONV}])
    cfg = default_config()
    cfg.data = _cfg(path, "qwen3")
    cfg.data.tokenizer = str(tok_dir)
    stats, shown = data_inspect.inspect_data(cfg, num_examples=2)
    assert stats["examples"] == 2 and stats["skipped"] == {}
    tool_text = data_inspect._render(*shown[0], color=False)
    assert '[[<think>\nTwo cities: two calls.\n</think>\n\nLet me check both.\n<tool_call>\n{"name": "get_weather"' \
        in tool_text
    assert "<tool_response>\nsunny\n</tool_response>" in tool_text and "[[sunny" not in tool_text
    reason_text = data_inspect._render(*shown[1], color=False)
    assert "[[It is four.<|im_end|>]]" in reason_text and "Two and two" not in reason_text
    assert "[[<think>\nThree and three make six.\n</think>\n\nIt is six.<|im_end|>]]" in reason_text

"""Fuzz test of the data readers (issue 19): mutated JSON / JSONL / ShareGPT / alpaca rows, random bytes and
truncations.  Every input either loads equal to a reference parse (the standard `json` module applied to the
file's documented layout) or raises a DataError naming the file and the line -- never another exception.

`SFT_JAX_FUZZ_EXAMPLES=N` sets hypothesis' examples per test (default 150: ~20-40 s on the 2-core CI);
`SFT_JAX_FUZZ_COUNT=FILE` appends the number of inputs each test tried to FILE (BUILD_NOTES.md records them)."""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_jax.data import formats, sources
from sft_jax.data.errors import DataError

N = int(os.environ.get("SFT_JAX_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=N, deadline=None, database=None, derandomize=N <= 1000,
                    suppress_health_check=list(HealthCheck))
TMP = tempfile.mkdtemp(prefix="sft_jax_fuzz_")
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _count():
    yield
    out = os.environ.get("SFT_JAX_FUZZ_COUNT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(TRIED) + "\n")


ERR = object()  # the reference says: not loadable


def reference_rows(data: bytes, suffix: str):
    """[(row, line)] as the readers document the layout, or ERR."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return ERR
    if text.startswith("\ufeff"):
        text = text[1:]
    head = text.lstrip(" \t\r\n")
    if not head:
        return ERR

    def lines(t):
        rows = []
        for k, line in enumerate(t.split("\n"), 1):
            if line.strip(" \t\r"):
                try:
                    rows.append((json.loads(line), k))
                except (ValueError, RecursionError):
                    return ERR
        return rows

    try:
        if head.startswith("["):
            v = json.loads(text)
            start = text.index("[")
            # the line of each element: re-find it by decoding element by element
            dec, i, rows = json.JSONDecoder(), start + 1, []
            for x in v:
                while text[i] in " \t\r\n,":
                    i += 1
                _, j = dec.raw_decode(text, i)
                rows.append((x, text.count("\n", 0, i) + 1))
                i = j
        elif suffix == ".json" and head.startswith("{"):
            try:
                rows = [(json.loads(text), 1)]
            except json.JSONDecodeError as e:
                if not e.msg.startswith("Extra data"):
                    return ERR
                rows = lines(text)
        else:
            rows = lines(text)
    except (ValueError, RecursionError):
        return ERR
    if rows is ERR or not rows or not all(isinstance(r, dict) for r, _ in rows):
        return ERR
    return rows


def _names_file_and_line(e: DataError, path: str) -> None:
    msg = str(e)
    assert re.match(re.escape(path) + r":\d+: ", msg) or msg == f"{path}: empty file (no rows)", msg


def _write(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix, dir=TMP)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _check_raw(data: bytes, suffix: str) -> None:
    path = _write(data, suffix)
    try:
        ref = reference_rows(data, suffix)
        try:
            got = formats.read_rows(path)
        except DataError as e:
            _names_file_and_line(e, path)
            got = ERR
        assert (got is ERR) == (ref is ERR), (data[:300], got if got is ERR else got[:3])
        if got is not ERR:
            assert got == ref
        if suffix == ".jsonl":  # the streaming reader (byte offsets) gives the same rows
            try:
                src = sources.open_source(path, formats._read_json_text)
                streamed = [src.row(i) for i in range(len(src))]
            except DataError as e:
                _names_file_and_line(e, path)
                streamed = ERR
            assert (streamed is ERR) == (ref is ERR), data[:300]
            if streamed is not ERR:
                assert [r for r, _ in streamed] == [r for r, _ in ref]
                assert [w for _, w in streamed] == [f"{path}:{k}" for _, k in ref]
    finally:
        os.unlink(path)


# ------------------------------------------------------------------------------ strategies

text = st.text(st.characters(codec="utf-8"), max_size=12).filter(lambda t: "</think>" not in t)
nonempty = text.filter(lambda t: t.strip() != "")


@st.composite
def conversation(draw):
    """(format, row, expected messages) of a valid row in one of the four formats."""
    fmt = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "prompt_completion"]))
    system = draw(st.one_of(st.just(""), nonempty))
    if fmt in ("messages", "sharegpt"):
        n = draw(st.integers(1, 3))
        turns = [(role, draw(text)) for _ in range(n) for role in ("user", "assistant")]
        msgs = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": r, "content": c} for r, c in turns]
        if fmt == "messages":
            row = {"messages": [dict(m) for m in msgs]}
        else:
            who = {"system": "system", "user": "human", "assistant": "gpt"}
            row = {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in msgs]}
        return fmt, row, msgs
    if fmt == "alpaca":
        ins, inp, out = draw(text), draw(text), draw(text)
        row = {"instruction": ins, "input": inp, "output": out, **({"system": system} if system else {})}
        msgs = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": f"{ins}\n{inp}" if inp else ins}, {"role": "assistant", "content": out}]
        return fmt, row, msgs
    p, c = draw(text), draw(text)
    row = {"prompt": p, "completion": c, **({"system": system} if system else {})}
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    return fmt, row, msgs


def expected_skip(msgs):
    if not any(m["role"] == "assistant" for m in msgs):
        return "no_assistant"
    if msgs[-1]["role"] != "assistant":
        return "no_final_assistant"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        return "empty_assistant"
    return None


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=6)


@st.composite
def mutated(draw, obj):
    """A structural mutation of a JSON value: drop a key, retype a value, rename a field, insert junk."""
    if isinstance(obj, dict) and obj:
        k = draw(st.sampled_from(sorted(obj)))
        op = draw(st.sampled_from(["drop", "retype", "recurse", "rename"]))
        out = dict(obj)
        if op == "drop":
            del out[k]
        elif op == "retype":
            out[k] = draw(json_value)
        elif op == "rename":
            out[draw(text)] = out.pop(k)
        else:
            out[k] = draw(mutated(obj[k]))
        return out
    if isinstance(obj, list) and obj:
        i = draw(st.integers(0, len(obj) - 1))
        op = draw(st.sampled_from(["drop", "retype", "recurse", "dup"]))
        out = list(obj)
        if op == "drop":
            del out[i]
        elif op == "retype":
            out[i] = draw(json_value)
        elif op == "dup":
            out.insert(i, out[i])
        else:
            out[i] = draw(mutated(obj[i]))
        return out
    return draw(json_value)


def serialize(rows, layout: str, draw) -> bytes:
    ensure_ascii = draw(st.booleans())
    nl = draw(st.sampled_from(["\n", "\r\n"]))
    if layout == "jsonl":
        body = nl.join(json.dumps(r, ensure_ascii=ensure_ascii) + draw(st.sampled_from(["", nl, " "])) for r in rows)
    else:
        body = json.dumps(rows if layout == "array" else rows[0], ensure_ascii=ensure_ascii,
                          indent=draw(st.sampled_from([None, 1, 2])))
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + body + nl).encode("utf-8")


@st.composite
def byte_mutation(draw, data: bytes):
    op = draw(st.sampled_from(["none", "truncate", "insert", "delete", "flip", "comma", "random"]))
    if op == "none" or not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    if op == "truncate":
        return data[:i]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
    if op == "delete":
        return data[:i] + data[i + draw(st.integers(1, 8)):]
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if op == "comma":  # the trailing comma (and doubled / leading ones)
        j = data.rfind(b"]")
        j = j if j > 0 and draw(st.booleans()) else i
        return data[:j] + b"," + data[j:]
    return draw(st.binary(max_size=64))


# ------------------------------------------------------------------------------ tests


@SETTINGS
@given(st.data())
def test_raw_bytes_load_equal_to_reference_or_data_error(data):
    """Serialized rows (valid, mutated, truncated, random bytes) through read_rows and the streaming reader."""
    TRIED["raw"] = TRIED.get("raw", 0) + 1
    rows = [c[1] for c in data.draw(st.lists(conversation(), min_size=1, max_size=3))]
    layout = data.draw(st.sampled_from(["jsonl", "array", "object"]))
    raw = data.draw(byte_mutation(serialize(rows, layout, data.draw)))
    suffix = ".jsonl" if layout == "jsonl" else data.draw(st.sampled_from([".json", ".jsonl"]))
    _check_raw(raw, suffix)


@SETTINGS
@given(st.data())
def test_rows_to_records_equal_to_reference_or_data_error(data):
    """Valid rows of every format load to the reference conversation (skips marked with their reason);
    structurally mutated rows load or fail with a DataError naming file:line."""
    TRIED["records"] = TRIED.get("records", 0) + 1
    convs = data.draw(st.lists(conversation(), min_size=1, max_size=4))
    fmt = convs[0][0]
    convs = [c for c in convs if c[0] == fmt] or convs[:1]
    mutate = data.draw(st.lists(st.booleans(), min_size=len(convs), max_size=len(convs)))
    rows = [data.draw(mutated(row)) if m else row for (_, row, _), m in zip(convs, mutate)]
    path = _write(("\n".join(json.dumps(r) for r in rows) + "\n").encode(), ".jsonl")
    try:
        strict = data.draw(st.booleans())
        try:
            got = formats.load_conversations(path, keep_skipped=True, strict=strict)
        except DataError as e:
            _names_file_and_line(e, path)
            got = None
        if any(mutate):
            return
        expected = [expected_skip(msgs) for _, _, msgs in convs]
        if strict and any(expected):
            assert got is None
            return
        assert got is not None
        assert [r["messages"] for r in got] == [msgs for _, _, msgs in convs]
        assert [r.get("skip") for r in got] == expected
        assert [r["source"] for r in got] == [f"{path}:{k}" for k in range(1, len(convs) + 1)]
    finally:
        os.unlink(path)


def test_known_cases():
    """The issue's cases, fixed inputs (also what the fuzzer found while being written)."""
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    for raw, suffix in [
        (b"[\n" + json.dumps(good).encode() + b",\n]\n", ".json"),  # trailing comma: error at line 2
        (b"[" + json.dumps(good).encode() + b",," + json.dumps(good).encode() + b"]", ".json"),
        (json.dumps({"messages": [{"role": "user", "content": "a\u2028b"},  # U+2028 inside a string: one row
                                  {"role": "assistant", "content": "c"}]}, ensure_ascii=False).encode(), ".jsonl"),
        (b'{\n"messages": [\n{"role": "user", "content": "a"},\n{"role": "assistant", "content": "b"}]}', ".json"),
        (b"\xef\xbb\xbf\n" + json.dumps(good).encode(), ".jsonl"),  # a BOM on a blank first line
        (b"[" * 100000, ".json"), (b"{\"a\": " + b"1" * 5000 + b"}", ".jsonl"),  # too deep, too long an int
        (b"\x1c" + json.dumps(good).encode(), ".jsonl"),
    ]:
        _check_raw(raw, suffix)
    path = _write(b"[\n" + json.dumps(good).encode() + b",\n]\n", ".json")
    with pytest.raises(DataError, match=re.escape(path) + ":2: malformed JSON: trailing comma"):
        formats.read_rows(path)

"""Readers and formats: rows of any source -> normalised conversations.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant"|"tool",
"content": str}``; an assistant message may also carry ``tool_calls`` (OpenAI form,
``[{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}]``) and
``reasoning_content`` (str); a tool message may carry ``tool_call_id``.  A record is
``{"messages": [...], "source": "file:line"}`` plus ``"tools"`` (a list of JSON schemas,
``[{"type": "function", "function": {...}}]``) when the row or its file has any.

Every row becomes exactly one record or raises :class:`DataError` naming the file, the
line (the 1-based row for Parquet / Arrow) and the field.  Nothing is dropped silently: a
row that parses but has nothing right to train on (no assistant turn, not ending on one, an
empty assistant turn: :data:`SKIP_REASONS`) becomes a record marked ``"skip"``, counted with
its reason by the pipeline (``pipeline.DataStats``) like the skips after tokenization (no
trainable token, over-long with ``truncation=drop``); ``data.strict=True`` makes it an error.

Supported row formats (detected per file from its first row, or forced by ``data.format``):

- ``alpaca``: ``instruction``, ``input`` (optional), ``output``, optional ``system`` and
  ``history`` (a list of ``[user, assistant]`` pairs that come BEFORE the instruction).
- ``sharegpt``: ``conversations``: ``[{"from": "human"|"gpt"|"system"|"function_call"|
  "observation", "value": ...}]`` and optional ``tools`` (LLaMA-Factory's convention: a
  ``function_call`` value is ``{"name", "arguments"}`` JSON (or a list of them) and becomes
  an assistant tool call; an ``observation`` is the tool result).
- ``messages`` (OpenAI): ``messages``: ``[{"role": ..., "content": ..., "tool_calls"?,
  "reasoning_content"?, "tool_call_id"?}]`` and optional ``tools``.
- ``prompt_completion``: ``prompt`` and ``completion`` (optional ``system``).

Sources (``sources.py``): JSON, JSONL (also ``.gz`` / ``.zst``), Parquet, Arrow,
``datasets.save_to_disk`` directories and ``hf:`` hub ids.  ``data.columns`` renames
columns (``instruction:question`` = the ``instruction`` field is read from column
``question``).  In a JSON/JSONL file a row that holds only ``tools`` is a file header:
its tools apply to the rows after it that have none of their own.

Reasoning: ``reasoning_content`` (also ``reasoning`` / ``thinking``) or a
``<think>...</think>`` block in front of the content (split off as Qwen3's template does)
becomes the message's ``reasoning_content``; ``reasoning="drop"`` removes it.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any

import numpy as np

from sft_jax.data import sources
from sft_jax.data.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")
REASONING = ("keep", "drop")
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}
_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


def _where(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


# ----------------------------------------------------------------------------- files


def expand_paths(spec: str) -> list[str]:
    """``data.path`` -> list of sources: files, comma-separated entries, directories (every
    data file inside, sorted), ``datasets.save_to_disk`` directories and ``hf:`` ids."""
    files: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            files.extend(sources.expand_entry(part))
        except DataError as e:
            raise DataError(f"{e} (from data.path={spec!r})") from None
    if not files:
        raise DataError(f"data.path={spec!r} names no files")
    return files


def _decode(path: str) -> str:
    raw = sources.read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {col})") from None


_JSON_WS = " \t\r\n"  # JSON's whitespace (str.strip() would also take \x1c, U+2028, ...)


def _line_col(text: str, i: int) -> tuple[int, int]:
    line = text.count("\n", 0, i) + 1
    return line, i - (text.rfind("\n", 0, i) + 1) + 1


def _read_array(path: str, text: str) -> list[tuple[Any, int]]:
    """The rows of a JSON array, parsed strictly (a trailing or doubled comma is an error naming its line)."""
    dec = json.JSONDecoder()
    rows: list[tuple[Any, int]] = []
    n = len(text)
    i = text.index("[") + 1
    comma = -1  # position of the comma after the last row (-1: none pending)

    def err(j: int, what: str) -> DataError:
        line, col = _line_col(text, j)
        return DataError(f"{path}:{line}: malformed JSON: {what} (column {col})")

    while True:
        while i < n and text[i] in _JSON_WS:
            i += 1
        if i >= n:
            raise DataError(f"{_where(path, text.count(chr(10)) + 1)}: malformed JSON: unterminated array")
        c = text[i]
        if c == "]":
            if comma >= 0:
                raise err(comma, "trailing comma before ']'")
            i += 1
            break
        if c == ",":
            if comma >= 0 or not rows:
                raise err(i, "unexpected ',' (a missing row?)")
            comma = i
            i += 1
            continue
        if rows and comma < 0:
            raise err(i, "expected ',' or ']' after a row")
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an over-long integer, nesting too deep
            raise DataError(f"{path}:{line}: malformed JSON: {type(e).__name__}: {e}") from None
        rows.append((obj, line))
        comma = -1
    while i < n and text[i] in _JSON_WS:
        i += 1
    if i < n:
        raise err(i, "extra data after the closing ']'")
    return rows


def _read_lines(path: str, text: str) -> list[tuple[Any, int]]:
    """JSON Lines: one value per ``\n``-separated line; lines of JSON whitespace are not rows."""
    rows: list[tuple[Any, int]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip(_JSON_WS):
            continue
        try:
            rows.append((json.loads(line), lineno))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line: {type(e).__name__}: {e}") from None
    return rows


def _read_json_text(path: str) -> list[tuple[dict, int]]:
    """The rows of a JSON (an array, one object) or JSON Lines file, with their line numbers."""
    text = _decode(path)
    stripped = text.lstrip(_JSON_WS)
    if not stripped:
        raise DataError(f"{path}: empty file (no rows)")
    is_json = sources.suffix_of(path) in sources.JSON_SUFFIXES
    if stripped.startswith("["):
        rows = _read_array(path, text)
    elif is_json and stripped.startswith("{"):
        try:  # one object (pretty-printed or not); else JSON Lines in a .json file
            rows = [(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            rows = _read_lines(path, text)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:1: malformed JSON: {type(e).__name__}: {e}") from None
    else:
        rows = _read_lines(path, text)
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    for obj, line in rows:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: a row must be a JSON object, got {type(obj).__name__}")
    return rows  # type: ignore[return-value]


def read_rows(path: str) -> list[tuple[dict, int]]:
    """All rows of one source (see :func:`expand_paths`) with their line numbers (the
    1-based row for Parquet / Arrow / hub data sets).  Loads the whole source."""
    if sources.suffix_of(path) in sources.JSON_SUFFIXES + sources.JSONL_SUFFIXES:
        return _read_json_text(path)
    src = sources.open_source(path, _read_json_text)
    return [(src.row(i)[0], i + 1) for i in range(len(src))]


# --------------------------------------------------------------------------- formats


def detect_format(row: dict, where: str = "") -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise DataError(
        f"{where}: cannot detect the row format from fields {sorted(row)}; expected one of "
        "messages / conversations / instruction+output / prompt+completion (or set data.format / data.columns)"
    )


def parse_columns(spec: str) -> dict[str, str]:
    """``data.columns`` ("field:column,...") -> {field: column}."""
    out: dict[str, str] = {}
    for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        field, sep, column = part.partition(":")
        if not sep or not field.strip() or not column.strip():
            raise DataError(f"data.columns={spec!r}: {part!r} is not FIELD:COLUMN")
        out[field.strip()] = column.strip()
    return out


def map_columns(row: dict, columns: dict[str, str], where: str) -> dict:
    """Rename the columns of ``row`` to the standard field names (``columns``: {field: column})."""
    if not columns:
        return row
    row = dict(row)
    for field, column in columns.items():
        if column not in row:
            raise DataError(f"{where}: missing column '{column}' (data.columns maps {field}:{column}; "
                            f"the row has {sorted(row)})")
        row[field] = row.pop(column)
    return row


def _str(row: dict, field: str, where: str, *, required: bool = True, label: str | None = None) -> str:
    label = label or field
    if field not in row or row[field] is None:
        if required:
            raise DataError(f"{where}: missing field '{label}'")
        return ""
    v = row[field]
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{label}' must be a string, got {type(v).__name__} {str(v)[:60]!r}")
    return v


def _list(row: dict, field: str, where: str) -> list:
    if field not in row:
        raise DataError(f"{where}: missing field '{field}'")
    v = row[field]
    if not isinstance(v, list):
        raise DataError(f"{where}: field '{field}' must be a list, got {type(v).__name__}")
    return v


def _json_value(v, where: str, label: str):
    """A JSON-encoded string -> its value (other values pass through)."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: field '{label}' is not valid JSON: {e.msg} (column {e.colno}): {v[:80]!r}") from None


def parse_tools(value, where: str, label: str = "tools") -> list[dict]:
    """A ``tools`` value (a list or its JSON text) -> ``[{"type": "function", "function": {...}}]``."""
    value = _json_value(value, where, label)
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{label}' must be a list of tool schemas, got {type(value).__name__}")
    out = []
    for k, tool in enumerate(value):
        f = f"{label}[{k}]"
        if not isinstance(tool, dict):
            raise DataError(f"{where}: field '{f}' must be an object, got {type(tool).__name__}")
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: field '{f}' must be a function schema with a 'name' "
                            "({'type': 'function', 'function': {'name': ..., 'parameters': ...}})")
        out.append({"type": "function", "function": {k2: v for k2, v in fn.items() if v is not None}})
    return out


def _tool_call(call, where: str, label: str) -> dict:
    """One OpenAI tool call (or a flat ``{"name", "arguments"}``) -> the normalised form."""
    call = _json_value(call, where, label)
    if not isinstance(call, dict):
        raise DataError(f"{where}: field '{label}' must be an object, got {type(call).__name__}")
    fn = call.get("function") if call.get("function") is not None else call
    flabel = f"{label}.function" if call.get("function") is not None else label
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise DataError(f"{where}: field '{flabel}.name' is missing (a tool call needs a function name)")
    args = fn.get("arguments", fn.get("parameters", {}))
    args = {} if args is None else _json_value(args, where, f"{flabel}.arguments")
    if not isinstance(args, dict):
        raise DataError(f"{where}: field '{flabel}.arguments' must be a JSON object, got {type(args).__name__}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise DataError(f"{where}: field '{label}.id' must be a string")
        out["id"] = call["id"]
    return out


def split_think(content: str) -> tuple[str, str | None]:
    """``<think>r</think>c`` -> ``(c, r)`` as Qwen3's template splits it; no block -> ``(content, None)``."""
    if "</think>" not in content:
        return content, None
    head, _, tail = content.partition("</think>")
    return tail.lstrip("\n"), head.rstrip("\n").split("<think>")[-1].lstrip("\n")


def _from_alpaca(row: dict, where: str) -> list[dict]:
    msgs: list[dict] = []
    system = _str(row, "system", where, required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: field 'history[{k}]' must be a [user, assistant] pair")
        for j, role in enumerate(("user", "assistant")):
            if not isinstance(pair[j], str):
                raise DataError(
                    f"{where}: field 'history[{k}][{j}]' must be a string, got {type(pair[j]).__name__}"
                )
            msgs.append({"role": role, "content": pair[j]})
    instruction = _str(row, "instruction", where)
    inp = _str(row, "input", where, required=False)
    user = f"{instruction}\n{inp}" if inp else instruction
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": _str(row, "output", where)})
    return msgs


def _message(turn: dict, role: str, where: str, f: str, content_key: str) -> dict:
    """One OpenAI-style message -> normalised (tool calls parsed, reasoning split off)."""
    calls = turn.get("tool_calls")
    has_calls = role == "assistant" and bool(calls)
    content = _str(turn, content_key, where, label=f"{f}.{content_key}", required=not has_calls)
    if calls and role != "assistant":
        raise DataError(f"{where}: field '{f}.tool_calls': only assistant messages make tool calls")
    msg: dict = {"role": role, "content": content}
    if has_calls:
        if not isinstance(calls, list):
            raise DataError(f"{where}: field '{f}.tool_calls' must be a list, got {type(calls).__name__}")
        msg["tool_calls"] = [_tool_call(c, where, f"{f}.tool_calls[{j}]") for j, c in enumerate(calls)]
    if role == "assistant":
        reasoning = next((turn[k] for k in _REASONING_FIELDS if turn.get(k) is not None), None)
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{where}: field '{f}.reasoning_content' must be a string")
        if reasoning is None:
            content, reasoning = split_think(content)
            msg["content"] = content
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
    if role == "tool" and turn.get("tool_call_id") is not None:
        msg["tool_call_id"] = _str(turn, "tool_call_id", where, label=f"{f}.tool_call_id")
    return msg


def _from_messages(row: dict, where: str) -> list[dict]:
    msgs = []
    for k, turn in enumerate(_list(row, "messages", where)):
        f = f"messages[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{f}' must be an object, got {type(turn).__name__}")
        role = _str(turn, "role", where, label=f"{f}.role")
        if role not in ROLES:
            raise DataError(f"{where}: field '{f}.role': unknown role {role!r} (known: {list(ROLES)})")
        msgs.append(_message(turn, role, where, f, "content"))
    return msgs


def _from_sharegpt(row: dict, where: str) -> list[dict]:
    msgs = []
    for k, turn in enumerate(_list(row, "conversations", where)):
        f = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{f}' must be an object, got {type(turn).__name__}")
        who = _str(turn, "from", where, label=f"{f}.from")
        if who not in _SHAREGPT_ROLES:
            raise DataError(f"{where}: field '{f}.from': unknown role {who!r} (known: {sorted(_SHAREGPT_ROLES)})")
        if who == "function_call":
            value = _json_value(_str(turn, "value", where, label=f"{f}.value"), where, f"{f}.value")
            calls = value if isinstance(value, list) else [value]
            msgs.append({"role": "assistant", "content": "",
                         "tool_calls": [_tool_call(c, where, f"{f}.value") for c in calls]})
        else:
            msgs.append(_message(turn, _SHAREGPT_ROLES[who], where, f, "value"))
    return msgs


def row_to_conversation(row: dict, fmt: str, where: str, system_prompt: str = "") -> list[dict]:
    """One row -> a validated conversation (list of messages)."""
    if fmt == "alpaca":
        msgs = _from_alpaca(row, where)
    elif fmt == "sharegpt":
        msgs = _from_sharegpt(row, where)
    elif fmt == "messages":
        msgs = _from_messages(row, where)
    elif fmt == "prompt_completion":
        msgs = []
        system = _str(row, "system", where, required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": _str(row, "prompt", where)})
        msgs.append({"role": "assistant", "content": _str(row, "completion", where)})
    else:
        raise DataError(f"{where}: unknown data.format {fmt!r} (known: auto, {', '.join(FORMATS)})")
    validate_conversation(msgs, where)
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def validate_conversation(msgs: list[dict], where: str) -> None:
    """Roles in order: system first only, and every tool result answering a tool call of the
    assistant turn before it (by ``tool_call_id`` when given).  (A conversation with nothing to
    train on is not an error here but a counted skip: :func:`conversation_skip`.)"""
    if not msgs:
        raise DataError(f"{where}: empty conversation")
    pending: list[dict] = []  # calls of the last assistant turn not answered yet
    for k, m in enumerate(msgs):
        if m["role"] == "system" and k != 0:
            raise DataError(f"{where}: message {k}: a system message may only come first")
        if m["role"] == "assistant":
            pending = list(m.get("tool_calls", []))
        elif m["role"] == "tool":
            if not pending:
                raise DataError(f"{where}: message {k}: a tool result with no tool call before it "
                                "(an assistant message with tool_calls must precede it)")
            cid = m.get("tool_call_id")
            ids = [c.get("id") for c in pending]
            if cid is not None and any(ids):
                if cid not in ids:
                    raise DataError(f"{where}: message {k}: field 'tool_call_id' {cid!r} answers no pending "
                                    f"tool call (pending ids: {[i for i in ids if i]})")
                pending.pop(ids.index(cid))
            else:
                pending.pop(0)
        else:
            pending = []


# Rows that parse but hold nothing right to train on: skipped and counted (pipeline.DataStats, the
# trainer's data accounting), or a DataError under data.strict=True.
SKIP_REASONS = {
    "no_assistant": "the conversation has no assistant message (nothing to train on)",
    "no_final_assistant": "the conversation does not end on an assistant turn (its last turn would go untrained "
                          "and the prompt would teach nothing)",
    "empty_assistant": "an assistant turn is empty (it would train the model to answer with nothing)",
}


def conversation_skip(msgs: list[dict]) -> str:
    """The :data:`SKIP_REASONS` key of a conversation that should not be trained on ("" = train on it)."""
    if not any(m["role"] == "assistant" for m in msgs):
        return "no_assistant"
    if msgs[-1]["role"] != "assistant":
        return "no_final_assistant"
    for m in msgs:
        if (m["role"] == "assistant" and not m.get("content", "").strip() and not m.get("tool_calls")
                and not (m.get("reasoning_content") or "").strip()):
            return "empty_assistant"
    return ""


def row_to_record(row: dict, fmt: str, where: str, *, system_prompt: str = "", columns: dict | None = None,
                  file_tools: list | None = None, reasoning: str = "keep", strict: bool = False) -> dict:
    """One raw row -> a record ``{"messages", "source"[, "tools"][, "skip"]}`` (columns mapped, tools
    parsed, reasoning kept or dropped).  ``skip`` (a :data:`SKIP_REASONS` key) marks a row with
    nothing right to train on; ``strict`` makes it a DataError instead."""
    if reasoning not in REASONING:
        raise DataError(f"data.reasoning={reasoning!r} is not one of {list(REASONING)}")
    row = map_columns(row, columns or {}, where)
    msgs = row_to_conversation(row, fmt, where, system_prompt)
    if reasoning == "drop":
        for m in msgs:
            m.pop("reasoning_content", None)
    rec: dict = {"messages": msgs, "source": where}
    skip = conversation_skip(msgs)
    if skip and strict:
        raise DataError(f"{where}: {SKIP_REASONS[skip]} (data.strict=True; without it the row is skipped and counted)")
    if skip:
        rec["skip"] = skip
    tools = parse_tools(row["tools"], where) if row.get("tools") not in (None, "", []) else file_tools
    if tools:
        rec["tools"] = tools
    return rec


def is_tools_header(row: dict) -> bool:
    """A JSON/JSONL row holding only ``tools``: the tool schemas of the rows after it."""
    return set(row) == {"tools"}


class RecordReader:
    """Rows of one source -> records, with the file's format (detected from its first row),
    ``data.columns`` and the per-file ``tools`` header resolved once."""

    def __init__(self, path: str, fmt: str = "auto", system_prompt: str = "", *, columns: str = "",
                 reasoning: str = "keep", cache_blocks: int = 4, strict: bool = False):
        self.path = path
        self.source = sources.open_source(path, _read_json_text, cache_blocks=cache_blocks)
        self.columns = parse_columns(columns)
        self.system_prompt, self.reasoning, self.strict = system_prompt, reasoning, strict
        first, where = self.source.row(0)
        self.file_tools = parse_tools(first["tools"], where) if is_tools_header(first) else None
        self.start = 1 if self.file_tools is not None else 0
        if self.start >= len(self.source):
            raise DataError(f"{path}: only a tools header, no rows")
        self.block_starts = np.unique(np.maximum(np.asarray(self.source.block_starts) - self.start, 0))
        self.fmt = fmt
        if fmt == "auto":
            row, where = self.source.row(self.start)
            self.fmt = detect_format(map_columns(row, self.columns, where), where)

    def __len__(self) -> int:
        return len(self.source) - self.start

    def __getitem__(self, i: int) -> dict:
        row, where = self.source.row(self.start + int(i))
        if is_tools_header(row):
            raise DataError(f"{where}: a tools-only header row may only be the first row of a file")
        return row_to_record(row, self.fmt, where, system_prompt=self.system_prompt, columns=self.columns,
                             file_tools=self.file_tools, reasoning=self.reasoning, strict=self.strict)


def load_conversations(path_spec: str, fmt: str = "auto", system_prompt: str = "", *, columns: str = "",
                       reasoning: str = "keep", strict: bool = False, keep_skipped: bool = True) -> list[dict]:
    """Read every source of ``path_spec`` whole; returns records ``{"messages": [...], "source": "file:line"}``.

    Rows with nothing to train on (:data:`SKIP_REASONS`) are kept, marked ``"skip"`` with the reason (the
    training pipeline counts them; the quality tool reports empty responses itself); ``keep_skipped=False``
    leaves them out with one warning counting them; ``strict``: a DataError instead."""
    out = []
    for path in expand_paths(path_spec):
        out.extend(load_file(path, fmt, system_prompt, columns=columns, reasoning=reasoning, strict=strict))
    if keep_skipped:
        return out
    skipped = collections.Counter(r["skip"] for r in out if r.get("skip"))
    if skipped:
        log.warning("%s: skipped %d row(s) with nothing to train on: %s", path_spec, sum(skipped.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    return [r for r in out if not r.get("skip")]


def load_file(path: str, fmt: str = "auto", system_prompt: str = "", *, columns: str = "",
              reasoning: str = "keep", strict: bool = False) -> list[dict]:
    """Every record of one source (skipped rows included, marked ``"skip"``)."""
    reader = RecordReader(path, fmt, system_prompt, columns=columns, reasoning=reasoning, strict=strict)
    return [reader[i] for i in range(len(reader))]


__all__ = [
    "DataError", "FORMATS", "REASONING", "expand_paths", "read_rows", "detect_format", "row_to_conversation",
    "row_to_record", "validate_conversation", "load_conversations", "load_file", "parse_columns", "parse_tools",
    "split_think", "RecordReader", "SKIP_REASONS", "conversation_skip",
]

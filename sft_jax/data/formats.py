"""Readers and formats: JSON / JSONL rows -> normalised conversations.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``.
Every row becomes exactly one conversation or raises :class:`DataError` naming the
file, the line and the field.  Nothing is dropped silently here; the only skips in
the data path (no trainable token, over-long with ``truncation=drop``) happen after
tokenization and are counted (see ``pipeline.DataStats``).

Supported row formats (detected per file from its first row, or forced by ``data.format``):

- ``alpaca``: ``instruction``, ``input`` (optional), ``output``, optional ``system`` and
  ``history`` (a list of ``[user, assistant]`` pairs that come BEFORE the instruction).
- ``sharegpt``: ``conversations``: ``[{"from": "human"|"gpt"|"system", "value": ...}]``.
- ``messages`` (OpenAI): ``messages``: ``[{"role": ..., "content": ...}]``.
- ``prompt_completion``: ``prompt`` and ``completion`` (optional ``system``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}
_DATA_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def _where(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


# ----------------------------------------------------------------------------- files


def expand_paths(spec: str) -> list[str]:
    """``data.path`` -> list of files: a file, comma-separated files, or directories
    (every ``*.json``/``*.jsonl`` inside, sorted)."""
    files: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        p = pathlib.Path(part).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix in _DATA_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{p}: directory holds no .json or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(str(p))
        else:
            raise DataError(f"{p}: no such file or directory (from data.path={spec!r})")
    if not files:
        raise DataError(f"data.path={spec!r} names no files")
    return files


def _decode(path: str) -> str:
    raw = pathlib.Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {col})") from None


def read_rows(path: str) -> list[tuple[dict, int]]:
    """All rows of one JSON (array or single object) or JSONL file, with their line numbers."""
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: empty file (no rows)")
    stripped = text.lstrip()
    rows: list[tuple[Any, int]] = []
    if stripped.startswith("["):
        dec = json.JSONDecoder()
        i = text.index("[") + 1
        n = len(text)
        while True:
            while i < n and text[i] in " \t\r\n,":
                i += 1
            if i >= n:
                raise DataError(f"{_where(path, text.count(chr(10)) + 1)}: malformed JSON: unterminated array")
            if text[i] == "]":
                break
            line = text.count("\n", 0, i) + 1
            try:
                obj, i = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            rows.append((obj, line))
    elif path.endswith(".json") and stripped.startswith("{") and "\n{" not in stripped.strip():
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        rows.append((obj, 1))
    else:  # JSONL
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), lineno))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    for obj, line in rows:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: a row must be a JSON object, got {type(obj).__name__}")
    return rows  # type: ignore[return-value]


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
        "messages / conversations / instruction+output / prompt+completion (or set data.format)"
    )


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


def _from_turns(row: dict, where: str, field: str, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    turns = _list(row, field, where)
    msgs = []
    for k, turn in enumerate(turns):
        f = f"{field}[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{f}' must be an object, got {type(turn).__name__}")
        role = _str(turn, role_key, where, label=f"{f}.{role_key}")
        if role_map is not None:
            if role not in role_map:
                raise DataError(f"{where}: field '{f}.{role_key}': unknown role {role!r} (known: {sorted(role_map)})")
            role = role_map[role]
        elif role not in ROLES:
            raise DataError(f"{where}: field '{f}.{role_key}': unknown role {role!r} (known: {list(ROLES)})")
        content = _str(turn, content_key, where, label=f"{f}.{content_key}")
        msgs.append({"role": role, "content": content})
    return msgs


def row_to_conversation(row: dict, fmt: str, where: str, system_prompt: str = "") -> list[dict]:
    """One row -> a validated conversation (list of {role, content})."""
    if fmt == "alpaca":
        msgs = _from_alpaca(row, where)
    elif fmt == "sharegpt":
        msgs = _from_turns(row, where, "conversations", "from", "value", _SHAREGPT_ROLES)
    elif fmt == "messages":
        msgs = _from_turns(row, where, "messages", "role", "content", None)
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
    if not msgs:
        raise DataError(f"{where}: empty conversation")
    for k, m in enumerate(msgs):
        if m["role"] == "system" and k != 0:
            raise DataError(f"{where}: message {k}: a system message may only come first")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: conversation has no assistant message (nothing to train on)")


def load_conversations(path_spec: str, fmt: str = "auto", system_prompt: str = "") -> list[dict]:
    """Read every file of ``path_spec``; returns records ``{"messages": [...], "source": "file:line"}``."""
    out = []
    for path in expand_paths(path_spec):
        out.extend(load_file(path, fmt, system_prompt))
    return out


def load_file(path: str, fmt: str = "auto", system_prompt: str = "") -> list[dict]:
    rows = read_rows(path)
    file_fmt = fmt
    if fmt == "auto":
        file_fmt = detect_format(rows[0][0], _where(path, rows[0][1]))
    out = []
    for row, line in rows:
        where = _where(path, line)
        out.append({"messages": row_to_conversation(row, file_fmt, where, system_prompt), "source": where})
    return out


__all__ = [
    "DataError", "FORMATS", "expand_paths", "read_rows", "detect_format", "row_to_conversation",
    "validate_conversation", "load_conversations", "load_file",
]

"""Reading the methods' inputs: Self-Instruct seed tasks, and prompts / instructions for
Evol-Instruct and distillation (rows in any of the trainer's formats, or `{"prompt": ...}`).

Bad rows raise `sft_jax.data.formats.DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses

from sft_jax.data.formats import DataError, read_rows


@dataclasses.dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]  # (input, output)
    is_classification: bool


def _text(row: dict, field: str, where: str, *, required: bool = True) -> str:
    v = row.get(field)
    if v is None:
        if required:
            raise DataError(f"{where}: missing field '{field}'")
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")
    return v


def load_seed_tasks(path: str) -> list[SeedTask]:
    """The Self-Instruct seed format: `instruction`, `instances` [{input, output}], `is_classification`."""
    tasks = []
    for row, line in read_rows(path):
        where = f"{path}:{line}"
        instruction = _text(row, "instruction", where).strip()
        if not instruction:
            raise DataError(f"{where}: field 'instruction' is empty")
        inst = row.get("instances")
        if not isinstance(inst, list) or not inst:
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
        pairs = []
        for k, x in enumerate(inst):
            if not isinstance(x, dict):
                raise DataError(f"{where}: field 'instances[{k}]' must be an object")
            pairs.append((_text(x, "input", f"{where}: instances[{k}]", required=False),
                          _text(x, "output", f"{where}: instances[{k}]")))
        cls = row.get("is_classification", False)
        if not isinstance(cls, bool):
            raise DataError(f"{where}: field 'is_classification' must be true or false, got {cls!r}")
        tasks.append(SeedTask(instruction, tuple(pairs), cls))
    return tasks


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One input prompt: the user text, an existing answer (if the row has one) and where it came from."""

    prompt: str
    response: str | None
    source: str


def _from_messages(msgs, where: str, field: str) -> tuple[str, str | None]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field '{field}' must be a non-empty list")
    role_key, content_key = ("from", "value") if field == "conversations" else ("role", "content")
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{field}[{k}]' must be an object")
        turns.append((_text(m, role_key, f"{where}: {field}[{k}]"), _text(m, content_key, f"{where}: {field}[{k}]")))
    users = [k for k, (r, _) in enumerate(turns) if r in ("user", "human")]
    if not users:
        raise DataError(f"{where}: field '{field}' has no user message")
    u = users[0]
    answer = turns[u + 1][1] if u + 1 < len(turns) and turns[u + 1][0] in ("assistant", "gpt") else None
    return turns[u][1], answer


def load_prompts(path: str) -> list[PromptRow]:
    """Rows with `prompt` (+ optional `completion`), `instruction` (+ `input`, `output`), `messages` or
    `conversations` (the first user turn, and the reply after it if any) -> PromptRows."""
    out = []
    for row, line in read_rows(path):
        where = f"{path}:{line}"
        if "messages" in row or "conversations" in row:
            field = "messages" if "messages" in row else "conversations"
            prompt, answer = _from_messages(row[field], where, field)
        elif "instruction" in row:
            ins = _text(row, "instruction", where)
            inp = _text(row, "input", where, required=False)
            prompt = f"{ins}\n{inp}" if inp else ins
            answer = _text(row, "output", where, required=False) or None
        elif "prompt" in row:
            prompt = _text(row, "prompt", where)
            answer = _text(row, "completion", where, required=False) or None
        else:
            raise DataError(f"{where}: no prompt: expected a field 'prompt', 'instruction', 'messages' or "
                            f"'conversations' (got {sorted(row)})")
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        out.append(PromptRow(prompt.strip(), answer, where))
    return out


def to_row(prompt: str, response: str, fmt: str, meta: dict, *, input_text: str = "") -> dict:
    """A trainer row (`alpaca` or `messages`) with the synthesis metadata under `synth`."""
    if fmt == "alpaca":
        return {"instruction": prompt, "input": input_text, "output": response, "synth": meta}
    if fmt == "messages":
        user = f"{prompt}\n{input_text}" if input_text else prompt  # as formats.py joins alpaca rows
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
                "synth": meta}
    raise ValueError(f"unknown output format {fmt!r} (alpaca | messages)")

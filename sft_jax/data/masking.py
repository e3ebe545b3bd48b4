"""Conversation -> (token ids, loss mask), with the mask taken from the template itself.

Two ways to find the trainable spans, which agree exactly on every built-in template:

1. ``{% generation %}`` markers (built-ins, and any user template that has them): the
   template renderer reports the character spans; tokens overlapping a span are
   trainable.  For fast tokenizers this is exactly
   ``tokenizer.apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)``
   (same rendering, same offsets rule; a test checks equality).  Slow (sentencepiece /
   python) tokenizers have no offsets -- ``apply_chat_template`` raises on them in
   transformers 5.24 -- so their char spans are mapped by comparing token streams.
2. Prefix diff (templates without markers): for assistant turn i, render the conversation
   up to turn i with ``add_generation_prompt=True`` (the span starts after it) and up to
   and including turn i (the span ends there, minus trailing whitespace: the newline
   after ``<|im_end|>`` / ``<end_of_turn>`` is scaffolding).  Token boundaries come from
   comparing the token streams of those prefixes with the full one.

Trainable = assistant content + the end-of-turn/EOS token closing it.  ``train_on``:
``all_assistant`` (default), ``last_assistant``, ``all`` (every token).
"""

from __future__ import annotations

import re

import jinja2
import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from sft_jax.data.errors import DataError
from sft_jax.data.templates import has_generation_markers

TRAIN_ON = ("all_assistant", "last_assistant", "all")


def _template_kwargs(tokenizer) -> dict:
    kw = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        kw.setdefault(k, getattr(tokenizer, k, None) or "")
    return kw


_TOOLS_RE = re.compile(r"\btools\b")


def prepare_messages(template: str, messages: list[dict], tools: list | None = None, source: str = "") -> list[dict]:
    """Check that ``template`` can render what the conversation holds, and fold reasoning
    into the content for templates that do not render ``reasoning_content`` themselves
    (``<think>\\n{reasoning}\\n</think>\\n\\n{content}``, kept on every turn)."""
    where = f"{source}: " if source else ""
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages) and "tool_calls" not in template:
        raise DataError(f"{where}the conversation has tool calls but the chat template does not render them; "
                        "use a template with tool support (built-ins: qwen2.5, qwen3, llama3.1, mistral-v0.3)")
    if tools and not _TOOLS_RE.search(template):
        raise DataError(f"{where}the row has tools but the chat template does not render a tools list")
    if "reasoning_content" in template or not any("reasoning_content" in m for m in messages):
        return messages
    out = []
    for m in messages:
        if "reasoning_content" in m:
            m = dict(m)
            m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content']}"
        out.append(m)
    return out


def render(tokenizer, template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           with_spans: bool = False, tools: list | None = None, source: str = ""):
    """Render one conversation; with ``with_spans`` also the ``{% generation %}`` char spans.
    A template error (e.g. its ``raise_exception``) becomes a :class:`DataError` naming ``source``."""
    try:
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=with_spans,
            add_generation_prompt=add_generation_prompt, tools=tools or None, **_template_kwargs(tokenizer),
        )
    except jinja2.TemplateError as e:
        raise DataError(f"{source + ': ' if source else ''}the chat template failed on this conversation: {e}") from None
    if with_spans:
        return texts[0], [tuple(s) for s in spans[0]]
    return texts[0]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _stream_span(tokenizer, text: str, full: list[int], start: int, end: int) -> tuple[int, int]:
    """Char span -> token span by comparing token streams of ``text[:start]``/``text[:end]``
    with the full stream.  A token straddling a boundary counts as inside (the same
    'overlaps the span' rule transformers uses with offsets)."""
    a = _ids(tokenizer, text[:start])
    t0 = _lcp(a, full)  # == len(a) when the prefix tokenizes cleanly
    b = _ids(tokenizer, text[:end])
    t1 = _lcp(b, full)
    if t1 < len(b):  # last token of the prefix merged across the boundary: it straddles
        t1 += 1
    return t0, max(t0, min(t1, len(full)))


def _is_fast(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def _spans_to_mask(tokenizer, text: str, spans: list[tuple[int, int]]):
    if _is_fast(tokenizer):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), _offset_spans(enc["offset_mapping"], spans)
    ids = _ids(tokenizer, text)
    return ids, [_stream_span(tokenizer, text, ids, s0, s1) for s0, s1 in spans]


def generation_spans(tokenizer, template: str, messages: list[dict], tools: list | None = None, source: str = ""):
    """Method 1: ids and per-assistant-turn token spans from ``{% generation %}`` markers."""
    text, spans = render(tokenizer, template, messages, with_spans=True, tools=tools, source=source)
    ids, tok_spans = _spans_to_mask(tokenizer, text, spans)
    return ids, tok_spans


def _drop_closing_suffix(text: str, upto: str) -> str:
    """`upto` without the text a template adds only after the LAST message (Phi-3/3.5's own
    template appends `eos_token` when there is no generation prompt): when `upto` = P + tail with P a
    prefix of the full rendering (cut after a marker or whitespace) and the full rendering itself
    ends with that tail, the turn ends at P (the final turn's span keeps the tail: Phi-3.5 trains
    `<|end|>` then the closing `\n<|endoftext|>` there).  Anything else is returned unchanged (and
    then fails the prefix check)."""
    if text.startswith(upto):
        return upto
    n = 0
    for x, y in zip(text, upto):
        if x != y:
            break
        n += 1
    # back to the last marker end or whitespace: the two texts may share the first characters of
    # different markers ("<|endoftext|>" / "<|user|>")
    cut = max(upto.rfind(">", 0, n), upto.rfind("]", 0, n), *(upto.rfind(w, 0, n) for w in " \n")) + 1
    tail = upto[cut:].strip()
    if cut > 0 and tail and text.rstrip().endswith(tail):
        return upto[:cut].rstrip()
    return upto


def prefix_diff_spans(tokenizer, template: str, messages: list[dict], tools: list | None = None, source: str = ""):
    """Method 2: ids and per-assistant-turn token spans by rendering turn prefixes."""
    text = render(tokenizer, template, messages, tools=tools, source=source)
    full = _ids(tokenizer, text)
    tok_spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools, source=source)
        upto = render(tokenizer, template, messages[: i + 1], tools=tools, source=source).rstrip()
        upto = _drop_closing_suffix(text, upto)
        if not (text.startswith(before) and text.startswith(upto) and len(upto) >= len(before)):
            raise DataError(
                f"{source + ': ' if source else ''}the chat template is not prefix-stable at message {i} (rendering a prefix of the "
                "conversation changes earlier text); add {% generation %} markers to it or use a built-in"
            )
        tok_spans.append(_stream_span(tokenizer, text, full, len(before), len(upto)))
    return full, tok_spans


def encode(tokenizer, template: str, messages: list[dict], train_on: str = "all_assistant",
           method: str = "auto", *, tools: list | None = None, source: str = "") -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> ``(ids int32 [n], mask int8 [n])`` (mask 1 = trainable token).

    ``tools``: the JSON schemas passed to the template (as ``apply_chat_template(tools=...)``);
    ``source``: "file:line" named in errors."""
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on={train_on!r} is not one of {list(TRAIN_ON)}")
    messages = prepare_messages(template, messages, tools, source)
    if method == "auto":
        method = "generation" if has_generation_markers(template) else "prefix_diff"
    if method == "generation":
        ids, spans = generation_spans(tokenizer, template, messages, tools, source)
    elif method == "prefix_diff":
        ids, spans = prefix_diff_spans(tokenizer, template, messages, tools, source)
    else:
        raise ValueError(f"unknown mask method {method!r}")
    return np.asarray(ids, np.int32), _mask(len(ids), spans, train_on)


def _mask(n: int, spans, train_on: str) -> np.ndarray:
    mask = np.zeros(n, np.int8)
    if train_on == "all":
        mask[:] = 1
    else:
        if train_on == "last_assistant":
            spans = spans[-1:]
        for a, b in spans:
            mask[a:b] = 1
    return mask


def _offset_spans(offsets, spans) -> list[tuple[int, int]]:
    """Char spans -> token spans: the tokens overlapping a span (end > its start, start < its end), first to
    last (transformers' `return_assistant_tokens_mask` rule).  A plain loop: faster than building a numpy
    array from the offsets list."""
    out = []
    for s0, s1 in spans:
        idx = [i for i, (a, b) in enumerate(offsets) if b > s0 and a < s1]
        out.append((idx[0], idx[-1] + 1) if idx else (0, 0))
    return out


def encode_many(tokenizer, template: str, convs: list[dict], train_on: str = "all_assistant") -> list:
    """`encode` of many conversations (dicts with "messages", optional "tools" and "source"), equal to
    calling it on each: a fast tokenizer with a `{% generation %}` template renders each conversation and
    tokenizes them all in one batched backend call (`_encode_batch`); other tokenizers/templates fall back to
    `encode` per row."""
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on={train_on!r} is not one of {list(TRAIN_ON)}")
    if not convs:
        return []
    if not (_is_fast(tokenizer) and has_generation_markers(template)):
        return [encode(tokenizer, template, c["messages"], train_on, tools=c.get("tools"), source=c.get("source", ""))
                for c in convs]
    texts, all_spans = [], []
    for c in convs:
        src = c.get("source", "")
        messages = prepare_messages(template, c["messages"], c.get("tools"), src)
        text, spans = render(tokenizer, template, messages, with_spans=True, tools=c.get("tools"), source=src)
        texts.append(text)
        all_spans.append(spans)
    out = []
    for ids, offsets, spans in zip(*_encode_batch(tokenizer, texts), all_spans):
        out.append((np.asarray(ids, np.int32), _mask(len(ids), _offset_spans(offsets, spans), train_on)))
    return out


def _encode_batch(tokenizer, texts: list[str]) -> tuple[list, list]:
    """-> (ids lists, offsets lists) of `texts` (no special tokens added), as
    `tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)` gives them.  A transformers fast
    tokenizer's Rust backend is called directly (one `encode_batch`, parallel in Rust; the wrapper's per-row
    conversion to a BatchEncoding costs about as much as the tokenization itself): a one-row wrapper call first
    puts the backend in the wrapper's state (no truncation or padding, special-token splitting)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    tokenizer(texts[:1], add_special_tokens=False, return_offsets_mapping=True)
    encs = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encs], [e.offsets for e in encs]


def render_marked(tokenizer, ids, mask, *, color: bool = False) -> str:
    """Decode ``ids`` with trainable runs marked: ANSI green on a tty, ``[[...]]`` otherwise.

    Runs are cut from decodes of growing prefixes, so word-initial spaces that a
    sentencepiece decoder drops at the start of a string stay where they belong."""
    ids = [int(i) for i in ids]
    out, i, n, prev = [], 0, len(ids), ""
    while i < n:
        j = i
        while j < n and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(ids[:j], skip_special_tokens=False)
        piece = text[len(prev):] if text.startswith(prev) else tokenizer.decode(ids[i:j], skip_special_tokens=False)
        prev = text
        if mask[i]:
            out.append(f"\x1b[32m{piece}\x1b[0m" if color else f"[[{piece}]]")
        else:
            out.append(piece)
        i = j
    return "".join(out)

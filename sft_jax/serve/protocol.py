"""OpenAI request bodies -> validated requests, and OpenAI-style error bodies.

`parse_chat(body)` / `parse_completion(body)` take the decoded JSON object of
`POST /v1/chat/completions` / `POST /v1/completions` and return a `ChatRequest` /
`CompletionRequest`, or raise `BadRequest` naming the offending field (`param`).

Supported fields: model, messages | prompt, max_tokens (chat also max_completion_tokens),
temperature [0, 2], top_p (0, 1], top_k >= 0 (an extension, as vLLM's), stop (a string or up to 4),
seed, n [1, 16], stream, stream_options.include_usage.  Fields that would change the output but
are not implemented (logprobs, tools, response_format, logit_bias, penalties != 0, echo, best_of
> 1, suffix) are refused rather than ignored; a few that do not affect generation (user,
metadata, store, service_tier, parallel_tool_calls) are accepted and ignored; any other field is
an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MAX_N = 16
MAX_STOP = 4
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# field -> the values that mean "off" (accepted); anything else is refused as unsupported
_OFF = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_ROLES = ("system", "developer", "user", "assistant")


class BadRequest(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The JSON OpenAI answers errors with: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass
class Options:
    """The sampling fields shared by both endpoints (max_tokens None = fill the context)."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    n: int
    stream: bool
    include_usage: bool


@dataclasses.dataclass
class ChatRequest:
    options: Options
    messages: list[dict]


@dataclasses.dataclass
class CompletionRequest:
    options: Options
    prompts: list[str | list[int]]  # each a text or token ids


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {type(v).__name__}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{name}' must be an integer, got {type(v).__name__}", name)
    if minimum is not None and v < minimum:
        raise BadRequest(f"'{name}' must be >= {minimum}, got {v}", name)
    if maximum is not None and v > maximum:
        raise BadRequest(f"'{name}' must be <= {maximum}, got {v}", name)
    return v


def _check_fields(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    for k, v in body.items():
        if k in allowed or k in _IGNORED:
            continue
        if k in _OFF:
            if v not in _OFF[k]:
                raise BadRequest(f"'{k}' is not supported by this server (got {v!r})", k)
            continue
        raise BadRequest(f"unknown field '{k}'", k)


def _options(body: dict, *, chat: bool) -> Options:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required (a model id from GET /v1/models)", "model")
    max_tokens = _integer(body, "max_tokens", minimum=1)
    if chat:
        mct = _integer(body, "max_completion_tokens", minimum=1)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise BadRequest("'max_tokens' and 'max_completion_tokens' disagree", "max_completion_tokens")
        max_tokens = max_tokens if max_tokens is not None else mct
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise BadRequest("'stop' strings must not be empty", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
            raise BadRequest("'stream_options' must be an object with 'include_usage'", "stream_options")
        if not stream:
            raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = bool(so.get("include_usage", False))
    return Options(
        model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", minimum=0) or 0,
        stop=stops, seed=_integer(body, "seed", minimum=-(2**63), maximum=2**64 - 1),
        n=_integer(body, "n", minimum=1, maximum=MAX_N) or 1, stream=stream, include_usage=include_usage,
    )


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None and msg.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content[{j}]: only {{'type': 'text', 'text': ...}} parts are "
                                 f"supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: Any) -> ChatRequest:
    _check_fields(body, _CHAT_FIELDS)
    opts = _options(body, chat=True)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}",
                             f"messages[{i}].role")
        if m.get("tool_calls"):
            raise BadRequest(f"messages[{i}].tool_calls: tools are not supported", f"messages[{i}].tool_calls")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    return ChatRequest(opts, out)


def parse_completion(body: Any) -> CompletionRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    opts = _options(body, chat=False)
    p = body.get("prompt")

    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(p, str):
        prompts: list = [p]
    elif ids(p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(ids(x) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                         "lists (non-empty)", "prompt")
    if len(prompts) * opts.n > MAX_N:
        raise BadRequest(f"at most {MAX_N} completions per request (prompts x n), got {len(prompts) * opts.n}",
                         "n")
    return CompletionRequest(opts, prompts)

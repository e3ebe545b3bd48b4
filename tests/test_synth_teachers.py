"""sft_jax.synth teachers against local HTTP servers that fail on purpose (429, 5xx, timeouts,
malformed bodies), the bounded concurrency, the token count and the echo log-likelihood."""

from __future__ import annotations

import pytest
from synth_server import CraftedTeacher, ScriptedServer, crafted_answer, serving

from sft_jax.synth.teachers import OpenAITeacher, TeacherError, make_teacher


def _teacher(url, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAITeacher(url, "m", **kw)


def test_retries_429_500_malformed_then_answers():
    with serving(ScriptedServer(["429", "500", "503", "badjson", "nocontent"])) as s:
        t = _teacher(s.url, concurrency=1, max_retries=5)
        (c,) = t.complete(["hello"], max_tokens=8)
    assert c.error is None and c.text == "answer: hello"
    assert t.usage.retries == 5 and t.usage.requests == 1 and t.usage.failed_requests == 0
    assert len(s.requests) == 6


def test_timeout_is_retried():
    with serving(ScriptedServer(["timeout"], sleep=1.0)) as s:
        t = _teacher(s.url, concurrency=1, max_retries=2, timeout=0.3)
        (c,) = t.complete(["hi"], max_tokens=8)
    assert c.text == "answer: hi" and t.usage.retries == 1


def test_persistent_failure_is_a_counted_error_and_a_dead_batch_raises():
    with serving(ScriptedServer(["500", "500", "ok"] + ["500"] * 2)) as s:
        t = _teacher(s.url, concurrency=1, max_retries=1)
        a, b = t.complete(["one", "two"], max_tokens=8)
        assert a.error is not None and "HTTP 500" in a.error and b.error is None
        assert t.usage.failed_requests == 1
        with pytest.raises(TeacherError, match="all 1 requests"):
            t.complete(["three"], max_tokens=8)


def test_a_refused_request_fails_alone_without_retries():
    with serving(ScriptedServer(["400"])) as s:
        t = _teacher(s.url, concurrency=1, max_retries=5)
        a, b = t.complete(["too long", "fine"], max_tokens=8)
    assert a.error.startswith("HTTP 400") and b.text == "answer: fine" and len(s.requests) == 2


def test_client_errors_stop_at_once():
    with serving(ScriptedServer(["401"])) as s:
        t = _teacher(s.url, max_retries=5)
        with pytest.raises(TeacherError, match="HTTP 401"):
            t.complete(["x"], max_tokens=8)
        assert len(s.requests) == 1


def test_bounded_concurrency_keeps_order_and_counts_tokens():
    with serving(CraftedTeacher(delay=0.05)) as s:
        t = _teacher(s.url, concurrency=3)
        prompts = [f"question {k}" for k in range(12)]
        outs = t.complete(prompts, max_tokens=8, temperature=0.5, seed=7)
    assert s.max_inflight <= 3 and s.max_inflight >= 2
    sent = {r["messages"][0]["content"]: r for _, r in s.requests}
    assert [sent[p]["seed"] for p in prompts] == list(range(7, 19))  # one seed per request
    assert all(sent[p]["max_tokens"] == 8 and sent[p]["temperature"] == 0.5 for p in prompts)
    assert [o.text for o in outs] == [crafted_answer(p, 7 + k) for k, p in enumerate(prompts)]
    assert t.usage.prompt_tokens == 120 and t.usage.completion_tokens == sum(len(o.text.split()) for o in outs)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sekret")
    with serving(CraftedTeacher()) as s:
        t = _teacher(s.url, api_key_env="MY_TEACHER_KEY")
        assert t.client.api_key == "sekret"


def test_echo_loglik():
    with serving(CraftedTeacher()) as s:
        t = _teacher(s.url)
        ((total, n),) = t.loglik([("Say hi", " to everyone here")])
    assert n == 3 and total == pytest.approx(-(3 + 9 + 5) / 10)


def test_teacher_spec_errors():
    with pytest.raises(TeacherError, match="expected http"):
        make_teacher("ftp://x")
    with pytest.raises(TeacherError, match="--teacher-model"):
        make_teacher("http://127.0.0.1:1/v1")

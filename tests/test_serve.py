"""`sft_jax.serve`: the real `openai` client against a server on 127.0.0.1 (tiny random model built
here): greedy outputs == `sft_jax.generate`, streaming, n/seed/stop, usage, OpenAI-style errors
(malformed JSON, unknown model, too long, bad max_tokens, queue full), a disconnecting client frees
its slot, no compilation after warm-up, concurrent requests mixing LoRA adapters in one batch ==
each adapter alone, other methods in engines of their own, SIGTERM drains (CLI in a subprocess),
tensor-parallel generation on the 8-device mesh."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import openai
import pytest

from sft_jax.data.templates import prepare_tokenizer
from sft_jax.data.testing import tiny_fast_tokenizer
from sft_jax.generate import load_model_dir
from sft_jax.metrics import CompileCounter
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig
from sft_jax.models.hf_io import save_hf
from sft_jax.peft import Lora
from sft_jax.serve.__main__ import load_adapter
from sft_jax.serve.engine import Engine, SamplingParams, Seq
from sft_jax.serve.server import ServerThread, build_models, create_app, served_from_generator

MAX_LEN = 128
QUESTIONS = ["Hello there! How are you today?", "What is two plus two?", "Tell me a story about a dog.",
             "Write a poem about the sea.", "Be nice"]


def make_model_dir(path, seed: int = 0, **overrides) -> str:
    """A tiny random chatml Llama saved as an HF directory (weights, config, tokenizer + template)."""
    tok, _ = prepare_tokenizer(tiny_fast_tokenizer(400), "chatml", add_tokens=True)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    mc = ModelConfig(**kw)
    save_hf(str(path), mc, llama.init_params(mc, jax.random.PRNGKey(seed)))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return load_model_dir(make_model_dir(tmp_path_factory.mktemp("serve_base") / "tiny-chat"))


@pytest.fixture(scope="module")
def engine(gen):
    eng = Engine(gen.params, gen.config, max_batch=4, max_len=MAX_LEN, max_queue=32)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def server(gen, engine):
    app = create_app([served_from_generator(gen, "tiny-chat", engine.start())])
    with ServerThread(app, [engine]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


REF_TOKENS = 60


def reference(gen, conversations, max_tokens):
    """What `sft_jax.generate` gives greedily for each conversation with max_tokens [(text, finish, count)]
    (one batched call of REF_TOKENS tokens, cut to each max_tokens: greedy decoding is a prefix)."""
    outs = gen.generate_ids([gen.encode_messages(m) for m in conversations], max_new_tokens=REF_TOKENS)
    res = []
    for (ids, why), n in zip(outs, max_tokens):
        assert n <= REF_TOKENS
        if len(ids) > n or (len(ids) == n and why == "length"):
            ids, why = ids[:n], "length"
        res.append((gen.decode(ids), why, len(ids)))
    return res


def post(server, path, body, raw: bytes | None = None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_concurrent_chat_equals_generate(gen, client, engine):
    """Concurrent greedy requests (batched in the engine's slots, more requests than slots) each
    give exactly what `sft_jax.generate` gives alone; usage counts the prompt and completion tokens."""
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS] + [
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": QUESTIONS[1]}]]
    lens = [5, 24, 9, 30, 17, 12]
    res = [None] * len(msgs)

    def call(i):
        res[i] = client.chat.completions.create(model="tiny-chat", messages=msgs[i], max_tokens=lens[i],
                                                temperature=0)

    before = engine.stats()["decode_steps"]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(msgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = engine.stats()["decode_steps"] - before
    assert steps < sum(lens)  # rows were decoded together
    for m, n, r, (text, why, count) in zip(msgs, lens, res, reference(gen, msgs, lens)):
        assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == why == "length"
        assert r.model == "tiny-chat" and r.object == "chat.completion"
        assert r.usage.prompt_tokens == len(gen.encode_messages(m))
        assert r.usage.completion_tokens == count == n
        assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_stream_equals_non_stream(gen, client):
    """The stream's text is generate's, sent in pieces as the tokens come (a byte-level token that
    ends mid-character waits for the next)."""
    m = [{"role": "user", "content": QUESTIONS[2]}]
    stream = client.chat.completions.create(model="tiny-chat", messages=m, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = gen.generate_ids([gen.encode_messages(m)], max_new_tokens=REF_TOKENS)[0][0][:20]
    assert len(pieces) > 1  # token by token, not all at the end
    assert "".join(pieces) == gen.decode(ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    done = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert done[0].usage.completion_tokens == 20  # usage on the finishing chunk even without include_usage


def test_completions_text_ids_n_seed_stop(gen, client):
    tok = gen.tokenizer
    ids = [tok.bos_token_id] + tok("Once upon a time", add_special_tokens=False)["input_ids"]
    ids2 = tok("Once upon a time")["input_ids"]  # a text prompt: the tokenizer's own special tokens
    ref, ref2 = (o[0][:12] for o in gen.generate_ids([ids, ids2], max_new_tokens=REF_TOKENS))
    r = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == gen.decode(ref) and r.usage.prompt_tokens == len(ids)
    r2 = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r2.choices[0].text == gen.decode(ref2) and r2.usage.prompt_tokens == len(ids2)
    # sampling: n choices with a seed are reproducible and differ from each other
    kw = dict(model="tiny-chat", prompt=ids, max_tokens=16, temperature=1.0, top_p=0.9, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and [c.index for c in a.choices] == [0, 1, 2]
    assert 0 < a.usage.completion_tokens <= 3 * 16 and a.usage.prompt_tokens == len(ids)
    # a stop string cuts the text before it, with finish_reason 'stop'
    full = gen.decode(ref)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r3 = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=12, temperature=0, stop=[stop])
    assert r3.choices[0].finish_reason == "stop" and r3.choices[0].text == full[: full.index(stop)]


def test_stops_on_end_token(engine):
    """A row stops (finish 'stop', the end token not in the output) at one of its end ids: the
    greedy first token of a prompt, made an end id, ends it at once."""
    forced = Seq([1, 5, 9], SamplingParams(max_tokens=8), notify=lambda ids, why: None)
    engine.submit([forced])
    while forced.finish_reason is None:
        time.sleep(0.01)
    first = forced.out_ids[0]
    seq = Seq([1, 5, 9], SamplingParams(max_tokens=8), notify=lambda ids, why: None, eos_ids=frozenset({first}))
    engine.submit([seq])
    while seq.finish_reason is None:
        time.sleep(0.01)
    assert seq.finish_reason == "stop" and seq.out_ids == []


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/health")
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 200 and body["status"] == "ok" and body["slots"] == 4 and body["max_len"] == MAX_LEN


@pytest.mark.parametrize("body,raw,status,param,code", [
    (None, b'{"model": "tiny-chat", "messages": [', 400, None, None),
    (None, b'[1, 2]', 400, None, None),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, None, 404, "model", "model_not_found"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi " * 200}]}, None, 400, "messages",
     "context_length_exceeded"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 120}, None, 400,
     "max_tokens", "context_length_exceeded"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, None, 400,
     "max_tokens", None),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, None, 400,
     "temperature", None),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "messages[0].role",
     None),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, None, 400,
     "logprobs", None),
    ({"model": "tiny-chat", "messages": [], "max_tokens": 4}, None, 400, "messages", None),
    ({"model": "tiny-chat", "prompt": [1, 99999], "max_tokens": 4}, None, 400, "prompt", None),
    ({"model": "tiny-chat", "prompt": "", "max_tokens": 4}, None, 400, "prompt", None),
    ({"model": "tiny-chat", "prompt": [1] * 200}, None, 400, "prompt", "context_length_exceeded"),
])
def test_bad_requests(server, body, raw, status, param, code):
    path = "/v1/completions" if body and "prompt" in body else "/v1/chat/completions"
    got, err = post(server, path, body, raw)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["code"] == code and err["error"]["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=0)


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_slot(server, engine):
    """A streaming client that goes away after the first tokens: its slot is freed long before
    its max_tokens would have been reached."""
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
            "temperature": 0, "stream": True}
    before = engine.stats()["decode_steps"]
    s = socket.create_connection((server.host, server.port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    assert b"200 OK" in got
    _wait(lambda: engine.stats()["running"] == 1)
    s.close()
    _wait(lambda: engine.stats()["running"] == 0)
    assert engine.stats()["decode_steps"] - before < 95


def test_bounded_queue_answers_429(gen):
    """A queue of two while the engine loop is held: the third request is refused with 429 (not
    queued); once the loop runs, the two queued requests complete."""
    eng = Engine(gen.params, gen.config, max_batch=1, max_len=MAX_LEN, max_queue=2)
    app = create_app([served_from_generator(gen, "tiny-chat", eng)])
    with ServerThread(app, [eng]) as srv:
        body = {"model": "tiny-chat", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
        out = []
        ts = [threading.Thread(target=lambda: out.append(post(srv, "/v1/completions", body))) for _ in range(2)]
        for t in ts:
            t.start()
        _wait(lambda: eng.stats()["queued"] == 2)
        status, err = post(srv, "/v1/completions", body)
        assert status == 429 and err["error"]["type"] == "rate_limit_error" and "limit 2" in err["error"]["message"]
        eng.start()
        for t in ts:
            t.join()
        assert [s for s, _ in out] == [200, 200] and out[0][1]["choices"] == out[1][1]["choices"]


def test_no_compilation_after_warmup(server, client):
    """Prompts of every length bucket, several batch occupancies, greedy and sampled, stream or
    not, n > 1: no XLA compilation at all once the engine warmed up."""
    with CompileCounter() as counter:
        threads = []
        for i, n in enumerate((1, 20, 40, 70, 100)):
            kw = dict(model="tiny-chat", prompt=[1] + [7] * (n - 1), max_tokens=5 + i,
                      temperature=0.0 if i % 2 else 0.8, n=1 + i % 2, stream=bool(i % 3 == 0))
            threads.append(threading.Thread(target=lambda kw=kw: list(client.completions.create(**kw))
                                            if kw["stream"] else client.completions.create(**kw)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3)
    assert counter.count == 0, counter.names


@pytest.mark.parametrize("argv,match", [
    (["--model=a", "--workdir=b"], "exactly one"),
    (["--model=a", "--max_batch=0"], "max_batch"),
    (["--model=a", "--adapters=x"], "name=DIR"),
    (["--model=a", "--adapters=x=a,x=b"], "twice"),
    (["--model=a", "--log_level=loud"], "log_level"),
    (["--model=/nonexistent"], "not a directory"),
])
def test_cli_bad_arguments(argv, match):
    from sft_jax.export import UsageError
    from sft_jax.serve.__main__ import main

    with pytest.raises(UsageError, match=match):
        main(argv)


def lora_adapter(gen, rank, targets, seed):
    """A Generator for a LoRA adapter over gen's base with random (non-zero) A and B."""
    method = Lora(rank=rank, alpha=2.0 * rank, targets=targets)
    trainable, frozen = method.init(gen.params, gen.config, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, jnp.float32), trainable)
    params, method_vars = method.model_inputs(trainable, frozen)
    return dataclasses.replace(gen, params=params, method=method, method_vars=method_vars, name=f"lora{seed}")


class SublayerScale(Lora):
    """A method that also changes a sublayer output: not stackable (gets its own engine)."""

    def sublayer_out(self, kind, h, site):
        return h * 1.5


def test_mixed_adapters_in_one_batch_equal_each_adapter_alone(gen, tmp_path):
    """Concurrent requests for the base and two LoRA adapters (different ranks and targets; one read
    back from a PEFT adapter directory as `--adapters` does) share one engine and its batches; each
    answer equals `sft_jax.generate` greedy with that adapter alone."""
    a1 = lora_adapter(gen, 4, "all-linear", seed=1)
    a1.method.save_peft(str(tmp_path / "a1"), a1.method_vars["method"], gen.params, gen.config)
    a1_peft = load_adapter(str(tmp_path / "a1"), gen)
    a2 = lora_adapter(gen, 2, "q_proj,v_proj,down_proj", seed=2)
    other = lora_adapter(gen, 2, "q_proj", seed=3)
    other = dataclasses.replace(other, method=SublayerScale(rank=2, alpha=4.0, targets="q_proj"))
    models = build_models([("base", gen), ("a1", a1_peft), ("a2", a2), ("other", other)], max_batch=4,
                          max_len=64)
    eng = models[0].engine
    assert [m.engine is eng for m in models] == [True, True, True, False]
    assert [m.adapter for m in models[:3]] == [0, 1, 2] and eng.num_adapters == 2
    eng.warmup()
    app = create_app(models[:3])
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    want = {name: reference(g, msgs, [16] * 3) for name, g in (("base", gen), ("a1", a1), ("a2", a2))}
    assert len({want[n][0][0] for n in want}) == 3  # the adapters change the output
    with ServerThread(app, [eng.start()]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        jobs = [(name, i) for i in range(3) for name in ("base", "a1", "a2")]
        got = {}

        def call(name, i):
            r = client.chat.completions.create(model=name, messages=msgs[i], max_tokens=16, temperature=0)
            got[name, i] = (r.choices[0].message.content, r.choices[0].finish_reason)

        threads = [threading.Thread(target=call, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [m.id for m in client.models.list().data] == ["base", "a1", "a2"]
        assert eng.stats()["decode_steps"] < len(jobs) * 15  # the rows were decoded together
    for name, i in jobs:
        assert got[name, i] == want[name][i][:2], (name, i)


@pytest.mark.slow
def test_cli_serves_and_sigterm_drains(gen, tmp_path):
    """`python -m sft_jax.serve --model=DIR --adapters=name=PEFT_DIR`: both ids served (the adapter's
    greedy answer == generate with it); a stream in flight when SIGTERM arrives completes in full; the
    process exits 0."""
    model_dir = gen.name  # load_model_dir names the Generator by its directory
    lora = lora_adapter(gen, 4, "all-linear", seed=5)
    lora.method.save_peft(str(tmp_path / "lora5"), lora.method_vars["method"], gen.params, gen.config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "sft_jax.serve", f"--model={model_dir}", f"--port={port}",
                             "--max_model_len=128", "--max_batch=2", "--log_level=warning",
                             f"--adapters=lora5={tmp_path / 'lora5'}"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.3)
        assert [x.id for x in client.models.list().data] == ["tiny-chat", "lora5"]
        m = [{"role": "user", "content": QUESTIONS[0]}]
        r = client.chat.completions.create(model="lora5", messages=m, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == reference(lora, [m], [12])[0][0]
        stream = client.chat.completions.create(model="tiny-chat", messages=m, max_tokens=60, temperature=0,
                                                stream=True)
        it = iter(stream)
        first = next(it)
        proc.send_signal(signal.SIGTERM)
        rest = list(it)
        text = "".join(c.choices[0].delta.content or "" for c in [first] + rest if c.choices)
        assert text == reference(gen, [m], [60])[0][0]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_tensor_parallel_generate_and_engine_equal_one_device(tmp_path):
    """Weights sharded over the 8-fake-device mesh (heads / kv heads / MLP / vocab over `tensor`):
    `sampling.generate` and the engine give the one-device greedy tokens."""
    from sft_jax.sampling import generate
    from sft_jax.sharding import tensor_parallel_mesh

    assert jax.device_count() == 8
    gen8 = load_model_dir(make_model_dir(tmp_path / "tp", seed=3, num_heads=8, num_kv_heads=8,
                                         vocab_size=408))  # 408 = 8 x 51 (>= the tokenizer's 402)
    mesh = tensor_parallel_mesh(8)
    prompts = [[1, 17, 40, 99], [1] + list(range(50, 80))]
    one = generate(gen8.params, gen8.config, prompts, max_new_tokens=12)
    assert generate(gen8.params, gen8.config, prompts, max_new_tokens=12, mesh=mesh) == one
    eng = Engine(gen8.params, gen8.config, max_batch=2, max_len=48, mesh=mesh)
    q = eng.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec[1] == "tensor" and {sh.data.shape for sh in q.addressable_shards} == {(64, 8)}
    assert eng.cache["k"].sharding.spec[3] == "tensor"
    eng.start()
    seqs = [Seq(p, SamplingParams(max_tokens=12), notify=lambda ids, why: None) for p in prompts]
    eng.submit(seqs)
    _wait(lambda: all(s.finish_reason for s in seqs))
    eng.shutdown()
    assert [s.out_ids for s in seqs] == one

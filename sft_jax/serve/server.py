"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) over an `Engine`.

Endpoints: `POST /v1/chat/completions` (messages rendered with the model's training template,
as `sft_jax.generate` does), `POST /v1/completions` (text, rendered as-is with the tokenizer's
special tokens, or token ids), `GET /v1/models`, `GET /health`.  Every response carries `usage`
(streams: on the chunk that finishes the last choice, plus the standard extra usage chunk when
`stream_options.include_usage`).  Streams are server-sent events (`data: {json}` ... `data: [DONE]`).

Errors are OpenAI-style JSON `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON
and invalid fields, 404 `model_not_found`, 400 `context_length_exceeded`, 429 when the engine's
bounded queue is full, 503 while draining.  A client that disconnects has its sequences cancelled
(their slots are freed at the next step).  `ServerThread` runs the app on a local socket in a
background thread (tests, benchmarks, an in-process teacher).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import socket
import threading
import time
import logging
import uuid
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sft_jax.serve.adapters import NotStackable, low_rank_parts, same_tree
from sft_jax.serve.engine import Engine, EngineError, SamplingParams, Seq
from sft_jax.serve.protocol import BadRequest, Options, error_body, parse_chat, parse_completion

log = logging.getLogger("sft_jax.serve")


@dataclasses.dataclass
class ServedModel:
    """One model id of `/v1/models`: the engine (and adapter index in it) that decodes it, how its
    prompts are encoded/decoded and its end tokens.

    `encode_messages(messages) -> ids` (None: the model has no chat template),
    `encode_text(text) -> ids`, `decode(ids) -> text`."""

    name: str
    engine: Engine
    adapter: int
    encode_messages: Callable[[list[dict]], list[int]] | None
    encode_text: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_ids: frozenset[int]
    vocab_size: int
    parent: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def served_from_generator(gen, name: str, engine: Engine, adapter: int = 0, parent: str | None = None) -> ServedModel:
    """A `ServedModel` for an `sft_jax.generate.Generator` (template, tokenizer and stop ids as generate)."""
    if gen.tokenizer is None:
        raise ValueError(f"{gen.name}: serving needs a tokenizer (none found beside the model)")
    return ServedModel(
        name=name, engine=engine, adapter=adapter,
        encode_messages=gen.encode_messages if gen.template else None,
        encode_text=lambda text: list(gen.tokenizer(text)["input_ids"]),
        decode=gen.decode, eos_ids=frozenset(int(e) for e in gen.eos_ids), vocab_size=int(gen.config.vocab_size),
        parent=parent,
    )


def build_models(entries: list[tuple[str, Any]], **engine_kw) -> list[ServedModel]:
    """`ServedModel`s (engines built, not started) for `(name, Generator)` entries.

    Entries whose method is purely low-rank (`adapters.low_rank_parts`) and whose params and model
    config equal an earlier such entry's share that entry's engine: one base, an adapter stack, any
    mix of them per batch.  Every other entry (another base, or a method such as DoRA or a quantised
    base) gets an engine of its own running its method unmerged.  A group of one runs its method
    directly.  `engine_kw`: `Engine`'s keyword arguments (max_batch, max_len, max_queue, mesh)."""
    groups: list[dict] = []  # {"gen", "members": [(name, gen, parts)], "stackable"}
    for name, gen in entries:
        try:
            parts = low_rank_parts(gen.method, gen.method_vars, gen.config)
        except NotStackable as e:
            log.info("model '%s' gets an engine of its own: %s", name, e)
            parts = None
        home = None
        if parts is not None:
            home = next((g for g in groups if g["stackable"] and g["gen"].config == gen.config
                         and same_tree(g["gen"].params, gen.params)), None)
        if home is None:
            home = {"gen": gen, "members": [], "stackable": parts is not None}
            groups.append(home)
        home["members"].append((name, gen, parts))
    out = []
    for g in groups:
        base = g["gen"]
        if len(g["members"]) == 1:
            engine = Engine(base.params, base.config, method=base.method, method_vars=base.method_vars, **engine_kw)
            out.append(served_from_generator(base, g["members"][0][0], engine))
            continue
        adapters = [parts for _, _, parts in g["members"] if parts]
        engine = Engine(base.params, base.config, adapters=adapters, **engine_kw)
        k = 0
        for name, gen, parts in g["members"]:
            k += bool(parts)
            out.append(served_from_generator(gen, name, engine, k if parts else 0,
                                             parent=None if name == g["members"][0][0] else g["members"][0][0]))
    return out


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _bad(e: BadRequest) -> JSONResponse:
    return _error(e.status, e.message, e.kind, e.param, e.code)


class _Bridge:
    """Engine-thread notifications -> an asyncio queue of (choice index, new ids, finish reason)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def notifier(self, i: int):
        def notify(ids: list[int], reason: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens any more
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, list(ids), reason))

        return notify


def _stream_safe(text: str, stops: tuple[str, ...]) -> str:
    """The prefix of the text so far that can be sent: without a trailing partial UTF-8 character
    and without a tail that may still become a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


def create_app(models: list[ServedModel]) -> FastAPI:
    """The FastAPI app serving `models` through their engines (started by the caller; drained and
    joined when the app shuts down)."""
    by_name = {m.name: m for m in models}
    engines = list({id(m.engine): m.engine for m in models}.values())

    def shutdown_all() -> None:
        for e in engines:
            e.begin_drain()
        for e in engines:
            e.shutdown()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, shutdown_all)

    app = FastAPI(title="sft_jax", lifespan=lifespan)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None

    def lookup(name: str) -> ServedModel:
        if name not in by_name:
            raise BadRequest(f"The model '{name}' does not exist (served: {', '.join(by_name)})", "model",
                             status=404, code="model_not_found")
        return by_name[name]

    def make_seqs(model: ServedModel, prompts: list[list[int]], opts: Options, bridge: _Bridge,
                  prompt_field: str) -> list[Seq]:
        engine = model.engine
        seqs = []
        base_seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
        for p, ids in enumerate(prompts):
            if not ids:
                raise BadRequest("the prompt is empty (it encodes to no tokens)", prompt_field)
            bad = [t for t in ids if not 0 <= t < model.vocab_size]
            if bad:
                raise BadRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {model.vocab_size})",
                                 prompt_field)
            max_tokens = opts.max_tokens if opts.max_tokens is not None else engine.max_len - len(ids)
            try:
                engine.check(len(ids), max(max_tokens, 1), model.adapter)
            except EngineError as e:
                raise BadRequest(str(e), prompt_field if opts.max_tokens is None else "max_tokens",
                                 code="context_length_exceeded") from None
            for c in range(opts.n):
                i = p * opts.n + c
                params = SamplingParams(max_tokens=max_tokens, temperature=opts.temperature, top_p=opts.top_p,
                                        top_k=opts.top_k, seed=(base_seed + i) % 2**31, stop=opts.stop)
                seqs.append(Seq(list(ids), params, bridge.notifier(i), eos_ids=model.eos_ids,
                                detokenize=model.decode, adapter=model.adapter))
        return seqs

    def submit(engine: Engine, seqs: list[Seq]) -> None:
        try:
            engine.submit(seqs)
        except EngineError as e:
            raise BadRequest(str(e), status=e.status, kind=e.kind) from None

    def final_text(model: ServedModel, seq: Seq) -> str:
        return seq.text if seq.text is not None else model.decode(seq.out_ids)

    def usage(prompts: list[list[int]], seqs: list[Seq]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(len(s.out_ids) for s in seqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def wait_all(request: Request, engine: Engine, seqs: list[Seq], bridge: _Bridge) -> None:
        """Until every sequence finished; cancels them if the client disconnects."""
        left = len(seqs)
        try:
            while left:
                try:
                    _, _, reason = await asyncio.wait_for(bridge.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(seqs)
                        return
                    continue
                left -= reason is not None
        finally:
            if left:
                engine.cancel(seqs)

    def failure(engine: Engine, seqs: list[Seq]) -> JSONResponse | None:
        if any(s.finish_reason == "error" for s in seqs):
            return _error(500, f"generation failed: {engine.error!r}", "server_error")
        if any(s.finish_reason == "cancelled" for s in seqs):
            return _error(503, "the request was cancelled (server shutting down)", "server_error")
        return None

    async def respond(request: Request, model: ServedModel, prompts: list[list[int]], opts: Options, chat: bool):
        bridge = _Bridge(asyncio.get_running_loop())
        seqs = make_seqs(model, prompts, opts, bridge, "messages" if chat else "prompt")
        submit(model.engine, seqs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if opts.stream:
            return StreamingResponse(stream(rid, created, model, prompts, seqs, opts, bridge, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await wait_all(request, model.engine, seqs, bridge)
        bad = failure(model.engine, seqs)
        if bad is not None:
            return bad
        choices = []
        for i, s in enumerate(seqs):
            text = final_text(model, s)
            body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": i, **body, "logprobs": None, "finish_reason": s.finish_reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model.name, "choices": choices, "usage": usage(prompts, seqs)}

    async def stream(rid, created, model, prompts, seqs, opts, bridge, chat):
        engine = model.engine
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent = [""] * len(seqs)
        left = len(seqs)

        def chunk(i: int, text: str | None, reason: str | None, first: bool = False, with_usage: bool = False):
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            c = {"id": rid, "object": obj, "created": created, "model": model.name, "choices": [choice]}
            if with_usage:
                c["usage"] = usage(prompts, seqs)
            return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

        try:
            if chat:
                for i in range(len(seqs)):
                    yield chunk(i, "", None, first=True)
            while left:
                i, _, reason = await bridge.queue.get()
                s = seqs[i]
                if reason in ("error", "cancelled"):
                    msg = f"generation failed: {engine.error!r}" if reason == "error" else "cancelled (shutting down)"
                    yield f"data: {json.dumps(error_body(msg, 'server_error'))}\n\n"
                    return
                if reason is None:
                    safe = _stream_safe(model.decode(s.out_ids), opts.stop)
                else:
                    safe = final_text(model, s)
                    left -= 1
                if safe.startswith(sent[i]) and (len(safe) > len(sent[i]) or reason is not None):
                    delta, sent[i] = safe[len(sent[i]):], safe
                    yield chunk(i, delta, reason, with_usage=reason is not None and left == 0)
                elif reason is not None:
                    yield chunk(i, None, reason, with_usage=left == 0)
            if opts.include_usage:
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model.name, 'choices': [], 'usage': usage(prompts, seqs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client went away (or the stream failed): free the slots
                engine.cancel(seqs)

    @app.exception_handler(BadRequest)
    async def _on_bad(_request, e: BadRequest):
        return _bad(e)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(await read_json(request))
        model = lookup(req.options.model)
        if model.encode_messages is None:
            raise BadRequest(f"model '{model.name}' has no chat template; use /v1/completions", "messages")
        ids = await asyncio.get_running_loop().run_in_executor(None, model.encode_messages, req.messages)
        return await respond(request, model, [ids], req.options, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(await read_json(request))
        model = lookup(req.options.model)
        prompts = [p if isinstance(p, list) else model.encode_text(p) for p in req.prompts]
        return await respond(request, model, prompts, req.options, chat=False)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "sft_jax",
             "root": m.parent or m.name, "parent": m.parent, "max_model_len": m.engine.max_len} for m in models]}

    @app.get("/health")
    async def health():
        """Status and the first engine's counters (`engines`: every engine's)."""
        stats = [e.stats() for e in engines]
        body = {**stats[0], "engines": stats}
        failed = [e for e in engines if e.error is not None]
        if failed:
            return JSONResponse({"status": "error", "error": repr(failed[0].error), **body}, status_code=500)
        if any(st["draining"] for st in stats):
            return JSONResponse({"status": "draining", **body}, status_code=503)
        return {"status": "ok", **body}

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server; on SIGINT/SIGTERM the engines stop admitting first (new requests get 503),
    then uvicorn stops listening and waits for in-flight responses, then the app's lifespan drains
    and joins the engine; `run()` then returns (uvicorn would re-raise the signal after its graceful
    shutdown, killing the process with it: a drained server exits normally instead)."""

    def __init__(self, config: uvicorn.Config, engines: list[Engine]):
        super().__init__(config)
        self.engines = engines

    def handle_exit(self, sig, frame) -> None:
        for e in self.engines:
            e.begin_drain()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


class ServerThread:
    """Run `app` with uvicorn on `host` (a free port) in a background thread:

        with ServerThread(app, engines) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    """

    def __init__(self, app: FastAPI, engines: list[Engine], host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        cfg = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
        self.server = DrainingServer(cfg, engines)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

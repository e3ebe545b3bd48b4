"""Local OpenAI-compatible test servers for the synth tests (127.0.0.1 only, stopped by the test).

`CraftedTeacher` answers every prompt kind of sft_jax.synth with well-formed, deterministic teacher
outputs (a function of the prompt text and the request seed), including a share of answers that each
filter must reject.  `ScriptedServer` returns a scripted sequence of failures (429, 500, timeouts,
malformed bodies) before answering.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import random
import threading
import time

from sft_jax.synth import distill, evol_instruct, self_instruct

WORDS = """apple river quantum budget poem ladder violin orbit harvest glacier lantern mosaic tariff neuron pepper
sonnet canyon ledger magnet meadow pixel quarry saddle thunder velvet walnut yogurt zephyr anchor bishop copper
dolphin ember falcon garnet hazel igloo jigsaw kettle lemon marble nectar oyster parcel quiver raven sapphire
tundra umbrella vortex willow xylophone yarrow zinc acorn barley cobalt dune easel fjord gravel hammock indigo
jasmine kayak lilac mango nickel opal prism quill rhubarb saffron tulip urchin vapor wombat yeast badger cactus
diesel elbow fennel goblet helmet iris jelly kiwi lotus mustard noodle olive pebble quartz ribbon spruce thimble""".split()


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest())


def _last_task(prompt: str) -> str:
    return prompt.rsplit("Task:", 1)[-1].strip().split("\n")[0]


def crafted_answer(prompt: str, seed: int) -> str:
    """A teacher answer for one of sft_jax.synth's prompts."""
    r = _rng(prompt, seed)
    if prompt.startswith(self_instruct.GENERATE_HEADER):
        new = [f"Explain how {' '.join(r.sample(WORDS, 3))} relates to {' '.join(r.sample(WORDS, 3))} today."
               for _ in range(3)]
        new.append(f"Classify the sentiment of this {r.choice(WORDS)} review as positive or negative.")
        new += ["Draw a picture of a lighthouse at night.", "Sum it.", "- list three colours of the rainbow",
                prompt.split("Task 1: ", 1)[1].split("\n", 1)[0],  # an in-context instruction again: ROUGE-L 1
                "Write a program that sorts a list of names.", "Écris un poème sur la mer, s'il te plaît."]
        r.shuffle(new)
        return " " + new[0] + "".join(f"\nTask {k}: {x}" for k, x in enumerate(new[1:], 10))
    if prompt.startswith(self_instruct.CLASSIFY_HEADER):
        return " Yes" if "classify" in _last_task(prompt).lower() else " No"
    if prompt.startswith(self_instruct.OUTPUT_FIRST_HEADER):
        w = r.choice(WORDS)
        return f"Class label: Positive\nInput: I love this {w}.\nClass label: Negative\nInput: This {w} is awful."
    if prompt.startswith(self_instruct.INPUT_FIRST_HEADER):
        a, b = r.sample(WORDS, 2)
        return (f"Example 1\nInput: {a} and {b}\nOutput: The {a} and the {b} share a long history.\n\n"
                f"Example 2\nOutput: A {b} is not a {a}.\n\nExample 3\nInput: {a} and {b}\nOutput: Something else.")
    if "#Given Prompt#" in prompt:
        given = prompt.split("#Given Prompt#:\n", 1)[1].rsplit("\n\n#", 1)[0]
        roll = r.random()
        if roll < 0.12:
            return "Here is the rewritten prompt based on the given prompt: " + given
        if roll < 0.24:
            return ""
        extra = " ".join(r.sample(WORDS, 4))
        return f"#Rewritten Prompt#: {given} Also discuss {extra} and justify each step."
    if prompt.startswith(evol_instruct.EQUAL_PROMPT.split("{a}")[0]):
        return "Equal" if r.random() < 0.15 else "Different"
    if prompt.startswith(distill.JUDGE_PROMPT.split("{prompt}")[0]):
        return f"Score: {r.randint(1, 10)}\nThe response is adequate."
    roll = r.random()
    if roll < 0.08:
        return "Sorry, I cannot help with that."
    if roll < 0.12:
        return "It is the, and of a."
    return f"Here is a careful answer about {' '.join(r.sample(WORDS, 5))}, in three clear steps."


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code: int, body: bytes | dict, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server API
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, req))
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            srv.respond(self, self.path, req)
        finally:
            with srv.lock:
                srv.inflight -= 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list = []
        self.inflight = 0
        self.max_inflight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def chat_body(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 0}}


def echo_body(text: str) -> dict:
    """/v1/completions with echo: whitespace tokens, log p = -len(token) / 10, one generated token."""
    toks, offs, pos = [], [], 0
    for piece in text.split(" "):
        toks.append(piece if pos == 0 else " " + piece)
        offs.append(pos)
        pos += len(toks[-1])
    lps = [None] + [-len(t) / 10 for t in toks[1:]]
    return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length", "text": text + " x",
                         "logprobs": {"tokens": toks + [" x"], "token_logprobs": lps + [-1.0],
                                      "text_offset": offs + [pos], "top_logprobs": None}}],
            "usage": {"prompt_tokens": len(toks), "completion_tokens": 1, "total_tokens": 0}}


class CraftedTeacher(_Server):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay

    def respond(self, h: _Handler, path: str, req: dict) -> None:
        if self.delay:
            time.sleep(self.delay)
        if path.endswith("/completions") and "chat" not in path:
            h._send(200, echo_body(req["prompt"]))
            return
        h._send(200, chat_body(crafted_answer(req["messages"][-1]["content"], req.get("seed", 0))))


class ScriptedServer(_Server):
    """Pops one behaviour per request from `script` ("400", "401", "429", "500", "503", "timeout", "badjson",
    "nocontent", "ok"); "ok" once the script is empty."""

    def __init__(self, script: list[str], sleep: float = 1.5):
        super().__init__()
        self.script = list(script)
        self.sleep = sleep

    def respond(self, h: _Handler, path: str, req: dict) -> None:
        with self.lock:
            what = self.script.pop(0) if self.script else "ok"
        if what in ("400", "401", "429", "500", "503"):
            h._send(int(what), {"error": {"message": f"scripted {what}", "type": "x"}},
                    {"Retry-After": "0"} if what == "429" else None)
        elif what == "timeout":
            time.sleep(self.sleep)
            with contextlib.suppress(OSError):
                h._send(200, chat_body("late"))
        elif what == "badjson":
            h._send(200, b"{not json")
        elif what == "nocontent":
            h._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}]})
        else:
            h._send(200, chat_body("answer: " + req["messages"][-1]["content"]))


@contextlib.contextmanager
def serving(server: _Server):
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)

"""Teachers: the models that write synthetic data.

A teacher turns a list of user prompts into completions (`complete`) and, for the
log-likelihood scorer, gives the summed log-probability of a given continuation (`loglik`).

- `OpenAITeacher`: any OpenAI-compatible endpoint (`--teacher=http://host:port/v1`), through the
  `openai` client: chat completions for `complete`, the legacy completions endpoint with
  `echo=True, logprobs=0` for `loglik` (vLLM and the OpenAI-compatible servers that implement
  echo).  Requests run on a bounded thread pool (`concurrency`); 429, 5xx, timeouts, dropped
  connections and unreadable response bodies are retried with exponential backoff (honouring a
  `Retry-After` header); 400 / 413 / 422 fail that request only (a prompt over the context, say);
  other 4xx errors (bad key, unknown model) stop the job at once.
  A request that still fails after the retries comes back as a `Completion` with `error` set,
  which the methods count as a rejection; a batch in which every request failed raises
  `TeacherError` (the job stops, uncommitted, and resumes later).
- `LocalTeacher`: an sft_jax model in this process (`--teacher=hf:DIR` or `workdir:DIR`) through
  `sft_jax.generate.Generator` (the training chat template, batched KV-cache decoding) and
  `sft_jax.models.llama.forward` for the log-likelihood.  Besides the model's stop ids, a generated
  BOS ends an answer (a base model such as llama2.c's starts its next document with BOS).  A
  prompt longer than the context leaves room for the answer by dropping its oldest tokens (counted
  in `usage.truncated_prompts`).

Both keep a token count (`usage`).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import os
import random
import threading
import time
from typing import Sequence

import numpy as np
import openai

RETRYABLE_STATUS = frozenset({408, 409, 429})
REQUEST_STATUS = frozenset({400, 413, 422})  # this request is refused (e.g. too long): counted, not retried


class TeacherError(RuntimeError):
    """The teacher cannot be used (unreachable, rejected the request, bad configuration)."""


@dataclasses.dataclass
class Completion:
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request failed after every retry


@dataclasses.dataclass
class Usage:
    requests: int = 0
    failed_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_prompts: int = 0  # LocalTeacher: prompts cut from the left to fit the context

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Teacher(abc.ABC):
    """The interface the methods use, and the shared usage counters."""

    name = "teacher"

    def __init__(self):
        self.usage = Usage()
        self._lock = threading.Lock()

    @abc.abstractmethod
    def complete(self, prompts: Sequence[str], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> list[Completion]:
        """One completion per prompt, in order (request `k` sampled with seed `seed + k` where supported)."""

    @abc.abstractmethod
    def loglik(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """[(sum of log p(continuation tokens | prompt), number of continuation tokens)]."""

    def _count(self, c: Completion, retries: int) -> None:
        with self._lock:
            self.usage.requests += 1
            self.usage.retries += retries
            self.usage.failed_requests += c.error is not None
            self.usage.prompt_tokens += c.prompt_tokens
            self.usage.completion_tokens += c.completion_tokens


def check_batch(prompts: Sequence[str], outs: Sequence[Completion], name: str) -> None:
    """Raise TeacherError when every request of a non-empty batch failed."""
    if outs and all(o.error is not None for o in outs):
        raise TeacherError(f"{name}: all {len(prompts)} requests of a batch failed; last error: {outs[-1].error}")


# ---------------------------------------------------------------------------- HTTP


class OpenAITeacher(Teacher):
    """An OpenAI-compatible endpoint; the API key is read from the environment variable `api_key_env`."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0, max_backoff: float = 60.0):
        super().__init__()
        if not model:
            raise TeacherError("an HTTP teacher needs --teacher-model=NAME")
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise TeacherError("need concurrency >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")
        self.name = f"{base_url} ({model})"
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._rng = random.Random(0)  # backoff jitter only
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout, max_retries=0)

    def _delay(self, attempt: int, err: Exception) -> float:
        resp = getattr(err, "response", None)
        after = resp.headers.get("retry-after") if resp is not None else None
        if after:
            try:
                return min(float(after), self.max_backoff)
            except ValueError:
                pass
        with self._lock:
            jitter = self._rng.uniform(0.5, 1.0)
        return min(self.backoff * (2 ** attempt) * jitter, self.max_backoff)

    def _call(self, fn):
        """fn() with retries -> (result or None, error text or None, retries used)."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn(), None, attempt
            except openai.APIStatusError as e:
                if e.status_code in REQUEST_STATUS:
                    return None, f"HTTP {e.status_code}: {e.message}", attempt
                if e.status_code < 500 and e.status_code not in RETRYABLE_STATUS:
                    raise TeacherError(f"{self.name}: HTTP {e.status_code}: {e.message}") from None
                err: Exception = e
                why = f"HTTP {e.status_code}"
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError,
                    ValueError, AttributeError, TypeError) as e:  # timeouts, resets, unreadable bodies
                err = e
                why = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, err))
        return None, why, self.max_retries

    def _one(self, prompt: str, kw: dict) -> Completion:
        def request():
            r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                    **kw)
            choice = r.choices[0]
            text = choice.message.content
            if not isinstance(text, str):
                raise ValueError(f"no text in the response: {choice.message!r}"[:200])
            u = r.usage
            return Completion(text=text, finish_reason=choice.finish_reason or "stop",
                              prompt_tokens=(u.prompt_tokens or 0) if u else 0,
                              completion_tokens=(u.completion_tokens or 0) if u else 0)

        out, err, retries = self._call(request)
        c = out if out is not None else Completion(text="", finish_reason="error", error=err)
        self._count(c, retries)
        return c

    def _map(self, fn, items):
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    def complete(self, prompts, *, max_tokens, temperature=0.0, top_p=1.0, seed=0):
        kws = [dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
               for i in range(len(prompts))]
        outs = self._map(lambda a: self._one(*a), list(zip(prompts, kws)))
        check_batch(prompts, outs, self.name)
        return outs

    def _loglik_one(self, pair: tuple[str, str]) -> tuple[tuple[float, int] | None, str | None]:
        prompt, cont = pair
        full = prompt + cont

        def request():
            r = self.client.completions.create(model=self.model, prompt=full, max_tokens=1, temperature=0.0,
                                               echo=True, logprobs=0)
            lp = r.choices[0].logprobs
            if lp is None or lp.text_offset is None or lp.token_logprobs is None:
                raise ValueError("the endpoint returned no echoed logprobs (it needs echo=True support)")
            total, n = 0.0, 0
            for off, v in zip(lp.text_offset, lp.token_logprobs):
                if len(prompt) <= off < len(full) and v is not None:
                    total += float(v)
                    n += 1
            return total, n

        out, err, retries = self._call(request)
        self._count(Completion(text="", error=err), retries)
        return out, err

    def loglik(self, pairs):
        outs = self._map(self._loglik_one, list(pairs))
        if outs and all(o is None for o, _ in outs):
            raise TeacherError(f"{self.name}: every log-likelihood request of a batch failed; last error: "
                               f"{outs[-1][1]} (the scorer needs /v1/completions with echo and logprobs)")
        return [o if o is not None else (float("nan"), 0) for o, _ in outs]


# ---------------------------------------------------------------------------- in process


class LocalTeacher(Teacher):
    """An sft_jax model in this process (a `sft_jax.generate.Generator`)."""

    def __init__(self, generator, *, batch_size: int = 8):
        super().__init__()
        if generator.tokenizer is None:
            raise TeacherError(f"{generator.name}: the model has no tokenizer")
        bos = generator.config.bos_token_id
        stops = list(generator.eos_ids) + ([bos] if bos is not None and bos not in generator.eos_ids else [])
        self.gen = dataclasses.replace(generator, eos_ids=stops)
        self.name = generator.name
        self.batch_size = batch_size
        self.context = int(generator.config.max_position_embeddings)
        self._fwd = None

    def _fit(self, ids: list[int], room: int) -> list[int]:
        keep = max(1, self.context - room)
        if len(ids) > keep:
            with self._lock:
                self.usage.truncated_prompts += 1
            return ids[-keep:]
        return ids

    def complete(self, prompts, *, max_tokens, temperature=0.0, top_p=1.0, seed=0):
        max_tokens = min(max_tokens, self.context - 1)
        ids = [self._fit(self.gen.encode_prompt(p), max_tokens) for p in prompts]
        outs: list[Completion] = []
        for k in range(0, len(ids), self.batch_size):
            chunk = ids[k:k + self.batch_size]
            res = self.gen.generate_ids(chunk, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed + k)
            for p, (new, why) in zip(chunk, res):
                c = Completion(text=self.gen.decode(new), finish_reason=why, prompt_tokens=len(p),
                               completion_tokens=len(new))
                self._count(c, 0)
                outs.append(c)
        return outs

    def _forward(self):
        if self._fwd is None:
            import jax

            from sft_jax.models import llama

            cfg, method = self.gen.config, self.gen.method

            def fwd(params, method_vars, x, pos, seg):
                return llama.forward(params, cfg, x, pos, seg, method=method, method_vars=method_vars)

            jitted = jax.jit(fwd)
            self._fwd = lambda x, pos, seg: jitted(self.gen.params, self.gen.method_vars, x, pos, seg)
        return self._fwd

    def loglik(self, pairs):
        import jax

        tok = self.gen.tokenizer
        rows = []
        for prompt, cont in pairs:
            c = list(tok(cont, add_special_tokens=False)["input_ids"])[: self.context - 1]
            p = self._fit(self.gen.encode_prompt(prompt), len(c))
            rows.append((p, c))
        out: list[tuple[float, int]] = []
        fwd = self._forward()
        for k in range(0, len(rows), self.batch_size):
            chunk = rows[k:k + self.batch_size]
            t = max(len(p) + len(c) for p, c in chunk)
            t = -(-t // 64) * 64  # bucketed lengths share a compilation
            x = np.zeros((len(chunk), t), np.int32)
            seg = np.zeros((len(chunk), t), np.int32)
            for i, (p, c) in enumerate(chunk):
                x[i, : len(p) + len(c)] = p + c
                seg[i, : len(p) + len(c)] = 1
            pos = np.where(seg > 0, np.arange(t)[None, :], 0).astype(np.int32)
            logp = np.asarray(jax.nn.log_softmax(fwd(x, pos, seg), axis=-1))
            for i, (p, c) in enumerate(chunk):
                # the token at position j is predicted by the logits at j - 1
                idx = np.arange(len(p), len(p) + len(c))
                total = float(logp[i, idx - 1, x[i, idx]].sum()) if len(c) else 0.0
                out.append((total, len(c)))
        return out


# ---------------------------------------------------------------------------- --teacher


def make_teacher(spec: str, *, model: str = "", api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0, batch_size: int = 8) -> Teacher:
    """`http(s)://host:port/v1` | `hf:DIR` | `workdir:DIR[@STEP]` -> a Teacher."""
    if spec.startswith(("http://", "https://")):
        return OpenAITeacher(spec, model, api_key_env=api_key_env, concurrency=concurrency, max_retries=max_retries,
                             timeout=timeout, backoff=backoff)
    from sft_jax import generate

    if spec.startswith("hf:"):
        return LocalTeacher(generate.load_model_dir(spec[3:]), batch_size=batch_size)
    if spec.startswith("workdir:"):
        path, _, step = spec[len("workdir:"):].partition("@")
        from sft_jax.workdir import check_workdir

        step_n = int(step) if step else None
        check_workdir(path, step_n)
        return LocalTeacher(generate.load_workdir(path, step_n), batch_size=batch_size)
    raise TeacherError(f"--teacher={spec!r}: expected http(s)://HOST:PORT/v1, hf:DIR or workdir:DIR[@STEP]")

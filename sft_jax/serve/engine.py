"""Continuous-batching decoder over the model's KV cache (the engine behind `sft_jax.serve`).

Slots
-----
The engine owns ONE KV cache (`llama.init_cache(config, max_batch, max_len)`): row `r` is slot `r`,
holding at most one sequence at a time.  Its `index` (the cache slot every row writes next) is a
ring position `g % max_len` shared by all rows: every decode step feeds one token per row at slot
`g % max_len` (inactive rows feed segment id 0, which marks that slot empty) and then `g += 1`.
A sequence admitted at step `g` is prefilled alone (batch 1, its prompt right-padded to a length
bucket) and its keys/values are copied into its row at slots `g - P .. g - 1 (mod max_len)`, the
rest of the row marked empty; its new tokens then land at `g, g + 1, ...`.  Attention reads only
the positions stored per slot (see `sft_jax.models.llama`), so where in the ring a row's tokens
sit does not matter; `prompt + max_tokens <= max_len` guarantees a row never overwrites itself.

Requests arriving while others decode are prefilled between two decode steps and join the next
one (continuous batching); a finished or cancelled sequence frees its slot at once.

Phi-3 `longrope` (`rope.reencode_at`): when a row feeds the token at position
original_max_position_embeddings, its whole sequence (prompt + completion so far) is prefilled again
into the same slots (long factors for every key, as transformers' Phi-3 re-encodes its cache there) and
that prefill's token replaces the decode step's for the row; other rows are unaffected.

Models
------
An engine runs one base `params` either with one fine-tuning method for every row (`method`,
`method_vars`, as `llama.forward_with_cache`), or with a stack of low-rank adapters
(`sft_jax.serve.adapters`): each sequence names its adapter (`Seq.adapter`, 0 = the plain base) and
the step gathers every row's own A/B, so one batch mixes adapters.

Shapes
------
The decode step always runs the whole `[max_batch, 1]` batch, and a prefill runs `[1, bucket]` for
a bucket from `length_buckets(max_len)` (powers of two from 16), so after `warmup()` (which runs
every one of them) no request compiles anything.  Sampling parameters (temperature, top-p, top-k,
seed) are per-row arrays, not static arguments.

Sampling
--------
Temperature 0 is greedy (argmax, as `sampling.generate`); otherwise the logits are divided by the
temperature, cut to the top-k (k > 0) and to the smallest nucleus of mass >= top-p, then sampled
with the key `fold_in(PRNGKey(seed), step)` of that row: a seeded request gives the same tokens
whatever else shares its batch.

Threads
-------
`start()` runs the loop in a daemon thread; `submit()` and `cancel()` may be called from any thread.
A sequence reports progress through its `notify(new_ids, finish_reason)` callback, called from the
engine thread.  `shutdown()` stops admitting, lets the running and queued sequences finish (drain),
and joins the thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import sharding
from sft_jax.models import llama
from sft_jax.models import rope
from sft_jax.models.config import ModelConfig
from sft_jax.models.hooks import METHOD
from sft_jax.serve import adapters as adapter_lib
from sft_jax.sampling import mesh_rules


class EngineError(Exception):
    """A request the engine cannot take; `status` is the HTTP status the server answers with."""

    status = 400
    kind = "invalid_request_error"


class ContextLengthError(EngineError):
    """Prompt + max_tokens exceed the engine's context (`max_len`)."""


class QueueFullError(EngineError):
    """The bounded queue of waiting sequences is full."""

    status = 429
    kind = "rate_limit_error"


class DrainingError(EngineError):
    """The engine is shutting down and admits nothing new."""

    status = 503
    kind = "server_error"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-sequence decoding settings (validated by the caller)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(eq=False)
class Seq:
    """One generated sequence (one choice of one request).

    `notify(new_ids, finish_reason)` is called from the engine thread after every token (with the new
    ids) and once more with a finish reason: 'stop' (an `eos_ids` token, not included in `out_ids`, or
    a stop string), 'length' (max_tokens), 'cancelled' or 'error' (the engine failed: `Engine.error`).
    Stop strings need `detokenize(ids) -> str`; `text` is then set when one cut the output: the text
    before the stop string (the ids still hold the tokens that produced it)."""

    prompt_ids: list[int]
    params: SamplingParams
    notify: Callable[[list[int], str | None], None]
    eos_ids: frozenset[int] = frozenset()
    detokenize: Callable[[list[int]], str] | None = None
    adapter: int = 0  # index into the engine's adapter stack (0 = its plain params)
    out_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    cancelled: bool = False


def length_buckets(max_len: int, smallest: int = 16) -> list[int]:
    """Prefill lengths compiled: powers of two from `smallest`, capped by (and ending at) max_len."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return out


def sample_rows(logits, temperature, top_p, top_k, seeds, steps):
    """Per-row sampling. logits [B, V] float32; temperature/top_p [B] float32; top_k/seeds/steps [B]
    int32 -> token ids [B] int32.  Rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        lg = logits / t
        desc = jnp.sort(lg, axis=-1)[:, ::-1]
        v = lg.shape[-1]
        kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
        lg = jnp.where((top_k[:, None] > 0) & (lg < kth), -jnp.inf, lg)
        desc = jnp.where((top_k[:, None] > 0) & (desc < kth), -jnp.inf, desc)
        probs = jax.nn.softmax(desc, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # the smallest prefix whose mass reaches top_p (always at least one token)
        cut_idx = jnp.sum(cum - probs < top_p[:, None], axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(desc, cut_idx, axis=-1)
        lg = jnp.where((top_p[:, None] < 1.0) & (lg < cutoff), -jnp.inf, lg)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, steps)
        tok = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, lg).astype(jnp.int32)
        return jnp.where(temperature > 0, tok, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


class Engine:
    """Slots + a background decode loop for one model (see the module docstring).

    params / method / method_vars: as `llama.forward_with_cache` takes them (one fine-tuning method
    for every row), or `adapters`: the `adapters.low_rank_parts` of N low-rank adapters over these
    params, stacked so that each sequence picks its own (`Seq.adapter`: 0 = the plain params,
    i = adapters[i - 1]) and one batch mixes them.  `max_len`: the context of one slot (prompt +
    completion; default min(max_position_embeddings, 2048)).  `max_queue`: how many sequences may
    wait for a slot before `submit` refuses.  `mesh`: place the weights tensor-parallel
    (`sharding.LOGICAL_RULES`; method variables and adapters replicated) and run under it.
    """

    def __init__(self, params, config: ModelConfig, *, method=None, method_vars=None, adapters=None,
                 max_batch: int = 8, max_len: int | None = None, max_queue: int = 64, mesh=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        limit = int(config.max_position_embeddings)
        max_len = min(limit, 2048) if max_len is None else int(max_len)
        if not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be in [1, {limit}] (the model's max_position_embeddings), got {max_len}")
        self.config = config
        self.max_batch, self.max_len, self.max_queue = int(max_batch), max_len, int(max_queue)
        self.mesh = mesh
        self.buckets = length_buckets(max_len)
        if method is not None and method.embed_slots():
            raise ValueError(f"serving does not support {method.describe()}: it prepends {method.embed_slots()} "
                             "virtual tokens per sequence, which the slot cache does not hold; use sft_jax.generate")
        if adapters and method is not None:
            raise ValueError("give either one method for every row or stacked adapters, not both")
        self.num_adapters = len(adapters or [])
        stacked = bool(adapters)
        # the per-step model input: the stacked adapters (gathered per row inside the step) or the method's
        self.extra = adapter_lib.stack(adapters, config.scan_layers) if stacked else (method_vars or {})
        self.params = params
        self.cache = llama.init_cache(config, self.max_batch, max_len)
        if mesh is not None:
            if jax.tree.structure(params) != jax.tree.structure(llama.abstract_params(config)):
                raise ValueError("tensor-parallel serving needs the plain parameter layout (this method stores the "
                                 "base weights in another form); serve it on one device")
            self.params = sharding.shard_params(params, config, mesh)
            self.extra = jax.device_put(self.extra, sharding.replicated(mesh))
            self.cache = jax.device_put(self.cache, cache_shardings(self.cache, config, mesh))
        hooks = adapter_lib.ROW_ADAPTERS if stacked else method
        self._prefill = _jit_prefill(config, mesh, hooks, stacked)
        self._decode = _jit_decode(config, mesh, hooks, stacked)
        b = self.max_batch
        self._tokens = np.zeros(b, np.int32)
        self._positions = np.zeros(b, np.int32)
        self._active = np.zeros(b, bool)
        self._temp = np.zeros(b, np.float32)
        self._top_p = np.ones(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._seeds = np.zeros(b, np.int32)
        self._steps = np.zeros(b, np.int32)
        self._rows = np.zeros(b, np.int32)  # each slot's adapter index
        self._slots: list[Seq | None] = [None] * b
        self._ring = 0  # g: the decode steps run so far
        self._reencode_at = rope.reencode_at(config)  # Phi-3 longrope: the position whose step re-encodes (or None)
        self._pending: collections.deque[Seq] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._stop = False
        self.steps_run = 0
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ public API
    def check(self, prompt_len: int, max_tokens: int, adapter: int = 0) -> None:
        """Raise ContextLengthError unless a prompt of `prompt_len` with `max_tokens` fits a slot
        (EngineError for an adapter index this engine does not hold)."""
        if not 0 <= adapter <= self.num_adapters:
            raise EngineError(f"adapter index {adapter} is not in [0, {self.num_adapters}]")
        if prompt_len < 1:
            raise EngineError("the prompt is empty (it needs at least one token)")
        if prompt_len + max_tokens > self.max_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_len} tokens, but {prompt_len + max_tokens} "
                f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion); shorten the "
                f"prompt or lower max_tokens")

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue sequences (all or none). QueueFullError when the bounded queue would overflow,
        DrainingError while shutting down, ContextLengthError when one does not fit."""
        for s in seqs:
            self.check(len(s.prompt_ids), s.params.max_tokens, s.adapter)
        with self._cv:
            if self._draining or self._stop:
                raise DrainingError("the server is shutting down")
            if self.error is not None:
                raise DrainingError(f"the engine stopped: {type(self.error).__name__}: {self.error}")
            if len(self._pending) + len(seqs) > self.max_queue:
                raise QueueFullError(
                    f"too many requests waiting ({len(self._pending)} queued, limit {self.max_queue}); retry later")
            self._pending.extend(seqs)
            self._cv.notify_all()

    def cancel(self, seqs: Sequence[Seq]) -> None:
        """Drop sequences (e.g. the client went away): a queued one is removed, a running one frees
        its slot before the next decode step."""
        with self._cv:
            for s in seqs:
                if s.finish_reason is None:
                    s.cancelled = True
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {"slots": self.max_batch, "running": int(sum(s is not None for s in self._slots)),
                    "queued": len(self._pending), "max_queue": self.max_queue, "max_len": self.max_len,
                    "decode_steps": self.steps_run, "draining": self._draining}

    def warmup(self) -> None:
        """Compile the decode step and every prefill bucket (before serving; not thread-safe with the loop)."""
        for bucket in self.buckets:
            ids = np.zeros((1, bucket), np.int32)
            self.cache, _ = self._prefill(self.params, self.extra, self.cache, ids, np.int32(1), np.int32(0),
                                          np.int32(0), np.int32(0), *self._row_sampling(SamplingParams(max_tokens=1)),
                                          np.int32(0))
        self._positions[:] = 0
        self.cache, _ = self._decode(self.params, self.extra, self.cache, self._tokens, self._positions,
                                     np.zeros(self.max_batch, np.int32), self._rows, np.int32(0), self._temp,
                                     self._top_p, self._top_k, self._seeds, self._steps)
        jax.block_until_ready(self.cache)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="sft_jax-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with `drain`, finish the running and queued sequences first; join the thread."""
        with self._cv:
            self._draining = True
            if not drain:
                self._stop = True
                for s in list(self._pending) + [s for s in self._slots if s is not None]:
                    s.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            self._stop = True

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new sequences from now on (running and queued ones still finish)."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ loop
    def _row_sampling(self, p: SamplingParams):
        return (np.float32(p.temperature), np.float32(p.top_p), np.int32(p.top_k), np.int32(p.seed))

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._pending and not any(self._slots):
                        if self._draining:
                            return
                        self._cv.wait()
                    if self._stop:
                        return
                    self._drop_cancelled()
                    admit = []
                    for r in range(self.max_batch):
                        if self._slots[r] is None and self._pending:
                            seq = self._pending.popleft()
                            self._slots[r] = seq
                            admit.append((r, seq))
                for r, seq in admit:
                    self._admit(r, seq)
                if any(s is not None for s in self._slots):
                    self._step()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting sequence, then re-raised
            self.error = e
            with self._cv:
                for s in list(self._pending) + [s for s in self._slots if s is not None]:
                    self._finish_seq(s, "error")
                self._pending.clear()
                self._slots = [None] * self.max_batch
            raise

    def _drop_cancelled(self) -> None:
        """(lock held) Finish cancelled queued sequences and free the slots of cancelled running ones."""
        for s in [s for s in self._pending if s.cancelled]:
            self._pending.remove(s)
            self._finish_seq(s, "cancelled")
        for r, s in enumerate(self._slots):
            if s is not None and s.cancelled:
                self._free(r, "cancelled")

    def _prefill_row(self, r: int, seq: Seq, tokens: Sequence[int], step: int) -> int:
        """Encode `tokens` (positions 0..n-1) into row r at ring slots g-n .. g-1; the sampled next token."""
        n = len(tokens)
        bucket = next(b for b in self.buckets if b >= n)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :n] = tokens
        start = (self._ring - n) % self.max_len
        self.cache, tok = self._prefill(self.params, self.extra, self.cache, ids, np.int32(n), np.int32(r),
                                        np.int32(start), np.int32(seq.adapter), *self._row_sampling(seq.params),
                                        np.int32(step))
        return int(np.asarray(tok)[0])

    def _admit(self, r: int, seq: Seq) -> None:
        n = len(seq.prompt_ids)
        tok = self._prefill_row(r, seq, seq.prompt_ids, 0)
        p = seq.params
        self._temp[r], self._top_p[r], self._top_k[r], self._seeds[r] = p.temperature, p.top_p, p.top_k, p.seed
        self._positions[r] = n
        self._rows[r] = seq.adapter
        self._steps[r] = 1
        self._active[r] = True
        self._emit(r, tok)

    def _step(self) -> None:
        index = np.int32(self._ring % self.max_len)
        self.cache, nxt = self._decode(self.params, self.extra, self.cache, self._tokens, self._positions,
                                       self._active.astype(np.int32), self._rows, index, self._temp, self._top_p,
                                       self._top_k, self._seeds, self._steps)
        self._ring += 1
        self.steps_run += 1
        nxt = np.asarray(nxt)
        for r in range(self.max_batch):
            if self._active[r]:
                tok = int(nxt[r])
                if self._positions[r] == self._reencode_at:
                    # transformers' Phi-3 (longrope): the step that feeds the token at original_max_position_embeddings
                    # drops the cache and encodes the whole sequence again with the long factors; so does this row
                    # (the batched step's output for it is discarded; same slots, so the ring layout is unchanged)
                    seq = self._slots[r]
                    tok = self._prefill_row(r, seq, list(seq.prompt_ids) + seq.out_ids, int(self._steps[r]))
                self._positions[r] += 1
                self._steps[r] += 1
                self._emit(r, tok)

    def _emit(self, r: int, tok: int) -> None:
        """Row r produced `tok` (the token it feeds next step unless it finished)."""
        seq = self._slots[r]
        if seq.cancelled:
            with self._cv:
                self._free(r, "cancelled")
            return
        if tok in seq.eos_ids:
            with self._cv:
                self._free(r, "stop")
            return
        seq.out_ids.append(tok)
        self._tokens[r] = tok
        reason = None
        if seq.params.stop and seq.detokenize is not None:
            text = seq.detokenize(seq.out_ids)
            cut = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
            if cut:
                seq.text = text[: min(cut)]
                reason = "stop"
        if reason is None and len(seq.out_ids) >= seq.params.max_tokens:
            reason = "length"
        seq.notify([tok], None)
        if reason is not None:
            with self._cv:
                self._free(r, reason)

    def _free(self, r: int, reason: str) -> None:
        """(lock held) Finish row r's sequence and free the slot (its cache row is reset on reuse)."""
        seq = self._slots[r]
        self._slots[r] = None
        self._active[r] = False
        self._temp[r] = 0.0
        self._finish_seq(seq, reason)
        self._cv.notify_all()

    @staticmethod
    def _finish_seq(seq: Seq, reason: str) -> None:
        seq.finish_reason = reason
        seq.notify([], reason)


# ---------------------------------------------------------------------------- jitted steps


def cache_shardings(cache: dict, config: ModelConfig, mesh):
    """KV heads over the tensor axis (when it divides them), everything else replicated."""
    kv = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        (None, None, None, "kv_heads", None), shape=cache["k"].shape, mesh=mesh))
    rep = sharding.replicated(mesh)
    return {"k": kv, "v": kv, "positions": rep, "index": rep}


def _model_inputs(extra, rows, config: ModelConfig, hooks, stacked: bool):
    """(traced) `(method, method_vars)` of one step: the rows' gathered adapters, or the one method's."""
    if stacked:
        return hooks, {METHOD: adapter_lib.gather_rows(extra, rows, config.scan_layers)}
    return hooks, extra


@functools.lru_cache(maxsize=None)
def _jit_prefill(config: ModelConfig, mesh, hooks, stacked: bool):
    def prefill(params, extra, cache, ids, length, row, start, adapter, temperature, top_p, top_k, seed, step):
        with mesh_rules(mesh):
            method, method_vars = _model_inputs(extra, adapter[None], config, hooks, stacked)
            bucket = ids.shape[1]
            small = llama.init_cache(config, 1, bucket, dtype=cache["k"].dtype)
            ar = jnp.arange(bucket, dtype=jnp.int32)
            seg = (ar < length).astype(jnp.int32)[None]
            pos = jnp.where(seg > 0, ar[None], 0)
            logits, small = llama.forward_with_cache(params, config, ids, pos, small, segment_ids=seg, method=method,
                                                     method_vars=method_vars)
            last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=True)
            tok = sample_rows(last, temperature[None], top_p[None], top_k[None], seed[None], step[None])
            s = cache["k"].shape[2]
            slots = (start + ar) % s
            new = dict(cache)
            new["k"] = cache["k"].at[:, row, slots].set(small["k"][:, 0])
            new["v"] = cache["v"].at[:, row, slots].set(small["v"][:, 0])
            new["positions"] = cache["positions"].at[row].set(-1).at[row, slots].set(small["positions"][0])
            return new, tok

    prefill.__name__ = prefill.__qualname__ = "serve_prefill"
    return jax.jit(prefill, donate_argnums=(2,))


@functools.lru_cache(maxsize=None)
def _jit_decode(config: ModelConfig, mesh, hooks, stacked: bool):
    def decode(params, extra, cache, tokens, positions, active, rows, index, temperature, top_p, top_k, seeds,
               steps):
        with mesh_rules(mesh):
            method, method_vars = _model_inputs(extra, rows, config, hooks, stacked)
            cache = dict(cache, index=index)
            logits, cache = llama.forward_with_cache(params, config, tokens[:, None], positions[:, None], cache,
                                                     segment_ids=active[:, None], method=method,
                                                     method_vars=method_vars)
            return cache, sample_rows(logits[:, 0], temperature, top_p, top_k, seeds, steps)

    decode.__name__ = decode.__qualname__ = "serve_decode"
    return jax.jit(decode, donate_argnums=(2,))

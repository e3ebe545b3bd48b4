"""Model-based quality measures, computed by the base model through sft_jax on the mesh.

Three batched passes, each jitted once (one static ``[B, T]`` shape; rows packed first-fit
decreasing with block-diagonal attention per example, as the train step packs them; the
batch is sharded over the mesh's data axes, the parameters replicated):

1. conversation: per-token cross-entropy of the whole rendered conversation; reduced per
   example over its trainable tokens (the per-example assistant loss, what training would
   see) and over the last assistant turn (the numerator of IFD);
2. response alone: the last assistant turn's tokens after only a BOS token (the
   denominator of IFD: "From Quantity to Quality", Li et al. 2023,
   IFD = loss(response | instruction) / loss(response));
3. prompt: the tokens before the last assistant turn, mean-pooled final-normed hidden
   states -> the embedding that k-means clusters (task diversity of the instructions).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import sharding
from sft_jax.data import masking
from sft_jax.data.formats import DataError
from sft_jax.models import hf_io, llama

MAX_SEGMENTS = 64  # examples per packed row (the per-example reductions are [B, MAX_SEGMENTS])


@dataclasses.dataclass
class Tokenized:
    """One conversation through the trainer's template and masks (not shifted, not truncated)."""

    ids: np.ndarray  # int32 [n]
    trainable: np.ndarray  # int8 [n], data.train_on's mask
    last: tuple[int, int]  # token span [start, end) of the last assistant turn (content + end of turn)


def tokenize(tokenizer, template: str, record: dict, train_on: str) -> Tokenized:
    """A record (``messages``, ``source``, optional ``tools``) as the trainer tokenizes it."""
    kw = dict(tools=record.get("tools"), source=record["source"])
    ids, trainable = masking.encode(tokenizer, template, record["messages"], train_on, **kw)
    _, last_mask = masking.encode(tokenizer, template, record["messages"], "last_assistant", **kw)
    where = np.flatnonzero(last_mask)
    span = (int(where[0]), int(where[-1]) + 1) if where.size else (len(ids), len(ids))
    return Tokenized(ids=ids, trainable=trainable, last=span)


# ---------------------------------------------------------------------------- packing


def pack(items: list[dict[str, np.ndarray]], *, length: int, batch_size: int,
         max_segments: int = MAX_SEGMENTS) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, int, int]]]:
    """Pack sequences (dicts of equal-length 1-D arrays, ``inputs`` required, at most
    ``length`` long) into ``[batch_size, length]`` batches, longest first, each into the
    first row with room (first-fit decreasing).  Adds ``segment_ids`` (1.. per row, 0 =
    padding) and ``positions``.  Returns the batches and, per item, (batch, row, segment)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["inputs"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i]["inputs"])
        if n == 0 or n > length:
            raise ValueError(f"pack: item {i} has {n} tokens (must be 1..{length})")
        for r, free in enumerate(room):
            if free >= n and len(rows[r]) < max_segments:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(length - n)
    keys = list(items[0]) if items else ["inputs"]
    batches, where = [], [None] * len(items)
    for b0 in range(0, len(rows), batch_size):
        batch = {k: np.zeros((batch_size, length), np.float32 if items[0][k].dtype.kind == "f" else np.int32)
                 for k in keys}
        batch["segment_ids"] = np.zeros((batch_size, length), np.int32)
        batch["positions"] = np.zeros((batch_size, length), np.int32)
        for r, row in enumerate(rows[b0:b0 + batch_size]):
            t = 0
            for s, i in enumerate(row, 1):
                n = len(items[i]["inputs"])
                for k in keys:
                    batch[k][r, t:t + n] = items[i][k]
                batch["segment_ids"][r, t:t + n] = s
                batch["positions"][r, t:t + n] = np.arange(n)
                where[i] = (len(batches), r, s)
                t += n
        batches.append(batch)
    return batches, where  # type: ignore[return-value]


# ------------------------------------------------------------------------------ steps


def _segment_onehot(segment_ids, max_segments: int):
    return (segment_ids[..., None] == jnp.arange(1, max_segments + 1, dtype=jnp.int32)).astype(jnp.float32)


def make_steps(config, mesh, *, max_segments: int = MAX_SEGMENTS):
    """(loss_step, embed_step): jitted ``f(params, {}, batch)`` with the batch sharded over
    the mesh's data axes; both return per-(row, segment) sums, replicated."""

    def loss_fn(params, _frozen, batch):
        logits = llama.forward(params, config, batch["inputs"], batch["positions"], batch["segment_ids"])
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        ce = lse - target
        onehot = _segment_onehot(batch["segment_ids"], max_segments)
        out = {}
        for name in ("trainable", "last"):
            m = batch[name]
            out[f"{name}_sum"] = jnp.einsum("bt,bts->bs", ce * m, onehot)
            out[f"{name}_n"] = jnp.einsum("bt,bts->bs", m, onehot)
        return out

    def embed_fn(params, _frozen, batch):
        hidden = llama.forward(params, config, batch["inputs"], batch["positions"], batch["segment_ids"],
                               return_hidden=True)
        onehot = _segment_onehot(batch["segment_ids"], max_segments)
        return {"sum": jnp.einsum("btd,bts->bsd", hidden.astype(jnp.float32), onehot),
                "n": jnp.sum(onehot, axis=1)}

    rep = sharding.replicated(mesh)
    loss_step = sharding.jit_eval_step(loss_fn, mesh, trainable_shardings=rep, frozen_shardings=rep)
    embed_step = sharding.jit_eval_step(embed_fn, mesh, trainable_shardings=rep, frozen_shardings=rep)
    return loss_step, embed_step


def _run(step, params, batches) -> tuple[list[dict[str, np.ndarray]], int, float]:
    """Run ``step`` over host batches: (host outputs, real tokens, seconds), the tokens and
    seconds without the first batch (which includes compiling) when there are several."""
    outs, tokens, seconds = [], [], []
    for b in batches:
        t = time.perf_counter()
        outs.append(jax.tree.map(np.asarray, step(params, {}, b)))
        seconds.append(time.perf_counter() - t)
        tokens.append(int((b["segment_ids"] > 0).sum()))
    skip = 1 if len(batches) > 1 else 0
    return outs, sum(tokens[skip:]), sum(seconds[skip:])


# ----------------------------------------------------------------------------- k-means


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (rows L2-normalised, k-means++ seeding): (labels [n], centres [k, D])."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    d2 = np.full(n, np.inf)
    for _ in range(1, k):
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
        total = d2.sum()
        centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    c = np.stack(centres)
    labels = np.full(n, -1)
    for _ in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                v = members.sum(0)
                c[j] = v / max(np.linalg.norm(v), 1e-12)
    return labels, c


# ------------------------------------------------------------------------------ scoring


@dataclasses.dataclass
class ModelScores:
    """Per example (aligned with the scored records): ``loss`` mean cross-entropy of the
    trainable tokens, ``loss_last`` / ``loss_alone`` of the last assistant turn with / without
    its context, ``ifd`` their ratio (NaN where a turn was cut off by ``max_length``),
    ``embedding`` [n, D], ``cluster`` [n]; ``tokens_per_second``: real tokens of the three
    passes over their step time (each pass's first, compiling batch left out)."""

    loss: np.ndarray
    loss_last: np.ndarray
    loss_alone: np.ndarray
    ifd: np.ndarray
    embedding: np.ndarray
    cluster: np.ndarray
    tokens_per_second: float
    num_clusters: int


def _gather(outs, where, key_sum, key_n):
    s = np.array([outs[b][key_sum][r, seg - 1] for b, r, seg in where], np.float64)
    n = np.array([outs[b][key_n][r, seg - 1] for b, r, seg in where], np.float64)
    return s, n


def score(model_path: str, cfg, tokenized: list[Tokenized], tokenizer, *, batch_size: int,
          num_clusters: int, seed: int = 0) -> ModelScores:
    """Load the base model from ``model_path`` and run the three passes over ``tokenized``."""
    config, params = hf_io.load_hf(model_path, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    if len(tokenizer) > config.vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model at {model_path} has "
                        f"vocab_size {config.vocab_size}: use the model's own tokenizer")
    mesh = sharding.make_mesh(cfg.mesh)
    dp = sharding.mesh_sizes(mesh)["data"] * sharding.mesh_sizes(mesh)["fsdp"]
    batch_size = -(-batch_size // dp) * dp
    T = int(cfg.data.max_length)
    params = jax.device_put(params, sharding.replicated(mesh))
    loss_step, embed_step = make_steps(config, mesh)
    bos = tokenizer.bos_token_id

    conv, alone, prompt = [], [], []
    for tk in tokenized:
        ids, trainable = tk.ids[: T + 1], tk.trainable[: T + 1]
        last = np.zeros(len(tk.ids), np.float32)
        last[tk.last[0]:tk.last[1]] = 1
        conv.append({"inputs": ids[:-1], "targets": ids[1:], "trainable": trainable[1:].astype(np.float32),
                     "last": last[1:len(ids)]})
        span = tk.ids[tk.last[0]:tk.last[1]]
        start = np.asarray([bos if bos is not None else tk.ids[0]], np.int32)
        seq = np.concatenate([start, span])[: T + 1]
        alone.append({"inputs": seq[:-1], "targets": seq[1:], "trainable": np.ones(len(seq) - 1, np.float32),
                      "last": np.ones(len(seq) - 1, np.float32)})
        prompt.append({"inputs": tk.ids[: max(tk.last[0], 1)][:T]})

    tokens = seconds = 0.0
    batches, where = pack(conv, length=T, batch_size=batch_size)
    outs, n_tok, sec = _run(loss_step, params, batches)
    tokens, seconds = tokens + n_tok, seconds + sec
    tr_sum, tr_n = _gather(outs, where, "trainable_sum", "trainable_n")
    last_sum, last_n = _gather(outs, where, "last_sum", "last_n")
    alone_items = [a for a in alone if len(a["inputs"])]
    batches, where_alone = pack(alone_items, length=T, batch_size=batch_size)
    outs, n_tok, sec = _run(loss_step, params, batches)
    tokens, seconds = tokens + n_tok, seconds + sec
    al_sum, al_n = _gather(outs, where_alone, "last_sum", "last_n")
    full_al_sum, full_al_n = np.full(len(alone), np.nan), np.zeros(len(alone))
    idx = [i for i, a in enumerate(alone) if len(a["inputs"])]
    full_al_sum[idx], full_al_n[idx] = al_sum, al_n
    batches, where_p = pack(prompt, length=T, batch_size=batch_size)
    outs, n_tok, sec = _run(embed_step, params, batches)
    tokens, seconds = tokens + n_tok, seconds + sec
    emb = np.stack([outs[b]["sum"][r, s - 1] / outs[b]["n"][r, s - 1] for b, r, s in where_p])

    with np.errstate(invalid="ignore", divide="ignore"):
        loss = tr_sum / tr_n
        loss_last = last_sum / last_n
        loss_alone = full_al_sum / full_al_n
        # the same target tokens in both passes, or no ratio (a turn cut by max_length)
        ifd = np.where((last_n == full_al_n) & (last_n > 0), loss_last / loss_alone, np.nan)
    labels, _ = kmeans(emb, num_clusters, seed=seed)
    return ModelScores(loss=loss, loss_last=loss_last, loss_alone=loss_alone, ifd=ifd, embedding=emb,
                       cluster=labels, tokens_per_second=tokens / max(seconds, 1e-9),
                       num_clusters=int(labels.max()) + 1 if len(labels) else 0)

"""The grain input pipeline: rows -> tokenized examples -> packed/padded host batches.

    source(s) --(mix by data.weights | concatenate)--> seeded shuffle --> epochs
      --> shard by process (rows i::process_count) --> tokenize + mask + shift
      --> [mp_prefetch over data.num_workers processes]
      --> count + skip (main process) --> pack (first/best fit) or pad (bucketed)
      --> per-host batch of numpy arrays

Batch contract (BUILD_NOTES.md): ``inputs`` int32 [b, T], ``targets`` int32 [b, T],
``loss_mask`` float32 [b, T], ``segment_ids`` int32 [b, T] (0 = padding),
``positions`` int32 [b, T] (restart at 0 per segment).  Each example is shifted BEFORE
packing (inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:]), so no token ever
predicts the first token of the next segment.
"""

from __future__ import annotations

import array
import bisect
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import grain
import numpy as np

from sft_jax.data import formats, masking, sources, templates
from sft_jax.data.formats import DataError

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
PAD_MULTIPLE = 64


# ----------------------------------------------------------------------------- stats


@dataclasses.dataclass
class DataStats:
    """Counts over the rows this process has tokenized (since the iterator was built)."""

    rows: int = 0  # conversations read and tokenized
    examples: int = 0  # kept (have >= 1 trainable token)
    skipped: dict = dataclasses.field(default_factory=lambda: collections.Counter())  # reason -> count
    truncated: int = 0  # kept but cut to max_length
    tokens: int = 0  # input tokens of kept examples (after shift: len(ids) - 1)
    trainable_tokens: int = 0  # loss_mask ones of kept examples
    lengths: array.array = dataclasses.field(default_factory=lambda: array.array("I"))  # per kept example, after shift (4 bytes each)
    first_skipped: dict = dataclasses.field(default_factory=dict)  # reason -> (source, rendered text)
    # per source file: {"rows", "examples", "skipped": {reason: n}, "truncated"}
    files: dict = dataclasses.field(default_factory=dict)

    def _file(self, source: str) -> dict:
        name = source.rsplit(":", 1)[0] if source.rsplit(":", 1)[-1].isdigit() else source
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = {"rows": 0, "examples": 0, "skipped": collections.Counter(), "truncated": 0}
        return f

    def add(self, ex: dict) -> None:
        self.rows += 1
        f = self._file(ex["source"])
        f["rows"] += 1
        if ex["skip"]:
            self.skipped[ex["skip"]] += 1
            f["skipped"][ex["skip"]] += 1
            self.first_skipped.setdefault(ex["skip"], (ex["source"], ex.get("text", "")))
            return
        self.examples += 1
        f["examples"] += 1
        f["truncated"] += int(ex["truncated"])
        self.truncated += int(ex["truncated"])
        n = len(ex["inputs"])
        self.tokens += n
        self.trainable_tokens += int(ex["loss_mask"].sum())
        self.lengths.append(n)

    @property
    def num_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def check_skip_fraction(self, max_skip_fraction: float, *, min_rows: int = 1) -> None:
        if self.rows < min_rows or self.rows == 0:
            return
        frac = self.num_skipped / self.rows
        if frac > max_skip_fraction:
            reason, count = max(self.skipped.items(), key=lambda kv: kv[1])
            source, text = self.first_skipped[reason]
            why = SKIP_REASONS.get(reason, reason)
            raise DataError(
                f"{self.num_skipped} of {self.rows} examples ({frac:.0%}) were skipped, more than "
                f"data.max_skip_fraction={max_skip_fraction}; most common reason '{reason}' ({count}): {why}.\n"
                f"One offending example ({source}):\n{text[:2000]}"
            )

    def summary(self) -> dict:
        lengths = np.asarray(self.lengths, np.int64)
        pct = {}
        if len(lengths):
            for p in (50, 90, 99, 100):
                pct[f"p{p}"] = int(np.percentile(lengths, p))
        return {
            "rows": self.rows, "examples": self.examples, "skipped": dict(self.skipped),
            "truncated": self.truncated, "tokens": self.tokens, "trainable_tokens": self.trainable_tokens,
            "trainable_fraction": self.trainable_tokens / max(self.tokens, 1), "length_percentiles": pct,
        }

    def files_summary(self) -> dict:
        """Per source file: rows read, examples kept, skipped by reason, truncated."""
        return {k: {**v, "skipped": dict(v["skipped"])} for k, v in self.files.items()}


# Every reason an example is skipped (rows read - examples kept), with what it means.
SKIP_REASONS = {
    **formats.SKIP_REASONS,
    "no_trainable_tokens": "no token of the example is trainable (no assistant content left after the template "
                           "and truncation, or the template has no assistant turn)",
    "too_long": "the example is longer than data.max_length and data.truncation='drop'",
}


# ------------------------------------------------------------------------ tokenizer


def load_tokenizer(path: str):
    """A tokenizer directory (``AutoTokenizer.from_pretrained``), or a bare sentencepiece
    ``.model`` file (wrapped in a temporary directory as ``tokenizer.model``)."""
    from transformers import AutoTokenizer

    p = pathlib.Path(path).expanduser()
    if p.is_file() and p.suffix == ".model":
        tmp = tempfile.mkdtemp(prefix="sft_jax_tok_")
        shutil.copy(p, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not p.exists():
        raise DataError(f"tokenizer path {path!r} does not exist")
    return AutoTokenizer.from_pretrained(str(p))


def tokenizer_from_config(cfg):
    """``cfg`` (the full ConfigDict) -> ``(tokenizer, added_tokens)``, with ``data.template``
    installed.  ``added_tokens`` non-empty => resize the model vocab to ``len(tokenizer)``."""
    path = cfg.data.tokenizer or cfg.model.path
    if not path:
        raise DataError("no tokenizer: set data.tokenizer (a tokenizer directory or .model file) or model.path")
    tok = load_tokenizer(path)
    return templates.prepare_tokenizer(tok, cfg.data.template, add_tokens=cfg.data.add_template_tokens)


# ----------------------------------------------------------------------- tokenizing


class TokenizeFn:
    """record -> example dict (picklable, runs in grain workers)."""

    def __init__(self, tokenizer, template: str, *, max_length: int, truncation: str, train_on: str):
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.truncation = truncation
        self.train_on = train_on

    def __call__(self, rec: dict) -> dict:
        if rec.get("skip"):  # nothing right to train on (formats.SKIP_REASONS): counted, not tokenized
            return {"inputs": np.zeros(0, np.int32), "targets": np.zeros(0, np.int32),
                    "loss_mask": np.zeros(0, np.float32), "skip": rec["skip"], "truncated": False,
                    "source": rec["source"], "text": json.dumps(rec["messages"], ensure_ascii=False)[:2000]}
        ids, mask = masking.encode(self.tokenizer, self.template, rec["messages"], self.train_on,
                                   tools=rec.get("tools"), source=rec["source"])
        return make_example(ids, mask, rec["source"], max_length=self.max_length, truncation=self.truncation,
                            tokenizer=self.tokenizer)

    def many(self, recs: list[dict]) -> list[dict]:
        """``[self(r) for r in recs]``, with the tokenizer called once for the batch (``masking.encode_many``)."""
        todo = [r for r in recs if not r.get("skip")]
        encoded = iter(masking.encode_many(self.tokenizer, self.template, todo, self.train_on))
        out = []
        for r in recs:
            if r.get("skip"):
                out.append(self(r))
                continue
            ids, mask = next(encoded)
            out.append(make_example(ids, mask, r["source"], max_length=self.max_length, truncation=self.truncation,
                                    tokenizer=self.tokenizer))
        return out


def make_example(ids, mask, source: str, *, max_length: int, truncation: str, tokenizer=None) -> dict:
    """Shift one tokenized conversation and apply the length policy."""
    skip, truncated = "", False
    if len(ids) - 1 > max_length:
        if truncation == "drop":
            skip = "too_long"
        else:
            ids, mask = ids[: max_length + 1], mask[: max_length + 1]
            truncated = True
    inputs = np.asarray(ids[:-1], np.int32)
    targets = np.asarray(ids[1:], np.int32)
    loss_mask = np.asarray(mask[1:], np.float32)
    if not skip and loss_mask.sum() == 0:
        skip = "no_trainable_tokens"
    ex = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "skip": skip,
          "truncated": truncated, "source": source}
    if skip:
        ex["text"] = tokenizer.decode(list(ids), skip_special_tokens=False) if tokenizer is not None else ""
        ex["inputs"] = ex["targets"] = np.zeros(0, np.int32)
        ex["loss_mask"] = np.zeros(0, np.float32)
    return ex


class _CountAndCheck:
    """Main-process map: counts every example into ``stats`` and enforces max_skip_fraction."""

    def __init__(self, stats: DataStats, max_skip_fraction: float, min_rows: int):
        self.stats, self.max_skip_fraction, self.min_rows = stats, max_skip_fraction, min_rows

    def __call__(self, ex: dict) -> dict:
        self.stats.add(ex)
        self.stats.check_skip_fraction(self.max_skip_fraction, min_rows=self.min_rows)
        return ex


def _template(tokenizer, cfg_data) -> str:
    return templates.get_template(cfg_data.template) if cfg_data.template else templates.resolve_template(tokenizer)


def _strip(ex: dict) -> dict:
    return {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"]}


# ---------------------------------------------------------------------------- sources


def _split_indices(n: int, eval_fraction: float, seed: int, split: str) -> np.ndarray | None:
    """Sorted row indices of ``split`` among ``n`` rows (None = all of them)."""
    if eval_fraction <= 0:
        return None if split == "train" else np.zeros(0, np.int64)
    k = int(round(eval_fraction * n))
    k = min(max(k, 1), n - 1) if n > 1 else 0
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5F7])).permutation(n)
    return np.sort(perm[:k] if split == "eval" else perm[k:])


class _Concat:
    """Several record sequences (readers, subsets) as one, lazily, with their blocks concatenated."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        self.block_starts = np.concatenate(
            [np.asarray(p.block_starts, np.int64) + o for p, o in zip(parts, self.offsets)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][int(i - self.offsets[k])]


class _Subset:
    """The rows ``indices`` (sorted) of a sequence; blocks follow the parent's."""

    def __init__(self, parent, indices: np.ndarray):
        self.parent, self.indices = parent, indices
        self.block_starts = np.unique(np.searchsorted(indices, parent.block_starts))
        self.block_starts = self.block_starts[self.block_starts < len(indices)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.parent[int(self.indices[i])]


class BlockShuffle(grain.MapDataset):
    """The streaming shuffle: per epoch, permute the blocks of ``parent`` (Parquet row groups,
    1024-row chunks of other sources) and shuffle the rows within each window of ``window``
    consecutive blocks.  A window is read at a time, so reads stay local (one row group decode
    serves a whole window) and memory holds one window's index permutation."""

    def __init__(self, parent: grain.MapDataset, block_starts: np.ndarray, *, window: int, seed: int):
        super().__init__(parent)
        self._n = len(parent)
        self._starts = np.asarray(block_starts, np.int64)
        self._sizes = np.diff(np.append(self._starts, self._n))
        self._window, self._seed = max(1, window), seed
        self._cache: dict = {}

    def __len__(self) -> int:
        return self._n

    def __str__(self) -> str:
        return f"BlockShuffle(window={self._window}, seed={self._seed})"

    def _epoch(self, epoch: int):
        if self._cache.get("epoch") != epoch:
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._starts))
            wins = [order[w:w + self._window] for w in range(0, len(order), self._window)]
            starts = np.cumsum([0] + [int(self._sizes[b].sum()) for b in wins[:-1]])
            self._cache = {"epoch": epoch, "windows": wins, "win_starts": starts, "win": None}
        return self._cache

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        c = self._epoch(epoch)
        w = int(np.searchsorted(c["win_starts"], i, side="right") - 1)
        win = c["win"]  # read once: grain's reader threads share this cache
        if win is None or win[0] != w:
            rows = np.concatenate([np.arange(self._starts[b], self._starts[b] + self._sizes[b]) for b in c["windows"][w]])
            win = (w, rows[np.random.default_rng([self._seed, epoch, w]).permutation(len(rows))])
            c["win"] = win
        return self._parent[epoch * self._n + int(win[1][i - c["win_starts"][w]])]


def _readers(entry: str, cfg_data, cache_blocks: int = 4) -> list[formats.RecordReader]:
    return [formats.RecordReader(p, cfg_data.format, cfg_data.system_prompt, columns=cfg_data.columns,
                                 reasoning=cfg_data.reasoning, cache_blocks=cache_blocks,
                                 strict=bool(getattr(cfg_data, "strict", False)))
            for p in formats.expand_paths(entry)]


# The last few files read whole, by path, stat and reader settings: the trainer reads one file for its epoch
# count, the train iterator, the eval batches, the data accounting and the sample prompts (LIMA: ~2 ms a row
# to parse each time).  Records are read-only downstream (TokenizeFn and the readers never mutate them).
_LOADED: collections.OrderedDict = collections.OrderedDict()
_LOADED_MAX = 4


def _load_key(entry: str, cfg_data) -> tuple | None:
    if not os.path.isfile(entry):  # directories, hf: ids: read each time
        return None
    st = os.stat(entry)
    return (os.path.abspath(entry), st.st_ino, st.st_size, st.st_mtime_ns, cfg_data.format, cfg_data.system_prompt,
            cfg_data.columns, cfg_data.reasoning, bool(getattr(cfg_data, "strict", False)))


def _load(entry: str, cfg_data) -> list:
    """One ``data.path`` entry: every record in memory, or (``data.streaming``) a lazy sequence."""
    if not cfg_data.streaming:
        key = _load_key(entry, cfg_data)
        if key is not None and key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        recs = formats.load_conversations(entry, cfg_data.format, cfg_data.system_prompt,
                                          columns=cfg_data.columns, reasoning=cfg_data.reasoning,
                                          strict=bool(getattr(cfg_data, "strict", False)), keep_skipped=True)
        if key is not None:
            _LOADED[key] = recs
            while len(_LOADED) > _LOADED_MAX:
                _LOADED.popitem(last=False)
        return recs
    return _Concat(_readers(entry, cfg_data, cache_blocks=cfg_data.shuffle_window + 1))  # one window (+1 spare)


def _select(records, indices: np.ndarray | None):
    if indices is None:
        return records
    if isinstance(records, list):
        return [records[i] for i in indices]
    return _Subset(records, indices)


def missing_data_message(cfg_data) -> str:
    """The error for an empty ``data.path``: the config's ``data.source_help`` when it has one."""
    return "data.path is empty: " + (cfg_data.source_help or "set --config.data.path=FILE[,FILE...], a directory "
                                     "or a Hugging Face dataset id hf:org/name[:config][@split]")


def split_records(cfg_data, split: str, seed: int = 0) -> list:
    """Per ``data.path`` entry: the rows of ``split`` ("train" | "eval"), a list of records
    (or, with ``data.streaming``, a lazy sequence of them with ``block_starts``).

    Eval rows: ``data.eval_path`` when set (then train gets every row of ``data.path``),
    else a seeded ``data.eval_fraction`` of each entry's rows, disjoint from train."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and cfg_data.eval_path:
        return [_load(cfg_data.eval_path, cfg_data)]
    if not cfg_data.path:  # the trainer fills it in for model.init=tiny (its generated tasks)
        raise DataError(missing_data_message(cfg_data))
    out = []
    for entry in [p.strip() for p in cfg_data.path.split(",") if p.strip()]:
        recs = _load(entry, cfg_data)
        frac = 0.0 if cfg_data.eval_path else cfg_data.eval_fraction
        out.append(_select(recs, _split_indices(len(recs), frac, seed, split)))
    return out


def _weights(cfg_data, n: int) -> list[float] | None:
    if not cfg_data.weights:
        return None
    w = [float(x) for x in cfg_data.weights.split(",") if x.strip()]
    if len(w) != n:
        raise DataError(f"data.weights has {len(w)} values but data.path names {n} sources")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise DataError(f"data.weights must be non-negative and not all zero, got {cfg_data.weights!r}")
    return w


def _default_process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return process_index, process_count


def _shuffled(group, seed: int, window: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(group)
    if isinstance(group, list):
        return ds.shuffle(seed=seed)
    return BlockShuffle(ds, group.block_starts, window=window, seed=seed)


def _row_dataset(groups: list, weights, *, seed: int, shuffle: bool, epochs: int | None, window: int = 1):
    """Mixed/concatenated, shuffled, repeated MapDataset of records (same on every process).

    In-memory groups get grain's global shuffle; streamed ones the :class:`BlockShuffle`."""
    if any(len(g) == 0 for g in groups):
        raise DataError("a data source has no rows for this split")
    if weights is None:
        if all(isinstance(g, list) for g in groups):
            src = [r for g in groups for r in g]
        else:
            src = groups[0] if len(groups) == 1 else _Concat(groups)
        ds = _shuffled(src, seed, window) if shuffle else grain.MapDataset.source(src)
        return ds.repeat(epochs) if epochs != 1 else ds
    parts = []
    for k, g in enumerate(groups):
        p = _shuffled(g, seed + 7919 * (k + 1), window) if shuffle else grain.MapDataset.source(g)
        parts.append(p.repeat(None))
    ds = grain.MapDataset.mix(parts, weights)
    if epochs is not None:  # an "epoch" of a mixture = as many rows as all sources hold
        ds = ds[: epochs * sum(len(g) for g in groups)]
    return ds


# ---------------------------------------------------------------------------- batching


def _pad_rows(rows: list[dict], batch_size: int, length: int) -> dict[str, np.ndarray]:
    """Stack unpacked examples into [batch_size, length] (padding rows/tokens get segment 0)."""
    out = {k: np.zeros((batch_size, length), np.float32 if k == "loss_mask" else np.int32) for k in KEYS}
    for i, ex in enumerate(rows):
        n = len(ex["inputs"])
        out["inputs"][i, :n] = ex["inputs"]
        out["targets"][i, :n] = ex["targets"]
        out["loss_mask"][i, :n] = ex["loss_mask"]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
    return out


class _PackedBatchFn:
    def __init__(self, batch_size: int, length: int):
        self.batch_size, self.length = batch_size, length

    def __call__(self, rows: list[dict]) -> dict[str, np.ndarray]:
        out = {k: np.zeros((self.batch_size, self.length), np.float32 if k == "loss_mask" else np.int32)
               for k in KEYS}
        for i, r in enumerate(rows):
            out["inputs"][i] = r["inputs"]
            out["targets"][i] = r["targets"]
            out["loss_mask"][i] = r["loss_mask"]
            out["segment_ids"][i] = r["inputs_segment_ids"]
            out["positions"][i] = r["inputs_positions"]
        return out


class _PaddedBatchFn:
    def __init__(self, batch_size: int, max_length: int, bucket: bool):
        self.batch_size, self.max_length, self.bucket = batch_size, max_length, bucket

    def __call__(self, rows: list[dict]) -> dict[str, np.ndarray]:
        length = self.max_length
        if self.bucket:
            longest = max(len(r["inputs"]) for r in rows)
            length = min(self.max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        return _pad_rows(rows, self.batch_size, length)


# grain's packers flush all bins when an example fits none, so efficiency grows with the
# number of open bins: on LIMA at 2048 (tok512, shuffled) 32 bins -> 0.91, 128 -> 0.94,
# 512 -> 0.958 (first fit) / 0.964 (best fit).  512 bins x T tokens x 3 arrays stay small.
NUM_PACKING_BINS = 512


def _num_bins(batch_size: int) -> int:
    return max(NUM_PACKING_BINS, batch_size)


def _batched(ds: grain.IterDataset, cfg_data, batch_size: int, *, seed: int, bucket: bool,
             num_bins: int | None = None) -> grain.IterDataset:
    T = cfg_data.max_length
    if cfg_data.packing:
        cls = (grain.experimental.FirstFitPackIterDataset if cfg_data.packer == "first_fit"
               else grain.experimental.BestFitPackIterDataset)
        ds = cls(ds, length_struct={"inputs": T, "targets": T, "loss_mask": T},
                 num_packing_bins=num_bins or _num_bins(batch_size), seed=seed, shuffle_bins=True)
        return ds.batch(batch_size, drop_remainder=False, batch_fn=_PackedBatchFn(batch_size, T))
    return ds.batch(batch_size, drop_remainder=False, batch_fn=_PaddedBatchFn(batch_size, T, bucket))


# ---------------------------------------------------------------------------- iterator


class DataIterator(grain.DatasetIterator):
    """A grain DatasetIterator over host batches, with ``stats`` (a :class:`DataStats`).

    ``get_state()``/``set_state()`` give exact resume (and work with
    ``grain.checkpoint.CheckpointSave/CheckpointRestore`` under Orbax)."""

    def __init__(self, parent: grain.DatasetIterator, stats: DataStats):
        super().__init__(parent)
        self.stats = stats

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def _pipeline(groups, weights, tokenizer, cfg_data, *, batch_size, seed, shuffle, epochs,
              process_index, process_count, num_workers, bucket, num_packing_bins=None) -> DataIterator:
    template = _template(tokenizer, cfg_data)
    rows = _row_dataset(groups, weights, seed=seed, shuffle=shuffle, epochs=epochs, window=cfg_data.shuffle_window)
    rows = rows[process_index::process_count]
    n_local = len(rows) if epochs is not None else sum(len(g) for g in groups) // process_count
    ds = rows.map(TokenizeFn(tokenizer, template, max_length=cfg_data.max_length,
                             truncation=cfg_data.truncation, train_on=cfg_data.train_on))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 2, prefetch_buffer_size=64))
    if num_workers > 0:
        from absl import flags  # grain's worker code reads absl flags; parse them if the caller did not

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=8))
    stats = DataStats()
    ds = ds.map(_CountAndCheck(stats, cfg_data.max_skip_fraction, min_rows=max(1, min(100, n_local))))
    ds = ds.filter(lambda ex: not ex["skip"]).map(_strip)
    ds = _batched(ds, cfg_data, batch_size, seed=seed, bucket=bucket, num_bins=num_packing_bins)
    return DataIterator(iter(ds), stats)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    return global_batch_size // process_count


def build_train_iterator(cfg_data, tokenizer, *, global_batch_size: int, seed: int = 0,
                         process_index: int | None = None, process_count: int | None = None,
                         epochs: int | None = None, num_workers: int | None = None,
                         num_packing_bins: int | None = None) -> DataIterator:
    """Host batches of the training split, forever (``epochs=None``) or for ``epochs`` passes.

    ``tokenizer`` must already carry the template (``prepare_tokenizer`` /
    ``tokenizer_from_config``).  Each process gets ``global_batch_size // process_count``
    rows per batch from a disjoint shard.  The last batch of a finite run is padded with
    empty rows (segment_ids 0) to keep the static shape.  Packed: T = data.max_length.
    Padded (packing=False): T = the batch's longest row rounded up to 64 (single process)
    or data.max_length (several processes, so every host has the same shape)."""
    process_index, process_count = _default_process(process_index, process_count)
    bs = _local_batch_size(global_batch_size, process_count)
    groups = split_records(cfg_data, "train", seed)
    return _pipeline(groups, _weights(cfg_data, len(groups)), tokenizer, cfg_data, batch_size=bs, seed=seed,
                     shuffle=cfg_data.shuffle, epochs=epochs, process_index=process_index,
                     process_count=process_count,
                     num_workers=cfg_data.num_workers if num_workers is None else num_workers,
                     bucket=process_count == 1, num_packing_bins=num_packing_bins)


def count_train_batches(cfg_data, tokenizer, *, global_batch_size: int, seed: int = 0,
                        num_packing_bins: int | None = None, stats_out: list | None = None) -> int:
    """Global batches in one epoch of the training split (one in-process pass over the data).

    Computed as if there were one process, so every host gets the same number; use it to
    turn ``train.epochs`` into ``train.steps`` and run the iterator with ``epochs=None``
    (several hosts must never run a finite iterator to exhaustion: their shards can pack
    into different numbers of batches)."""
    it = build_train_iterator(cfg_data, tokenizer, global_batch_size=global_batch_size, seed=seed,
                              process_index=0, process_count=1, epochs=1, num_workers=0,
                              num_packing_bins=num_packing_bins)
    n = sum(1 for _ in it)
    if stats_out is not None:  # the pass's DataStats: the data accounting of the training split, for free
        stats_out.append(it.stats)
    return n


def build_eval_batches(cfg_data, tokenizer, *, global_batch_size: int, seed: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       max_batches: int = 0) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    """The held-out split as a list of host batches (one pass, no shuffle, deterministic),
    plus its stats.  Same layout as training batches.  Every process returns the same
    number of batches (short ones are padded with empty rows; count them by loss_mask)."""
    process_index, process_count = _default_process(process_index, process_count)
    bs = _local_batch_size(global_batch_size, process_count)
    groups = [g for g in split_records(cfg_data, "eval", seed) if g]
    if not groups:
        return [], DataStats()
    it = _pipeline(groups, None, tokenizer, cfg_data, batch_size=bs, seed=seed, shuffle=False, epochs=1,
                   process_index=process_index, process_count=process_count, num_workers=0,
                   bucket=process_count == 1)
    batches = []
    for b in it:
        batches.append(b)
        if max_batches and len(batches) >= max_batches:
            break
    if process_count > 1:
        # Shards can pack into different numbers of batches: pad to a count every process
        # can compute identically (an upper bound: one example per row).
        n_rows = sum(len(g) for g in groups)
        per_process = -(-n_rows // process_count)
        bound = -(-per_process // bs)
        if max_batches:
            bound = min(bound, max_batches)
        T = cfg_data.max_length
        while len(batches) < bound:
            batches.append(_pad_rows([], bs, T))
    return batches, it.stats


ENCODE_CHUNK = 256  # rows per batched tokenizer call of a pass in file order


def examples_for_split(cfg_data, tokenizer, split: str = "train", *, seed: int = 0,
                       limit: int = 0, check: bool = True, keep: bool = True) -> tuple[list[dict], DataStats]:
    """Tokenize a split in file order (no shuffle, no sharding): a list of examples
    ``{inputs, targets, loss_mask, source, truncated}`` (kept ones only; none when not ``keep``)
    and its stats (``check``: data.max_skip_fraction enforced).
    Used by the inspector, the data accounting and for packing-efficiency numbers."""
    template = _template(tokenizer, cfg_data)
    fn = TokenizeFn(tokenizer, template, max_length=cfg_data.max_length, truncation=cfg_data.truncation,
                    train_on=cfg_data.train_on)
    stats = DataStats()
    out = []
    for group in split_records(cfg_data, split, seed):
        n = len(group) if not limit else min(len(group), limit - stats.rows)
        for start in range(0, n, ENCODE_CHUNK):  # tokenized a chunk at a time (TokenizeFn.many)
            for ex in fn.many([group[i] for i in range(start, min(n, start + ENCODE_CHUNK))]):
                stats.add(ex)
                if keep and not ex["skip"]:
                    out.append(ex)
        if limit and stats.rows >= limit:
            break
    if check:
        stats.check_skip_fraction(cfg_data.max_skip_fraction)
    return out, stats


# ----------------------------------------------------------------------- accounting

ACCOUNT_STREAMING_ROWS = 10000  # data.streaming: the accounting pass reads this many rows per split


def account_data(cfg_data, tokenizer, *, seed: int = 0, limit: int | None = None,
                 train_stats: DataStats | None = None, eval_configs: list | None = None,
                 eval_stats: dict | None = None) -> dict:
    """What the data readers make of ``data.*``: per split and per file, rows read, examples kept,
    skipped (by reason) and truncated, plus the directory entries that are not read.

    One in-file-order pass over each split (tokenized a chunk at a time, `TokenizeFn.many`), of every row
    (``limit``: that many rows per split; default: all, or :data:`ACCOUNT_STREAMING_ROWS` with
    ``data.streaming``: a split cut there is marked ``partial``).  ``train_stats``: the stats of a pass
    over the training split already made (the trainer's epoch count), reused instead of a second pass;
    ``eval_stats``: ``{name: DataStats}`` of complete passes over eval sets (the trainer's eval batches).
    ``eval_configs``: ``[(name, cfg_data)]`` of named eval sets (default: the one eval split of ``cfg_data``).
    Printed by :func:`format_accounting`; the trainer writes it into run_info.json."""
    if limit is None:
        limit = ACCOUNT_STREAMING_ROWS if cfg_data.streaming else 0
    out: dict = {"max_length": int(cfg_data.max_length), "truncation": cfg_data.truncation,
                 "limit": int(limit) or None, "ignored": [], "splits": {}, "partial": {}}
    evals = [(n, f"eval {n}" if n else "eval", c) for n, c in (eval_configs or [("", cfg_data)])]
    for spec in [cfg_data.path] + [c.eval_path for _, _, c in evals]:
        if spec:
            out["ignored"] += [f for f in sources.ignored_files(spec) if f not in out["ignored"]]
    for name, split, cfg in [(None, "train", cfg_data)] + evals:
        reused = train_stats if split == "train" else (eval_stats or {}).get(name)
        if split != "train" and reused is None and not cfg.eval_path and cfg.eval_fraction <= 0:
            continue  # no eval split (reading the files would find no row of it)
        if reused is not None:
            stats = reused
        else:
            _, stats = examples_for_split(cfg, tokenizer, "train" if split == "train" else "eval", seed=seed,
                                          limit=limit, check=False, keep=False)
            if limit and stats.rows >= limit:
                out["partial"][split] = stats.rows
        if split != "train" and stats.rows == 0:
            continue
        summ = stats.summary()
        out["splits"][split] = {**{k: summ[k] for k in ("rows", "examples", "skipped", "truncated", "tokens",
                                                        "trainable_tokens")}, "files": stats.files_summary()}
    return out


def _skips(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def format_accounting(acc: dict, max_files: int = 8) -> str:
    """The short block the trainer prints at start (and ``sft_jax.data.inspect`` shows)."""
    lines = [f"data (max_length {acc['max_length']}, truncation={acc['truncation']}):"]
    for split, st in acc["splits"].items():
        n_skip = sum(st["skipped"].values())
        partial = (acc.get("partial") or {}).get(split)
        line = f"  {split}: {st['rows']} rows read" + (
            f" (partial: its first {partial} rows; a streaming source is not counted up front)" if partial else "")
        line += f" -> {st['examples']} examples kept"
        line += f", {n_skip} skipped ({_skips(st['skipped'])})" if n_skip else ", 0 skipped"
        line += f", {st['truncated']} truncated" if st["truncated"] else ""
        lines.append(line)
    files: dict = {}
    for split, st in acc["splits"].items():
        for name, f in st["files"].items():
            tot = files.setdefault(name, {"rows": 0, "examples": 0, "skipped": collections.Counter(), "truncated": 0})
            tot["rows"] += f["rows"]
            tot["examples"] += f["examples"]
            tot["truncated"] += f["truncated"]
            tot["skipped"].update(f["skipped"])
    for k, (name, f) in enumerate(sorted(files.items())):
        if k == max_files:
            lines.append(f"  ... {len(files) - max_files} more files (all of them in run_info.json)")
            break
        n_skip = sum(f["skipped"].values())
        line = f"  {name}: {f['rows']} rows, {f['examples']} kept"
        line += f", {n_skip} skipped ({_skips(f['skipped'])})" if n_skip else ""
        line += f", {f['truncated']} truncated" if f["truncated"] else ""
        lines.append(line)
    if acc.get("ignored"):
        shown = ", ".join(acc["ignored"][:max_files]) + (f", ... ({len(acc['ignored']) - max_files} more)"
                                                          if len(acc["ignored"]) > max_files else "")
        lines.append(f"  ignored (not data files): {shown}")
    return "\n".join(lines)


def packing_efficiency(examples: list[dict], cfg_data, *, batch_size: int = 8, seed: int = 0,
                       num_packing_bins: int | None = None) -> float:
    """Real tokens / token slots when ``examples`` are packed (or padded) as the training
    pipeline would (seeded shuffle first when ``data.shuffle``).  Slots count the rows
    that hold data (the padding rows of a short last batch are not counted)."""
    ds = grain.MapDataset.source([_strip(e) for e in examples])
    if cfg_data.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.to_iter_dataset()
    real = slots = 0
    for b in _batched(ds, cfg_data, batch_size, seed=seed, bucket=True, num_bins=num_packing_bins):
        rows_used = int((b["segment_ids"].max(axis=1) > 0).sum())
        slots += rows_used * b["inputs"].shape[1]
        real += int((b["segment_ids"] > 0).sum())
    return real / max(slots, 1)


def global_batch(host_batch: dict[str, np.ndarray], mesh, spec) -> dict:
    """Host batch -> dict of global ``jax.Array`` sharded by ``NamedSharding(mesh, spec)``
    (e.g. ``P(("data", "fsdp"))``); every process passes its own host batch."""
    import jax

    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}

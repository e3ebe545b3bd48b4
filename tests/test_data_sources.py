"""Sources (compressed JSONL, Parquet shards, Arrow, saved datasets, hf: ids), column mapping,
and the streaming pipeline (lazy sources, block shuffle, exact resume, process shards)."""

import collections
import copy
import gzip
import json

import datasets
import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sft_jax.config import default_config
from sft_jax.data import formats, pipeline, sources, templates, testing
from sft_jax.data.formats import DataError

ROWS = testing.synthetic_rows(90)


@pytest.fixture(scope="module")
def tok():
    t, _ = templates.prepare_tokenizer(testing.tiny_fast_tokenizer(), "chatml")
    return t


def _write_parquet_shards(directory, rows, shards=3, row_group_size=8):
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per:(k + 1) * per]
        pq.write_table(pa.Table.from_pylist(part), str(directory / f"train-{k:05d}-of-{shards:05d}.parquet"),
                       row_group_size=row_group_size)
    return str(directory)


def _messages(records):
    return [r["messages"] for r in records]


def test_every_source_gives_the_same_conversations(tmp_path):
    ref = [r["messages"] for r in ROWS]
    lines = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    shards = _write_parquet_shards(tmp_path / "pq", ROWS)
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(arrow) == 1
    for spec in ("a.jsonl.gz", "a.jsonl.zst", "a.json.gz", "pq", "saved", "dd", "dd@train", str(arrow[0])):
        path = spec if spec.startswith("/") else str(tmp_path / spec)
        got = _messages(formats.load_conversations(path))
        assert got == ref, spec
    assert len(formats.load_conversations(str(tmp_path / "dd@test"))) == 5
    # sources name rows as file:line (1-based row for columnar files)
    recs = formats.load_conversations(shards)
    assert recs[0]["source"].endswith("train-00000-of-00003.parquet:1")
    assert recs[-1]["source"].endswith("train-00002-of-00003.parquet:30")
    assert formats.load_conversations(str(tmp_path / "a.jsonl.zst"))[4]["source"].endswith("a.jsonl.zst:5")
    # read_rows (the readers' row API) reads every kind too
    assert [r for r, _ in formats.read_rows(str(tmp_path / "pq" / "train-00001-of-00003.parquet"))] == ROWS[30:60]
    with pytest.raises(DataError, match="splits"):
        formats.load_conversations(str(tmp_path / "dd@nope"))


def test_bad_sources_name_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet"):
        formats.load_conversations(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz: cannot"):
        formats.load_conversations(str(tmp_path / "bad.jsonl.gz"))
    rows = [dict(ROWS[0]), {"messages": [{"role": "robot", "content": "x"}]}]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "role.parquet"))
    with pytest.raises(DataError, match=r"role.parquet:2: field 'messages\[0\].role': unknown role 'robot'"):
        formats.load_conversations(str(tmp_path / "role.parquet"))


def test_hf_ids_parse_and_fail_clearly_offline():
    assert sources.parse_hf_id("hf:org/name") == ("org/name", None, "train")
    assert sources.parse_hf_id("hf:org/name:cfg@test") == ("org/name", "cfg", "test")
    with pytest.raises(DataError, match="expected hf:org/name"):
        sources.parse_hf_id("hf:")
    assert formats.expand_paths("hf:org/name:cfg@train") == ["hf:org/name:cfg@train"]
    with pytest.raises(DataError, match="'hf:sft-jax-test/does-not-exist'.*load_dataset failed"):
        formats.load_conversations("hf:sft-jax-test/does-not-exist")  # HF_HUB_OFFLINE=1 in conftest


def test_column_mapping(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "qa.parquet"))
    recs = formats.load_conversations(str(tmp_path / "qa.parquet"), columns="instruction:question,output:answer")
    assert recs[2]["messages"] == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with pytest.raises(DataError, match="cannot detect the row format"):
        formats.load_conversations(str(tmp_path / "qa.parquet"))
    with pytest.raises(DataError, match=r"qa.parquet:1: missing column 'prompt' \(data.columns maps instruction:prompt"):
        formats.load_conversations(str(tmp_path / "qa.parquet"), columns="instruction:prompt,output:answer")
    with pytest.raises(DataError, match="is not FIELD:COLUMN"):
        formats.parse_columns("instruction")


def _cfg(path, **kw):
    c = default_config().data
    c.path, c.template, c.max_length, c.eval_fraction = path, "chatml", 256, 0.0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _segments(batches):
    segs = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            for s in [s for s in np.unique(b["segment_ids"][r]) if s > 0]:
                w = b["segment_ids"][r] == s
                segs.append((tuple(b["inputs"][r][w]), tuple(b["loss_mask"][r][w])))
    return collections.Counter(segs)


def _ref_segments(cfg, tok):
    exs, _ = pipeline.examples_for_split(cfg, tok)
    return collections.Counter((tuple(e["inputs"]), tuple(e["loss_mask"])) for e in exs)


def test_streaming_parquet_epoch_resume_and_shards(tok, tmp_path):
    shards = _write_parquet_shards(tmp_path / "pq", ROWS)
    cfg = _cfg(shards, streaming=True, shuffle_window=2)
    eager = _cfg(shards)
    ref = _ref_segments(eager, tok)
    assert _ref_segments(cfg, tok) == ref  # the lazy readers give the same examples
    it = pipeline.build_train_iterator(cfg, tok, global_batch_size=4, process_index=0, process_count=1, epochs=1)
    batches = list(it)
    assert _segments(batches) == ref  # one epoch = every example exactly once
    # the block shuffle really shuffles: not file order, and a different order than a second seed
    order = [b["inputs"][0, :8].tolist() for b in batches]
    it2 = pipeline.build_train_iterator(cfg, tok, global_batch_size=4, seed=1, process_index=0, process_count=1,
                                        epochs=1)
    assert [b["inputs"][0, :8].tolist() for b in it2] != order
    # exact resume from a saved state
    it = pipeline.build_train_iterator(cfg, tok, global_batch_size=4, process_index=0, process_count=1, epochs=None)
    for _ in range(3):
        next(it)
    state = copy.deepcopy(it.get_state())
    expect = [next(it) for _ in range(4)]
    it2 = pipeline.build_train_iterator(cfg, tok, global_batch_size=4, process_index=0, process_count=1, epochs=None)
    it2.set_state(state)
    for a in expect:
        b = next(it2)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # two processes: disjoint shards covering the epoch
    parts = [_segments(list(pipeline.build_train_iterator(cfg, tok, global_batch_size=4, process_index=p,
                                                          process_count=2, epochs=1))) for p in range(2)]
    assert parts[0] + parts[1] == ref and not set(parts[0]) & set(parts[1])


def test_streaming_eval_split_and_compressed_jsonl(tok, tmp_path):
    path = tmp_path / "rows.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    splits = {}
    for streaming in (False, True):
        cfg = _cfg(str(path), streaming=streaming, eval_fraction=0.1)
        train = [r["source"] for g in pipeline.split_records(cfg, "train") for r in (g[i] for i in range(len(g)))]
        ev = [r["source"] for g in pipeline.split_records(cfg, "eval") for r in (g[i] for i in range(len(g)))]
        assert len(ev) == 9 and len(train) == 81 and not set(train) & set(ev)
        splits[streaming] = (train, ev)
    assert splits[True] == splits[False]  # the same split streamed or not


def test_block_shuffle_is_a_local_permutation_per_epoch():
    n, starts = 50, np.array([0, 8, 16, 24, 32, 40])
    ds = pipeline.BlockShuffle(grain.MapDataset.source(list(range(n))), starts, window=2, seed=3)
    e0 = [ds[i] for i in range(n)]
    e1 = [ds[n + i] for i in range(n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1 and e0 != list(range(n))
    # locality: the rows come window by window; a window touches <= 2 blocks, and a block
    # is never read again once its window is done (one row-group decode serves it)
    done, current = set(), set()
    for b in np.searchsorted(starts, np.asarray(e0), side="right") - 1:
        if b not in current:
            assert b not in done
            if len(current) == 2:
                done |= current
                current = set()
            current.add(b)


def test_streaming_reads_rows_lazily(tmp_path):
    """A streamed JSONL source holds offsets, not rows: a bad row far down only fails when read."""
    rows = [json.dumps(r) for r in ROWS]
    rows[70] = '{"messages": [{"role": "user", "content": "unterminated'
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(rows) + "\n")
    reader = formats.RecordReader(str(path))
    assert len(reader) == 90 and reader[3]["messages"] == ROWS[3]["messages"]
    with pytest.raises(DataError, match="late.jsonl:71: malformed JSON line"):
        reader[70]
    with pytest.raises(DataError, match="late.jsonl:71: malformed JSON line"):
        formats.load_conversations(str(path))  # the in-memory path reads (and checks) everything up front

"""grain pipeline: packing invariants, exact resume, process sharding, skips, eval split, mixing."""

import collections
import copy
import json

import grain
import numpy as np
import pytest

from sft_jax.config import default_config
from sft_jax.data import pipeline, templates, testing
from sft_jax.data.formats import DataError

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok():
    t, _ = templates.prepare_tokenizer(testing.tiny_fast_tokenizer(), "chatml")
    return t


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "rows.jsonl"
    return testing.write_jsonl(str(p), testing.synthetic_rows(120))


def _cfg(path, **kw):
    c = default_config().data
    c.path = path
    c.template = "chatml"
    c.max_length = 256
    c.eval_fraction = 0.0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _segments(batches):
    """Every packed segment as a hashable (inputs, targets, loss_mask) triple, checking invariants."""
    segs = []
    for b in batches:
        assert set(b) == set(KEYS)
        assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32 and b["segment_ids"].dtype == np.int32
        assert b["positions"].dtype == np.int32
        for r in range(b["inputs"].shape[0]):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            pad = seg == 0
            assert not b["loss_mask"][r][pad].any(), "padding is never trainable"
            ids = [s for s in np.unique(seg) if s > 0]
            last_end = 0
            for s in ids:
                where = np.nonzero(seg == s)[0]
                a, e = where[0], where[-1] + 1
                assert len(where) == e - a, "a segment is one contiguous block (no overlap)"
                assert a >= last_end, "segments do not overlap"
                last_end = e
                np.testing.assert_array_equal(pos[a:e], np.arange(e - a), "positions restart at 0")
                segs.append((tuple(b["inputs"][r, a:e]), tuple(b["targets"][r, a:e]),
                             tuple(b["loss_mask"][r, a:e])))
    return segs


def _reference(cfg, tok):
    exs, stats = pipeline.examples_for_split(cfg, tok)
    return collections.Counter((tuple(e["inputs"]), tuple(e["targets"]), tuple(e["loss_mask"])) for e in exs), stats


@pytest.mark.parametrize("packer", ["first_fit", "best_fit"])
def test_packed_epoch_each_example_exactly_once(tok, data_file, packer):
    cfg = _cfg(data_file, packer=packer)
    it = pipeline.build_train_iterator(cfg, tok, global_batch_size=4, seed=1, process_index=0, process_count=1,
                                       epochs=1, num_packing_bins=8)
    batches = list(it)
    assert all(b["inputs"].shape == (4, 256) for b in batches), "static shape, last batch padded"
    segs = _segments(batches)
    ref, stats = _reference(cfg, tok)
    assert collections.Counter(segs) == ref
    trainable = sum(float(b["loss_mask"].sum()) for b in batches)
    assert trainable == stats.trainable_tokens == it.stats.trainable_tokens
    assert it.stats.rows == 120 and it.stats.examples == stats.examples
    # shifted per example: within a segment targets[t] == inputs[t+1]
    for inp, tgt, _ in segs:
        assert inp[1:] == tgt[:-1]
    assert max(len(s[0]) for s in segs) <= 256
    assert len(batches) < 120 / 4, "packing put several examples in a row"
    assert pipeline.count_train_batches(cfg, tok, global_batch_size=4, seed=1, num_packing_bins=8) == len(batches)


def test_resume_is_exact(tok, data_file):
    cfg = _cfg(data_file)
    kw = dict(global_batch_size=4, seed=3, process_index=0, process_count=1, epochs=None, num_packing_bins=8)
    it = pipeline.build_train_iterator(cfg, tok, **kw)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able (Orbax/grain checkpoint handler)
    want = [next(it) for _ in range(4)]
    fresh = pipeline.build_train_iterator(cfg, tok, **kw)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(4)]
    for w, g in zip(want, got):
        for k in KEYS:
            np.testing.assert_array_equal(w[k], g[k])


def test_process_shards_disjoint_and_covering(tok, data_file):
    cfg = _cfg(data_file)
    shards = []
    for p in range(2):
        it = pipeline.build_train_iterator(cfg, tok, global_batch_size=4, seed=5, process_index=p, process_count=2,
                                           epochs=1, num_packing_bins=8)
        batches = list(it)
        assert all(b["inputs"].shape == (2, 256) for b in batches), "per-host batch = global / processes"
        shards.append(collections.Counter(_segments(batches)))
    assert not (set(shards[0]) & set(shards[1])), "disjoint"
    ref, _ = _reference(cfg, tok)
    assert shards[0] + shards[1] == ref, "covering"


def test_padded_mode_buckets(tok, data_file):
    cfg = _cfg(data_file, packing=False, max_length=256)
    batches = list(pipeline.build_train_iterator(cfg, tok, global_batch_size=8, seed=0, process_index=0,
                                                 process_count=1, epochs=1))
    lengths = {b["inputs"].shape[1] for b in batches}
    assert all(t % 64 == 0 and t <= 256 for t in lengths)
    segs = _segments(batches)
    assert all(s == 1 for b in batches for s in np.unique(b["segment_ids"]) if s)
    ref, _ = _reference(cfg, tok)
    assert collections.Counter(segs) == ref
    # several processes: one static shape (max_length) so global arrays line up
    b = next(pipeline.build_train_iterator(cfg, tok, global_batch_size=8, seed=0, process_index=1,
                                           process_count=2, epochs=1))
    assert b["inputs"].shape == (4, 256)


def test_truncate_drop_and_skip_counts(tok, tmp_path):
    rows = testing.synthetic_rows(40)
    long_prompt = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    p = testing.write_jsonl(str(tmp_path / "r.jsonl"), rows + [long_prompt] * 5)
    # truncate: the long prompts lose their assistant turn -> no trainable token -> skipped, counted
    exs, st = pipeline.examples_for_split(_cfg(p), tok)
    assert st.rows == 45 and st.skipped == {"no_trainable_tokens": 5} and st.examples == 40 == len(exs)
    assert all(len(e["inputs"]) <= 256 for e in exs)
    n_long = st.truncated + 5
    # drop: over-long rows are skipped as too_long
    exs, st = pipeline.examples_for_split(_cfg(p, truncation="drop"), tok)
    assert st.skipped == {"too_long": n_long} and st.rows == 45 and st.truncated == 0 and len(exs) == 45 - n_long
    # truncation keeps a row that still has trainable tokens, and counts it
    exs, st = pipeline.examples_for_split(_cfg(p, max_length=48, max_skip_fraction=1.0), tok)
    assert st.truncated > 0 and all(len(e["inputs"]) == 48 for e in exs if e["truncated"])


def test_too_many_skipped_is_a_loud_error(tok, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    p = testing.write_jsonl(str(tmp_path / "r.jsonl"), testing.synthetic_rows(4) + [long_prompt] * 6)
    with pytest.raises(DataError) as e:
        pipeline.examples_for_split(_cfg(p), tok)
    msg = str(e.value)
    assert "6 of 10" in msg and "max_skip_fraction" in msg and "no_trainable_tokens" in msg
    assert "r.jsonl:" in msg and "word word" in msg, "shows one offending example and where it is"
    with pytest.raises(DataError, match="max_skip_fraction"):
        list(pipeline.build_train_iterator(_cfg(p), tok, global_batch_size=2, process_index=0, process_count=1,
                                           epochs=1, num_packing_bins=4))
    # a looser threshold lets it through, with the skips counted
    it = pipeline.build_train_iterator(_cfg(p, max_skip_fraction=0.7), tok, global_batch_size=2, process_index=0,
                                       process_count=1, epochs=1, num_packing_bins=4)
    list(it)
    assert it.stats.skipped == {"no_trainable_tokens": 6}


def test_eval_split_disjoint_and_eval_path(tok, data_file, tmp_path):
    cfg = _cfg(data_file, eval_fraction=0.1)
    train = pipeline.split_records(cfg, "train", seed=0)[0]
    ev = pipeline.split_records(cfg, "eval", seed=0)[0]
    assert len(ev) == 12 and len(train) == 108
    assert not {r["source"] for r in train} & {r["source"] for r in ev}
    batches, stats = pipeline.build_eval_batches(cfg, tok, global_batch_size=4, process_index=0, process_count=1)
    assert stats.rows == 12 and collections.Counter(_segments(batches)) == _reference(
        _cfg(testing.write_jsonl(str(tmp_path / "ev.jsonl"), [json.loads(open(data_file).readlines()[
            int(r["source"].rsplit(":", 1)[1]) - 1]) for r in ev])), tok)[0]
    # two processes: same number of eval batches on each
    n = {len(pipeline.build_eval_batches(cfg, tok, global_batch_size=4, process_index=p, process_count=2)[0])
         for p in range(2)}
    assert len(n) == 1
    # explicit eval_path: train keeps every row
    cfg2 = _cfg(data_file, eval_path=str(tmp_path / "ev.jsonl"), eval_fraction=0.5)
    assert len(pipeline.split_records(cfg2, "train")[0]) == 120
    assert len(pipeline.split_records(cfg2, "eval")[0]) == 12


def test_weighted_mixing(tok, tmp_path):
    a = testing.write_jsonl(str(tmp_path / "a.jsonl"), testing.synthetic_rows(30, seed=1))
    b = testing.write_jsonl(str(tmp_path / "b.jsonl"), testing.synthetic_rows(10, seed=2))
    cfg = _cfg(f"{a},{b}", weights="3,1")
    groups = pipeline.split_records(cfg, "train")
    rows = pipeline._row_dataset(groups, pipeline._weights(cfg, 2), seed=0, shuffle=True, epochs=2)
    assert len(rows) == 80
    counts = collections.Counter(r["source"].split(":")[0].endswith("a.jsonl") for r in rows)
    assert counts[True] == 60 and counts[False] == 20
    it = pipeline.build_train_iterator(cfg, tok, global_batch_size=2, process_index=0, process_count=1,
                                       epochs=1, num_packing_bins=4)
    list(it)
    assert it.stats.rows == 40
    with pytest.raises(DataError, match="weights"):
        pipeline._weights(_cfg(f"{a},{b}", weights="1"), 2)


def test_global_batch_on_mesh(tok, data_file):
    import jax
    from jax.sharding import PartitionSpec as P

    cfg = _cfg(data_file)
    batch = next(pipeline.build_train_iterator(cfg, tok, global_batch_size=8, process_index=0, process_count=1,
                                               epochs=1, num_packing_bins=8))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
    g = pipeline.global_batch(batch, mesh, P(("data", "fsdp")))
    assert g["inputs"].shape == (8, 256) and g["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(g["targets"]), batch["targets"])


def test_workers_give_the_same_examples(tok, data_file):
    cfg = _cfg(data_file)
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1, epochs=1, num_packing_bins=8)
    inproc = collections.Counter(_segments(pipeline.build_train_iterator(cfg, tok, **kw)))
    it = pipeline.build_train_iterator(cfg, tok, num_workers=2, **kw)
    try:
        workers = collections.Counter(_segments(it))
    finally:
        it.close()
    assert workers == inproc


def test_lima_packing_efficiency_tok512_chatml(shared_dir):
    """LIMA, chatml with its markers as plain text, stories260K's tok512, max_length 2048."""
    cfg = _cfg(str(shared_dir / "data" / "lima.json"), max_length=2048)
    tok = pipeline.load_tokenizer(str(shared_dir / "assets" / "stories260K" / "tok512.model"))
    tok, added = templates.prepare_tokenizer(tok, "chatml", add_tokens=False)
    assert added == []
    it = pipeline.build_train_iterator(cfg, tok, global_batch_size=8, seed=0, process_index=0, process_count=1,
                                       epochs=1)
    real = slots = 0
    for b in it:
        used = b["segment_ids"].max(axis=1) > 0
        slots += int(used.sum()) * 2048
        real += int((b["segment_ids"] > 0).sum())
    eff = real / slots
    print(f"LIMA packing efficiency (first_fit, 2048, tok512, chatml): {eff:.4f}; stats {it.stats.summary()}")
    assert eff >= 0.95
    assert it.stats.rows == 1029 and real == it.stats.tokens


def test_grain_checkpoint_handler_roundtrip(tok, data_file, tmp_path):
    """The iterator goes through grain's Orbax checkpoint handler (what the trainer saves)."""
    from etils import epath

    cfg = _cfg(data_file)
    kw = dict(global_batch_size=4, seed=9, process_index=0, process_count=1, epochs=None, num_packing_bins=8)
    it = pipeline.build_train_iterator(cfg, tok, **kw)
    next(it), next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    want = next(it)
    fresh = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(
        pipeline.build_train_iterator(cfg, tok, **kw)))
    got = next(fresh)
    for k in KEYS:
        np.testing.assert_array_equal(want[k], got[k])


def test_empty_paths_are_clear_errors():
    cfg = default_config()
    with pytest.raises(DataError, match="no tokenizer"):
        pipeline.tokenizer_from_config(cfg)
    with pytest.raises(DataError, match="data.path is empty"):
        pipeline.split_records(cfg.data, "train")

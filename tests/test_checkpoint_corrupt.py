"""Every unreadable condition of a checkpoint goes through the same fallback (issue 19 item 3);
the trainer test also covers metrics.jsonl on resume and restart (item 4).

Each file of the newest step (its `meta/metadata` included) is overwritten with garbage, emptied
or deleted in turn: the restore either reads that step correctly (a file Orbax does not need
for this tree) or warns and restores the older one, never raises nor returns a mixed state.
All steps unreadable: one CheckpointNotFound line naming each of them.
"""

from __future__ import annotations

import pathlib
import shutil
import warnings

import numpy as np
import pytest

from sft_jax.checkpoint import Checkpointer, CheckpointNotFound, abstract_like
from test_checkpoint import assert_tree_equal, make_iter, make_state
from test_train import _metrics, _train

DAMAGE = {"garbage": b"\x00garbage{", "empty": b"", "delete": None}


def _make(d):
    with Checkpointer(d, keep=3, every_steps=1, async_save=False) as ck:
        it = make_iter()
        for step in (1, 2):
            next(it)
            ck.save(step, make_state(step), it, {"s": step})
        ck.wait()


def _damage(path: pathlib.Path, how: str):
    if DAMAGE[how] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGE[how])


def _position(it) -> np.ndarray:
    return np.asarray(next(it))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore teardown
def test_every_file_of_the_newest_step_damaged_every_way(tmp_path):
    ref = tmp_path / "ref"
    _make(ref)
    newest = ref / "checkpoints" / "2"
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert pathlib.Path("meta/metadata") in files and len(files) >= 10
    positions = {}
    for s in (1, 2):
        it = make_iter()
        for _ in range(s):
            next(it)
        positions[s] = _position(it)
    outcomes = {}
    for how in DAMAGE:
        for rel in files:
            d = tmp_path / f"{how}-{str(rel).replace('/', '_')}"
            shutil.copytree(ref, d)
            _damage(d / "checkpoints" / "2" / rel, how)
            it = make_iter()
            with warnings.catch_warnings(record=True) as caught, Checkpointer(d, keep=3) as ck:
                warnings.simplefilter("always")
                state, meta = ck.restore(abstract_state=abstract_like(make_state(0)), data_iterator=it)
            s = meta["s"]
            assert_tree_equal(state, make_state(s))  # the state, meta and iterator of one step
            np.testing.assert_array_equal(_position(it), positions[s])
            texts = [str(w.message) for w in caught]
            fell_back = [t for t in texts if "checkpoint of step 2" in t and "unreadable" in t]
            assert (s == 1) == bool(fell_back), (how, rel, s, texts)
            outcomes[(how, str(rel))] = s
            shutil.rmtree(d)
    # the case: a corrupt meta/metadata is skipped like any other file
    assert all(outcomes[(how, "meta/metadata")] == 1 for how in DAMAGE)
    assert outcomes[("garbage", "data/process_0-of-1.json")] == 1


def test_all_steps_unreadable_is_one_line_naming_them(tmp_path):
    _make(tmp_path)
    for s in (1, 2):
        _damage(tmp_path / "checkpoints" / str(s) / "meta" / "metadata", "garbage")
    with Checkpointer(tmp_path, keep=3) as ck, pytest.warns(RuntimeWarning), \
            pytest.raises(CheckpointNotFound) as e:
        ck.restore(abstract_state=abstract_like(make_state(0)))
    msg = str(e.value)
    assert "\n" not in msg and "step 2 (" in msg and "step 1 (" in msg and "JSONDecodeError" in msg


@pytest.mark.slow
def test_trainer_corrupt_meta_falls_back_all_corrupt_says_resume_none(tmp_path, trained_4_steps):
    common = ["--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.checkpoint.async_save=False"]
    wd = trained_4_steps  # conftest: 4 steps of test_train.SMALL, checkpoints of steps 2 and 4
    (wd / "checkpoints" / "4" / "meta" / "metadata").write_text("{garbage")
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and metrics.jsonl ends on a half-written line (a kill while writing)
    p = _train(wd, "--config.train.steps=4", *common)  # read before the fallback until issue 19: a traceback
    assert "checkpoint of step 4" in p.stderr and "unreadable" in p.stderr, p.stderr[-3000:]
    assert "skipped 1 line(s)" in p.stderr, p.stderr[-3000:]
    assert "resuming at step 2" in p.stdout
    assert [r["step"] for r in _metrics(wd) if "loss" in r] == [1, 2, 3, 4]  # rows 3, 4 of the first run dropped
    steps = sorted(int(s.name) for s in (wd / "checkpoints").iterdir() if s.name.isdigit())
    for s in steps:
        (wd / "checkpoints" / str(s) / "meta" / "metadata").write_text("{garbage")
    p = _train(wd, "--config.train.steps=8", *common, check=False)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert all(f"step {s} (" in errors[0] for s in steps) and "checkpoint.resume=none" in errors[0]
    old_rows = (wd / "metrics.jsonl").read_text()
    _train(wd, "--config.train.steps=2", *common, "--config.checkpoint.resume=none")
    assert sorted(int(s.name) for s in (wd / "checkpoints.1").iterdir() if s.name.isdigit()) == steps
    assert sorted(int(s.name) for s in (wd / "checkpoints").iterdir() if s.name.isdigit()) == [2]
    assert [r["step"] for r in _metrics(wd) if "loss" in r] == [1, 2]  # a fresh file, no duplicated steps
    assert (wd / "metrics.jsonl.1").read_text() == old_rows

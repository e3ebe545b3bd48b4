"""Checkpointer: round trip with a grain iterator, keep policy, corrupt-latest fallback, async."""

import os
import pathlib
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.config import default_config
from sft_jax.checkpoint import Checkpointer, CheckpointNotFound, PreemptionFlag, abstract_like


def make_iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def make_state(step, mesh=None):
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")) if mesh else None
    w = jnp.arange(16, dtype=jnp.float32).reshape(8, 2) + step
    if shard is not None:
        w = jax.device_put(w, shard)
    return {
        "params": {"w": w, "b": jnp.ones((3,), jnp.bfloat16) * step},
        "opt": {"mu": jnp.full((8, 2), 0.5 * step)},
        "step": jnp.asarray(step, jnp.int32),
        "rng": jax.random.fold_in(jax.random.key(0), step),
    }


def assert_tree_equal(a, b):
    a, b = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, (a, b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_iterator_and_shardings(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    it = make_iter()
    for _ in range(3):
        next(it)
    state = make_state(3, mesh)
    with Checkpointer(tmp_path, keep=2, every_steps=0) as ck:
        assert ck.latest_step() is None
        assert not ck.save(3, state, it, {"config": {"a": 1}})  # every_steps=0: not due
        assert ck.save(3, state, it, {"config": {"a": 1}}, force=True)
        ck.wait()
        expected = [next(it) for _ in range(5)]

    it2 = make_iter()
    with Checkpointer(tmp_path, keep=2) as ck:
        assert ck.latest_step() == 3
        restored, meta = ck.restore(abstract_state=abstract_like(state), data_iterator=it2)
    assert meta == {"step": 3, "config": {"a": 1}}
    assert_tree_equal(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    for e in expected:
        np.testing.assert_array_equal(next(it2), e)


def test_keep_and_interval(tmp_path):
    with Checkpointer(tmp_path, keep=2, every_steps=2, async_save=True) as ck:
        for step in range(1, 9):
            ck.save(step, make_state(step), make_iter(), {})
        ck.wait()
        assert ck.all_steps() == [6, 8]
        assert not ck.save(8, make_state(8), None, {}, force=True)  # already there: no-op


def test_async_save_returns_then_wait_finalises(tmp_path):
    big = {"x": jnp.ones((2048, 2048), jnp.float32)}  # 16 MB
    with Checkpointer(tmp_path, keep=1, every_steps=1, async_save=True) as ck:
        ck.save(1, big, None, {})
        ck.wait()
        x2 = jnp.ones((2048, 2048), jnp.float32) * 2
        ck.save(2, {"x": x2}, None, {"cfg": default_config(), "n": np.int64(3)})
        x2.delete()  # buffers may be donated/freed as soon as save() returned
        # While the async save runs, a finalised step directory exists at every moment:
        # the older step is deleted only after the newer one is finalised (renamed).
        root = pathlib.Path(ck.directory)
        polls = 0
        while ck._mgr.is_saving_in_progress():
            assert [d for d in root.iterdir() if d.name.isdigit()], list(root.iterdir())
            polls += 1
        ck.wait()
        assert ck.all_steps() == [2]
        restored, meta = ck.restore()
        assert meta["n"] == 3 and meta["cfg"]["train"]["lr"] == 1e-4
        np.testing.assert_array_equal(np.asarray(restored["x"]), np.full((2048, 2048), 2.0))


def _files(step_dir):
    return sorted(p for p in pathlib.Path(step_dir).rglob("*") if p.is_file())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore teardown
@pytest.mark.parametrize("damage", ["truncate", "delete_state", "delete_data"])
def test_corrupt_latest_falls_back(tmp_path, damage):
    with Checkpointer(tmp_path, keep=3, every_steps=1) as ck:
        for step in (1, 2):
            it = make_iter()
            for _ in range(step):
                next(it)
            ck.save(step, make_state(step), it, {"s": step})
        ck.wait()
    newest = pathlib.Path(tmp_path) / "checkpoints" / "2"
    if damage == "truncate":
        # Truncate every array data file of the state item.
        victims = [p for p in _files(newest / "state") if "d" in p.parts[-2:-1] or p.parent.name == "d"]
        assert victims, _files(newest / "state")
        for p in victims:
            p.write_bytes(p.read_bytes()[:10])
    elif damage == "delete_state":
        for p in _files(newest / "state"):
            p.unlink()
    else:
        for p in _files(newest / "data"):
            p.unlink()
    it = make_iter()
    with Checkpointer(tmp_path, keep=3, every_steps=1) as ck:
        with pytest.warns(RuntimeWarning, match="step 2"):
            restored, meta = ck.restore(abstract_state=abstract_like(make_state(0)), data_iterator=it)
        assert meta["s"] == 1
        assert_tree_equal(restored, make_state(1))
        ref = make_iter()
        next(ref)
        np.testing.assert_array_equal(next(it), next(ref))
        # Training resumes from 1 and saves 2 again: the corrupt step is replaced.
        with pytest.warns(RuntimeWarning, match="replacing corrupt"):
            assert ck.save(2, make_state(2), it, {"s": 2})
        ck.wait()
        assert ck.restore(abstract_state=abstract_like(make_state(0)))[1]["s"] == 2


def test_unfinalised_tmp_dir_is_ignored(tmp_path):
    with Checkpointer(tmp_path, keep=3, every_steps=1) as ck:
        ck.save(1, make_state(1), None, {"s": 1})
        ck.wait()
    # What a crash mid-save leaves behind.
    tmp = pathlib.Path(tmp_path) / "checkpoints" / "2.orbax-checkpoint-tmp-1234567890"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path, keep=3, every_steps=1) as ck:
        assert ck.latest_step() == 1
        assert ck.restore()[1]["s"] == 1


def test_no_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path) as ck, pytest.raises(CheckpointNotFound):
        ck.restore()


def test_preemption_flag():
    previous = signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag().install()
    try:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop() and flag.received == signal.SIGTERM
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous

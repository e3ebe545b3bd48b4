"""Checkpoints: Orbax CheckpointManager over (train state, grain iterator state, JSON meta).

One step directory `WORKDIR/checkpoints/<step>/` holds three items:

* `state`: any pytree of arrays (the trainer passes trainable params, optimizer state,
  step and RNG key).  Typed PRNG keys are stored as their raw uint32 key data and
  re-wrapped on restore when the abstract tree asks for a key dtype.
* `data`: the grain iterator's state (`grain.checkpoint.CheckpointHandler`); restoring
  it makes the iterator continue exactly where the saved one stood.
* `meta`: a JSON dict (config, step, library versions ...), written by process 0 only
  (Orbax's JsonCheckpointHandler writes on the primary host).

Orbax writes each step into a temporary directory and renames it when every item is
committed, so a crash mid-save leaves an unfinalised tmp dir that `all_steps()` ignores;
the keep policy deletes old steps only after the new one is finalised.  On top of that,
`restore()` tries the newest step first and falls back to older ones (with a warning)
when a step is corrupt or partial.

Steps a reader pins (`sft_jax.step_pins`: export/generate/eval/serve reading a step while the trainer
runs) are not deleted by the rotation: Orbax's deleter is wrapped (`_PinAwareDeleter`), a pinned step is
kept and deleted at a later save (or at `close()`) once no reader holds it.

`PreemptionFlag` turns SIGTERM into a flag the training loop polls at step boundaries.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import step_pins

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _grain():
    import grain

    return grain


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> raw uint32 key data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree: Any) -> Any:
    """In an abstract tree, replace key-typed leaves with the uint32 layout they are saved as."""

    def conv(x):
        if not _is_key(x):
            return x
        impl = jax.random.key_impl(x) if isinstance(x, jax.Array) else _key_impl_of(x)
        shape = tuple(x.shape) + tuple(_key_data_shape(impl))
        sharding = getattr(x, "sharding", None)
        if sharding is not None and isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        elif sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            sharding = None
        return jax.ShapeDtypeStruct(shape, jnp.uint32, sharding=sharding)

    return jax.tree.map(conv, tree)


def _key_impl_of(x: Any):
    # ShapeDtypeStruct of a key dtype: the impl lives on the dtype.
    return x.dtype._impl  # noqa: SLF001 - public API has no accessor for abstract keys


def _key_data_shape(impl) -> tuple[int, ...]:
    return tuple(jax.random.key_data(jax.random.key(0, impl=impl)).shape)


def _data_to_keys(restored: Any, abstract: Any) -> Any:
    def conv(r, a):
        if not _is_key(a):
            return r
        impl = jax.random.key_impl(a) if isinstance(a, jax.Array) else _key_impl_of(a)
        return jax.random.wrap_key_data(r, impl=impl)

    return jax.tree.map(conv, restored, abstract)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with each leaf's sharding) of a concrete tree: restore targets."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def _json_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """ConfigDicts -> dicts, numpy/jax scalars -> numbers, anything else odd -> str."""

    def default(o):
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if hasattr(o, "shape") and getattr(o, "shape", None) == ():
            return np.asarray(o).item()
        if hasattr(o, "tolist"):
            return np.asarray(o).tolist()
        return str(o)

    import json

    return json.loads(json.dumps(dict(meta), default=default))


class _PinAwareDeleter:
    """Orbax's checkpoint deleter, skipping steps a reader pins (`sft_jax.step_pins`); a skipped step is
    remembered and deleted by `retry()` (the next save, `close()`) once unpinned.  Process 0 decides and
    deletes (Orbax's deleter acts on the primary host only), so no collective is involved."""

    def __init__(self, inner: Any, directory: str):
        self._inner, self._directory = inner, directory
        self._deferred: set[int] = set()
        self._lock = threading.Lock()

    @property
    def deferred(self) -> list[int]:
        with self._lock:
            return sorted(self._deferred)

    def delete(self, step: int) -> None:
        step = int(step)
        if jax.process_index() != 0:
            return self._inner.delete(step)  # a no-op off the primary host
        fd = step_pins.try_exclusive(self._directory, step)
        if fd is None:
            with self._lock:
                new = step not in self._deferred
                self._deferred.add(step)
            if new:
                log.warning("checkpoint step %d is being read by another process (pinned: %s); kept, it is deleted "
                            "at a later save once the reader is done", step, step_pins.pin_path(self._directory, step))
            return
        try:
            if os.path.isdir(os.path.join(self._directory, str(step))):
                self._inner.delete(step)
        finally:
            step_pins.release_exclusive(self._directory, step, fd)
        with self._lock:
            self._deferred.discard(step)

    def delete_steps(self, steps) -> None:
        for step in steps:
            self.delete(step)

    def retry(self) -> None:
        for step in self.deferred:
            self.delete(step)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name):  # anything else Orbax asks of its deleter
        return getattr(self._inner, name)


class CheckpointNotFound(FileNotFoundError):
    """No (readable) checkpoint in the work directory."""


class Checkpointer:
    """Save/restore `(state, data iterator, meta)` under `workdir/checkpoints` (or `workdir/<subdir>`).

    `every_steps` > 0: `save(step, ...)` saves when `step % every_steps == 0`; 0 means only
    forced saves (the trainer forces the final one and a preemption one).  `keep` finalised
    checkpoints are kept (older ones are deleted by Orbax after a newer one is finalised).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, every_steps: int = 0, async_save: bool = True,
                 subdir: str = "checkpoints"):
        ocp, grain = _ocp(), _grain()
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), subdir)
        self.every_steps = int(every_steps)
        self._bad_steps: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the interval policy is ours (see save)
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )
        # the keep-N rotation respects readers' pins (sft_jax.step_pins); Orbax 0.12's deleter attribute
        self._deleter = _PinAwareDeleter(self._mgr._checkpoint_deleter, self.directory)  # noqa: SLF001
        self._mgr._checkpoint_deleter = self._deleter  # noqa: SLF001

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    # --------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state_tree: Any,
        data_iterator: Any = None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving `step`; returns whether a save was started (async: not yet finished).

        `state_tree` arrays are read before this returns (Orbax copies device buffers to host
        first), so the caller may donate/overwrite them right after.  The grain iterator's
        state is captured now, too.  Call `wait()` before reading the files.
        """
        ocp, grain = _ocp(), _grain()
        step = int(step)
        if not force and not self.should_save(step):
            return False
        self._deleter.retry()  # steps a reader pinned at an earlier rotation: deleted now if unpinned (process 0)
        existing = set(self._mgr.all_steps())
        if step in existing:
            if step in self._bad_steps:
                warnings.warn(f"replacing corrupt checkpoint of step {step}", RuntimeWarning, stacklevel=2)
                self._mgr.delete(step)
                self._bad_steps.discard(step)
                if os.path.isdir(os.path.join(self.directory, str(step))):  # a reader pins it: keep, do not save
                    return False
            else:
                log.info("checkpoint of step %d already exists; not saving again", step)
                return False
        items: dict[str, Any] = {"state": ocp.args.StandardSave(_keys_to_data(state_tree))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        items["meta"] = ocp.args.JsonSave(_json_meta({"step": step, **dict(meta or {})}))
        return bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))

    # ------------------------------------------------------------------ restore
    def restore(
        self, step: int | None = None, abstract_state: Any = None, data_iterator: Any = None,
        restore_data_if: Callable[[dict], bool] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restore `(state, meta)`; `data_iterator` (if given) is set to the saved position.

        `abstract_state`: a tree of `jax.ShapeDtypeStruct` (with `sharding`) giving the
        target structure, dtypes and shardings; None restores as saved (host numpy-like).
        `restore_data_if(meta)`: restore the iterator only when it returns True for the meta
        of the step being restored (the trainer: same process count as when it was saved).
        `step=None`: the newest readable step; a step any of whose files (meta included) cannot
        be read is skipped with a warning and the next older one is tried.  An explicit `step`
        raises if bad.  Raises `CheckpointNotFound` (one line naming every step and why) when
        there is nothing readable to restore.
        """
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise CheckpointNotFound(f"no checkpoint of step {step} in {self.directory} (have {steps})")
            return self._restore_one(int(step), abstract_state, data_iterator, restore_data_if)
        if not steps:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        errors = []
        for s in reversed(steps):
            try:
                out = self._restore_one(s, abstract_state, data_iterator, restore_data_if)
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                self._bad_steps.add(s)
                errors.append(f"step {s} ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
                warnings.warn(
                    f"checkpoint of step {s} in {self.directory} is unreadable "
                    f"({type(e).__name__}: {str(e)[:300]}); trying an older one",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            return out
        raise CheckpointNotFound(f"no readable checkpoint in {self.directory}: {'; '.join(errors)}")

    def _restore_one(self, step: int, abstract_state: Any, data_iterator: Any,
                     restore_data_if: Callable[[dict], bool] | None) -> tuple[Any, dict[str, Any]]:
        ocp, grain = _ocp(), _grain()
        target = None if abstract_state is None else _abstract_keys_to_data(abstract_state)
        # Meta and state first: the iterator is only touched once those are known good.
        meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        state = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        if abstract_state is not None:
            state = _data_to_keys(state, abstract_state)
        if data_iterator is not None and (restore_data_if is None or restore_data_if(dict(meta or {}))):
            self._mgr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return state, dict(meta or {})

    # ---------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Block until the in-flight async save (if any) is finalised; re-raise its error."""
        self._mgr.wait_until_finished()
        self._mgr.check_for_errors()

    def close(self) -> None:
        self._mgr.close()  # waits for the in-flight save (its rotation included)
        self._deleter.retry()  # pinned steps whose readers are done; still pinned: left for the reader

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------ preemption


class PreemptionFlag:
    """SIGTERM (and optionally SIGINT) → a flag polled by the training loop at step boundaries.

        flag = PreemptionFlag().install()
        for step in ...:
            ...
            if flag.should_stop():        # collective when process_count() > 1
                ckpt.save(step, state, it, meta, force=True); ckpt.wait(); break
        flag.uninstall()

    The handler only sets a flag (no I/O, no JAX calls).  With several processes every
    process must call `should_stop()` at the same steps: it all-gathers the local flags
    so all processes stop at the same step even if only one received the signal.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must run in the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        """This process's flag (no communication)."""
        return self._event.is_set()

    __bool__ = is_set

    def should_stop(self) -> bool:
        """True on every process when any process got the signal (collective if multi-process)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([local], dtype=np.int32))
        return bool(np.asarray(flags).any())

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

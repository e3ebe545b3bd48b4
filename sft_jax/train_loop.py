"""The training loop: one state value, a short step, and hooks called on a schedule.

`Loop.fit()` runs `step()` (dispatch the jitted train step; no host sync) until the run ends or a hook
stops it.  Metrics stay on the device and are fetched together at *sync points*: every
`train.log_every` steps, at a step where a hook is due (evaluation, checkpoint), at the last step, at a
step that compiled, and (one process) as soon as SIGTERM arrives.  A sync writes one metrics row per step,
checks them (non-finite loss or gradient norm, loss spike) and takes the run's one collective for the stop
decisions (SIGTERM on any process).  Hooks (levanter's `add_hook(every=N)` in spirit) then run in order:
evaluation, best checkpoint / early stopping, checkpoint, preemption.  A checkpoint is only written after a
sync found every step up to it finite, so a non-finite state is never saved.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import math
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import struct

from sft_jax import checkpoint as ckpt_lib
from sft_jax import distributed
from sft_jax import metrics as metrics_lib


class TrainError(RuntimeError):
    """A run that cannot go on (NaN loss, loss spike, disk full ...); the message says why and what was kept."""


@struct.dataclass
class TrainState:
    """Everything that changes during training; `step` is a host int (static), `rng` the run's base key
    (raw key data, replicated): step s draws `fold_in(rng, s)`."""

    trainable: Any
    opt_state: Any
    rng: Any
    step: int = struct.field(pytree_node=False, default=0)

    def checkpoint_tree(self, rep_array: Callable) -> dict:
        """The tree saved in `checkpoints/<step>/state` (the layout export/generate read)."""
        return {"trainable": self.trainable, "opt_state": self.opt_state,
                "step": rep_array(np.int32(self.step)), "rng": self.rng}

    @classmethod
    def from_checkpoint(cls, tree: dict) -> "TrainState":
        return cls(trainable=tree["trainable"], opt_state=tree["opt_state"], rng=tree["rng"],
                   step=int(tree["step"]))


@dataclasses.dataclass
class Hook:
    """`fn(loop)` at steps where `due(step)`; `every`: every N steps (0 = never by the schedule)."""

    name: str
    fn: Callable[["Loop"], None]
    every: int = 0
    when: Callable[[int], bool] | None = None

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.when is not None and self.when(step))


@dataclasses.dataclass
class _Pending:
    step: int
    metrics: Any  # device arrays
    compile_s: float  # > 0: this step compiled (its dispatch time)


class EarlyStopping:
    """Best value of an eval metric and the evaluations since it improved (saved in checkpoint meta)."""

    def __init__(self, metric: str, patience: int, min_delta: float):
        self.metric, self.patience, self.min_delta = metric, int(patience), float(min_delta)
        self.lower_is_better = metrics_lib.lower_is_better(metric)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is the new best."""
        if value is None or not math.isfinite(value):
            self.bad_evals += 1
            return False
        better = (self.best is None or
                  (value < self.best - self.min_delta if self.lower_is_better else value > self.best + self.min_delta))
        if better:
            self.best, self.best_step, self.bad_evals = float(value), int(step), 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, saved: dict | None) -> None:
        if saved and saved.get("metric") == self.metric:
            self.best, self.best_step = saved.get("best"), saved.get("best_step")
            self.bad_evals = int(saved.get("bad_evals") or 0)


def check_disk_space(directory: str, need_bytes: float, step: int, kept: list[int]) -> None:
    """TrainError (one line: path, free space, what is kept) when `directory` has less than `need_bytes` free."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise TrainError(disk_full_message(directory, step, kept, free, need_bytes))


def disk_full_message(directory: str, step: int, kept: list[int], free: float | None = None,
                      need: float | None = None) -> str:
    if free is None:
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            free = float("nan")
    needs = f", the checkpoint needs about {need / 2**20:.1f} MiB" if need else ""
    return (f"disk full: cannot save the checkpoint of step {step} in {directory} ({free / 2**20:.1f} MiB free"
            f"{needs}); the earlier checkpoints are kept (steps {kept or 'none'}). Free space or use another "
            f"--workdir, then run the same command to resume")


def is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class Loop:
    """The fit phase.  Built by the trainer with everything it needs; hooks are added with `add_hook`."""

    def __init__(self, *, state: TrainState, steps, frozen, train_iter, make_batch: Callable, total_steps: int,
                 mw: metrics_lib.MetricsWriter, ck: ckpt_lib.Checkpointer, meta: Callable[["Loop"], dict],
                 rep_array: Callable, log_every: int, flops_per_token: float, peak_flops: float,
                 spike_factor: float = 0.0, spike_window: int = 100):
        self.state, self.steps, self.frozen, self.train_iter = state, steps, frozen, train_iter
        self.make_batch, self.total_steps, self.mw, self.ck = make_batch, int(total_steps), mw, ck
        self.meta, self.rep_array, self.log_every = meta, rep_array, max(int(log_every), 1)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.spike_factor, self.recent = float(spike_factor), collections.deque(maxlen=int(spike_window))
        self.hooks: list[Hook] = []
        self.pending: list[_Pending] = []
        self.last: dict = {}  # the last metrics row
        self.last_eval: dict = {}
        self.eval_step = -1
        self.stop: str | None = None  # why the loop ends early (SIGTERM, early_stopping)
        self.flag = ckpt_lib.PreemptionFlag()
        self.counter = metrics_lib.CompileCounter("train_step")
        self.shapes: set = set()
        self._window_t0 = time.perf_counter()

    def add_hook(self, name: str, fn: Callable[["Loop"], None], every: int = 0,
                 when: Callable[[int], bool] | None = None) -> None:
        self.hooks.append(Hook(name, fn, int(every), when))

    # ---------------------------------------------------------------- the loop
    def fit(self) -> str | None:
        self.flag.install()
        try:
            while self.state.step < self.total_steps and self.stop is None:
                compiled = self.train_step()
                step = self.state.step
                synced = compiled or self._sync_due() or any(h.due(step) for h in self.hooks)
                if synced:
                    self.sync()
                for hook in self.hooks:  # `due` is asked in turn: a hook may stop the run for the next ones
                    if hook.due(step):
                        hook.fn(self)
                if synced:  # the next window's step times start after the hooks (evaluation is not a step)
                    self._window_t0 = time.perf_counter()
            self.wait()
        finally:
            self.flag.uninstall()
            self.counter.close()
        return self.stop

    def train_step(self) -> bool:
        """Dispatch one step (no host sync); True when it compiled."""
        host = next(self.train_iter)
        batch = self.make_batch(host)
        s = self.state
        before, t0 = self.counter.count, time.perf_counter()
        trainable, opt_state, m = self.steps.train_step(s.trainable, self.frozen, s.opt_state, batch,
                                                        jax.random.fold_in(s.rng, s.step))
        dt = time.perf_counter() - t0
        self.state = s.replace(trainable=trainable, opt_state=opt_state, step=s.step + 1)
        compiled = self.counter.count > before
        shape = tuple(host["inputs"].shape)
        if compiled and shape in self.shapes:
            self.mw.print(f"warning: step {self.state.step} recompiled the train step for an already-compiled "
                          f"batch shape {shape} ({self.counter.count} compilations so far)")
        self.shapes.add(shape)
        self.pending.append(_Pending(self.state.step, m, dt if compiled else 0.0))
        return compiled

    def _sync_due(self) -> bool:
        step = self.state.step
        return step % self.log_every == 0 or step >= self.total_steps or (
            jax.process_count() == 1 and self.flag.is_set())

    def sync(self) -> None:
        """Fetch the pending metrics, write their rows, check them; one collective for SIGTERM."""
        if self.pending:
            pending, self.pending = self.pending, []
            fetched = jax.device_get([p.metrics for p in pending])
            now = time.perf_counter()
            compile_s = sum(p.compile_s for p in pending)
            plain = [p for p in pending if not p.compile_s]
            per_step = max(now - self._window_t0 - compile_s, 1e-9) / max(len(plain), 1)
            self._window_t0 = now
            for p, m in zip(pending, fetched):
                self._row(p, m, per_step)
        if distributed.agree_any(self.flag.is_set()):
            self.stop = self.stop or "SIGTERM"

    def _row(self, p: _Pending, m: dict, per_step: float) -> None:
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise TrainError(
                f"non-finite loss {loss} (grad_norm {gnorm}) at step {p.step}: stopping. The last good "
                f"checkpoint is kept (step {self.ck.latest_step()}); lower train.lr or check the data.")
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            median = float(np.median(self.recent))
            if loss > self.spike_factor * median:
                raise TrainError(
                    f"loss spike at step {p.step}: loss {loss:.4g} > train.loss_spike.factor={self.spike_factor:g} x "
                    f"the running median {median:.4g} of the last {len(self.recent)} steps: stopping. The newest "
                    f"checkpoint before it is kept (step {self.ck.latest_step()}); lower train.lr or check the data.")
        self.recent.append(loss)
        dt = p.compile_s or per_step
        real = int(m["real_tokens"])
        tps = real / dt
        self.last = {
            "loss": loss, "lr": float(m["lr"]), "grad_norm": gnorm, "accuracy": float(m["accuracy"]),
            "trainable_tokens": int(m["trainable_tokens"]), "real_tokens": real, "tokens_per_s": tps,
            "step_time_s": dt, "compile_time_s": p.compile_s,
            "mfu": metrics_lib.mfu(self.flops_per_token, tps, self.peak_flops, jax.device_count()),
        }
        self.mw.write(p.step, self.last)

    # ------------------------------------------------------------ checkpoints
    def wait(self) -> None:
        """Wait for the in-flight async save; a disk full there -> TrainError naming it."""
        try:
            self.ck.wait()
        except Exception as e:
            if is_disk_full(e):
                raise TrainError(disk_full_message(self.ck.directory, self.state.step, self.ck.all_steps())) from None
            raise

    def save(self, ck: ckpt_lib.Checkpointer | None = None, force: bool = False) -> bool:
        """Save the current state (after a sync: every step up to it was finite); disk full -> TrainError."""
        ck = ck or self.ck
        step = self.state.step
        if not force and not ck.should_save(step):
            return False
        kept = ck.all_steps()
        leaves = jax.tree.leaves((self.state.trainable, self.state.opt_state))
        need = 1.1 * sum(x.nbytes for x in leaves) / jax.process_count() + 2**20
        try:
            problem = ""
            try:
                check_disk_space(ck.directory, need, step, kept)
            except TrainError as e:
                problem = str(e)
            if distributed.agree_any(bool(problem)):
                raise TrainError(problem or f"disk full on another process at the checkpoint of step {step}")
            return ck.save(step, self.state.checkpoint_tree(self.rep_array), self.train_iter, self.meta(self),
                           force=True)
        except TrainError:
            raise
        except Exception as e:
            if is_disk_full(e):
                raise TrainError(disk_full_message(ck.directory, step, kept)) from None
            raise

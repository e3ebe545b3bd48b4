"""Run metrics: JSONL + TensorBoard + progress display, MFU arithmetic, a compile counter.

* `MetricsWriter(workdir, is_main_process)`: `WORKDIR/metrics.jsonl` (one JSON object per
  logged step), TensorBoard scalars in `WORKDIR/tb`, `WORKDIR/run_info.json` (config,
  versions, devices) and a progress display (tqdm on a tty, periodic log lines otherwise).
  Non-main processes write nothing and show nothing.
* `model_flops_per_token`, `peak_flops_per_device`, `measure_matmul_peak`, `mfu`: the
  throughput arithmetic, with the formula written down.
* `CompileCounter`: counts XLA compilations via `jax.monitoring` so the trainer can warn
  when something recompiles after the first step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

from sft_jax.restart import keep_aside

log = logging.getLogger(__name__)

# Event recorded once per executable that jit builds (wraps `compile_or_get_cached`, so it
# fires on persistent-compilation-cache hits too, with the retrieval time), keyword
# `fun_name="jit(<python name>)"`.  Verified in jax 0.10.2 (jax/_src/dispatch.py:
# BACKEND_COMPILE_EVENT; jax/_src/interpreters/pxla.py:_cached_compilation).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# ------------------------------------------------------------------------------- MFU


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of eval metric `metric` ("loss", "a/loss", "accuracy", "stop_rate", ...) is
    better: the one rule of early stopping, `checkpoint.keep_best` and the run report's best step."""
    return metric.endswith("loss") or metric in ("repetition", "mean_length")


def model_flops_per_token(
    n_params_total: int,
    n_layers: int,
    seq_len: int,
    hidden: int,
    frozen_base: bool = False,
    *,
    n_lookup_params: int = 0,
    n_trainable_params: int = 0,
) -> float:
    """Training FLOPs per token (forward + backward), the numerator of MFU.

    With N = `n_params_total - n_lookup_params` (the weights used in matmuls: pass the
    untied input-embedding table, vocab*hidden, as `n_lookup_params` - a gather costs no
    FLOPs; a tied embedding is the LM head and stays in N), L layers, model width d and
    attended length T (`seq_len`: the row length, because dense attention computes the
    full T x T score matrix of a padded or packed row):

      full fine-tuning:  6·N + 12·L·d·T
          forward 2·N (a multiply-add per weight); backward 4·N (activation gradients
          2·N + weight gradients 2·N).
      frozen base (`frozen_base`: LoRA and the other adapter methods):
                         4·N + 6·N_trainable + 12·L·d·T
          the frozen base gets activation gradients (2·N) but no weight gradients, so
          2·N + 2·N; the method's weights (`n_trainable_params`) are ordinary trained weights.
      attention (both):  12·L·d·T
          per layer and token, Q·Kᵀ and P·V are 2·T·d multiply-adds each = 4·T·d FLOPs
          forward; backward is twice that (gradients to both operands, none are weights).
          No causal halving (PaLM's convention; flash/splash kernels skip the masked half,
          so MFU is conservative there).  d is the attention width (heads x head_dim),
          normally equal to `hidden`.

    Embedding gathers, norms, softmax, activations and the optimizer update are ignored.
    """
    n = float(n_params_total - n_lookup_params)
    attention = 12.0 * n_layers * hidden * seq_len
    if frozen_base:
        return 4.0 * n + 6.0 * float(n_trainable_params) + attention
    return 6.0 * n + attention


# Dense bf16 matmul peak per device (per chip for TPU; TPU f32 matmuls use the same units).
# Keys are matched as lower-case substrings of `jax.devices()[0].device_kind`, in order.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("b200", 2250e12),
    ("h200", 989e12),  # also GH200
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h800", 989e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),  # before "l4": "NVIDIA L40S" contains it
    ("nvidia l4", 121e12),
    ("a10g", 70e12),
)
# Measured with `measure_matmul_peak` on the 2-core development machines (ENV_NOTES.md).
CPU_PEAK_FLOPS = {"float32": 210e9, "bfloat16": 420e9}

_measured: dict[tuple[str, int], float] = {}


def measure_matmul_peak(dtype: Any = "float32", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted `size`x`size` matmul on the default device (best of `repeats`).

    bfloat16 inputs accumulate in float32.  Takes well under a second on a CPU; the
    result is cached per (dtype, size).  Noisy on a shared machine: it is a lower bound.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    key = (dtype.name, int(size))
    if key in _measured:
        return _measured[key]
    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _measured[key] = 2.0 * size**3 / best
    return _measured[key]


def peak_flops_per_device(override: float = 0.0, dtype: str = "float32", device: Any = None,
                          measure_cpu: bool = False) -> float:
    """Peak FLOP/s of one device: `override` (`train.peak_flops`) if > 0, else the table.

    CPUs: `measure_matmul_peak(dtype)` when `measure_cpu`, else CPU_PEAK_FLOPS[dtype].
    Unknown accelerators return NaN (MFU then reads NaN rather than a made-up number).
    """
    if override and override > 0:
        return float(override)
    import jax

    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "cpu":
        if measure_cpu:
            return measure_matmul_peak(dtype)
        return CPU_PEAK_FLOPS.get(str(dtype), CPU_PEAK_FLOPS["float32"])
    for sub, peak in PEAK_FLOPS:
        if sub in kind:
            return peak
    return float("nan")


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices.

    Pass *real* (non-padding) tokens per second: padding is not useful model work.
    """
    return flops_per_token * tokens_per_s / (peak_flops * max(num_devices, 1))


# ---------------------------------------------------------------------- compilations


class CompileCounter:
    """Counts XLA compilations (executables built by jit, incl. persistent-cache hits).

        counter = CompileCounter("train_step")   # only jitted functions named *train_step*
        ... first step ...
        counter.reset()
        ... later: if counter.count: warn(f"recompiled: {counter.names}")

    `name_filter` is a substring of the Python function name (events carry
    `fun_name="jit(<name>)"`); None counts everything, including the small executables
    that eager `jnp` operations compile on first use.  Listeners are process-global;
    `close()` (or leaving the `with` block) unregisters this one.
    """

    def __init__(self, name_filter: str | None = None):
        from jax import monitoring

        self.name_filter = name_filter
        self.count = 0
        self.seconds = 0.0
        self.names: list[str] = []
        self._monitoring = monitoring
        monitoring.register_event_duration_secs_listener(self._on_duration)
        self._active = True

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event != COMPILE_EVENT:
            return
        name = str(kwargs.get("fun_name", "?"))
        if self.name_filter is not None and self.name_filter not in name:
            return
        self.count += 1
        self.seconds += float(duration)
        self.names.append(name)

    def reset(self) -> None:
        self.count, self.seconds, self.names = 0, 0.0, []

    def close(self) -> None:
        if self._active:
            self._monitoring.unregister_event_duration_listener(self._on_duration)
            self._active = False

    def __enter__(self) -> "CompileCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- writer


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers",
                 "tokenizers", "sentencepiece", "numpy", "ml-collections"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_info() -> dict[str, Any]:
    import jax

    devs = jax.devices()
    return {
        "platform": devs[0].platform,
        "device_kind": devs[0].device_kind,
        "device_count": len(devs),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
    }


def _to_python(v: Any) -> Any:
    """jax/numpy scalars -> float/int; non-finite floats -> None (strict JSON)."""
    if hasattr(v, "shape") and getattr(v, "shape", None) == ():
        v = np.asarray(v).item()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=lambda o: _to_python(o) if hasattr(o, "shape") else str(o)))


class Progress:
    """tqdm bar (loss, real tokens/s, ETA) on a tty; else a log line every `every_s` seconds."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 tty: bool | None = None, every_s: float = 30.0, print_fn: Callable[[str], None] | None = None):
        self.total = int(total_steps)
        self.enabled = enabled
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.every_s = every_s
        self.print_fn = print_fn or (lambda s: print(s, flush=True))
        self.step = initial_step
        self._t0 = time.perf_counter()
        self._s0 = initial_step
        self._last_print = -math.inf
        self._bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=initial_step, dynamic_ncols=True, unit="step")

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self.step)
            post = {}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            if tokens_per_s is not None:
                post["tok/s"] = f"{tokens_per_s:,.0f}"
            self._bar.set_postfix(post, refresh=False)
            self.step = step
            return
        self.step = step
        now = time.perf_counter()
        if now - self._last_print < self.every_s and step < self.total:
            return
        self._last_print = now
        done = step - self._s0
        eta = (now - self._t0) / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        parts.append(f"ETA {_fmt_s(eta)}")
        self.print_fn(" | ".join(parts))

    def restart_clock(self, step: int) -> None:
        """Measure the ETA's rate from `step` on (the trainer: after the compile step)."""
        self._t0, self._s0 = time.perf_counter(), step

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            self.print_fn(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsWriter:
    """Per-step metrics to `WORKDIR/metrics.jsonl` + TensorBoard (`WORKDIR/tb`) + progress.

    Trainer fields (all optional, any extra numeric fields pass through): `loss, lr,
    grad_norm, trainable_tokens, real_tokens, tokens_per_s` (real, non-padding tokens),
    `step_time_s, compile_time_s, mfu`; `write_eval` prefixes its fields with `eval_`.
    Each JSONL line is `{"step": s, "time": unix_seconds, ...}`; non-finite values are
    written as null.  `resume_step`: rows with a larger step (from a run that went past
    the checkpoint it resumes from) are dropped, and TensorBoard purges them too; a line that
    is not JSON (the half-written last line of a killed run) is dropped with a warning.
    `resume_step=None` (a run starting at step 0): an existing metrics.jsonl and tb/ are kept
    as `metrics.jsonl.<n>` and `tb.<n>` and fresh ones started.
    On non-main processes every method is a no-op.
    """

    def __init__(self, workdir: str | os.PathLike, is_main_process: bool | None = None, *,
                 total_steps: int = 0, resume_step: int | None = None, tensorboard: bool = True,
                 progress: bool = True, tty: bool | None = None, log_every_s: float = 30.0,
                 print_fn: Callable[[str], None] | None = None):
        if is_main_process is None:
            import jax

            is_main_process = jax.process_index() == 0
        self.main = bool(is_main_process)
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self._tb = None
        self.progress = Progress(total_steps, initial_step=resume_step or 0,
                                 enabled=self.main and progress and total_steps > 0,
                                 tty=tty, every_s=log_every_s, print_fn=print_fn)
        if not self.main:
            self._f = None
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is None:
            for old in (self.path, os.path.join(self.workdir, "tb")):
                keep_aside(old, "training starts at step 0")
        elif os.path.exists(self.path):
            self._keep_rows_until(resume_step)
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most a line
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, "tb"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def _keep_rows_until(self, resume_step: int) -> None:
        """Rewrite metrics.jsonl with its rows of steps <= resume_step (unparsable lines dropped, warned)."""
        keep, bad = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, ln in enumerate(f, 1):
                if not ln.strip():
                    continue
                try:
                    row = json.loads(ln)
                    step = int(row.get("step", 0)) if isinstance(row, dict) else None
                except (json.JSONDecodeError, TypeError, ValueError):
                    step = None
                if step is None:
                    bad.append(n)
                elif step <= resume_step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
        if bad:
            log.warning("%s: skipped %d line(s) that are not a metrics row (line %s; a run killed while writing "
                        "leaves a truncated last line)", self.path, len(bad), ", ".join(map(str, bad[:10])))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write_run_info(self, config: Any, extra: Mapping[str, Any] | None = None) -> None:
        """`WORKDIR/run_info.json`: config dict, library versions, devices, `extra`."""
        if not self.main:
            return
        info = {
            "config": _jsonable(config),
            "versions": library_versions(),
            "devices": device_info(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **_jsonable(dict(extra or {})),
        }
        tmp = os.path.join(self.workdir, "run_info.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(self.workdir, "run_info.json"))

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Log one step's scalars; returns the row written (python numbers)."""
        row = {f"{prefix}{k}": _to_python(v) for k, v in metrics.items()}
        if not self.main:
            return row
        line = {"step": int(step), "time": round(time.time(), 3), **row}
        self._f.write(json.dumps(line) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                    self._tb.add_scalar(tag, v, step)
        if not prefix:
            if row.get("compile_time_s"):  # the ETA counts from after a compile step, not through it
                self.progress.restart_clock(step)
            self.progress.update(step, row.get("loss"), row.get("tokens_per_s"))
        return row

    def write_eval(self, step: int, metrics: Mapping[str, Any], echo: bool = True) -> dict[str, Any]:
        """Log an evaluation (fields prefixed eval_); `echo`: also print it (the trainer prints its own line)."""
        row = self.write(step, metrics, prefix="eval_")
        if self.main and echo:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            self.progress.write(f"[eval step {step}] {shown}")
        return row

    def print(self, line: str) -> None:
        """A message from the main process that does not break the progress bar."""
        if self.main:
            if self.progress.enabled:
                self.progress.write(line)
            else:
                print(line, flush=True)

    def flush(self) -> None:
        if self.main:
            self._f.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        self.progress.close()
        if self.main and self._f is not None:
            self._f.close()
            self._f = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Multi-host start-up and the checks that keep every process agreeing.

`initialize()` starts `jax.distributed` when the environment says this is one of several
processes:
- explicit flags / arguments (`--coordinator_address --num_processes --process_id`),
- the `SFT_JAX_COORDINATOR`, `SFT_JAX_NUM_PROCESSES`, `SFT_JAX_PROCESS_ID` variables
  (set by `launch/local_multiprocess.sh`),
- SLURM with more than one task (`launch/gpu_slurm.sh`), TPU VM pods (`SFT_JAX_DISTRIBUTED=auto`,
  set by `launch/tpu_pod.sh`, or more than one worker in `TPU_WORKER_HOSTNAMES`), all through
  JAX's own cluster auto-detection.
On a single host nothing is started.

Every decision that changes control flow (resume step, stop on NaN, save on SIGTERM) goes
through `agree_any` / `broadcast_from_main` so that no process leaves the loop alone and
leaves the others waiting in a collective forever. A dead peer is detected by the
coordination service's heartbeat (`heartbeat_timeout_s`): the survivors then exit non-zero.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)

_INITIALIZED = False


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int | None = None,
    init_timeout_s: int = 300,
) -> bool:
    """Start jax.distributed if this is a multi-process run; return True when it did."""
    global _INITIALIZED
    if _INITIALIZED:
        return True
    coordinator_address = coordinator_address or os.environ.get("SFT_JAX_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _env_int("SFT_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("SFT_JAX_PROCESS_ID")
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_int("SFT_JAX_HEARTBEAT_TIMEOUT_S") or 100
    kwargs = dict(initialization_timeout=init_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    if coordinator_address or num_processes:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError(
                "multi-process run needs all of --coordinator_address, --num_processes and "
                f"--process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
            )
        if num_processes == 1:
            return False
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            **kwargs,
        )
    elif (
        os.environ.get("SFT_JAX_DISTRIBUTED", "").lower() == "auto"
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    ):
        # JAX's cluster auto-detection (SLURM, TPU VM pods via the GCE metadata server, ...).
        # TPU VMs usually do not export TPU_WORKER_HOSTNAMES to an ssh session, so
        # launch/tpu_pod.sh sets SFT_JAX_DISTRIBUTED=auto.
        jax.distributed.initialize(**kwargs)
    else:
        return False
    _INITIALIZED = True
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def is_main() -> bool:
    return jax.process_index() == 0


def agree_any(flag: bool) -> bool:
    """True on every process when `flag` is True on any process (a synchronised check)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([1 if flag else 0], np.int32))
    return bool(np.asarray(flags).max())


def agree_all(flag: bool) -> bool:
    """True on every process only when `flag` is True on every process (a synchronised check)."""
    return not agree_any(not flag)


def broadcast_from_main(value: int) -> int:
    """Process 0's integer, on every process (e.g. the step to resume from)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

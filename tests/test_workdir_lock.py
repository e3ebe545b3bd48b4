"""The work directory lock (`sft_jax.workdir_lock`): one training run per work directory.

The holders are real second processes: a small python process holding the lock, and (slow) a
real training run while a second trainer starts on the same directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sft_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLocked, _pid_start
from test_train import REPO, SMALL, _env, _metrics

HOLD = ("import sys, time; from sft_jax.workdir_lock import WorkdirLock; "
        "lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()")


def _holder(workdir):
    """A second process that takes the lock and holds it until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _write_holder(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_NAME), "w") as f:
        json.dump({"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", **holder}, f)


def test_second_trainer_refuses_while_another_process_holds_the_lock(tmp_path, caplog):
    wd = tmp_path / "run"
    proc = _holder(wd)
    try:
        with pytest.raises(WorkdirLocked, match=rf"host {socket.gethostname()}, pid {proc.pid}, started 20"):
            WorkdirLock(wd)
        cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}", *SMALL,
               "--config.train.steps=2"]
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stderr[-3000:]
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"pid {proc.pid}" in errors[0] and "in use" in errors[0], p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        assert not (wd / "run.json").exists() and not (wd / "checkpoints").exists()  # refused before anything
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # killed with -9: its file stays behind, naming a dead process on this host -> taken over with a warning
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="sft_jax.workdir_lock"):
        lock = WorkdirLock(wd)
    assert f"pid {proc.pid}" in caplog.text and "stale" in caplog.text
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (wd / LOCK_NAME).exists()


def test_release_lets_the_next_run_in(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):  # a second lock, even in one process
            WorkdirLock(tmp_path)
    with WorkdirLock(tmp_path) as again:
        assert again.holder["pid"] == os.getpid()


def test_recorded_holders_without_a_flock(tmp_path, caplog):
    """A lock file whose flock is free: live holder on this host or any other host -> refused;
    a reused pid (start time differs) -> taken over."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_holder(tmp_path, pid=sleeper.pid, pid_start=_pid_start(sleeper.pid))
        with pytest.raises(WorkdirLocked, match=f"pid {sleeper.pid}"):
            WorkdirLock(tmp_path)
        _write_holder(tmp_path, pid=sleeper.pid, pid_start="1")  # same pid, another process's start time
        with caplog.at_level(logging.WARNING, logger="sft_jax.workdir_lock"):
            WorkdirLock(tmp_path).release()
        assert "stale" in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    _write_holder(tmp_path, host="other-host.example", pid=1234)
    with pytest.raises(WorkdirLocked, match=rf"another host \(host other-host.example, pid 1234.*delete .*{LOCK_NAME}"):
        WorkdirLock(tmp_path)


@pytest.mark.slow
def test_two_real_trainers_on_one_workdir(tmp_path):
    """While a training run is going, a second one on its work directory exits 1 at once, and the
    first run finishes undisturbed (every step logged once)."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}", *SMALL,
           "--config.train.steps=100000", "--config.checkpoint.every_steps=0"]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while not ((wd / "metrics.jsonl").exists() and any("loss" in r for r in _metrics(wd))):
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.2)
        second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr[-3000:]
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    steps = [r["step"] for r in _metrics(wd) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))
    assert not (wd / LOCK_NAME).exists()


@pytest.mark.slow
def test_multihost_pair_is_refused_on_every_process(tmp_path):
    """Two processes (launch/local_multiprocess.sh) on a locked work directory: process 0 holds the
    lock decision and every process exits 1 with the holder's line, none waits in a collective."""
    from test_multihost import _logs, _pair_popen

    wd = tmp_path / "run"
    holder = _holder(wd)
    try:
        pair, log_dir = _pair_popen(tmp_path, wd, steps=2)
        out, _ = pair.communicate(timeout=300)
        logs = _logs(log_dir)
        assert pair.returncode == 1, out[-3000:] + logs
        errors = [[ln for ln in (log_dir / f"process_{i}.log").read_text().splitlines() if ln.startswith("error:")]
                  for i in (0, 1)]
        assert len(errors[0]) == 1 and "in use by another training run" in errors[0][0], logs
        assert f"pid {holder.pid}" in errors[0][0], logs
        assert errors[1] == [f"error: process 0 could not lock the work directory {wd}"], logs
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_readers_warn_about_a_running_trainer_and_never_flock(tmp_path, caplog):
    """export / generate / eval / serve read a work directory without locking it (issue 19, decision in
    workdir_lock.running_trainer): a live holder is named in a warning, a dead one is ignored."""
    import logging
    import socket

    from sft_jax import workdir_lock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"host": socket.gethostname(), "pid": holder.pid, "pid_start": workdir_lock._pid_start(holder.pid),
               "started": "2026-01-01T00:00:00+00:00"}
        (tmp_path / ".lock").write_text(json.dumps(rec))
        with caplog.at_level(logging.WARNING, logger="sft_jax.workdir_lock"):
            assert workdir_lock.warn_if_training(tmp_path, 4) == rec
        assert f"pid {holder.pid}" in caplog.text and "step 4" in caplog.text
        lock = workdir_lock.WorkdirLock(tmp_path / "other")  # a reader's check never blocks a trainer
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    assert workdir_lock.running_trainer(tmp_path) is None  # the holder is gone
    assert workdir_lock.running_trainer(tmp_path / "missing") is None

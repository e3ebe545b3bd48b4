"""Multi-host training on one machine: two JAX processes on 127.0.0.1 with 4 fake CPU devices each
(`launch/local_multiprocess.sh -n 2 -d 4`) against one process with 8 fake devices.

* per-step losses of the pair equal the single process (<= 1e-5);
* checkpoints move between topologies both ways (pair -> single, single -> pair) and the resumed
  runs reproduce the uninterrupted one step for step;
* SIGTERM to the launcher: both processes stop at the same step, save, and exit 0;
* SIGKILL of one process: the other exits non-zero (heartbeat timeout) instead of hanging.

Why the losses can be equal: with `data.packing=False` every row is one example and
`data.max_length=64` fixes the row length, so the pair's global batch k (process p contributes
rows p, p+2, p+4, ... of the shuffled stream, as `rows[p::2]`) holds exactly the examples of the
single process's batch k, in another row order. The loss and gradients are sums over rows divided
by the global trainable-token count, so they differ only by float summation order. (With packing
each process packs its own shard and the global batches differ in content: equal in
distribution, not per step; see BUILD_NOTES "Scale out (issue 8)".)
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = [
    "--config.model.tiny.num_layers=2", "--config.data.max_length=64",
    "--config.data.packing=False", "--config.eval.num_generations=0", "--config.eval.max_batches=1",
    "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=3",
]
STEPS = 12
TOL = 1e-5


def _env(tmp_root, **extra):
    env = dict(os.environ)
    for k in ("XLA_FLAGS", "SFT_JAX_COORDINATOR", "SFT_JAX_NUM_PROCESSES", "SFT_JAX_PROCESS_ID"):
        env.pop(k, None)
    cache = os.environ.get("SFT_JAX_COMPILATION_CACHE", "off")  # conftest: the session's cache
    cache = str(tmp_root / "xla_cache") if cache == "off" else cache
    env.update(JAX_PLATFORMS="cpu", SFT_JAX_COMPILATION_CACHE=cache, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _train_cmd(workdir, steps):
    # a snapshot of configs/tiny.py (copied once per test): every run of a test sees the same config
    # even while someone edits the file
    config = pathlib.Path(workdir).parent / "tiny_config.py"
    if not config.exists():
        shutil.copy(REPO / "configs" / "tiny.py", config)
    return [sys.executable, "-m", "sft_jax.train", f"--config={config}", *COMMON, f"--workdir={workdir}",
            f"--config.train.steps={steps}"]


def _single(tmp_root, workdir, steps=STEPS):
    env = _env(tmp_root, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run(_train_cmd(workdir, steps), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _pair_popen(tmp_root, workdir, steps=STEPS, log_dir=None):
    log_dir = log_dir or (tmp_root / f"logs_{pathlib.Path(workdir).name}")
    env = _env(tmp_root, LOG_DIR=str(log_dir), SFT_JAX_GRACE_S="20")
    return subprocess.Popen(["bash", "launch/local_multiprocess.sh", "-n", "2", "-d", "4", "--",
                             *_train_cmd(workdir, steps)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True), log_dir


def _pair(tmp_root, workdir, steps=STEPS):
    p, log_dir = _pair_popen(tmp_root, workdir, steps)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-3000:] + _logs(log_dir)
    return out


def _logs(log_dir):
    text = ""
    for f in sorted(pathlib.Path(log_dir).glob("process_*.log")):
        text += f"\n--- {f.name}\n" + f.read_text()[-3000:]
    return text


def _losses(workdir) -> dict[int, float]:
    out = {}
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row.get("loss") is not None:
            out[row["step"]] = row["loss"]
    return out


def _keep_checkpoints_upto(workdir, step):
    """Roll a copied run back to `step`: later checkpoints and metrics rows go (so progress is visible)."""
    ck = pathlib.Path(workdir) / "checkpoints"
    for d in ck.iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    m = pathlib.Path(workdir) / "metrics.jsonl"
    m.write_text("".join(ln + "\n" for ln in m.read_text().splitlines() if json.loads(ln)["step"] <= step))


def _assert_close(got: dict, ref: dict, steps):
    for s in steps:
        assert s in got, f"step {s} missing (have {sorted(got)})"
        assert abs(got[s] - ref[s]) <= TOL, f"step {s}: {got[s]} vs {ref[s]}"


def test_pair_equals_single_and_checkpoints_cross_topologies(tmp_path):
    single, pair = tmp_path / "single", tmp_path / "pair"
    t0 = time.time()
    _single(tmp_path, single)
    ref = _losses(single)
    assert sorted(ref) == list(range(1, STEPS + 1))
    t1 = time.time()
    _pair(tmp_path, pair)
    got = _losses(pair)
    _assert_close(got, ref, range(1, STEPS + 1))
    # process 0 alone logs: one row per step, and only process 0 wrote files
    rows = [json.loads(x) for x in (pair / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("loss") is not None] == list(range(1, STEPS + 1))
    assert sorted(int(d.name) for d in (pair / "checkpoints").iterdir() if d.name.isdigit()) == [4, 8, 12]
    t2 = time.time()

    # pair -> single: resume the pair's step-4 checkpoint in one process; steps 5.. reproduce the reference
    p2s = tmp_path / "pair_to_single"
    shutil.copytree(pair, p2s)
    _keep_checkpoints_upto(p2s, 4)
    r = _single(tmp_path, p2s)
    assert "fast-forwarded" in r.stderr + r.stdout  # the grain state is per process: a new topology re-reads
    _assert_close(_losses(p2s), ref, range(1, STEPS + 1))
    t3 = time.time()

    # single -> pair, stopped by SIGTERM: both processes stop at the same step, save it, exit 0
    s2p = tmp_path / "single_to_pair"
    shutil.copytree(single, s2p)
    _keep_checkpoints_upto(s2p, 4)
    proc, log_dir = _pair_popen(tmp_path, s2p, steps=400)
    deadline = time.time() + 300
    while max(_losses(s2p), default=0) < 6:
        assert proc.poll() is None and time.time() < deadline, _logs(log_dir)
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-3000:] + _logs(log_dir)
    stopped = [ln for f in sorted(log_dir.glob("process_*.log")) for ln in f.read_text().splitlines()
               if "SIGTERM: saved checkpoint at step" in ln]
    assert len(stopped) == 1, _logs(log_dir)  # process 0 prints; process 1 stops silently at the same step
    k = int(stopped[0].split("step ")[1].split(";")[0])
    assert k >= 6 and (s2p / "checkpoints" / str(k)).is_dir()
    _assert_close(_losses(s2p), ref, range(1, min(k, STEPS) + 1))
    t4 = time.time()
    print(f"single {t1 - t0:.0f}s, pair {t2 - t1:.0f}s, pair->single {t3 - t2:.0f}s, "
          f"single->pair+SIGTERM {t4 - t3:.0f}s; stopped at step {k}")


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("victim", [1, 0], ids=["kill_worker", "kill_coordinator"])
def test_killed_peer_does_not_hang(tmp_path, victim):
    """SIGKILL one of two processes mid-training: the survivor exits non-zero within a bounded
    time (SFT_JAX_HEARTBEAT_TIMEOUT_S=10) with a message naming the dead task."""
    workdir = tmp_path / "run"
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        env = _env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   SFT_JAX_COORDINATOR=f"127.0.0.1:{port}", SFT_JAX_NUM_PROCESSES="2", SFT_JAX_PROCESS_ID=str(i),
                   SFT_JAX_HEARTBEAT_TIMEOUT_S="10")
        log = open(tmp_path / f"p{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(_train_cmd(workdir, 100000), cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 300
        while max(_losses(workdir), default=0) < 2:
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.2)
        procs[victim].kill()
        t_kill = time.time()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=120)
        waited = time.time() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    text = (tmp_path / f"p{1 - victim}.log").read_text()
    print(f"survivor exited {rc} {waited:.1f}s after SIGKILL of process {victim}")
    assert rc != 0
    assert waited < 120
    assert any(s in text for s in ("heartbeat", "another task died", "coordination service", "unhealthy")), text[-3000:]

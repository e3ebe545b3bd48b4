"""End-to-end tests of the trainer CLI (`python -m sft_jax.train`), in subprocesses.

Small overrides of configs/tiny.py keep each run to seconds: 2 layers, hidden 64, 128-token rows.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from helpers import cli_env, kill_at_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL = [
    "--config.model.tiny.num_layers=2",
    "--config.model.tiny.hidden_size=64",
    "--config.model.tiny.intermediate_size=128",
    "--config.data.max_length=128",
    "--config.train.batch_size=8",
    "--config.eval.num_generations=0",
    "--config.eval.every_steps=0",
]


def _env():
    return cli_env()  # one CPU device, the session's XLA cache (conftest)


def _train(workdir, *args, config="configs/tiny.py", check=True, timeout=600):
    cmd = [sys.executable, "-m", "sft_jax.train", f"--config={config}", f"--workdir={workdir}", *SMALL, *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}")
    return p


def _metrics(workdir) -> list[dict]:
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_tiny_training_improves_held_out(tmp_path):
    """A shortened tiny run: held-out loss and token accuracy clearly better after training."""
    _train(tmp_path / "run", "--config.train.steps=60", "--config.train.warmup_steps=5",
           "--config.checkpoint.every_steps=0")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"] - 1.5, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.2, (before, after)
    # the run leaves a checkpoint and the files that export/generate read
    assert (tmp_path / "run" / "run.json").exists()
    assert (tmp_path / "run" / "tokenizer" / "tokenizer_config.json").exists()
    assert any((tmp_path / "run" / "checkpoints").iterdir())


def test_metrics_fields_and_real_token_count(tmp_path):
    """metrics.jsonl has the documented fields; real_tokens counts non-padding tokens of the data."""
    from sft_jax.data import pipeline

    wd = tmp_path / "run"
    # padding mode: 800 training rows (model.tiny.train_rows) / 80 = exactly 10 batches, so one epoch is one pass
    _train(wd, "--config.train.steps=0", "--config.train.epochs=1", "--config.data.packing=False",
           "--config.checkpoint.every_steps=0", "--config.train.batch_size=80", "--config.model.tiny.train_rows=800")
    rows = [r for r in _metrics(wd) if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "trainable_tokens", "real_tokens", "tokens_per_s", "step_time_s",
                "compile_time_s", "mfu"):
        assert key in rows[0], key
    # the step compiles once, on the first step, and never again
    assert rows[0]["compile_time_s"] > 0 and all(r["compile_time_s"] == 0 for r in rows[1:])
    assert all(r["tokens_per_s"] > 0 and r["real_tokens"] > 0 for r in rows)
    # the same data through the pipeline: total real tokens of one epoch
    import ml_collections

    run = json.loads((wd / "run.json").read_text())
    cfg = ml_collections.ConfigDict(run["config"])
    tok, _ = pipeline.tokenizer_from_config(cfg)
    examples, stats = pipeline.examples_for_split(cfg.data, tok, "train", seed=cfg.train.seed)
    expected_real = sum(len(e["inputs"]) for e in examples)
    expected_trainable = sum(int(sum(e["loss_mask"])) for e in examples)
    assert sum(r["real_tokens"] for r in rows) == expected_real
    assert sum(r["trainable_tokens"] for r in rows) == expected_trainable
    info = json.loads((wd / "run_info.json").read_text())
    assert len(rows) == 10 and len(examples) == 800
    assert info["versions"]["jax"] and info["config"]["train"]["batch_size"] == 80
    assert info["method"] == {"method": "full", "full": {}}  # the method and the kernel choice are recorded
    assert info["kernels"]["requested"] == "auto" and info["kernels"]["kernels"] in ("cpu", "reference")


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    """Kill -9 mid-run, resume: per-step losses equal the uninterrupted run bitwise (data order too)."""
    n = 30  # long enough that the kill lands mid-run even on a fast machine
    common = [f"--config.train.steps={n}", "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=False",
              "--config.train.warmup_steps=2"]
    ref = tmp_path / "ref"
    _train(ref, *common)
    ref_losses = _train_losses(ref)
    assert len(ref_losses) == n

    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}", *SMALL, *common]
    kill_at_checkpoint(cmd, wd, 6, deadline_s=400)
    killed_at = max(r["step"] for r in _metrics(wd) if "loss" in r)
    assert killed_at < n
    _train(wd, *common)  # resume=auto
    losses = _train_losses(wd)
    assert sorted(losses) == list(range(1, n + 1))
    assert losses == ref_losses  # bitwise: float equality of every step's loss


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}", *SMALL,
           "--config.train.steps=100000", "--config.checkpoint.every_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            m = wd / "metrics.jsonl"
            if m.exists() and sum(1 for line in m.read_text().splitlines() if '"loss"' in line) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail("run ended early:\n" + proc.stdout.read())
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    last_logged = max(r["step"] for r in _metrics(wd) if "loss" in r)
    assert steps and steps[-1] == last_logged


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, trained_4_steps):
    common = ["--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
              "--config.checkpoint.keep=5"]
    wd = trained_4_steps  # conftest: 4 steps with these flags, good checkpoints at steps 2 and 4
    # continue with an absurd learning rate: the loss becomes non-finite within a step or two
    p = _train(wd, "--config.train.steps=40", "--config.train.lr=1e12",
               "--config.train.schedule=constant", *common, check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "non-finite loss" in p.stderr and "last good checkpoint" in p.stderr
    assert "Traceback" not in p.stderr
    from sft_jax.checkpoint import Checkpointer

    ck = Checkpointer(wd, keep=5)
    steps = ck.all_steps()
    ck.close()
    bad_step = max(r["step"] for r in _metrics(wd) if "loss" in r)
    assert steps and 4 in steps and max(steps) < bad_step  # the non-finite state was never saved
    # and the kept checkpoint is good: a resumed run with a sane lr continues from it
    _train(wd, f"--config.train.steps={max(steps) + 1}", *common)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, trained_4_steps):
    common = ["--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.checkpoint.async_save=False"]
    wd = trained_4_steps  # conftest: 4 steps of SMALL, checkpoints of steps 2 and 4
    latest = wd / "checkpoints" / "4"
    files = [f for f in latest.rglob("*") if f.is_file() and "state" in str(f.relative_to(latest))]
    assert files
    for f in files:
        f.write_bytes(b"garbage")
    p = _train(wd, "--config.train.steps=6", *common)
    assert "checkpoint of step 4" in p.stderr and "unreadable" in p.stderr, p.stderr[-3000:]
    losses = _train_losses(wd)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]


def test_bad_config_errors(tmp_path):
    p = _train(tmp_path / "a", "--config.train.schedul=cosine", check=False)
    assert p.returncode != 0 and "schedul" in p.stderr
    p = _train(tmp_path / "b", "--config.train.schedule=zigzag", check=False)
    assert p.returncode == 2 and "train.schedule" in p.stderr
    p = _train(tmp_path / "c", config="configs/lima.py", check=False)
    assert p.returncode == 2 and "model.path" in p.stderr
    assert "Traceback" not in p.stderr


def test_lima_config_on_stories260k(tmp_path, shared_dir):
    """configs/lima.py with overrides runs a few steps on the real stories260K base and LIMA data."""
    from sft_jax.models.llama2c import convert_llama2c

    base = tmp_path / "stories260K"
    convert_llama2c(str(shared_dir / "assets/stories260K/stories260K.bin"),
                    str(shared_dir / "assets/stories260K/tok512.model"), str(base))
    wd = tmp_path / "lima"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/lima.py", f"--workdir={wd}",
           f"--config.model.path={base}", f"--config.data.path={shared_dir / 'data/lima.json'}",
           "--config.data.template=chatml", "--config.data.max_length=256", "--config.train.steps=3", "--config.train.batch_size=4", "--config.model.dtype=float32",
           "--config.model.remat=none", "--config.eval.max_batches=1", "--config.eval.num_generations=1",
           "--config.eval.max_new_tokens=8", "--config.checkpoint.every_steps=0"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    losses = _train_losses(wd)
    assert len(losses) == 3 and all(0 < v < 20 for v in losses.values())
    run = json.loads((wd / "run.json").read_text())
    assert run["config"]["train"]["b2"] == 0.95 and run["config"]["train"]["epochs"] == 15


def test_every_config_field_documented_in_readme():
    from sft_jax.config import _flatten, default_config

    readme = (REPO / "README.md").read_text()
    missing = [k for k in _flatten(default_config()) if f"`{k}`" not in readme]
    assert not missing, f"config fields not documented in README.md: {missing}"

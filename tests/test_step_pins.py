"""Readers pin the checkpoint step they read (`sft_jax.step_pins`); the trainer's rotation keeps a pinned
step and deletes it at a later save once unpinned.  The reader is a real second process holding a pin
(killed with -9: its pin goes with it), and `load_run` in process while a Checkpointer rotates the same
work directory.  Also `sft_jax.serve --step=N|latest|best` (the resolver of export/generate/eval)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from sft_jax import step_pins
from sft_jax import workdir as workdir_lib
from sft_jax.checkpoint import Checkpointer
from sft_jax.workdir import WorkdirError, available_steps, load_run
from test_train import REPO, _env
from test_workdir import shared_lora_run

PIN = ("import sys; from sft_jax.step_pins import StepPin; p = StepPin(sys.argv[1], int(sys.argv[2])); "
       "print('pinned' if p.held else 'unpinned', flush=True); sys.stdin.read(); p.release()")


def _reader(step_root, step):
    """A second process that pins `step` and holds the pin until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", PIN, str(step_root), str(step)], cwd=REPO, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "pinned"
    return proc


def _save(ck, step):
    ck.save(step, {"x": jnp.arange(4.0) + step}, meta={"step": step}, force=True)
    ck.wait()


def test_rotation_keeps_a_step_another_process_pins(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, async_save=True)  # the trainer's default: rotation in Orbax's finalize thread
    try:
        for s in (1, 2):
            _save(ck, s)
        reader = _reader(ck.directory, 1)
        try:
            assert step_pins.is_pinned(ck.directory, 1) and not step_pins.is_pinned(ck.directory, 2)
            _save(ck, 3)
            assert available_steps(tmp_path) == [1, 2, 3]  # step 1 would have been rotated out: pinned, kept
            _save(ck, 4)
            assert available_steps(tmp_path) == [1, 3, 4]  # step 2 (unpinned) rotated out as usual
        finally:
            reader.kill()  # kill -9: the kernel drops its flock, no stale pin is left
            reader.wait(timeout=30)
        assert not step_pins.is_pinned(ck.directory, 1)
        _save(ck, 5)
        assert available_steps(tmp_path) == [4, 5]  # the next save deleted the unpinned step
        restored, meta = ck.restore()
        assert meta["step"] == 5 and float(restored["x"][0]) == 5.0

        reader = _reader(ck.directory, 4)  # pinned at the end of the run: close() deletes it once released
        _save(ck, 6)
        assert available_steps(tmp_path) == [4, 5, 6]
        reader.stdin.close()  # the reader finishes normally and releases its pin
        assert reader.wait(timeout=30) == 0
    finally:
        ck.close()
    assert available_steps(tmp_path) == [5, 6]
    pins = tmp_path / step_pins.PIN_DIR
    assert not pins.exists() or os.listdir(pins) == []  # pin files do not pile up


def test_load_run_pins_its_step_while_a_trainer_rotates(tmp_path_factory, monkeypatch):
    src, _ = shared_lora_run(tmp_path_factory)
    wd = tmp_path_factory.mktemp("pinned_run") / "wd"
    shutil.copytree(src, wd)
    assert available_steps(wd) == [2, 3]
    ck = Checkpointer(wd, keep=1, async_save=False)
    seen = {}
    restore = workdir_lib._restore

    def restore_while_rotating(state_dir, target, with_rng):
        seen["pinned"] = step_pins.is_pinned(ck.directory, 2)
        _save(ck, 4)  # the trainer saves meanwhile: keep=1 would delete 2 and 3
        seen["steps"] = available_steps(wd)
        return restore(state_dir, target, with_rng)

    monkeypatch.setattr(workdir_lib, "_restore", restore_while_rotating)
    try:
        run = load_run(wd, 2)
        assert run.step == 2 and seen == {"pinned": True, "steps": [2, 4]}  # 3 rotated out, 2 kept while read
        assert not step_pins.is_pinned(ck.directory, 2)  # released after the read
        monkeypatch.setattr(workdir_lib, "_restore", restore)
        _save(ck, 5)
        assert available_steps(wd) == [5]  # step 2 deleted at the next save once unpinned
        with pytest.raises(WorkdirError, match="step 2 not found"):
            load_run(wd, 2)
    finally:
        ck.close()


def test_pin_state_resolves_again_when_the_step_vanished(tmp_path, monkeypatch):
    for s in (3, 5):
        (tmp_path / "checkpoints" / str(s) / "state").mkdir(parents=True)
    real = workdir_lib.state_dir
    calls = []

    def first_a_deleted_step(wd, step=None):  # resolved just before a rotation deleted it
        calls.append(step)
        return (1, str(tmp_path / "checkpoints" / "1" / "state")) if len(calls) == 1 else real(wd, step)

    monkeypatch.setattr(workdir_lib, "state_dir", first_a_deleted_step)
    n, sdir, pin = workdir_lib.pin_state(tmp_path, "latest")
    try:
        assert (n, calls) == (5, ["latest", "latest"]) and sdir.endswith("checkpoints/5/state") and pin.held
        assert step_pins.is_pinned(tmp_path / "checkpoints", 5)
    finally:
        pin.release()
    calls.clear()
    with pytest.raises(WorkdirError, match=r"step 1 of .* was deleted \(rotated away by a running trainer\).*3, 5"):
        workdir_lib.pin_state(tmp_path, "1")
    assert calls == ["1"]  # an explicit step is not replaced by another one


def test_serve_step_takes_best_latest_and_n(tmp_path_factory, monkeypatch, capsys):
    from sft_jax.cli import run_cli
    from sft_jax.serve import __main__ as serve_main

    src, _ = shared_lora_run(tmp_path_factory)
    wd = tmp_path_factory.mktemp("serve_step") / "wd"
    shutil.copytree(src, wd)
    (wd / workdir_lib.BEST_DIR).mkdir()
    shutil.copytree(wd / "checkpoints" / "2", wd / workdir_lib.BEST_DIR / "2")  # the best evaluation: step 2

    class Loaded(Exception):
        pass

    def stop_after_loading(entries, **kw):
        raise Loaded(entries[0][1].name)

    monkeypatch.setattr(serve_main, "build_models", stop_after_loading)
    for spec, step in (("best", 2), ("latest", 3), ("2", 2), (None, 3)):
        argv = [f"--workdir={wd}"] + ([f"--step={spec}"] if spec else [])
        with pytest.raises(Loaded) as e:
            serve_main.main(argv)
        assert str(e.value).endswith(f"@{step}"), (spec, str(e.value))
    for spec, msg in (("bogus", "--step must be best, latest or a step number, got 'bogus'"),
                      ("7", "step 7 not found"), ("best", "no best checkpoint")):
        if spec == "best":
            shutil.rmtree(wd / workdir_lib.BEST_DIR)
        assert run_cli(serve_main.main, [f"--workdir={wd}", f"--step={spec}"], serve_main.PROG) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err

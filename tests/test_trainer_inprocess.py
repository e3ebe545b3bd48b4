"""The trainer in process (as flax's train_test.py): phases + loop on a shrunken tiny config.

Early stopping at the patience limit with a resume in between, the best checkpoint kept outside the
keep-N rotation and exported with `sft_jax.export --step=best`, named eval sets, the loss-spike stop,
disk full at a save (a real small tmpfs, root only), config changes on resume; plus the small pieces
(config diff, eval-set parsing, the early-stopping tracker) as unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from sft_jax import export, tiny, train, train_loop, workdir as workdir_lib
from sft_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_cfg(**overrides):
    spec = importlib.util.spec_from_file_location("_cfg_tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    small = {"model.tiny.num_layers": 2, "model.tiny.hidden_size": 64, "model.tiny.intermediate_size": 128,
             "data.max_length": 128, "train.batch_size": 8, "eval.num_generations": 0, "eval.every_steps": 0,
             "train.warmup_steps": 0, "train.schedule": "constant", "checkpoint.async_save": False}
    for key, v in {**small, **overrides}.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _metrics(wd) -> list[dict]:
    return [json.loads(ln) for ln in (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ unit tests
def test_parse_eval_sets():
    assert train.parse_eval_sets("") == []
    assert train.parse_eval_sets("/d/eval.jsonl") == [("", "/d/eval.jsonl")]
    assert train.parse_eval_sets("a=/d/a.jsonl, b=/d/b.jsonl") == [("a", "/d/a.jsonl"), ("b", "/d/b.jsonl")]
    with pytest.raises(ConfigError, match="no NAME="):
        train.parse_eval_sets("a=/d/a.jsonl,/d/b.jsonl")
    with pytest.raises(ConfigError, match="twice"):
        train.parse_eval_sets("a=/x,a=/y")


def test_config_changes_split_meaning_from_the_rest():
    old = {"model": {"path": "/m", "remat": "none"}, "train": {"lr": 1e-4, "batch_size": 8, "steps": 10},
           "data": {"path": "/d", "num_workers": 0}, "eval": {"every_steps": 0}}
    new = {"model": {"path": "/m2", "remat": "full"}, "train": {"lr": 2e-4, "batch_size": 16, "steps": 10.0},
           "data": {"path": "/d", "num_workers": 2}, "eval": {"every_steps": 5}, "checkpoint": {"keep_best": True}}
    meaning, other = train.config_changes(old, new)
    assert meaning == ["model.path: '/m' -> '/m2'", "train.batch_size: 8 -> 16"]
    assert other == ["data.num_workers: 0 -> 2", "eval.every_steps: 0 -> 5", "model.remat: 'none' -> 'full'",
                     "train.lr: 0.0001 -> 0.0002"]  # steps 10 == 10.0; keep_best: not in the old config
    # the tiny run's generated files inside the work directory: a copied work directory resumes
    moved = train.config_changes({"data": {"path": "/a/run/tiny_data/train.jsonl", "tokenizer": "/a/run/tiny_tokenizer"}},
                                 {"data": {"path": "/b/copy/tiny_data/train.jsonl", "tokenizer": "/b/copy/tiny_tokenizer"}})
    assert moved == ([], [])


def test_early_stopping_tracker():
    es = train_loop.EarlyStopping("a/loss", patience=2, min_delta=0.1)
    assert es.lower_is_better and es.update(2, 1.0) and es.best_step == 2
    assert not es.update(4, 0.95) and not es.should_stop  # not better by more than min_delta
    assert es.update(6, 0.8) and es.bad_evals == 0
    assert not es.update(8, float("nan")) and not es.update(10, 0.9) and es.should_stop
    again = train_loop.EarlyStopping("a/loss", patience=2, min_delta=0.1)
    again.load(es.state())
    assert (again.best, again.best_step, again.should_stop) == (0.8, 6, True)
    acc = train_loop.EarlyStopping("exact_match", patience=1, min_delta=0.0)
    assert not acc.lower_is_better and acc.update(1, 0.2) and acc.update(2, 0.3) and not acc.update(3, 0.1)


def test_disk_space_check_names_path_and_free_space(tmp_path, monkeypatch):
    free = type("U", (), {"free": 3 * 2**20})()
    monkeypatch.setattr(train_loop.shutil, "disk_usage", lambda d: free)
    with pytest.raises(train_loop.TrainError, match=r"disk full: .*step 8 in .*ckpts \(3\.0 MiB free.*\(steps \[2, 4\]\)"):
        train_loop.check_disk_space(str(tmp_path / "ckpts"), 5 * 2**20, 8, [2, 4])
    train_loop.check_disk_space(str(tmp_path), 2 * 2**20, 8, [])  # enough room: no error
    assert train_loop.is_disk_full(OSError(28, "No space left on device"))
    assert not train_loop.is_disk_full(ValueError("x"))


def test_step_spec_parsing(tmp_path):
    assert workdir_lib.parse_step("latest") is None and workdir_lib.parse_step("best") == "best"
    assert workdir_lib.parse_step("12") == 12
    with pytest.raises(workdir_lib.WorkdirError, match="best, latest or a step number"):
        workdir_lib.parse_step("newest")
    with pytest.raises(workdir_lib.WorkdirError, match="no best checkpoint"):
        workdir_lib.resolve_step(tmp_path, "best")


# ---------------------------------------------------------------------- the whole trainer in process
@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    """Run 1: 4 steps (evals at 2 = best, 4 = no improvement); run 2 resumes and stops early at step 6."""
    root = tmp_path_factory.mktemp("early_stop")
    _, eval_rows = tiny.make_tiny_dataset(seed=0, n_train=10, n_eval=80)
    for name, rows in (("a", eval_rows[:40]), ("b", eval_rows[40:])):
        with open(root / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"messages": r["messages"]}) + "\n")
    common = {"eval.every_steps": 2, "checkpoint.every_steps": 2, "checkpoint.keep": 1,
              "checkpoint.keep_best": True, "train.early_stopping.patience": 2,
              "train.early_stopping.min_delta": 10.0,  # no evaluation after the first counts as better
              "data.eval_path": f"a={root / 'a.jsonl'},b={root / 'b.jsonl'}", "train.log_every": 3}
    wd = root / "run"
    first = train.run(_tiny_cfg(**common, **{"train.steps": 4}), wd)
    steps_after_first = workdir_lib.available_steps(wd)
    second = train.run(_tiny_cfg(**common, **{"train.steps": 20}), wd)
    return wd, first, steps_after_first, second


@pytest.mark.slow
def test_early_stopping_with_resume_keeps_best(early_stopped):
    wd, first, steps_after_first, second = early_stopped
    assert first["step"] == 4 and first["stopped_by"] is None and steps_after_first == [4]
    assert second["step"] == 6 and second["stopped_by"] == "early_stopping"
    assert workdir_lib.available_steps(wd) == [6]  # keep=1 rotated step 2 out of checkpoints/ ...
    assert workdir_lib.available_steps(wd, best=True) == [2]  # ... and the best one is kept beside
    rows = _metrics(wd)
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3, 4, 5, 6]  # one row per step
    evals = {r["step"]: r for r in rows if "eval_a/loss" in r}
    assert sorted(evals) == [0, 2, 4, 6] and all("eval_b/loss" in r and "eval_loss" not in r for r in evals.values())
    assert all(r["real_tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)


@pytest.mark.slow
def test_export_step_best(early_stopped, tmp_path, capsys):
    from safetensors.numpy import load_file

    wd = early_stopped[0]
    out = tmp_path / "best"
    assert export.main([f"--workdir={wd}", "--step=best", f"--out={out}", "--format=merged"]) == 0
    assert "of step 2" in capsys.readouterr().out
    exported = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    best = workdir_lib.load_run(wd, "best", load_tokenizer=False)
    latest = workdir_lib.load_run(wd, load_tokenizer=False)
    assert best.step == 2 and latest.step == 6
    np.testing.assert_array_equal(exported, np.asarray(best.trainable["embed"]["embedding"]))
    assert not np.array_equal(exported, np.asarray(latest.trainable["embed"]["embedding"]))


@pytest.mark.slow
def test_meaning_change_on_resume_refused(early_stopped):
    wd = early_stopped[0]
    before = (wd / "run.json").read_text()
    with pytest.raises(ConfigError, match=r"train.batch_size: 8 -> 16.*checkpoint.allow_config_change=True"):
        train.run(_tiny_cfg(**{"train.steps": 20, "train.batch_size": 16}), wd)
    assert (wd / "run.json").read_text() == before  # refused before any file was rewritten


@pytest.mark.slow
def test_loss_spike_stops_and_keeps_the_checkpoint_before(tmp_path):
    wd = tmp_path / "run"
    common = {"checkpoint.every_steps": 2, "checkpoint.keep": 2, "train.log_every": 1}
    train.run(_tiny_cfg(**common, **{"train.steps": 4}), wd)  # good checkpoints at 2 and 4
    with pytest.raises(train_loop.TrainError, match=r"loss spike at step (\d+).*newest checkpoint before it is "
                                                    r"kept \(step 4\)") as e:
        train.run(_tiny_cfg(**common, **{"train.steps": 40, "train.lr": 10.0, "train.loss_spike.factor": 1.5,
                                         "train.loss_spike.window": 1}), wd)
    spike = int(e.value.args[0].split("loss spike at step ")[1].split(":")[0])
    assert workdir_lib.available_steps(wd) == [2, 4] and spike > 4
    assert max(r["step"] for r in _metrics(wd) if "loss" in r) == spike - 1  # the spiking row is not logged


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="a real tmpfs needs root")
def test_disk_full_at_a_save_on_a_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(train_loop.TrainError, match=r"disk full: cannot save the checkpoint of step (\d+) in "
                                                        rf"{mnt}/run/checkpoints \([\d.]+ MiB free") as e:
            train.run(_tiny_cfg(**{"train.steps": 40, "checkpoint.every_steps": 2, "checkpoint.keep": 3}),
                      mnt / "run")
        assert "earlier checkpoints are kept (steps [2" in str(e.value)
        kept = workdir_lib.available_steps(mnt / "run")
        assert kept and workdir_lib.load_run(mnt / "run", load_tokenizer=False).step == kept[-1]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

"""The trainer on issue-22 sources: streamed Parquet shards (exact resume), a saved `datasets`
dataset, on the real stories260K base (../shared), in subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft_jax.data import testing

from test_train import REPO, _env, _metrics


@pytest.fixture(scope="module")
def base(tmp_path_factory, shared_dir):
    from sft_jax.models.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories260K")
    convert_llama2c(str(shared_dir / "assets/stories260K/stories260K.bin"),
                    str(shared_dir / "assets/stories260K/tok512.model"), str(out))
    return str(out)


def _run(base, workdir, data_path, *args):
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/lima.py", f"--workdir={workdir}",
           f"--config.model.path={base}", f"--config.data.path={data_path}", "--config.data.template=chatml",
           "--config.data.add_template_tokens=False", "--config.data.max_length=128", "--config.data.eval_fraction=0",
           "--config.train.batch_size=4", "--config.model.dtype=float32", "--config.model.remat=none",
           "--config.eval.num_generations=0", "--config.train.lr=1e-3", *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return {r["step"]: r["loss"] for r in _metrics(workdir) if "loss" in r}  # last value per step


@pytest.mark.slow
def test_streamed_parquet_shards_train_and_resume_exactly(base, tmp_path):
    rows = testing.synthetic_rows(60)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(rows[k * 20:(k + 1) * 20]), str(shards / f"part-{k}.parquet"),
                       row_group_size=5)
    args = ["--config.data.streaming=True", "--config.data.shuffle_window=2", "--config.train.steps=6",
            "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=False"]
    wd = tmp_path / "run"
    first = _run(base, wd, shards, *args)
    assert sorted(first) == list(range(1, 7)) and all(0 < v < 20 for v in first.values())
    shutil.rmtree(wd / "checkpoints" / "6")  # as if the run had died after step 5's save at 3
    again = _run(base, wd, shards, *args)  # resumes from step 3 and redoes 4..6
    assert {s: again[s] for s in (4, 5, 6)} == {s: first[s] for s in (4, 5, 6)}  # bitwise: data order too


@pytest.mark.slow
def test_saved_datasets_dataset_trains(base, tmp_path):
    datasets.Dataset.from_list(testing.synthetic_rows(40)).save_to_disk(str(tmp_path / "saved"))
    losses = _run(base, tmp_path / "run", tmp_path / "saved", "--config.train.steps=3",
                  "--config.checkpoint.every_steps=0")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 20 for v in losses.values())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["data"]["path"] == str(tmp_path / "saved")

"""The trainer on issue-22 data: streamed Parquet shards (exact resume), a saved `datasets`
dataset, a tool-calling data set that then generates calls in the family's format; on the real
stories260K base (../shared), trained in subprocesses."""

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
    losses = {r["step"]: r["loss"] for r in _metrics(workdir) if "loss" in r}  # last value per step
    return losses, p.stdout + p.stderr


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
    first, _ = _run(base, wd, shards, *args)
    assert sorted(first) == list(range(1, 7)) and all(0 < v < 20 for v in first.values())
    shutil.rmtree(wd / "checkpoints" / "6")  # as if the run had died after step 5's save at 3
    again, _ = _run(base, wd, shards, *args)  # resumes from step 3 and redoes 4..6
    assert {s: again[s] for s in (4, 5, 6)} == {s: first[s] for s in (4, 5, 6)}  # bitwise: data order too


CITIES = ["Paris", "Rome", "Oslo", "Lima"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _tool_row(k):
    city, cid = CITIES[k % len(CITIES)], f"call{k:05d}"
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": cid, "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": f"It is sunny in {city}."}]}


@pytest.mark.slow
def test_tool_calling_dataset_trains_and_generates_calls(base, tmp_path):
    from sft_jax.data.templates import parse_tool_calls
    from sft_jax.generate import load_workdir

    data = testing.write_jsonl(str(tmp_path / "tools.jsonl"), [_tool_row(k) for k in range(64)])
    wd = tmp_path / "run"
    losses, output = _run(base, wd, data, "--config.data.template=mistral-v0.3", "--config.data.max_length=384",
                  "--config.train.steps=60", "--config.train.batch_size=8", "--config.train.lr=3e-3",
                  "--config.train.schedule=constant", "--config.checkpoint.every_steps=0",
                  f"--config.data.eval_path={data}", "--config.eval.num_generations=1",
                  "--config.eval.max_new_tokens=100")
    assert losses[60] < losses[1] / 3, losses
    # the trainer's own sample generation (the held-out row up to its last answer, rendered with
    # the row's tools) answers from the tool result
    assert output.rsplit("model: ", 1)[1].startswith("'It is sunny in Paris.'"), output[-2000:]
    gen = load_workdir(str(wd))
    prompts = [gen.encode_messages([{"role": "user", "content": f"What is the weather in {c}?"}], TOOLS)
               for c in CITIES[:2]]
    outs = gen.generate_ids(prompts, max_new_tokens=120)
    for (ids, why), city in zip(outs, CITIES):
        text = gen.tokenizer.decode(ids, skip_special_tokens=False)
        assert text.lstrip().startswith("[TOOL_CALLS] ["), text  # Mistral's format
        calls = parse_tool_calls(text, "mistral-v0.3")
        assert len(calls) == 1 and calls[0]["name"] == "get_weather", text
        assert set(calls[0]["arguments"]) == {"city"}, text
        assert gen.tool_calls(ids) == calls


@pytest.mark.slow
def test_saved_datasets_reasoning_dataset_trains(base, tmp_path):
    """A locally saved `datasets` dataset of reasoning conversations trains with qwen3."""
    rows = [{"messages": [
        {"role": "user", "content": f"What is {k} plus {k}?"},
        {"role": "assistant", "content": f"<think>\n{k} and {k} make {2 * k}.\n</think>\n\nIt is {2 * k}."},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": f"It is {4 * k}.", "reasoning_content": f"Double {2 * k}."}]}
        for k in range(24)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    losses, _ = _run(base, tmp_path / "run", tmp_path / "saved", "--config.data.template=qwen3",
                  "--config.data.max_length=256", "--config.train.steps=3", "--config.checkpoint.every_steps=0")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 20 for v in losses.values())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["data"]["path"] == str(tmp_path / "saved")

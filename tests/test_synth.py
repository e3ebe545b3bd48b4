"""sft_jax.synth end to end: the three commands against a local teacher (a crafted OpenAI-compatible
server on 127.0.0.1, and stories260K in process), their output read by the trainer's reader and
trained on, the filter summary, and resume after kill -9 (no duplicated, no lost rows)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from helpers import cli_env
from synth_server import CraftedTeacher, serving

from sft_jax.data import formats
from sft_jax.synth import __main__ as cli
from sft_jax.synth.jobs import Job, JobError

REPO = pathlib.Path(__file__).resolve().parents[1]
SEEDS = REPO.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def _env():
    return cli_env(TOKENIZERS_PARALLELISM="false")


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in pathlib.Path(path).read_text().splitlines() if x.strip()]


def _summary(out) -> dict:
    return json.loads(pathlib.Path(str(out) + ".synth/summary.json").read_text())


def _accounted(counts: dict, stage: str) -> None:
    """Every candidate of a stage ends accepted or rejected for one counted reason."""
    rejected = sum(v for k, v in counts.items() if k.startswith(f"{stage}.rejected."))
    assert counts.get(f"{stage}.candidates", 0) == rejected + counts.get(f"{stage}.accepted", 0), counts


def _si_args(url, out, num=12, *extra):
    return ["self-instruct", f"--teacher={url}", "--teacher-model=m", f"--seed-tasks={SEEDS}", f"--num={num}",
            f"--out={out}", "--no-progress", "--prompts-per-iteration=2", *extra]


# ---------------------------------------------------------------------------- the job


def test_job_resume_drops_the_uncommitted_tail(tmp_path):
    out = str(tmp_path / "o.jsonl")
    job = Job(out, {"a": 1}, progress=False)
    job.commit("u0", [{"x": 0}, {"x": 1}], {"c": 2}, {"requests": 1})
    with open(out, "ab") as f:  # a crash: half a unit's rows, and half a journal line
        f.write(b'{"x": 2}\n{"x"')
    with open(job.journal_path, "ab") as f:
        f.write(b'{"unit": "u1", "ro')
    again = Job(out, {"a": 1}, progress=False)
    assert again.resumed and again.units == {"u0"} and again.n_rows == 2 and again.counts == Counter(c=2)
    assert list(again.rows()) == [{"x": 0}, {"x": 1}]
    again.commit("u1", [{"x": 2}], {"c": 1}, {})
    assert [r["x"] for r in again.rows()] == [0, 1, 2]
    assert again.finish()["counts"] == {"c": 3}


def test_job_refuses_other_parameters_and_foreign_files(tmp_path):
    out = str(tmp_path / "o.jsonl")
    Job(out, {"num": 5}, runtime={"concurrency": 1}, progress=False)
    Job(out, {"num": 5}, runtime={"concurrency": 9}, progress=False)  # runtime settings may change
    with pytest.raises(JobError, match="differ: num"):
        Job(out, {"num": 6}, progress=False)
    Job(out, {"num": 6}, overwrite=True, progress=False)
    foreign = tmp_path / "data.jsonl"
    foreign.write_text('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(JobError, match="not written by a synth job"):
        Job(str(foreign), {}, progress=False)


# ---------------------------------------------------------------------------- the CLI


def test_cli_bad_inputs_one_line(tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text("\n".join(json.dumps({"instruction": f"t{k}", "instances": [{"input": "", "output": "o"}]})
                             for k in range(8)) + '\n{"instruction": "x", "instances": [{"input": 3, "output": "o"}]}\n')
    assert cli.run_cli(cli.main, _si_args("http://127.0.0.1:9/v1", tmp_path / "o.jsonl", 3)[:4] +
                       [f"--seed-tasks={bad}", "--num=3", f"--out={tmp_path / 'o.jsonl'}"], cli.PROG) == 2
    err = capsys.readouterr().err
    assert f"{bad}:9" in err and "instances[0]" in err and "'input'" in err
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert cli.run_cli(cli.main, ["distill", "--teacher=http://127.0.0.1:9/v1", f"--prompts={p}", "--n=2",
                                  f"--out={tmp_path / 'd.jsonl'}"], cli.PROG) == 2
    assert f"{p}:2: no prompt" in capsys.readouterr().err
    assert cli.run_cli(cli.main, ["distill", "--teacher=x", f"--prompts={p}", "--n=0", "--out=o"], cli.PROG) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_three_commands_end_to_end_and_train(tmp_path, capsys, shared_dir):
    """Self-Instruct -> Evol-Instruct and distillation on its output, against the crafted server;
    the trainer's reader accepts all three files and `sft_jax.train` trains on them."""
    si, ev, ds = tmp_path / "si.jsonl", tmp_path / "evol.jsonl", tmp_path / "distill.jsonl"
    with serving(CraftedTeacher()) as s:
        assert cli.main(_si_args(s.url, si, 12)) == 0
        printed = capsys.readouterr().out
        assert "filter summary:" in printed and "instructions.rejected.unsuitable_for_text_model" in printed
        assert cli.main(["evol-instruct", f"--teacher={s.url}", "--teacher-model=m", f"--data={si}", "--rounds=2",
                         f"--out={ev}", "--no-progress", "--chunk=8"]) == 0
        assert cli.main(["distill", f"--teacher={s.url}", "--teacher-model=m", f"--prompts={si}", "--n=3",
                         "--scorer=both", f"--out={ds}", "--format=messages", "--no-progress"]) == 0
        assert "prompts.accepted" in capsys.readouterr().out

    rows = _lines(si)
    c = _summary(si)["counts"]
    assert c["instructions.accepted"] == 12 == len({r["instruction"] for r in rows})
    _accounted(c, "instructions")
    _accounted(c, "instances")
    for reason in ("unsuitable_for_text_model", "too_short", "starts_with_punctuation", "rouge_l_similar",
                   "write_a_program", "non_english"):
        assert c[f"instructions.rejected.{reason}"] > 0, reason
    assert c["classification.yes"] > 0 and any(r["synth"]["is_classification"] for r in rows)
    assert c["instances.rejected.same_input_other_output"] > 0 and c["instances.accepted"] == len(rows)
    assert len({(r["instruction"], r["input"], r["output"]) for r in rows}) == len(rows)
    params = json.loads((pathlib.Path(str(si) + ".synth") / "params.json").read_text())
    assert params["params"]["seed"] == 0 and params["params"]["num"] == 12 and params["runtime"]["concurrency"] == 8

    erows = _lines(ev)
    ce = _summary(ev)["counts"]
    _accounted(ce, "evolutions")
    assert ce["originals.accepted"] == len(rows) and ce["evolutions.accepted"] > 0
    assert sum(ce[f"operations.{op}"] for op in cli.evol_instruct.OPERATIONS) == 2 * len(rows)
    for reason in ("copied_prompt_words", "no_information_gain", "empty_evolution"):
        assert ce[f"evolutions.rejected.{reason}"] > 0, reason
    assert len(erows) == len(rows) + ce["evolutions.accepted"]
    for r in erows:  # lineage: the original, the parent, the operations, the round
        m = r["synth"]
        assert m["original"] == (rows[m["source_index"]]["instruction"] + (
            "\n" + rows[m["source_index"]]["input"] if rows[m["source_index"]]["input"] else ""))
        assert len(m["operations"]) <= m["round"] and (m["round"] == 0) == (m["parent"] is None)

    drows = _lines(ds)
    cd = _summary(ds)["counts"]
    assert cd["prompts.accepted"] == len(drows) == len(rows)
    for r in drows:
        cands = r["synth"]["candidates"]
        assert len(cands) == 3 and all("judge" in x and "loglik" in x for x in cands)
        best = max(cands, key=lambda x: (x["judge"], x["loglik"]))
        assert r["messages"][1]["content"] == best["text"]

    for path in (si, ev, ds):
        convs = formats.load_file(str(path))
        assert len(convs) == len(_lines(path)) and all(x["messages"][-1]["role"] == "assistant" for x in convs)
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}",
           f"--config.data.path={si},{ev},{ds}", "--config.train.steps=2", "--config.model.tiny.num_layers=1",
           "--config.model.tiny.hidden_size=32", "--config.model.tiny.intermediate_size=64",
           "--config.train.batch_size=4", "--config.eval.num_generations=0", "--config.eval.every_steps=0",
           "--config.checkpoint.every_steps=0"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 and all(0 < m["loss"] < 20 for m in losses)


@pytest.mark.slow
def test_resume_after_kill9_neither_duplicates_nor_drops(tmp_path, shared_dir):
    """A real subprocess killed with SIGKILL mid-job, then rerun: the output equals an uninterrupted run."""
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    with serving(CraftedTeacher(delay=0.03)) as s:
        args = _si_args(s.url, out, 40, "--concurrency=1")
        p = subprocess.Popen([sys.executable, "-m", "sft_jax.synth", *args], cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = pathlib.Path(str(out) + ".synth/journal.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 2:
                break
            time.sleep(0.01)
        assert p.poll() is None, "the job ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        committed = journal.read_text().count("\n")
        assert not pathlib.Path(str(out) + ".synth/summary.json").exists()
        before = out.read_bytes()
        r = subprocess.run([sys.executable, "-m", "sft_jax.synth", *args], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resuming" in r.stderr and "filter summary:" in r.stdout
        assert cli.main(_si_args(s.url, ref, 40, "--concurrency=1")) == 0
    after = out.read_bytes()
    # the committed rows are kept as they were (a torn tail after the last commit is dropped)
    kept = sum(json.loads(x)["rows"] for x in journal.read_text().splitlines()[:committed])
    assert after.splitlines()[:kept] == before.splitlines()[:kept]
    assert after == ref.read_bytes()
    rows = _lines(out)
    assert len({r["synth"]["instruction"] for r in rows}) == 40
    assert len({(r["instruction"], r["input"], r["output"]) for r in rows}) == len(rows)
    assert _summary(out)["counts"] == _summary(ref)["counts"]


@pytest.mark.parametrize("command", ["evol-instruct", "distill"])
def test_interrupted_evol_and_distill_resume_to_the_same_output(tmp_path, monkeypatch, command):
    """A job that dies between teacher calls (a dead endpoint, Ctrl-C) resumes from its rows and journal to
    exactly the output of an uninterrupted run: Evol-Instruct rebuilds its population, distill skips done chunks."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Write about {w} {k}.", "output": f"About {w}."}) + "\n"
                            for k, w in enumerate(["tea", "rain", "maps of", "salt", "iron", "wool", "moss"])))
    real = cli.make_teacher

    def dying_teacher(*a, **kw):
        t = real(*a, **kw)
        calls = {"n": 0}
        complete = t.complete

        def wrapped(*x, **y):
            calls["n"] += 1
            if calls["n"] > 4:
                raise KeyboardInterrupt
            return complete(*x, **y)

        t.complete = wrapped
        return t

    def args(url, out):
        extra = ["--rounds=3", f"--data={data}"] if command == "evol-instruct" else ["--n=2", f"--prompts={data}"]
        return [command, f"--teacher={url}", "--teacher-model=m", f"--out={out}", "--chunk=2", "--no-progress", *extra]

    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    with serving(CraftedTeacher()) as s:
        monkeypatch.setattr(cli, "make_teacher", dying_teacher)
        with pytest.raises(KeyboardInterrupt):
            cli.main(args(s.url, out))
        monkeypatch.setattr(cli, "make_teacher", real)
        partial = _lines(out)
        assert 0 < len(partial) and not pathlib.Path(str(out) + ".synth/summary.json").exists()
        assert cli.main(args(s.url, out)) == 0
        assert cli.main(args(s.url, ref)) == 0
    assert out.read_bytes() == ref.read_bytes() and _lines(out)[: len(partial)] == partial
    assert _summary(out)["counts"] == _summary(ref)["counts"]


@pytest.mark.slow
def test_in_process_teacher_stories260k(tmp_path, capsys, shared_dir):
    """The in-process teacher (`hf:DIR`): junk outputs, yet every job finishes, every rejection is counted
    and the files are accepted by the trainer's reader."""
    from sft_jax.models.llama2c import convert_llama2c

    base = tmp_path / "stories260K"
    convert_llama2c(str(shared_dir / "assets/stories260K/stories260K.bin"),
                    str(shared_dir / "assets/stories260K/tok512.model"), str(base))
    t = f"--teacher=hf:{base}"
    common = ["--no-progress", "--max-tokens=48", "--batch-size=8"]
    si, ev, ds = tmp_path / "si.jsonl", tmp_path / "ev.jsonl", tmp_path / "ds.jsonl"
    # 256 new tokens: room for a story to end (with BOS) before the limit, so some candidates are complete
    assert cli.main(["self-instruct", t, f"--seed-tasks={SEEDS}", "--num=2", "--prompts-per-iteration=4",
                     "--max-iterations=3", "--temperature=1.0", "--top-p=1.0", f"--out={si}", "--no-progress",
                     "--max-tokens=256"]) == 0
    c = _summary(si)["counts"]
    _accounted(c, "instructions")
    _accounted(c, "instances")
    assert c["instructions.rejected.cut_by_length"] > 0 and _summary(si)["teacher_usage"]["truncated_prompts"] > 0
    assert c["instructions.accepted"] == len({r["instruction"] for r in _lines(si)}) > 0
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Tell a story about a {w}.", "output": f"A {w} story."}) + "\n"
                            for w in ("cat", "dog", "frog")))
    assert cli.main(["evol-instruct", t, f"--data={data}", "--rounds=1", f"--out={ev}", *common]) == 0
    ce = _summary(ev)["counts"]
    _accounted(ce, "evolutions")
    assert ce["originals.accepted"] == 3 and ce["evolutions.candidates"] == 3
    assert cli.main(["distill", t, f"--prompts={data}", "--n=2", "--scorer=both", f"--out={ds}", *common]) == 0
    cd = _summary(ds)["counts"]
    assert cd["prompts.accepted"] == 3 and cd["loglik.scored"] == 6
    for r in _lines(ds):
        lls = [x["loglik"] for x in r["synth"]["candidates"]]
        assert all(x < 0 for x in lls)
    assert "filter summary:" in capsys.readouterr().out
    for path in (si, ev, ds):
        assert len(formats.load_file(str(path))) == len(_lines(path)) > 0


@pytest.mark.slow
def test_against_sft_jax_serve(tmp_path):
    """A real local endpoint: `sft_jax.serve` with a tiny random chat model (junk answers).  Evol-Instruct
    and judge-scored distillation finish with every rejection counted; the log-likelihood scorer, which
    needs `echo` (not served), stops with a one-line error."""
    import jax

    from sft_jax.data.templates import prepare_tokenizer
    from sft_jax.data.testing import tiny_fast_tokenizer
    from sft_jax.generate import load_model_dir
    from sft_jax.models import llama
    from sft_jax.models.config import ModelConfig
    from sft_jax.models.hf_io import save_hf
    from sft_jax.serve.engine import Engine
    from sft_jax.serve.server import ServerThread, create_app, served_from_generator

    tok, _ = prepare_tokenizer(tiny_fast_tokenizer(400), "chatml", add_tokens=True)
    mc = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "tiny-chat"
    save_hf(str(model_dir), mc, llama.init_params(mc, jax.random.PRNGKey(0)))
    tok.save_pretrained(str(model_dir))
    gen = load_model_dir(str(model_dir))
    engine = Engine(gen.params, gen.config, max_batch=4, max_len=1024, max_queue=64)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Name a {w}.", "completion": f"A {w}."}) + "\n"
                            for w in ("fruit", "river", "tree")))
    ev, ds, ds2 = tmp_path / "ev.jsonl", tmp_path / "ds.jsonl", tmp_path / "ds2.jsonl"
    with ServerThread(create_app([served_from_generator(gen, "tiny-chat", engine.start())]), [engine]) as srv:
        t = [f"--teacher={srv.url}/v1", "--teacher-model=tiny-chat", "--no-progress", "--max-tokens=16"]
        assert cli.main(["evol-instruct", *t, f"--data={data}", "--rounds=1", f"--out={ev}"]) == 0
        assert cli.main(["distill", *t, f"--prompts={data}", "--n=2", f"--out={ds}"]) == 0
        with pytest.raises(cli.UsageError, match="HTTP 400"):
            cli.main(["distill", *t, f"--prompts={data}", "--n=2", "--scorer=loglik", f"--out={ds2}"])
    ce = _summary(ev)["counts"]
    _accounted(ce, "evolutions")
    assert ce["originals.accepted"] == 3 and ce["evolutions.candidates"] == 3
    assert _summary(ev)["teacher_usage"]["completion_tokens"] > 0
    assert len(formats.load_file(str(ev))) == len(_lines(ev))
    cd = _summary(ds)["counts"]
    assert cd["candidates.generated"] == 6 and cd["prompts.candidates"] == 3
    assert cd.get("prompts.accepted", 0) + cd.get("prompts.rejected.no_score", 0) + cd.get(
        "prompts.rejected.no_candidate", 0) == 3

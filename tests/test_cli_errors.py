"""One error-to-exit path for every CLI (`sft_jax/cli.py`, issue 19): each entry point on one bad input
prints ONE `error:` line (no traceback unless --verbose), exit 2 for bad input / config, 1 for a failed run;
generation refuses a prompt past the model's context unless --truncate_prompt (then cut from the left)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

from sft_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
# every `python -m sft_jax.<tool>` entry point and the shared function its __main__ goes through
ENTRY_POINTS = {
    "sft_jax/train.py": "run_absl", "sft_jax/plan.py": "run_absl", "sft_jax/data/inspect.py": "run_absl",
    "sft_jax/data/quality.py": "run_absl", "sft_jax/export.py": "run_cli", "sft_jax/generate.py": "run_cli",
    "sft_jax/eval.py": "run_cli", "sft_jax/report.py": "run_cli", "sft_jax/convert.py": "run_cli",
    "sft_jax/serve/__main__.py": "run_cli", "sft_jax/synth/__main__.py": "run_cli",
    "sft_jax/peft/combine.py": "run_cli",
}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def _cli(*args, env=None, timeout=300):
    p = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stderr


def test_every_entry_point_goes_through_the_shared_path():
    """The acceptance grep: each entry point's __main__ ends in sft_jax.cli (and nothing else prints errors)."""
    mains = sorted(str(p.relative_to(REPO)) for p in (REPO / "sft_jax").rglob("*.py")
                   if re.search(r'^if __name__ == "__main__"', p.read_text(), re.M))
    assert mains == sorted(ENTRY_POINTS), mains
    for path, fn in ENTRY_POINTS.items():
        text = (REPO / path).read_text()
        assert f"{fn}(" in text and "from sft_jax.cli import" in text, path
        assert "app.run(" not in text and "sys.exit(2)" not in text, path
    defs = [str(p.relative_to(REPO)) for p in (REPO / "sft_jax").rglob("*.py")
            if re.search(r"^def (run_cli|run_absl)\(", p.read_text(), re.M)]
    assert defs == ["sft_jax/cli.py"]


def test_exit_codes_and_one_line_messages(capsys, tmp_path):
    from sft_jax.data.errors import DataError
    from sft_jax.workdir_lock import WorkdirLocked

    def raising(e):
        def main(argv):
            raise e
        return main

    cases = [(cli.UsageError("bad --flag"), 2), (DataError("f.jsonl:3: malformed\n JSON"), 2),
             (FileNotFoundError(errno.ENOENT, "No such file", "/x/y"), 2), (WorkdirLocked("in use"), 1),
             (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f")), 1), (KeyboardInterrupt(), 130)]
    for e, code in cases:
        capsys.readouterr()
        assert cli.run_cli(raising(e), [], "prog") == code, e
        line = _one_line(capsys.readouterr().err)
        if isinstance(e, DataError):
            assert line == "error: f.jsonl:3: malformed JSON"
        if code == 1 and isinstance(e, OSError):
            assert "no space left" in line and str(tmp_path / "f") in line and "MiB free" in line
    # --verbose: the traceback too, same exit code
    assert cli.run_cli(raising(DataError("x.jsonl:1: bad")), ["--verbose"], "prog") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: x.jsonl:1: bad")
    # an unexpected exception is a bug: it keeps its traceback
    with pytest.raises(ZeroDivisionError):
        cli.run_cli(raising(ZeroDivisionError("bug")), [], "prog")


def test_train_unknown_config_field_and_bad_value():
    code, err = _cli("sft_jax.train", "--config=configs/tiny.py", "--config.train.lrr=1", "--workdir=/nonexistent/x")
    line = _one_line(err)
    assert code == 2 and "--config.train.lrr" in line and '"lr"' in line, err  # was 58 lines
    code, err = _cli("sft_jax.train", "--config=configs/tiny.py", "--config.train.lr=abc", "--workdir=/nonexistent/x")
    assert code == 2 and "abc" in _one_line(err)
    code, err = _cli("sft_jax.plan", "--config=configs/tiny.py", "--target=nope-8", "--config.dat.path=x")
    assert code == 2 and "--config.dat.path" in _one_line(err)
    # an error class of the module run as __main__ (python -m sft_jax.plan) is known too
    code, err = _cli("sft_jax.plan", "--config=configs/tiny.py", "--target=nope-8")
    assert code == 2 and "unknown target" in _one_line(err)
    code, err = _cli("sft_jax.train", "--config=configs/tiny.py", "--config.train.lrr=1", "-v")
    assert code == 2 and "Traceback" in err  # -v: the traceback before the line


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny Llama with a 32-token context, saved as a Hugging Face directory (no tokenizer)."""
    import jax

    from sft_jax.models import llama
    from sft_jax.models.config import ModelConfig
    from sft_jax.models.hf_io import save_hf

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny_hf")
    params = llama.init_params(config, jax.random.PRNGKey(0))
    save_hf(str(d), config, params)
    return d


def test_generate_context(tiny_hf, capsys, caplog):
    from sft_jax.generate import PROG, ContextLengthError, load_model_dir
    from sft_jax.generate import main as generate_main

    gen = load_model_dir(str(tiny_hf))
    assert gen.context == 32
    long = [1] + [5 + i % 50 for i in range(39)]  # 40 tokens > 32
    with pytest.raises(ContextLengthError, match="40 tokens but the model's context is 32"):
        gen.generate_ids([long], max_new_tokens=4)
    # the CLI: one line, exit 2 (was: exit 0 with garbage)
    capsys.readouterr()
    ids = ",".join(map(str, long))
    assert cli.run_cli(generate_main, [f"--model={tiny_hf}", f"--prompt_ids={ids}", "--max_new_tokens=4"], PROG) == 2
    assert "--truncate_prompt" in _one_line(capsys.readouterr().err)
    # asked: cut from the left so that max_new_tokens fits, BOS kept, with a warning
    with caplog.at_level(logging.WARNING, logger="sft_jax.generate"):
        (out, why), = gen.generate_ids([long], max_new_tokens=8, truncate_prompt=True)
    assert "cut from the left to 24" in caplog.text and "BOS kept" in caplog.text
    kept = [1] + long[-23:]
    assert gen.generate_ids([kept], max_new_tokens=8) == [(out, why)]
    # a prompt that fits but whose generation would pass the context stops at it (per row of a batch)
    short = [1, 7, 8]
    res = gen.generate_ids([long[:30], short], max_new_tokens=8)
    assert len(res[0][0]) <= 2 and res[1] == gen.generate_ids([short], max_new_tokens=8)[0]
    assert generate_main([f"--model={tiny_hf}", f"--prompt_ids={ids}", "--max_new_tokens=4", "--truncate_prompt",
                          "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generations"][0]["ids"]) <= 4


def test_generate_pickle_only_model_dir_and_sandboxed_template(tiny_hf, tmp_path, capsys):
    from sft_jax.generate import PROG, Generator, load_model_dir
    from sft_jax.generate import main as generate_main

    pk = tmp_path / "pickle_only"
    pk.mkdir()
    (pk / "config.json").write_text((tiny_hf / "config.json").read_text())
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    capsys.readouterr()
    assert cli.run_cli(generate_main, [f"--model={pk}", "--prompt_ids=1,2"], PROG) == 2
    line = _one_line(capsys.readouterr().err)
    assert "pytorch_model.bin" in line and "pickle is not loaded" in line

    # a chat template that the sandbox blocks: one line naming it, exit 2 (was a traceback)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    gen = load_model_dir(str(tiny_hf))
    bad = Generator(**{**gen.__dict__, "tokenizer": tok, "template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})

    def main(argv):
        bad.encode_prompt("hi")

    assert cli.run_cli(main, [], PROG) == 2
    line = _one_line(capsys.readouterr().err)
    assert "chat template" in line and "unsafe" in line, line


def test_other_entry_points_one_line(tmp_path, capsys):
    """Each argparse tool on one bad input, in process (the same run_cli its __main__ calls)."""
    from sft_jax import convert, eval as eval_lib, export, report
    from sft_jax.serve import __main__ as serve
    from sft_jax.synth import __main__ as synth

    missing = str(tmp_path / "missing")
    cases = [
        (export.main, [f"--workdir={missing}", f"--out={tmp_path / 'o'}", "--format=merged"], 2, "not found"),
        (export.main, [f"--workdir={missing}", f"--out={tmp_path / 'o'}", "--format=onnx"], 2, "onnx"),
        (eval_lib.main, [f"--workdir={missing}", f"--data={missing}.jsonl"], 2, "does not exist"),
        (report.main, [f"--workdir={missing}"], 2, "not found"),
        (convert.main, ["llama2c", f"--checkpoint={missing}.bin", f"--tokenizer={missing}", f"--out={tmp_path}"], 2,
         "file not found"),
        (serve.main, [f"--workdir={missing}"], 2, "not found"),
        (synth.main, ["distill", "--teacher=x", f"--prompts={missing}.jsonl", "--n=0", "--out=o"], 2, "--n"),
    ]
    for main, args, code, text in cases:
        capsys.readouterr()
        assert cli.run_cli(main, args, "prog") == code, (main.__module__, args)
        assert text in _one_line(capsys.readouterr().err), (main.__module__, args)


@pytest.fixture(scope="module")
def inspect_setup(tmp_path_factory, shared_dir):
    d = tmp_path_factory.mktemp("inspect_cli")
    tok = shared_dir / "assets" / "stories260K" / "tok512.model"
    if not tok.exists():
        pytest.skip(f"{tok} not found")
    return d, tok


@pytest.mark.slow
def test_inspect_data_errors_are_one_line(inspect_setup):
    """Every kind of data error through `python -m sft_jax.data.inspect` (was a traceback each)."""
    d, tok = inspect_setup
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    files = {
        "trailing.json": "[\n" + json.dumps(good) + ",\n]\n",
        "badline.jsonl": json.dumps(good) + "\n{oops\n",
        "field.jsonl": json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n",
        "empty_answer.jsonl": json.dumps({"messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": ""}]}) + "\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    # one subprocess, many inputs: a driver that runs the inspector's main once per input
    code = (
        "import subprocess, sys, json\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    p = subprocess.run([sys.executable, '-m', 'sft_jax.data.inspect', *args], capture_output=True, text=True)\n"
        "    out.append([p.returncode, p.stderr])\n"
        "print(json.dumps(out))\n"
    )
    base = ["--config=configs/data_demo.py", f"--config.data.tokenizer={tok}", "--config.data.template=chatml",
            "--config.data.eval_fraction=0"]
    runs = [[*base, f"--config.data.path={d / n}"] for n in ("trailing.json", "badline.jsonl", "field.jsonl")]
    runs.append([*base, f"--config.data.path={d / 'empty_answer.jsonl'}", "--config.data.strict=True"])
    runs.append([*base, f"--config.data.path={d / 'nothing_here.jsonl'}"])
    p = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout)
    expect = [f"{d / 'trailing.json'}:2: malformed JSON: trailing comma", f"{d / 'badline.jsonl'}:2: malformed JSON",
              f"{d / 'field.jsonl'}:1: field 'messages[0].content' must be a string",
              f"{d / 'empty_answer.jsonl'}:1: an assistant turn is empty", "no such file"]
    for (rc, err), text in zip(results, expect):
        assert rc == 2 and text in _one_line(err), err[-2000:]


def test_data_accounting_block(tmp_path, shared_dir):
    """Per file rows / kept / skipped by reason / truncated, the ignored directory entries, in one block."""
    from sft_jax.config import default_config
    from sft_jax.data import pipeline

    tok_path = shared_dir / "assets" / "stories260K" / "tok512.model"
    if not tok_path.exists():
        pytest.skip(f"{tok_path} not found")
    d = tmp_path / "data"
    d.mkdir()
    turn = lambda role, c: {"role": role, "content": c}  # noqa: E731
    rows = [{"messages": [turn("user", "hi"), turn("assistant", "hello there")]}] * 3 + [
        {"messages": [turn("user", "hi"), turn("assistant", "")]},
        {"messages": [turn("user", "hi"), turn("assistant", "x"), turn("user", "and?")]},
        {"messages": [turn("user", "long"), turn("assistant", "word " * 200)]}]
    (d / "A.JSONL").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "notes.txt").write_text("not data")
    cfg = default_config()
    cfg.data.path, cfg.data.tokenizer, cfg.data.template = str(d), str(tok_path), "chatml"
    cfg.data.add_template_tokens, cfg.data.eval_fraction, cfg.data.max_length = False, 0.0, 64
    cfg.data.truncation = "drop"
    tok, _ = pipeline.tokenizer_from_config(cfg)
    acc = pipeline.account_data(cfg.data, tok)
    f = acc["splits"]["train"]["files"][str(d / "A.JSONL")]
    assert f == {"rows": 6, "examples": 3, "truncated": 0,
                 "skipped": {"empty_assistant": 1, "no_final_assistant": 1, "too_long": 1}}
    assert acc["ignored"] == [str(d / "notes.txt")] and "eval" not in acc["splits"]
    block = pipeline.format_accounting(acc)
    assert "train: 6 rows read -> 3 examples kept, 3 skipped (empty_assistant 1, no_final_assistant 1, too_long 1)" \
        in block and "ignored (not data files): " + str(d / "notes.txt") in block, block
    from sft_jax.data.errors import DataError

    with pytest.raises(DataError, match="A.JSONL:4: an assistant turn is empty"):
        pipeline.account_data(_strict(cfg).data, tok)


def _strict(cfg):
    cfg = cfg.copy_and_resolve_references()
    cfg.data.strict = True
    return cfg

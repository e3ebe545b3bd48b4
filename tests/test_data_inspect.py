"""The data inspector: marked rendering and the --json statistics (CLI, absl + config_flags)."""

import json
import os
import subprocess
import sys

from sft_jax.config import default_config
from sft_jax.data import inspect as data_inspect
from sft_jax.data import testing


def _setup(tmp_path):
    tok_dir = tmp_path / "tok"
    testing.tiny_fast_tokenizer().save_pretrained(str(tok_dir))
    data = testing.write_jsonl(str(tmp_path / "rows.jsonl"), testing.synthetic_rows(30))
    return str(tok_dir), data


def test_inspect_data_stats_and_marks(tmp_path):
    tok_dir, data = _setup(tmp_path)
    cfg = default_config()
    cfg.data.path, cfg.data.tokenizer, cfg.data.template = data, tok_dir, "chatml"
    cfg.data.max_length, cfg.data.eval_fraction = 256, 0.0
    stats, shown = data_inspect.inspect_data(cfg, num_examples=2)
    assert stats["rows"] == 30 and stats["examples"] == 30 and stats["skipped"] == {}
    assert 0 < stats["trainable_tokens"] < stats["tokens"]
    assert 0 < stats["packing_efficiency"] <= 1
    assert stats["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    ex, tok = shown[0]
    text = data_inspect._render(ex, tok, color=False)
    assert "[[Answer 0.0:" in text and text.count("[[") == text.count("]]") >= 1
    assert "<|im_end|>]]" in text and "[[<|im_start|>" not in text
    assert "\x1b[32m" in data_inspect._render(ex, tok, color=True)


def test_inspect_cli_json(tmp_path, repo_dir):
    tok_dir, data = _setup(tmp_path)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from sft_jax.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.data.path = {data!r}\n"
        f"    c.data.tokenizer = {tok_dir!r}\n"
        "    c.data.template = 'llama3'\n"
        "    c.data.eval_fraction = 0.0\n"
        "    return c\n")
    env = dict(os.environ, PYTHONPATH=str(repo_dir), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "sft_jax.data.inspect", f"--config={cfg_file}", "--config.data.max_length=64",
         "--config.data.truncation=drop", "--config.data.max_skip_fraction=1.0", "--json"],
        cwd=repo_dir, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout)
    for key in ("rows", "examples", "skipped", "tokens", "trainable_tokens", "packing_efficiency"):
        assert key in stats
    assert stats["rows"] == 30 and stats["max_length"] == 64
    assert stats["skipped"].get("too_long", 0) == 30 - stats["examples"] > 0

"""bench/accel_mfu.py (the accelerator MFU row): its FLOP count, and a toy run on CPU (not timing)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import accel_mfu as M  # noqa: E402

from sft_jax.models import llama  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402


def test_matmul_params_match_the_model(repo_dir):
    """N in the 6N count = every projection kernel of the 1B-shaped model + the (tied) LM head."""
    cfg = json.loads((repo_dir / "configs" / "shapes" / "llama3_2_1b" / "config.json").read_text())
    mc = ModelConfig.from_hf(cfg)
    shapes = llama.abstract_params(mc)
    kernels = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(shapes)
                  if "kernel" in jax.tree_util.keystr(p))
    assert mc.tie_embeddings  # so the LM head is the embedding matrix, not a kernel leaf
    assert M.matmul_params(mc) == kernels + mc.hidden_size * mc.vocab_size
    assert 1.23e9 < M.matmul_params(mc) < 1.24e9  # Llama-3.2-1B: 1.236B parameters
    # LoRA r16 on all 7 projections of 16 layers
    assert M.lora_params(mc, 16) == 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 2 * (2048 + 8192) + (8192 + 2048))


def test_step_flops_counts_each_packed_example():
    mc = ModelConfig.from_hf(dict(M.TOY))
    n = M.matmul_params(mc)
    attn = 12 * mc.num_layers * mc.num_heads * mc.head_dim
    assert M.step_flops(mc, [100, 28], 0) == 6 * n * 128 + attn * (100**2 + 28**2)
    assert M.step_flops(mc, [128], 4) == (4 * n + 6 * M.lora_params(mc, 4)) * 128 + attn * 128**2


def test_synthetic_batches_are_packed_rows():
    (b, lens), = M.synthetic_batches(1, 2, 256, 512)
    assert sum(lens) == int((b["segment_ids"] > 0).sum())
    for r in range(2):
        seg = b["segment_ids"][r]
        for s in set(seg.tolist()) - {0}:
            pos = b["positions"][r][seg == s]
            assert pos.tolist() == list(range(len(pos)))  # positions restart per example
    assert 0.5 < b["loss_mask"].sum() / sum(lens) < 0.7
    assert (b["targets"][b["segment_ids"] > 0] == 3 + (b["inputs"][b["segment_ids"] > 0] - 3 + 7) % 509).all()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_accel_mfu_toy_run(tmp_path, repo_dir):
    out = tmp_path / "toy.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark runs
    proc = subprocess.run([sys.executable, str(BENCH / "accel_mfu.py"), "--toy", "--out", str(out)],
                          cwd=repo_dir, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"]["platform"] == "cpu" and res["card_peak"] is None and res["measured_bf16_peak"] > 0
    assert [r["mode"] for r in res["rows"]] == ["full", "lora"]
    for row in res["rows"]:
        assert all(math.isfinite(x) for x in row["losses"]), row["losses"]
        assert row["losses"][-1] < row["losses"][0], (row["mode"], row["losses"])
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    full, lora = res["rows"]
    assert lora["trainable_params"] < full["trainable_params"] / 2
    assert "full" in proc.stdout and "MFU" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_accel_mfu_remat_fallback_and_errors(tmp_path, repo_dir):
    """An out-of-memory run falls back to the next remat policy (recorded); any other failure (here the GPU-only
    Pallas attention on CPU) is reported with its error and ends that mode."""
    out = tmp_path / "r.json"
    env = dict(os.environ, ACCEL_MFU_FAKE_OOM="none")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(BENCH / "accel_mfu.py"), "--toy", "--modes", "lora",
                           "--remat", "none,full", "--out", str(out)],
                          cwd=repo_dir, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0] == {"mode": "lora", "remat": "none", "error": rows[0]["error"]}
    assert rows[0]["error"].startswith("out of memory")
    assert rows[1]["remat"] == "full" and rows[1]["losses"][-1] < rows[1]["losses"][0]
    env.pop("ACCEL_MFU_FAKE_OOM")
    proc = subprocess.run([sys.executable, str(BENCH / "accel_mfu.py"), "--toy", "--modes", "full",
                           "--policy", "attention=pallas", "--out", str(out)],
                          cwd=repo_dir, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["error"].startswith("failed") and "GPU" in rows[0]["error"]
    assert "attention='pallas' is the GPU" in proc.stdout

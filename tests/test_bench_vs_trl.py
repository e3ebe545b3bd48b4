"""bench/vs_trl.py at toy size: both sides train and agree (correctness only, not timing).

Same random-init HF Llama, same TRL-packed batches in the same order, same optimizer, LoRA
starting from peft's own initial adapters: sft_jax and TRL's SFTTrainer must give the same
first-step loss (same weights, same batch: float32 rounding only) and stay close afterwards.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("torch")

FIRST_STEP_TOL = 1e-4  # same weights, same batch, float32 on both sides
LATER_STEP_TOL = 2e-3  # AdamW trajectories in float32 drift apart only slowly (measured ~3e-6 at 8 steps)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vs_trl_toy(tmp_path, repo_dir):
    out = tmp_path / "toy.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark runs
    proc = subprocess.run(
        [sys.executable, str(repo_dir / "bench" / "vs_trl.py"), "--quick", "--toy", "--out", str(out)],
        cwd=repo_dir, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {r["mode"] for r in res["rows"]} == {"lora", "full"}
    for row in res["rows"]:
        assert "trl:flat" in row and "sft_jax" in row, (row["mode"], row["runs"])
        lt, lj = row["trl:flat"]["losses"], row["sft_jax"]["losses"]
        assert len(lt) == len(lj) == res["steps"]
        for losses in (lt, lj):
            assert all(math.isfinite(x) for x in losses), losses
            assert losses[-1] < losses[0], f"{row['mode']}: loss did not decrease: {losses}"
        assert abs(lt[0] - lj[0]) < FIRST_STEP_TOL, (row["mode"], lt[0], lj[0])
        assert max(abs(a - b) for a, b in zip(lt, lj)) < LATER_STEP_TOL, (row["mode"], lt, lj)
        assert row["sft_jax"]["tokens_per_s"] > 0 and row["trl:flat"]["tokens_per_s"] > 0

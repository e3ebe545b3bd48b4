"""bench/vs_trl.py at toy size: both sides train and agree (correctness only, not timing).

Same random-init HF Llama, same TRL-packed batches in the same order, same optimizer, LoRA
starting from peft's own initial adapters: sft_jax and TRL's SFTTrainer must give the same
first-step loss (same weights, same batch: float32 rounding only) and stay close afterwards.
The toy runs once with untied and once with tied embeddings (the SmolLM2-135M row's layout).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

FIRST_STEP_TOL = 1e-4  # same weights, same batch, float32 on both sides
LATER_STEP_TOL = 2e-3  # AdamW trajectories in float32 drift apart only slowly (measured ~3e-6 at 8 steps)
SMOLLM2_135M_PARAMS = 134_515_008  # HuggingFaceTB/SmolLM2-135M's parameter count (tied embeddings)


def _load_bench(repo_dir):
    spec = importlib.util.spec_from_file_location("bench_vs_trl", repo_dir / "bench" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smollm2_row_has_smollm2_shapes(repo_dir):
    """The smollm2_135m row builds SmolLM2-135M's architecture: its parameter count, tied lm_head."""
    from transformers import LlamaForCausalLM

    bench = _load_bench(repo_dir)
    size = bench.SIZES["smollm2_135m"]
    cfg = bench.llama_config(size, 512)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (576, 30, 9, 3, 1536, 49152, 64)
    assert cfg.tie_word_embeddings
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_135M_PARAMS
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert size["modes"] == ("lora",)
    # LoRA r16 on all 7 linear layers of 30 blocks: the count the FLOP formula uses
    assert bench.lora_params(size) == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 2 * (576 + 1536) + (1536 + 576))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_vs_trl_toy(tmp_path, repo_dir):
    out = tmp_path / "toy.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark runs
    proc = subprocess.run(
        [sys.executable, str(repo_dir / "bench" / "vs_trl.py"), "--quick", "--toy", "--sizes", "toy,toy_tied",
         "--out", str(out)],
        cwd=repo_dir, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["size"], r["mode"]) for r in res["rows"]} == {
        (s, m) for s in ("toy", "toy_tied") for m in ("lora", "full")}
    for row in res["rows"]:
        assert "trl:flat" in row and "sft_jax" in row, (row["mode"], row["runs"])
        lt, lj = row["trl:flat"]["losses"], row["sft_jax"]["losses"]
        assert len(lt) == len(lj) == res["steps"]
        for losses in (lt, lj):
            assert all(math.isfinite(x) for x in losses), losses
            # the tied toy starts at ~ln(V) with frozen (tied) embeddings: 6 LoRA steps stay within batch noise
            # on both sides, so only its agreement with TRL is checked
            if (row["size"], row["mode"]) != ("toy_tied", "lora"):
                assert losses[-1] < losses[0], f"{row['size']} {row['mode']}: loss did not decrease: {losses}"
        assert abs(lt[0] - lj[0]) < FIRST_STEP_TOL, (row["size"], row["mode"], lt[0], lj[0])
        assert max(abs(a - b) for a, b in zip(lt, lj)) < LATER_STEP_TOL, (row["size"], row["mode"], lt, lj)
        assert row["sft_jax"]["tokens_per_s"] > 0 and row["trl:flat"]["tokens_per_s"] > 0

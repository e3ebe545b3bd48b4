"""The ahead-of-time planner (`python -m sft_jax.plan`): real train step, abstract params, no weights."""

import json
import os
import subprocess
import sys

import pytest

from sft_jax import plan

GiB = 1024**3


def _run(repo_dir, *args, timeout=300):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the planner sets the device count itself
    code = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
        "print('CHILD_MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)"
    )
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "sft_jax.plan", *args],
                       cwd=repo_dir, env=env, capture_output=True, text=True, timeout=timeout)
    rss_kb = int(r.stderr.rsplit("CHILD_MAXRSS_KB", 1)[1].split()[0])
    return r, rss_kb * 1024


def test_parse_target():
    assert plan.parse_target("tpu-v5e-8") == ("tpu-v5e", 8)
    assert plan.parse_target("H100-16") == ("h100", 16)
    assert plan.parse_target("a100-80g-8") == ("a100-80g", 8)
    with pytest.raises(plan.PlanError, match="unknown target"):
        plan.parse_target("tpu-v9-8")
    with pytest.raises(plan.PlanError):
        plan.parse_target("h100")


def test_tiny_plan_matches_state_bytes(repo_dir):
    r, _ = _run(repo_dir, "--config=configs/tiny.py", "--target=h100-4", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout)
    assert p["devices"] == 4 and p["run"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert p["fits"] and p["suggestions"] == []
    st, mem = p["state_per_device"], p["memory_per_device"]
    # compiled arguments = trainable + optimizer state + batch + the PRNG key
    assert abs(mem["arguments"] - sum(st.values())) <= 64, (mem, st)
    # unscanned: XLA's FLOP count and the analytical 6N + 12LdT agree to ~10%
    xla, ana = p["flops"]["xla_per_step_per_device"], p["flops"]["analytical_per_step_per_device"]
    assert 0.8 < xla / ana < 1.25, (xla, ana)


def test_8b_lora_plan_without_weights(repo_dir):
    """Llama-3.1-8B LoRA at 8192 tokens on a TPU v5e-8: compiles for 8 devices in well under 8 GiB of
    host memory (no weight is allocated), reports the numbers, and says it does not fit 16 GiB with
    dense attention (with suggestions)."""
    r, rss = _run(repo_dir, "--config=configs/llama3_8b_lora.py", "--target=tpu-v5e-8", "--json")
    assert r.returncode == 3, r.stderr[-3000:]  # 3 = planned fine, does not fit
    p = json.loads(r.stdout)
    print(plan.format_plan(p))
    print(f"peak RSS of the planner process: {rss / GiB:.2f} GiB")
    assert rss < 8 * GiB
    assert p["host_peak_rss_bytes"] < 8 * GiB
    assert p["model"]["params"] == 8_030_261_248  # Llama-3.1-8B
    assert p["run"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    st = p["state_per_device"]
    # bf16 base sharded 8 ways: 16.06 GB / 8
    assert abs(st["frozen_params"] - 8_030_261_248 * 2 / 8) < 0.01 * GiB
    assert p["memory_per_device"]["arguments"] >= sum(st.values())
    assert p["memory_per_device"]["temporaries"] > 0
    assert p["flops"]["analytical_per_step"] > 2e15
    assert not p["fits"] and any("max_length" in s for s in p["suggestions"])


def test_bad_target_is_a_clear_error(repo_dir):
    r, _ = _run(repo_dir, "--config=configs/tiny.py", "--target=tpu-v9-8")
    assert r.returncode == 2 and "unknown target" in r.stderr

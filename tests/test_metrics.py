"""MetricsWriter output, MFU arithmetic, the compile counter."""

import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from sft_jax import metrics as M
from sft_jax.config import default_config

FIELDS = dict(loss=2.5, lr=1e-4, grad_norm=jnp.float32(0.7), trainable_tokens=100, real_tokens=250,
              tokens_per_s=1234.5, step_time_s=0.2, compile_time_s=3.0, mfu=0.01)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_tb_run_info(tmp_path):
    lines = []
    with M.MetricsWriter(tmp_path, True, total_steps=3, tty=False, log_every_s=0.0, print_fn=lines.append) as w:
        w.write_run_info(default_config(), extra={"n_params": 123})
        for step in (1, 2, 3):
            w.write(step, {**FIELDS, "loss": FIELDS["loss"] / step})
        w.write(3, {"loss": float("nan")})
        w.write_eval(3, {"loss": 1.5, "accuracy": 0.25})
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 3]
    assert set(FIELDS) <= set(rows[0]) and rows[0]["grad_norm"] == pytest.approx(0.7)
    assert rows[3]["loss"] is None
    assert rows[4]["eval_loss"] == 1.5 and rows[4]["eval_accuracy"] == 0.25
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["config"]["train"]["lr"] == 1e-4 and info["n_params"] == 123
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "transformers"} <= set(info["versions"])
    assert info["devices"]["device_count"] == jax.device_count()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    # Non-tty progress: periodic lines with loss, tokens/s and ETA.
    assert any("step 3/3" in ln and "tok/s" in ln and "ETA" in ln for ln in lines), lines
    assert any(ln.startswith("[eval step 3]") for ln in lines)


def test_resume_drops_later_rows_and_non_main_is_silent(tmp_path):
    with M.MetricsWriter(tmp_path, True, tensorboard=False, progress=False) as w:
        for step in range(1, 6):
            w.write(step, {"loss": 1.0})
    with M.MetricsWriter(tmp_path, True, resume_step=3, tensorboard=False, progress=False) as w:
        w.write(4, {"loss": 0.5})
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    other = tmp_path / "other"
    with M.MetricsWriter(other, False, total_steps=5) as w:
        w.write_run_info({"a": 1})
        w.write(1, FIELDS)
    assert not other.exists()


def test_mfu_formula():
    n, L, T, d = 1_000_000, 4, 512, 128
    attn = 12 * L * d * T
    assert M.model_flops_per_token(n, L, T, d) == 6 * n + attn
    assert M.model_flops_per_token(n, L, T, d, frozen_base=True) == 4 * n + attn
    assert M.model_flops_per_token(n, L, T, d, frozen_base=True, n_trainable_params=1000) == 4 * n + 6000 + attn
    assert M.model_flops_per_token(n, L, T, d, n_lookup_params=65536) == 6 * (n - 65536) + attn
    # Llama-2-7B-ish: 6.5e9 matmul params, 32 layers, d=4096, T=4096 -> 3.96e10 + 0.64e10 = 4.6e10 FLOPs/token.
    f = M.model_flops_per_token(6_738_000_000, 32, 4096, 4096, n_lookup_params=32000 * 4096)
    assert 4.55e10 < f < 4.65e10
    assert M.mfu(f, 1000.0, 989e12, 1) == pytest.approx(f * 1000 / 989e12)
    assert M.mfu(1e9, 100.0, 1e12, 4) == pytest.approx(0.025)


def test_peak_flops_table_and_measure():
    class Dev:
        platform = "tpu"
        device_kind = "TPU v5 lite"

    assert M.peak_flops_per_device(device=Dev()) == 197e12
    Dev.device_kind = "TPU v5"
    assert M.peak_flops_per_device(device=Dev()) == 459e12
    Dev.device_kind, Dev.platform = "NVIDIA H100 80GB HBM3", "gpu"
    assert M.peak_flops_per_device(device=Dev()) == 989e12
    for kind, peak in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA L4", 121e12), ("NVIDIA A100-SXM4-80GB", 312e12)):
        Dev.device_kind = kind
        assert M.peak_flops_per_device(device=Dev()) == peak, kind
    Dev.device_kind = "Some New Chip"
    assert math.isnan(M.peak_flops_per_device(device=Dev()))
    assert M.peak_flops_per_device(override=5e12, device=Dev()) == 5e12
    assert M.peak_flops_per_device() == M.CPU_PEAK_FLOPS["float32"]  # tests run on CPU
    peak = M.measure_matmul_peak("float32", size=256, repeats=2)
    assert 1e8 < peak < 1e13


def test_compile_counter():
    x3, x4 = jnp.ones(3), jnp.ones(4)  # create inputs first: eager ops compile too

    def train_step(x):
        return x * 2 + 1

    f = jax.jit(train_step)
    with M.CompileCounter("train_step") as c:
        f(x3).block_until_ready()
        assert c.count == 1 and c.names == ["jit(train_step)"] and c.seconds > 0
        c.reset()
        f(x3).block_until_ready()
        assert c.count == 0
        f(x4).block_until_ready()
        assert c.count == 1
        jax.jit(lambda x: x - 1)(x3)  # not matched by the filter
        assert c.count == 1
    with M.CompileCounter() as everything:
        jax.jit(lambda x: x - 2)(x3)
        assert everything.count == 1
    f(jnp.ones(5))
    assert everything.count == 1  # closed: no longer listening

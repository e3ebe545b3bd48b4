#!/usr/bin/env python
"""Tokens/s and MFU of sft_jax's train step on one accelerator: a Llama-3.2-1B-shaped model, bf16.

    python bench/accel_mfu.py [--modes full,lora] [--seq 2048] [--batch 8] [--steps 12]
                              [--remat none,save_dots,full] [--out bench/accel_mfu_<card>.json]
    python bench/accel_mfu.py --toy      # a 2-layer model on CPU: the smoke run tests/ uses
    python bench/accel_mfu.py --modes full --policy attention=pallas  # model policy overrides (GPU: the
                                                                       # Pallas/Triton attention kernel)

The model has Llama-3.2-1B's shapes (`configs/shapes/llama3_2_1b/config.json`: hidden 2048, 16 layers,
32 / 8 heads, MLP 8192, vocab 128256, tied embeddings, llama3 RoPE), random weights; bf16 compute,
scanned layers. Full fine-tuning keeps float32 master weights and AdamW state; LoRA (r 16, alpha 32, all
linear layers) freezes a bf16 base. Data: synthetic rows of `--seq` tokens packed with examples of
LIMA-like lengths (log-normal, median ~420 tokens, 60% of tokens trained), each a learnable sequence
(next id = id + 7) so that the loss falls; values do not change the speed. One device (the issue's
single-card row), chunked cross-entropy (no [rows, T, vocab] logits).

For each mode the script tries the `--remat` policies in order and keeps the first that fits (an
out-of-memory compile/run is recorded and the next policy tried; any other error is printed and ends that
mode). Every run, and the device probe, is its own process: each starts with the whole device memory
(`XLA_PYTHON_CLIENT_MEM_FRACTION` 0.92 unless set) and its own peak-memory counter. It prints and records: the device kind, the card's
bf16 dense peak (vendor numbers: `sft_jax.metrics.PEAK_FLOPS`, the trainer's MFU table) and a bf16
matmul rate measured here, compile time, median step time (steps 2..N), real tokens/s, model FLOPs per
step and MFU, and peak device memory. (XLA's `cost_analysis` is not used: it counts a scanned layer's
body once.)

Model FLOPs per step (PaLM's convention, as bench/vs_trl.py and `sft_jax.metrics`): 6 N per real token
for full fine-tuning, 4 N + 6 N_lora for LoRA (no weight gradients for the frozen base), N = the matmul
parameters incl. the (tied) LM head; plus 12 L d n^2 per packed example of n tokens (attention scores
and values, forward + backward, not halved for causality; per example, the work a segment-skipping
attention needs, where the trainer's own MFU counts the whole row). MFU = model FLOP/s / card peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 512,
       "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def card_peak(dev) -> float | None:
    """The vendor bf16 dense peak of an accelerator (`sft_jax.metrics.PEAK_FLOPS`, the trainer's MFU table);
    None on CPU or for a kind the table lacks."""
    import math

    from sft_jax import metrics

    if dev.platform == "cpu":
        return None
    peak = metrics.peak_flops_per_device(dtype="bfloat16", device=dev)
    return None if math.isnan(peak) else peak


def matmul_params(mc) -> int:
    d, hd = mc.hidden_size, mc.head_dim
    per_layer = d * mc.num_heads * hd + 2 * d * mc.num_kv_heads * hd + mc.num_heads * hd * d + 3 * d * mc.intermediate_size
    return mc.num_layers * per_layer + d * mc.vocab_size


def lora_params(mc, r: int) -> int:
    d, hd, i = mc.hidden_size, mc.head_dim, mc.intermediate_size
    dims = [(d, mc.num_heads * hd), (d, mc.num_kv_heads * hd), (d, mc.num_kv_heads * hd), (mc.num_heads * hd, d),
            (d, i), (d, i), (i, d)]
    return mc.num_layers * sum(r * (a + b) for a, b in dims)


def step_flops(mc, seg_lens: list[int], lora_rank: int) -> float:
    n_tok = sum(seg_lens)
    n = matmul_params(mc)
    dense = (4 * n + 6 * lora_params(mc, lora_rank)) if lora_rank else 6 * n
    attn = sum(12 * mc.num_layers * mc.num_heads * mc.head_dim * s * s for s in seg_lens)
    return dense * n_tok + attn


def synthetic_batches(n_batches: int, rows: int, seq: int, vocab: int, seed: int = 0):
    """Packed rows: examples of log-normal lengths (LIMA-like) laid end to end; the last 60% of each
    example trained. Returns [(batch dict, segment lengths)]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        b = {k: np.zeros((rows, seq), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        b["loss_mask"] = np.zeros((rows, seq), np.float32)
        lens = []
        for r in range(rows):
            col, s = 0, 0
            while seq - col >= 16:
                n = int(min(max(16, rng.lognormal(np.log(420), 0.8)), seq - col))
                ids = 3 + (int(rng.integers(0, vocab)) + 7 * np.arange(n + 1)) % (vocab - 3)  # learnable
                b["inputs"][r, col:col + n] = ids[:-1]
                b["targets"][r, col:col + n] = ids[1:]
                b["loss_mask"][r, col + int(0.4 * n):col + n] = 1
                s += 1
                b["segment_ids"][r, col:col + n] = s
                b["positions"][r, col:col + n] = np.arange(n)
                lens.append(n)
                col += n
        out.append((b, lens))
    return out


def measure_bf16_peak(n: int, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def peak_memory(dev) -> int | None:
    try:
        st = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001  (CPU: not implemented)
        return None
    return st.get("peak_bytes_in_use")


def is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def run_mode(mc_json: dict, mode: str, remat: str, a, batches) -> dict:
    import jax
    import jax.numpy as jnp

    from sft_jax import config as config_lib
    from sft_jax import optim
    from sft_jax import peft
    from sft_jax import sharding as sharding_lib
    from sft_jax import train_step as ts
    from sft_jax.models import llama
    from sft_jax.models.config import ModelConfig

    lora = mode == "lora"
    policy = dict(dtype="bfloat16", param_dtype="bfloat16" if lora else "float32", scan_layers=True, remat=remat)
    for kv in filter(None, a.policy.split(",")):  # e.g. attention=dense,attention_block=512
        k, v = kv.split("=")
        policy[k] = int(v) if v.isdigit() else v
    mc = ModelConfig.from_hf(mc_json, **policy)
    cfg = config_lib.default_config()
    cfg.train.lr = a.lr or (2e-4 if lora else 1e-5)
    cfg.train.schedule = "constant"
    cfg.train.warmup_steps = 0
    dev = jax.devices()[0]
    params = llama.init_params(mc, jax.random.key(0))
    method = peft.Lora(rank=a.lora_rank, alpha=2.0 * a.lora_rank, targets="all-linear") if lora else peft.Full()
    trainable, frozen = method.init(params, mc, jax.random.key(1))
    del params
    optimizer, sched = optim.make_optimizer(cfg.train, 10**6)
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[dev])
    st = ts.make_train_step(mc, mesh, trainable=trainable, frozen=frozen, optimizer=optimizer, schedule=sched,
                            method=method, opts=ts.StepOptions(loss_chunk_size=a.loss_chunk),
                            batch_size=a.batch)
    trainable = jax.device_put(trainable, st.shardings.trainable)
    frozen = jax.device_put(frozen, st.shardings.frozen) if frozen else frozen
    opt_state = sharding_lib.init_opt_state(optimizer, trainable, st.shardings.opt_state)
    put = lambda b: jax.device_put({k: b[k] for k in ts.BATCH_KEYS}, st.shardings.batch)  # noqa: E731
    rng = jax.random.key(2)
    t0 = time.perf_counter()
    compiled = st.train_step.lower(trainable, frozen, opt_state, put(batches[0][0]), rng).compile()
    compile_s = time.perf_counter() - t0
    times, losses, flops, tokens = [], [], [], []
    for i, (b, lens) in enumerate(batches[: a.steps]):
        batch = put(b)
        jax.block_until_ready(batch)
        t = time.perf_counter()
        trainable, opt_state, m = compiled(trainable, frozen, opt_state, batch, jax.random.fold_in(rng, i))
        losses.append(float(m["loss"]))
        times.append(time.perf_counter() - t)
        flops.append(step_flops(mc, lens, a.lora_rank if lora else 0))
        tokens.append(int(sum(lens)))
    steady = times[1:] or times
    med = statistics.median(steady)
    tok_s = statistics.mean(tokens) / med
    fl_s = statistics.mean(flops) / med
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    return {"mode": mode, "remat": remat, "compile_s": compile_s, "first_step_s": times[0], "step_s": times,
            "median_step_s": med, "tokens_per_step": tokens, "tokens_per_s": tok_s, "model_flops_per_step":
            statistics.mean(flops), "model_flops_per_s": fl_s, "losses": losses,
            "trainable_params": int(n_train), "matmul_params": matmul_params(mc),
            "peak_memory_bytes": peak_memory(dev)}


def _device_info(a) -> dict:
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(), "jax": jax.__version__,
            "card_peak": card_peak(dev), "measured_bf16_peak": measure_bf16_peak(a.peak_n)}


def _child(a, mc_json, what: str, out: Path) -> None:
    """One measurement in this (fresh) process: `info` (device, peaks) or `MODE:REMAT` (one training run).
    Writes {"info"} / {"row"} / {"oom": message} as JSON to `out`."""
    if what == "info":
        out.write_text(json.dumps({"info": _device_info(a)}))
        return
    mode, remat = what.split(":")
    batches = synthetic_batches(a.steps, a.batch, a.seq, mc_json["vocab_size"])
    try:
        if os.environ.get("ACCEL_MFU_FAKE_OOM") == remat:  # tests: exercise the remat fallback without a GPU
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory (ACCEL_MFU_FAKE_OOM)")
        row = run_mode(mc_json, mode, remat, a, batches)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        out.write_text(json.dumps({"oom": str(e).splitlines()[0][:300]}))
        return
    out.write_text(json.dumps({"row": row}))


def _spawn(argv: list[str], what: str) -> dict:
    """Run `_child(what)` in a new process: each run starts with the whole device memory and its own peak-memory
    counter (jax cannot reset either), and the parent never touches the accelerator."""
    import subprocess
    import tempfile

    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # as launch/gpu_slurm.sh (default 0.75)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "child.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", what,
                               "--child-out", str(out)], env=env, capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true", help="2-layer toy model, T 128, batch 2, 5 steps (CPU smoke run)")
    ap.add_argument("--shapes", default=str(ROOT / "configs" / "shapes" / "llama3_2_1b" / "config.json"))
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--remat", default="none,save_dots,full", help="policies to try in order")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.0, help="0: 1e-5 full, 2e-4 LoRA")
    ap.add_argument("--loss-chunk", type=int, default=256, help="chunked cross-entropy: positions per chunk (x rows)")
    ap.add_argument("--peak-n", type=int, default=8192, help="matmul size of the measured bf16 peak")
    ap.add_argument("--policy", default="", help="model policy overrides, e.g. attention=dense,attention_block=512")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (a quick smoke run)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.toy:
        a.seq, a.batch, a.steps, a.peak_n, a.loss_chunk, a.lr = 128, 2, 5, 512, 64, a.lr or 3e-3
        mc_json = dict(TOY)
    else:
        mc_json = json.loads(Path(a.shapes).read_text())
    if a.layers:
        mc_json["num_hidden_layers"] = a.layers
    if a.child:
        return _child(a, mc_json, a.child, Path(a.child_out))

    info = _spawn(argv, "info")
    if "info" not in info:
        raise RuntimeError(f"accel_mfu: the device probe failed: {info.get('error')}")
    info = info["info"]
    spec, measured = info["card_peak"], info["measured_bf16_peak"]
    peak = spec or measured
    print(f"# bench/accel_mfu.py {' '.join(argv)}")
    print(f"# device: {info['platform']} {info['kind']} x{info['count']}  jax {info['jax']}  "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# bf16 peak: card {spec / 1e12 if spec else float('nan'):.0f} TFLOP/s (vendor, dense), measured "
          f"{measured / 1e12:.1f} TFLOP/s ({a.peak_n}^3 matmul); MFU below is against "
          f"{'the card' if spec else 'the measured peak (no card entry)'}")
    batches = synthetic_batches(a.steps, a.batch, a.seq, mc_json["vocab_size"])  # the children make the same
    print(f"# model {Path(a.shapes).parent.name if not a.toy else 'toy'}, {mc_json['num_hidden_layers']} layers: "
          f"rows {a.batch} x T {a.seq}, {statistics.mean(sum(ls) for _, ls in batches):.0f} real tokens/step, "
          f"steps {a.steps}; each run in its own process", flush=True)
    results = {"device": {k: info[k] for k in ("platform", "kind", "count")}, "jax": info["jax"],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "card_peak": spec,
               "measured_bf16_peak": measured, "args": {k: v for k, v in vars(a).items() if not k.startswith("child")},
               "rows": []}
    print("mode  remat      compile s  step s  tokens/s   model TFLOP/s  MFU     peak mem GiB  loss first->last",
          flush=True)
    for mode in [m for m in a.modes.split(",") if m]:
        for remat in [r for r in a.remat.split(",") if r]:
            res = _spawn(argv, f"{mode}:{remat}")
            if "row" not in res:
                why = "out of memory: " + res["oom"] if "oom" in res else "failed: " + res["error"]
                print(f"{mode:5s} {remat:9s}  {why.splitlines()[0][:160]}" + ("" if "oom" in res else
                      "\n" + res["error"][-1500:]), flush=True)
                results["rows"].append({"mode": mode, "remat": remat, "error": why})
                if "oom" in res:
                    continue  # the next remat policy
                break  # any other failure: this mode is done
            row = res["row"]
            row["mfu"] = row["model_flops_per_s"] / peak
            results["rows"].append(row)
            mem = row["peak_memory_bytes"]
            print(f"{mode:5s} {row['remat']:9s}  {row['compile_s']:9.1f}  {row['median_step_s']:6.3f}  "
                  f"{row['tokens_per_s']:9.0f}  {row['model_flops_per_s'] / 1e12:13.2f}  {row['mfu']:6.1%}  "
                  f"{mem / 2**30 if mem else float('nan'):12.1f}  "
                  f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}", flush=True)
            break
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(f"# wrote {a.out}")
    return results


if __name__ == "__main__":
    main()

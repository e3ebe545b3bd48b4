#!/usr/bin/env python
"""DoRA / QDoRA with and without the fused CPU kernels, next to LoRA: paired forward+backward step times.

    python bench/dora_fused.py [--reps 7] [--steps 5] [--out bench/dora_fused.json]

Model: stories260K's shapes (dim 64, 5 layers, 8 heads / 4 KV heads, MLP 172, vocab 512), random init,
float32, `model.kernels=cpu`, batch 8 x 256 tokens, adapters r 8 alpha 16 on every projection (the
bench/methods.py setting). One step = `jax.value_and_grad` of the mean token cross-entropy w.r.t. the
trainable tree (the optimizer update is the same for every row and left out). Rows:

* `lora`: LoRA (fused q/k/v and gate/up dots with the low-rank terms inside);
* `dora`: DoRA as now: the same fused dots, then the per-column scale m / ||W + s A B||_c (`LowRank.out_scale`);
* `dora-unfused`: DoRA as before this change (`low_rank` None: every adapted projection through DoRA's own
  `linear`, i.e. separate base, A and B dots per projection);
* `qdora` / `qdora-unfused`: the same on the NF4 base.

The rows are interleaved (rep 1: every row, rep 2: every row, ...) so that machine load hits them alike;
reported: median seconds per step over the reps, and each row / lora.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sft_jax import peft  # noqa: E402
from sft_jax.models import llama  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402


class DoraUnfused(peft.Dora):
    def low_rank(self, call):  # the state before DoRA stated its projections as LowRank
        return None


class QDoraUnfused(peft.QDora):
    def low_rank(self, call):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "bench" / "dora_fused.json"))
    args = ap.parse_args()

    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=5, num_heads=8,
                      num_kv_heads=4, max_position_embeddings=512, kernels="cpu")
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    kw = dict(rank=8, alpha=16.0)
    methods = {"lora": peft.Lora(**kw), "dora": peft.Dora(**kw), "dora-unfused": DoraUnfused(**kw),
               "qdora": peft.QDora(**kw), "qdora-unfused": QDoraUnfused(**kw)}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (args.batch, args.length)), jnp.int32)

    steps = {}
    for name, m in methods.items():
        trainable, frozen = m.init(params, cfg, jax.random.PRNGKey(1))
        trainable = jax.tree.map(lambda x: x + 0.01, trainable)

        def loss(t, frozen, ids, m=m):  # frozen and the batch are arguments, as in the train step
            logp = jax.nn.log_softmax(m.forward(t, frozen, cfg, ids)[:, :-1].astype(jnp.float32), -1)
            return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

        fn = jax.jit(jax.value_and_grad(loss))
        jax.block_until_ready(fn(trainable, frozen, ids))  # compile
        steps[name] = (fn, (trainable, frozen, ids))

    times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(args.reps):
        for name, (fn, fargs) in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = fn(*fargs)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / args.steps)
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"# stories260K shapes, batch {args.batch} x {args.length}, f32, kernels=cpu, r8; {args.reps} reps x "
          f"{args.steps} steps; loadavg {load}")
    print(f"{'row':<14} {'s/step':>8} {'x lora':>7}")
    for n in methods:
        print(f"{n:<14} {med[n]:8.4f} {med[n] / med['lora']:7.2f}")
    Path(args.out).write_text(json.dumps({"median_s": med, "all_s": times, "loadavg": load,
                                          "batch": args.batch, "length": args.length}, indent=1) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""A/B two sft_jax train-step variants in one process, steps interleaved (A, B, A, B, ...).

    python bench/ab_step.py --size medium --mode lora --a "" --b "attention_block=256" [--steps 8]
    python bench/ab_step.py --a "micro=1" --b "micro=8"

Each variant is `key=value,...`: model policy overrides (as profile_step's --policy) plus `micro=M`
(gradient-accumulation micro-batches), `chunk=N` (chunked cross-entropy), `unroll=N` (`sft_jax.kernels.flash_attention.UNROLL`), an integer
constant of that module as `attn.NAME=N`, `cpu.NAME=N` (sft_jax.kernels.cpu), `llama.NAME=N`,
and XLA compiler options by name (`xla_cpu_experimental_ynn_fusion_type=` compiles that variant's step with
an empty YNNPACK fusion list: dots go to Eigen). On a shared or throttled machine the speed of the whole box
drifts by tens of percent within minutes, so separate runs cannot resolve a 5-10% change; paired,
interleaved steps on the same batches can. Prints each variant's step times and the median of the
per-pair ratios B/A (< 1: B is faster). A development aid; no baseline of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step as P  # noqa: E402
import vs_trl as V  # noqa: E402


def parse(spec):
    policy, micro, unroll, xla, attn, chunk = {}, 1, None, {}, {}, 0
    for kv in filter(None, spec.split(",")):
        k, v = kv.split("=")
        if k.startswith("xla_"):
            xla[k] = v
        elif k == "micro":
            micro = int(v)
        elif k == "chunk":
            chunk = int(v)
        elif k == "unroll":
            unroll = int(v)
        elif k.startswith(("attn.", "cpu.", "llama.")):  # a constant of sft_jax.kernels.flash_attention / cpu / llama
            attn[k] = int(v)
        else:
            policy[k] = int(v) if v.isdigit() else v
    if unroll is not None:
        attn["attn.UNROLL"] = unroll
    return policy, (micro, chunk), attn, xla


def with_compiler_options(st, options):
    """`st` (vs_trl.setup_sft_jax's Steps) whose train_step is compiled with XLA `options` on first call."""
    if not options:
        return st
    compiled = {}

    def step(*args):
        if "f" not in compiled:
            compiled["f"] = st.train_step.lower(*args).compile(compiler_options=options)
        return compiled["f"](*args)

    return st._replace(train_step=step)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="medium", choices=list(V.SIZES))
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--a", default="")
    ap.add_argument("--b", default="")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    a = ap.parse_args(argv)

    import tempfile

    import numpy as np

    from sft_jax import train_step as ts

    size = V.SIZES[a.size]
    mdir = Path(tempfile.gettempdir()) / f"sft_jax_profile_{a.size}"
    if not (mdir / "config.json").exists():
        convs, _ = V.load_conversations()
        tok = V.build_tokenizer(convs, size["vocab"], mdir / "tok")
        V.build_model(size, tok, mdir, 2048)
    batches = P.synthetic_batches(a.steps + 1, a.batch, a.max_length, size["vocab"])
    from sft_jax.kernels import cpu, flash_attention
    from sft_jax.models import llama

    mods = {"attn": flash_attention, "cpu": cpu, "llama": llama}

    gens, times, consts = [], [], []
    for spec in (a.a, a.b):
        policy, micro, attn, xla = parse(spec)
        consts.append(attn)
        state = V.setup_sft_jax(mdir, batch_size=a.batch, lora=a.mode == "lora", lr=1e-3, steps=10**6, seed=0,
                                policy=policy, step_opts=ts.StepOptions(micro_batches=micro[0], loss_chunk_size=micro[1]))
        gens.append(V.sft_jax_steps(with_compiler_options(state[0], xla), *state[1:], batches))
        times.append([])
    def put(k, v):
        m, name = k.split(".")
        setattr(mods[m], name, v)

    defaults = {k: getattr(mods[k.split(".")[0]], k.split(".")[1]) for c in consts for k in c}
    for i in range(a.steps + 1):
        for g, t, c in zip(gens, times, consts):
            for k, v in {**defaults, **c}.items():  # read when the step is traced (its first call)
                put(k, v) if k in c else setattr(mods[k.split(".")[0]], k.split(".")[1], v)
            t.append(next(g)[1])
    for k, v in defaults.items():
        setattr(mods[k.split(".")[0]], k.split(".")[1], v)
    ta, tb = np.array(times[0][1:]), np.array(times[1][1:])
    toks = np.mean([float((b["segment_ids"] > 0).sum()) for b in batches[1:]])
    print(f"# {a.size} {a.mode} load={V.uptime_load()}")
    for name, spec, t in (("A", a.a, ta), ("B", a.b, tb)):
        print(f"{name} [{spec}] step s: {[round(float(x), 3) for x in t]}  median {np.median(t):.3f}  "
              f"{toks / np.median(t):.0f} tok/s")
    r = tb / ta
    print(f"B/A per pair: {[round(float(x), 3) for x in r]}  median {np.median(r):.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time and profile sft_jax's train step alone (no TRL): where does a step's time go?

    python bench/profile_step.py --size medium --mode lora [--policy dtype=bfloat16,attention=dense]
                                 [--steps 8] [--profile] [--hlo /tmp/step_hlo.txt]

Builds bench/vs_trl.py's model of that size (random init, cached under /tmp/sft_jax_profile_<size>),
makes synthetic packed batches (B 8 x T 512, examples of 150-1200 tokens, 60% of labels trained;
the data values do not change the speed), runs the jitted step and prints per-step wall times.
`--profile` traces the last two steps with `jax.profiler` and prints the time per XLA op kind and
the top ops by (kind, HLO op_name, shape), read from the compiled HLO. This is the tool behind
bench/README.md's "Speed work" tables; it is a development aid, not a comparison (no baseline).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl as V  # noqa: E402  (sets the env vars and sys.path first)


def synthetic_batches(n, B, T, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(B):
            lens, t = [], 0
            while t < T:
                k = min(int(rng.integers(150, 1200)), T - t + 1)
                lens.append(k)
                t += k - 1
                if T - t < 20:
                    break
            ids = rng.integers(5, vocab, sum(lens)).tolist()
            lab = [x if rng.random() < 0.6 else -100 for x in ids]
            rows.append({"input_ids": ids, "labels": lab, "seq_lengths": lens})
        out.append(V.rows_to_batch(rows, T)[0])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="medium", choices=list(V.SIZES))
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--policy", default="", help="model policy overrides, e.g. dtype=bfloat16,attention_block=128")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--hlo", default=None, help="also write the compiled step's HLO text here")
    ap.add_argument("--top", type=int, default=30, help="how many (op kind, name, shape) rows to print")
    ap.add_argument("--kinds", default="", help="only these op kinds in the top rows (comma-separated prefixes)")
    a = ap.parse_args(argv)
    policy = {}
    for kv in filter(None, a.policy.split(",")):
        k, v = kv.split("=")
        policy[k] = int(v) if v.isdigit() else v

    import jax
    import numpy as np

    size = V.SIZES[a.size]
    from sft_jax import train_step as ts

    step_opts = ts.StepOptions(micro_batches=a.micro)
    mdir = Path(tempfile.gettempdir()) / f"sft_jax_profile_{a.size}"
    if not (mdir / "config.json").exists():
        convs, _ = V.load_conversations()
        tok = V.build_tokenizer(convs, size["vocab"], mdir / "tok")
        V.build_model(size, tok, mdir, 2048)
    batches = synthetic_batches(a.steps, a.batch, a.max_length, size["vocab"])
    st, tr, fr, opt = V.setup_sft_jax(mdir, batch_size=a.batch, lora=a.mode == "lora", lr=1e-3, steps=10**6,
                                      seed=0, policy=policy, step_opts=step_opts)
    hlo = ""
    if a.hlo or a.profile:
        from sft_jax import train_step as ts

        b0 = jax.device_put({k: batches[0][k] for k in ts.BATCH_KEYS}, st.shardings.batch)
        hlo = st.train_step.lower(tr, fr, opt, b0, jax.random.key(0)).compile().as_text()
        if a.hlo:
            Path(a.hlo).write_text(hlo)
    trace_dir = tempfile.mkdtemp(prefix="sft_jax_trace_")
    times = []
    gen = V.sft_jax_steps(st, tr, fr, opt, batches)
    for i in range(len(batches)):
        if a.profile and i == len(batches) - 2:
            jax.profiler.start_trace(trace_dir)
        times.append(next(gen)[1])
    if a.profile:
        jax.profiler.stop_trace()
    toks = np.mean([float((b["segment_ids"] > 0).sum()) for b in batches[1:]])
    med = float(np.median(times[1:]))
    print(f"# {a.size} {a.mode} policy={policy} micro={a.micro} load={V.uptime_load()}")
    print(f"step s: {[round(t, 3) for t in times]}  (first includes compilation)")
    print(f"median {med:.3f} s  min {min(times[1:]):.3f} s  {toks / med:.0f} real tok/s")
    if not a.profile:
        return
    f = glob.glob(trace_dir + "/**/*.trace.json.gz", recursive=True)[0]
    events = [e for e in json.load(gzip.open(f))["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    kind, count, op = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e["name"]
        if name.startswith(("$", "end:", "np.", "Pjit")) or "ThunkExecutor" in name:
            continue
        k = re.sub(r"\.\d+$", "", name)
        kind[k] += e["dur"]
        count[k] += 1
        op[name] += e["dur"]
    print("\n# time per XLA op kind (ms per step, mean of the 2 traced steps)")
    for k, v in kind.most_common(20):
        print(f"{v / 2e3:9.1f} ms  {count[k] // 2:6d}x  {k}")
    cat = collections.Counter()
    for k, v in op.items():
        m = re.search(r"%" + re.escape(k) + r" = ([^ ]+) .*?op_name=\"([^\"]*)\"", hlo)
        if m:
            cat[(k.rsplit(".", 1)[0], re.sub(r"layers_\d+", "L", m.group(2)).replace("jit(train_step)/", ""),
                 m.group(1))] += v
        else:  # not found in the compiled HLO text (e.g. a thunk of a nested computation)
            cat[(k.rsplit(".", 1)[0], "(" + k + ": not in the HLO text)", "?")] += v
    print("\n# top (op kind, HLO op_name with layers folded, shape), ms per step")
    kinds = tuple(filter(None, a.kinds.split(",")))
    rows = [(key, v) for key, v in cat.most_common() if not kinds or key[0].startswith(kinds)]
    for (k, name, shape), v in rows[:a.top]:
        print(f"{v / 2e3:8.1f} ms  {k:28s} {shape:26s} {name[:110]}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Packing vs padding with sft_jax's own data pipeline on LIMA, at max_length 512 / 1024 / 2048.

    python bench/packing.py [--quick] [--out bench/packing_results.json]

For each max_length T (global batch B = 4096 // T rows, so every step has 4096 token slots):
  * efficiency: real tokens / token slots over one full epoch of LIMA, as the pipeline batches it
    (`sft_jax.data.pipeline.packing_efficiency`): packed (first-fit, grain), padded with the
    pipeline's length buckets (longest row of the batch rounded up to 64), and padded to T;
  * throughput: sft_jax LoRA (r16, all-linear) train steps on the pipeline's batches
    (`build_train_iterator`), packed vs padded (bucketed); real (non-padding) tokens per second.
    Padded batches change shape from bucket to bucket, and each new shape compiles: steps that
    saw a shape for the first time are excluded from the rate and reported as compiles.
Model and tokenizer: bench/vs_trl.py's "small" Llama (random init) and its BPE tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl as V  # noqa: E402  (sets the env vars and sys.path first)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--size", default="small", choices=list(V.SIZES))
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--slots", type=int, default=4096, help="token slots per step (B = slots // T)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per setting (after compiles)")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    a = ap.parse_args(argv)
    steps = a.steps or (4 if a.quick else 12)

    from sft_jax import config as config_lib
    from sft_jax.data import pipeline

    lima = V.SHARED / "data" / "lima.json"
    if not lima.exists():
        print(f"# SKIP: {lima} not found (this benchmark needs LIMA)")
        return None
    info = V.machine_info()
    print(f"# bench/packing.py {' '.join(sys.argv[1:])}")
    print(f"# machine: nproc={info['nproc']} cpu={info['cpu']} load(1,5,15m)={info['loadavg_start']}")
    print(f"# versions: jax {info['jax']}  date {info['date_utc']}", flush=True)

    convs, _ = V.load_conversations()
    work = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    size = V.SIZES[a.size]
    tok = V.build_tokenizer(convs, size["vocab"], work / "tok")
    mdir = work / "model"
    minfo = V.build_model(size, tok, mdir, 2048)
    print(f"# model {a.size}: {minfo['params'] / 1e6:.2f}M params, {a.mode}; tokenizer BPE {size['vocab']} "
          f"(chatml); data LIMA {lima}; {steps} timed steps per setting", flush=True)

    results = {"machine": info, "size": a.size, "mode": a.mode, "steps": steps, "rows": []}
    print(f"\n{'T':>5s} {'B':>3s} {'eff packed':>10s} {'eff pad(bkt)':>12s} {'eff pad(T)':>10s} "
          f"{'packed tok/s':>12s} {'padded tok/s':>12s} {'speedup':>7s} {'pad compiles':>12s}", flush=True)
    for T in [int(x) for x in a.lengths.split(",")]:
        B = max(a.slots // T, 1)
        cfg = config_lib.default_config()
        cfg.data.path = str(lima)
        cfg.data.tokenizer = str(mdir)
        cfg.data.max_length = T
        cfg.data.eval_fraction = 0.0
        cfg.data.num_workers = 0
        tokenizer, _ = pipeline.tokenizer_from_config(cfg)
        examples, stats = pipeline.examples_for_split(cfg.data, tokenizer)
        eff = {}
        for name, packing in (("packed", True), ("padded_bucketed", False)):
            cfg.data.packing = packing
            eff[name] = pipeline.packing_efficiency(examples, cfg.data, batch_size=B)
        eff["padded_to_T"] = sum(len(e["inputs"]) for e in examples) / (len(examples) * T)
        row = {"T": T, "B": B, "examples": len(examples), "truncated": stats.truncated, "efficiency": eff}
        for name, packing in (("packed", True), ("padded", False)):
            cfg.data.packing = packing
            it = pipeline.build_train_iterator(cfg.data, tokenizer, global_batch_size=B, seed=0,
                                               process_index=0, process_count=1, epochs=None)
            state = V.setup_sft_jax(mdir, batch_size=B, lora=a.mode == "lora", lr=1e-3, steps=10**6, seed=0)
            seen, timed_t, timed_tok, compiles, compile_s, losses = set(), 0.0, 0, 0, 0.0, []

            def batches():
                while len(losses) < 200:
                    yield next(it)

            for loss, wall, _cpu, b in V.sft_jax_steps(*state, batches()):
                losses.append(loss)
                shape = b["inputs"].shape
                if shape not in seen:
                    seen.add(shape)
                    compiles += 1
                    compile_s += wall
                else:
                    timed_t += wall
                    timed_tok += int((b["segment_ids"] > 0).sum())
                    if len(losses) - compiles >= steps:
                        break
            row[name] = {"tokens_per_s": timed_tok / timed_t, "timed_steps": len(losses) - compiles,
                         "compiles": compiles, "compile_s": compile_s, "shapes": sorted(seen),
                         "losses": losses}
        row["speedup"] = row["packed"]["tokens_per_s"] / row["padded"]["tokens_per_s"]
        results["rows"].append(row)
        print(f"{T:5d} {B:3d} {eff['packed']:10.3f} {eff['padded_bucketed']:12.3f} {eff['padded_to_T']:10.3f} "
              f"{row['packed']['tokens_per_s']:12.0f} {row['padded']['tokens_per_s']:12.0f} "
              f"{row['speedup']:7.2f} {row['padded']['compiles']:12d}", flush=True)
    results["machine"]["loadavg_end"] = V.uptime_load()
    print(f"# load at end (1,5,15m): {results['machine']['loadavg_end']}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1, default=str))
        print(f"# wrote {a.out}")
    return results


if __name__ == "__main__":
    main()

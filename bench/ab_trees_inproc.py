#!/usr/bin/env python
"""Two source trees of sft_jax in ONE process: compiled-step comparison and interleaved paired steps.

    python bench/ab_trees_inproc.py --a /path/to/old/tree --b . [--sizes small,medium] [--modes full,lora]
                                    [--steps 12] [--policy dtype=bfloat16,scan_layers=1,remat=full]
                                    [--chunk 128] [--hlo-only] [--out bench/ab_trees_inproc.json]

For each (size, mode) both trees build vs_trl.py's sft_jax step (each tree's own `bench/vs_trl.py`
`setup_sft_jax`: same HF model, optimizer, B 8 x T 512 f32; the trees' `sft_jax` packages are imported
one after the other into this process, the first one's modules dropped from `sys.modules` before the
second is imported; the jitted functions keep their own module globals). Then:

1. **Compiled step, load-free**: `lower(...).compile()` of both steps, `cost_analysis()` (flops, bytes)
   and the optimized HLO compared instruction by instruction (instruction names and metadata
   stripped, in schedule order): the instructions only A / only B has are printed. Identical compiled
   programs cannot differ in speed except through the host (dispatch, data placement).
2. **Paired timing** (not with `--hlo-only`): the compiled executables of 1. are called (no second
   compilation); after one untimed step each, steps run A B B A A B ... on the
   same synthetic packed batches (`profile_step.synthetic_batches`), so the drift of a shared machine
   hits both sides alike; the result is the median of the per-pair time ratios A/B as a tokens/s ratio
   B/A (> 1: B is faster), and the largest |loss A - loss B| over the steps (same init, same batches).

A development aid beside `bench/ab_trees.py` (which runs each tree's whole `vs_trl.py --quick` in its own
process, alternating processes, and so also sees import/process effects, and TRL).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def import_tree(tree: Path):
    """(vs_trl, profile_step, train_step) of `tree`, after dropping any other tree's modules."""
    for name in list(sys.modules):
        if name == "sft_jax" or name.startswith("sft_jax.") or name in ("vs_trl", "profile_step"):
            del sys.modules[name]
    for p in list(sys.path):
        if p.rstrip("/").endswith(("/bench",)) or (Path(p) / "sft_jax").is_dir():
            sys.path.remove(p)
    sys.path[:0] = [str(tree / "bench"), str(tree)]
    import profile_step  # noqa: F401  (imports vs_trl too)
    import vs_trl

    from sft_jax import train_step

    import sft_jax

    assert Path(sft_jax.__file__).resolve().is_relative_to(tree.resolve()), (sft_jax.__file__, tree)
    return vs_trl, profile_step, train_step


def normalized_hlo(text: str) -> list[str]:
    """Instructions of an optimized HLO module in schedule order, names/metadata stripped."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.*)", line)
        if not m:
            continue
        s = re.sub(r", metadata=\{.*", "", m.group(1))
        out.append(re.sub(r"%[A-Za-z0-9_.\-]+", "%X", s))
    return out


def hlo_diff(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    import difflib

    only_a, only_b = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            only_a += a[i1:i2]
        if tag in ("replace", "insert"):
            only_b += b[j1:j2]
    return only_a, only_b


def build_model(size_name: str, size: dict, work: Path) -> Path:
    """The HF model of that size (random init, seed 0), without a tokenizer (the step needs none)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / f"model_{size_name}"
    if not (out / "config.json").exists():
        cfg = LlamaConfig(
            vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv"],
            head_dim=size["hidden"] // size["heads"], max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=size.get("tied", False), bos_token_id=None, eos_token_id=None, pad_token_id=None)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(str(out), safe_serialization=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="tree A (baseline): a directory with sft_jax/ and bench/")
    ap.add_argument("--b", required=True, help="tree B")
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per side (after one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--policy", default="", help="model policy of both sides, e.g. dtype=bfloat16,scan_layers=1,"
                    "remat=full (vs_trl.py's --jax-policy)")
    ap.add_argument("--chunk", type=int, default=0, help="train.loss_chunk_size (chunked cross-entropy; 0: off)")
    ap.add_argument("--hlo-only", action="store_true", help="compare the compiled steps only (no step is run)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    trees = {"A": Path(a.a).resolve(), "B": Path(a.b).resolve()}
    policy = {}
    for kv in filter(None, a.policy.split(",")):
        k, v = kv.split("=")
        policy[k] = bool(int(v)) if k == "scan_layers" else int(v) if v.isdigit() else v
    work = Path(tempfile.mkdtemp(prefix="ab_trees_inproc_"))
    results = {"a": str(trees["A"]), "b": str(trees["B"]), "policy": policy, "chunk": a.chunk,
               "load_start": loadavg(), "rows": []}
    print(f"# bench/ab_trees_inproc.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# A = {trees['A']}  B = {trees['B']}  policy {policy} chunk {a.chunk}  nproc {os.cpu_count()}  "
          f"load {loadavg()}", flush=True)
    for size_name in a.sizes.split(","):
        for mode in a.modes.split(","):
            import jax
            import numpy as np

            sides = {}
            for side, tree in trees.items():
                V, P, ts = import_tree(tree)
                size = V.SIZES[size_name]
                mdir = build_model(size_name, size, work)
                batches = P.synthetic_batches(a.steps + 1, a.batch, a.max_length, size["vocab"])
                st, tr, fr, opt = V.setup_sft_jax(mdir, batch_size=a.batch, lora=mode == "lora", lr=1e-3,
                                                  steps=10**6, seed=0, policy=policy or None,
                                                  step_opts=ts.StepOptions(loss_chunk_size=a.chunk))
                dev = [jax.device_put({k: b[k] for k in ts.BATCH_KEYS}, st.shardings.batch) for b in batches]
                comp = st.train_step.lower(tr, fr, opt, dev[0], jax.random.key(0)).compile()
                ca = comp.cost_analysis()
                ca = ca[0] if isinstance(ca, list) else ca
                text = comp.as_text()
                sides[side] = {"step": comp, "state": [tr, fr, opt], "batches": dev, "hlo": normalized_hlo(text),
                               "flops": float(ca.get("flops", 0)), "bytes": float(ca.get("bytes accessed", 0)),
                               "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
                               "tokens": [float((b["segment_ids"] > 0).sum()) for b in batches]}
            only_a, only_b = hlo_diff(sides["A"]["hlo"], sides["B"]["hlo"])
            row = {"size": size_name, "mode": mode,
                   "flops": [sides[s]["flops"] for s in "AB"], "bytes": [sides[s]["bytes"] for s in "AB"],
                   "hlo_instructions": [len(sides[s]["hlo"]) for s in "AB"],
                   "custom_calls": [sides[s]["custom_calls"] for s in "AB"],
                   "only_a": only_a, "only_b": only_b}
            print(f"\n## {size_name}/{mode}: flops A {row['flops'][0]:.4e} B {row['flops'][1]:.4e}; bytes A "
                  f"{row['bytes'][0]:.4e} B {row['bytes'][1]:.4e}; HLO instructions A {row['hlo_instructions'][0]} "
                  f"B {row['hlo_instructions'][1]}; only in A: {len(only_a)}, only in B: {len(only_b)}; "
                  f"custom calls A {row['custom_calls'][0]} B {row['custom_calls'][1]}", flush=True)
            for tag, lines in (("A", only_a), ("B", only_b)):
                for s in lines[:40]:
                    print(f"  only {tag}: {s[:200]}")
            if not a.hlo_only:
                rng = jax.random.key(0)
                t = {"A": [], "B": []}
                losses = {"A": [], "B": []}

                def run(side, i):
                    sd = sides[side]
                    tr, fr, opt = sd["state"]
                    t0 = time.perf_counter()
                    tr, opt, m = sd["step"](tr, fr, opt, sd["batches"][i], jax.random.fold_in(rng, i))
                    loss = float(m["loss"])
                    dt = time.perf_counter() - t0
                    sd["state"] = [tr, fr, opt]
                    return loss, dt

                for side in "AB":  # one untimed step each (first touch of the buffers)
                    losses[side].append(run(side, 0)[0])
                for i in range(1, a.steps + 1):
                    order = "AB" if i % 2 else "BA"
                    for side in order:
                        loss, dt = run(side, i)
                        losses[side].append(loss)
                        t[side].append(dt)
                ratios = [ta / tb for ta, tb in zip(t["A"], t["B"])]  # = tok/s B / tok/s A (same batch)
                toks = statistics.mean(sides["A"]["tokens"][1:])
                row.update({
                    "step_s_a": t["A"], "step_s_b": t["B"], "ratio_b_over_a": statistics.median(ratios),
                    "ratios": ratios, "tok_s_a": toks / statistics.median(t["A"]),
                    "tok_s_b": toks / statistics.median(t["B"]),
                    "max_abs_dloss": max(abs(x - y) for x, y in zip(losses["A"], losses["B"])),
                    "load": loadavg(),
                })
                print(f"  steps: A median {statistics.median(t['A']):.3f} s ({row['tok_s_a']:.0f} tok/s), "
                      f"B median {statistics.median(t['B']):.3f} s ({row['tok_s_b']:.0f} tok/s); "
                      f"B/A tok/s median of {len(ratios)} pairs {row['ratio_b_over_a']:.3f} "
                      f"(pairs {min(ratios):.2f}..{max(ratios):.2f}); max |dloss| {row['max_abs_dloss']:.1e}; "
                      f"load {row['load']}", flush=True)
            results["rows"].append(row)
            del sides
    results["load_end"] = loadavg()
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(f"# wrote {a.out}")


if __name__ == "__main__":
    main()

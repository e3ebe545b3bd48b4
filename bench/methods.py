#!/usr/bin/env python
"""The fine-tuning methods side by side: same model, same data, same budget, one row per method at its preset.

    python bench/methods.py [--rows full,lora,...|all] [--steps 30] [--jobs 1] [--model PATH] [--out bench/methods_results.json]

Every row trains with `python -m sft_jax.train` (each in its own process, so that its peak memory is its
own) from the method's LIMA preset `configs/lima_<method>.py` (README "Method presets"), on the same base
model (default: stories260K from ../shared, converted with `sft_jax.convert llama2c`) and the same data
(../shared/data/alpaca_en_demo.json, chatml, packed rows of `--max-length`), with the same batch, number of
steps, seed, held-out split and evaluation. What a row takes from its preset: the learning rate (each method at
its literature learning rate is the fair comparison: prompt tuning at 3e-2 and PiSSA at 2e-5 are both what
their papers use), weight decay, grad clipping, Adam betas and the method's own fields. What every row shares
(overrides of the preset): the model in float32 (compute and frozen base; the QLoRA rows quantise it), a
constant schedule at the preset's peak lr without warmup (the presets' decays are spread over 15 LIMA epochs),
and, for the LoRA family (lora, rslora, dora, pissa, qlora, qdora), rank 8 with alpha chosen to keep the
preset's scale alpha/r (alpha/sqrt(r) for rsLoRA): the presets' ranks 16-64 would be 25-100% of stories260K's
width of 64.

Reported per row: the lr used, trainable parameters and their share of the model (run_info.json), steady
tokens/s (median of the logged steps after the first two, which carry compilation), the process's peak
resident memory (ru_maxrss), the train loss at step 1 and at the last step, and the held-out loss before /
after the fixed budget (summary.json), and the machine's load average when the row ended (2 shared cores:
tokens/s and memory move with the load, the losses do not).

Rows are named in ROWS: {row name: (preset, extra --config overrides)}. A row whose preset file, method or
config field is not in this tree is skipped with the reason printed, so the table grows by name as methods
land. `--row NAME=PRESET[:override,override]` adds one ad hoc.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LORA_RANK = 8  # the LoRA family's shared rank on stories260K (see the module docstring)
# row name -> (preset in configs/, extra overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    "full": ("lima", []),
    "lora": ("lima_lora", []),
    "rslora": ("lima_lora", ["--config.peft.lora.rslora=true"]),
    "dora": ("lima_dora", []),
    "pissa": ("lima_pissa", []),
    "pissa-niter4": ("lima_pissa", ["--config.peft.pissa.niter=4"]),
    "qlora-nf4": ("lima_qlora", ["--config.peft.qlora.quant_type=nf4"]),
    "qlora-int8": ("lima_qlora", ["--config.peft.qlora.quant_type=int8"]),
    "qdora-nf4": ("lima_qdora", ["--config.peft.qlora.quant_type=nf4"]),
    "ia3": ("lima_ia3", []),
    "prompt-tuning": ("lima_prompt_tuning", []),
    "p-tuning": ("lima_p_tuning", []),
    "prefix-tuning": ("lima_prefix_tuning", ["--config.peft.prefix_tuning.projection=false"]),
    "prefix-tuning-mlp": ("lima_prefix_tuning", ["--config.peft.prefix_tuning.projection=true"]),
    "bitfit": ("lima_bitfit", []),
    "bottleneck-houlsby": ("lima_bottleneck", ["--config.peft.bottleneck.style=houlsby"]),
    "bottleneck-pfeiffer": ("lima_bottleneck", ["--config.peft.bottleneck.style=pfeiffer"]),
}
# every method of issues 17 and 20 once (pissa-niter4 is an extra)
DEFAULT_ROWS = ("full,lora,rslora,dora,pissa,qlora-nf4,qlora-int8,qdora-nf4,ia3,prompt-tuning,p-tuning,prefix-tuning,"
                "prefix-tuning-mlp,bitfit,bottleneck-houlsby,bottleneck-pfeiffer")


def log(*a):
    print(*a, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def common_args(a, model: str) -> list[str]:
    """The overrides every row shares (model, data, budget, schedule shape, eval)."""
    return [
        f"--config.model.path={model}",
        "--config.model.dtype=float32",
        "--config.model.param_dtype=float32",
        "--config.model.remat=none",
        f"--config.data.path={a.data}",
        "--config.data.template=chatml",
        f"--config.data.max_length={a.max_length}",
        "--config.data.packing=true",
        "--config.data.eval_fraction=0.1",
        f"--config.train.steps={a.steps}",
        f"--config.train.batch_size={a.batch}",
        "--config.train.micro_batches=1",
        "--config.train.epochs=0",
        "--config.train.schedule=constant",
        "--config.train.warmup_steps=0",
        "--config.train.seed=0",
        "--config.eval.every_steps=0",
        "--config.eval.every_epoch=false",
        "--config.eval.max_batches=4",
        "--config.eval.num_generations=0",
        "--config.checkpoint.every_steps=0",
        "--config.checkpoint.keep_best=false",
    ]


def load_preset(preset: str):
    path = REPO / "configs" / f"{preset}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{preset}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def apply_overrides(cfg, overrides: list[str]):
    """`--config.a.b=v` onto the ConfigDict (v parsed by the field's current type); KeyError on an unknown field."""
    for o in overrides:
        key, _, value = o.removeprefix("--config.").partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config field {key!r}")
        old = node[leaf]
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{key}={value!r} is not a bool")
            node[leaf] = value.lower() in ("true", "1")
        elif isinstance(old, int):
            node[leaf] = int(value)
        elif isinstance(old, float):
            node[leaf] = float(value)
        else:
            node[leaf] = value
    return cfg


def resolve(name: str, preset: str, extra: list[str], a, model: str) -> dict:
    """What row `name` runs: its argv for sft_jax.train and its recipe (lr, method, ...), or {"skipped": why}."""
    from sft_jax import peft
    from sft_jax.config import validate

    path = REPO / "configs" / f"{preset}.py"
    if not path.exists():
        return {"skipped": f"configs/{preset}.py is not in this tree"}
    overrides = common_args(a, model) + list(extra)
    try:
        cfg = apply_overrides(load_preset(preset), overrides)
    except (KeyError, ValueError) as e:
        return {"skipped": f"{e.args[0] if e.args else e} (configs/{preset}.py + {' '.join(extra)})"}
    method_name = str(cfg.peft.method)
    if method_name not in peft.METHODS:
        return {"skipped": f"peft.method={method_name!r} is not in this tree's sft_jax.peft.METHODS"}
    method = peft.from_config(cfg.peft)
    if hasattr(method, "rank") and hasattr(method, "alpha") and method.rank != LORA_RANK:
        rslora = bool(getattr(method, "rslora", False))
        scale = method.alpha / (math.sqrt(method.rank) if rslora else method.rank)
        alpha = scale * (math.sqrt(LORA_RANK) if rslora else LORA_RANK)
        family = [f"--config.peft.lora.rank={LORA_RANK}", f"--config.peft.lora.alpha={alpha:.6g}"]
        overrides += family
        cfg = apply_overrides(cfg, family)
        method = peft.from_config(cfg.peft)
    validate(cfg)
    tr = cfg.train
    return {
        "preset": f"configs/{preset}.py", "method": method_name, "describe": method.describe(),
        "argv": [f"--config=configs/{preset}.py", *overrides],
        "lr": float(tr.lr), "weight_decay": float(tr.weight_decay), "grad_clip": float(tr.grad_clip),
        "b1": float(tr.b1), "b2": float(tr.b2),
    }


def child(argv: list[str], out: str) -> int:
    """Run sft_jax.train in this process and write its peak RSS to `out` (JSON)."""
    from sft_jax import train

    rc = train.main(["sft_jax.train", *argv])
    Path(out).write_text(json.dumps({"rc": rc, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return rc or 0


def run_row(name: str, recipe: dict, a, work: Path) -> dict:
    wd = work / name
    rss = work / f"{name}.rss.json"
    argv = [f"--workdir={wd}", *recipe["argv"]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", SFT_JAX_COMPILATION_CACHE="off")
    env.pop("XLA_FLAGS", None)
    base = {"row": name, **{k: recipe[k] for k in ("preset", "method", "describe", "lr", "weight_decay", "grad_clip")}}
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(rss), "--", *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {a.timeout} s", "load": loadavg()}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**base, "error": f"exit {proc.returncode}: " + " | ".join(tail), "load": loadavg()}
    metrics = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if "tokens_per_s" in m]
    info = json.loads((wd / "run_info.json").read_text())
    summary = json.loads((wd / "summary.json").read_text())
    steady = [m["tokens_per_s"] for m in train_rows[2:]] or [m["tokens_per_s"] for m in train_rows]
    return {
        **base, "overrides": recipe["argv"],
        "trainable_params": info.get("trainable_params"), "model_params": info.get("model_params"),
        "tokens_per_s": statistics.median(steady), "maxrss_mib": json.loads(rss.read_text())["maxrss_mib"],
        "steps": len(train_rows), "loss_first": train_rows[0]["loss"], "loss_last": train_rows[-1]["loss"],
        "eval_before": summary.get("eval_before", {}).get("loss"), "eval_after": summary.get("eval_after", {}).get("loss"),
        "load": loadavg(),
    }


def stories260k(work: Path) -> str:
    from sft_jax.models.llama2c import convert_llama2c

    out = work / "stories260K"
    convert_llama2c(str(SHARED / "assets/stories260K/stories260K.bin"), str(SHARED / "assets/stories260K/tok512.model"),
                    str(out))
    return str(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help="comma list of names in ROWS, or 'all' (= the default: " + DEFAULT_ROWS + "; known: "
                    + ",".join(ROWS) + ")")
    ap.add_argument("--row", action="append", default=[], help="NAME=PRESET[:--config.x=1,--config.y=2] (ad hoc row)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default="", help="HF model directory (default: stories260K from ../shared)")
    ap.add_argument("--data", default=str(SHARED / "data" / "alpaca_en_demo.json"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows trained at the same time (separate processes; > 1 only when the budget is short: "
                    "their tokens/s then share the cores)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    names = DEFAULT_ROWS if a.rows == "all" else a.rows
    rows = {}
    for name in filter(None, names.split(",")):
        if name not in ROWS:
            raise SystemExit(f"--rows: unknown row {name!r} (known: {', '.join(ROWS)})")
        rows[name] = ROWS[name]
    for spec in a.row:
        name, _, rest = spec.partition("=")
        preset, _, over = rest.partition(":")
        rows[name] = (preset, [o for o in over.split(",") if o])
    work = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    model = a.model or stories260k(work)
    log(f"# bench/methods.py {' '.join(sys.argv[1:])}")
    log(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, nproc {os.cpu_count()}, load {loadavg()}")
    log(f"# model {a.model or 'stories260K (../shared, converted)'} in float32; data {a.data} (chatml, packed, "
        f"10% held out); fixed budget for every row: {a.steps} steps x batch {a.batch} x {a.max_length} tokens "
        f"= {a.steps * a.batch * a.max_length:,} token slots, seed 0; {a.jobs} row(s) at a time")
    log("# each row = its preset configs/lima_<method>.py (lr, weight decay, grad clip, betas, method fields) with a "
        f"constant schedule at the preset's lr, no warmup; LoRA family at rank {LORA_RANK}, alpha keeping the preset's "
        "alpha/r; held-out loss on 4 batches before / after")
    results, recipes = [], {}
    for name, (preset, extra) in rows.items():
        r = resolve(name, preset, extra, a, model)
        if "skipped" in r:
            log(f"  {name}: skipped: {r['skipped']}")
            results.append({"row": name, "preset": f"configs/{preset}.py", "skipped": r["skipped"]})
            continue
        recipes[name] = r
        log(f"  {name}: {r['preset']} -> {r['describe']}; lr {r['lr']:g}, weight decay {r['weight_decay']:g}, "
            f"grad clip {r['grad_clip']:g}, betas ({r['b1']:g}, {r['b2']:g})")
    def done(r):
        results.append(r)
        if "error" in r:
            log(f"  {r['row']}: FAILED: {r['error']}  (load {r['load']})")
        else:
            log(f"  {r['row']}: {r['trainable_params']} trainable, {r['tokens_per_s']:.0f} tok/s, peak RSS "
                f"{r['maxrss_mib']:.0f} MiB, loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, held-out "
                f"{r['eval_before']:.4f} -> {r['eval_after']:.4f}  (load {r['load']})")

    if a.jobs > 1:  # rows in parallel processes: the losses are unchanged, tokens/s then share the machine
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(a.jobs) as pool:
            for f in as_completed([pool.submit(run_row, n, rec, a, work) for n, rec in recipes.items()]):
                done(f.result())
    else:
        for name, recipe in recipes.items():
            done(run_row(name, recipe, a, work))
    order = {n: i for i, n in enumerate(rows)}
    results.sort(key=lambda r: order.get(r["row"], len(order)))
    log(f"\n{'row':20s} {'method':13s} {'lr':>7s} {'trainable':>10s} {'% model':>8s} {'tok/s':>7s} {'peak RSS':>9s} "
        f"{'loss@1':>7s} {'loss@N':>7s} {'eval@0':>7s} {'eval@N':>7s}  load (1/5/15 min)")
    for r in results:
        if "tokens_per_s" not in r:
            log(f"{r['row']:20s} {r.get('method', '-'):13s} {r.get('skipped') or r.get('error')}")
            continue
        log(f"{r['row']:20s} {r['method']:13s} {r['lr']:7.0e} {r['trainable_params']:10d} "
            f"{100 * r['trainable_params'] / r['model_params']:7.2f}% {r['tokens_per_s']:7.0f} "
            f"{r['maxrss_mib']:5.0f} MiB {r['loss_first']:7.4f} {r['loss_last']:7.4f} {r['eval_before']:7.4f} "
            f"{r['eval_after']:7.4f}  {r['load']}")
    log(f"# load at end {loadavg()}")
    if a.out:
        Path(a.out).write_text(json.dumps({"argv": sys.argv[1:], "steps": a.steps, "batch": a.batch,
                                           "max_length": a.max_length, "lora_rank": LORA_RANK, "jobs": a.jobs,
                                           "rows": results},
                                          indent=1))
        log(f"# wrote {a.out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        out, argv = sys.argv[2], sys.argv[4:]
        sys.exit(child(argv, out))
    main()

#!/usr/bin/env python
"""The fine-tuning methods side by side: same model, same data, same steps, one row per method.

    python bench/methods.py [--rows full,lora,dora,pissa,qlora-nf4,qlora-int8,qdora-nf4] [--steps 40]
                            [--model PATH] [--out bench/methods_results.json]

Every row trains with `python -m sft_jax.train` (each in its own process, so that its peak memory is its
own) on the same base model (default: stories260K from ../shared, converted with `sft_jax.convert llama2c`)
and the same data (../shared/data/alpaca_en_demo.json, chatml, packed rows of `--max-length`), batch,
schedule and seed; only the method (and its learning rate: full fine-tuning 5e-4, the adapters 5e-3) differs.
Reported per row: trainable parameters (run_info.json), steady tokens/s (median of the logged steps after the
first two, which carry compilation), the process's peak resident memory (ru_maxrss), the train loss at the
last step and the held-out loss before / after training (summary.json).

Rows are named in ROWS: {row name: (peft.method, extra --config overrides)}. A row whose method is not in
`sft_jax.peft.METHODS` of this tree is skipped with the reason printed, so the table grows by name as
methods land (issue 20's adapters add their rows here). `--row NAME=METHOD[:override,override]` adds one ad hoc.
"""

from __future__ import annotations

import argparse
import datetime
import json
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

LR_FULL, LR_ADAPTER = 5e-4, 5e-3
# row name -> (peft.method, extra overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", [f"--config.train.lr={LR_FULL}"]),
    "lora": ("lora", []),
    "rslora": ("lora", ["--config.peft.lora.rslora=true"]),
    "dora": ("dora", []),
    "pissa": ("pissa", []),
    "pissa-niter4": ("pissa", ["--config.peft.pissa.niter=4"]),
    "qlora-nf4": ("qlora", ["--config.peft.qlora.quant_type=nf4"]),
    "qlora-int8": ("qlora", ["--config.peft.qlora.quant_type=int8"]),
    "qdora-nf4": ("qdora", ["--config.peft.qlora.quant_type=nf4"]),
    # prompt learning (issue 20): 20 virtual tokens, the presets' learning rates (configs/lima_<method>.py)
    "prompt-tuning": ("prompt_tuning", ["--config.train.lr=3e-2", "--config.peft.prompt_tuning.init_from=vocab"]),
    "p-tuning": ("p_tuning", ["--config.train.lr=3e-2"]),
    "prefix-tuning": ("prefix_tuning", ["--config.train.lr=1e-2"]),
    "prefix-tuning-mlp": ("prefix_tuning", ["--config.train.lr=1e-2", "--config.peft.prefix_tuning.projection=true"]),
}
DEFAULT_ROWS = "full,lora,dora,pissa,qlora-nf4,qlora-int8,qdora-nf4,prompt-tuning,p-tuning,prefix-tuning,prefix-tuning-mlp"


def log(*a):
    print(*a, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def common_args(a, model: str) -> list[str]:
    """The overrides every row shares (model, data, batch, schedule, eval)."""
    return [
        "--config=configs/lima.py",
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
        "--config.train.epochs=0",
        f"--config.train.lr={LR_ADAPTER}",
        "--config.train.end_lr=0.0",
        "--config.train.schedule=constant",
        "--config.train.warmup_steps=0",
        "--config.train.seed=0",
        "--config.peft.lora.rank=8",
        "--config.peft.lora.alpha=16",
        "--config.peft.lora.dropout=0.0",
        "--config.peft.lora.targets=all-linear",
        "--config.eval.every_steps=0",
        "--config.eval.max_batches=4",
        "--config.eval.num_generations=0",
        "--config.checkpoint.every_steps=0",
    ]


def child(argv: list[str], out: str) -> int:
    """Run sft_jax.train in this process and write its peak RSS to `out` (JSON)."""
    from sft_jax import train

    rc = train.main(["sft_jax.train", *argv])
    Path(out).write_text(json.dumps({"rc": rc, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return rc or 0


def run_row(name: str, method: str, extra: list[str], a, model: str, work: Path) -> dict:
    wd = work / name
    rss = work / f"{name}.rss.json"
    argv = [f"--workdir={wd}", *common_args(a, model), f"--config.peft.method={method}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", SFT_JAX_COMPILATION_CACHE="off")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, "--child", str(rss), "--", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"row": name, "method": method, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    metrics = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if "tokens_per_s" in m]
    info = json.loads((wd / "run_info.json").read_text())
    summary = json.loads((wd / "summary.json").read_text())
    steady = [m["tokens_per_s"] for m in train_rows[2:]] or [m["tokens_per_s"] for m in train_rows]
    return {
        "row": name, "method": method, "overrides": extra,
        "trainable_params": info.get("trainable_params"), "model_params": info.get("model_params"),
        "tokens_per_s": statistics.median(steady), "maxrss_mib": json.loads(rss.read_text())["maxrss_mib"],
        "loss_first": train_rows[0]["loss"], "loss_last": train_rows[-1]["loss"],
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
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of names in ROWS (known: " + ",".join(ROWS) + ")")
    ap.add_argument("--row", action="append", default=[], help="NAME=METHOD[:--config.x=1,--config.y=2] (ad hoc row)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default="", help="HF model directory (default: stories260K from ../shared)")
    ap.add_argument("--data", default=str(SHARED / "data" / "alpaca_en_demo.json"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from sft_jax.peft import METHODS

    rows = {}
    for name in filter(None, a.rows.split(",")):
        if name not in ROWS:
            raise SystemExit(f"--rows: unknown row {name!r} (known: {', '.join(ROWS)})")
        rows[name] = ROWS[name]
    for spec in a.row:
        name, _, rest = spec.partition("=")
        method, _, over = rest.partition(":")
        rows[name] = (method, [o for o in over.split(",") if o])
    work = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    model = a.model or stories260k(work)
    log(f"# bench/methods.py {' '.join(sys.argv[1:])}")
    log(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, nproc {os.cpu_count()}, load {loadavg()}")
    log(f"# model {a.model or 'stories260K (../shared, converted)'}; data {a.data}; {a.steps} steps x batch {a.batch} "
        f"x {a.max_length} tokens (packed), constant lr (full {LR_FULL}, adapters {LR_ADAPTER}), seed 0; adapters r 8, "
        f"alpha 16, all linear layers")
    results = []
    for name, (method, extra) in rows.items():
        if method not in METHODS:
            log(f"  {name}: skipped: peft.method={method!r} is not in this tree's sft_jax.peft.METHODS "
                f"({', '.join(sorted(METHODS))})")
            results.append({"row": name, "method": method, "skipped": f"peft.method={method!r} not available"})
            continue
        r = run_row(name, method, extra, a, model, work)
        results.append(r)
        if "error" in r:
            log(f"  {name}: FAILED: {r['error']}")
        else:
            log(f"  {name}: {r['trainable_params']} trainable, {r['tokens_per_s']:.0f} tok/s, peak RSS "
                f"{r['maxrss_mib']:.0f} MiB, loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, eval "
                f"{r['eval_before']:.4f} -> {r['eval_after']:.4f}  (load {r['load']})")
    log(f"\n{'row':14s} {'method':8s} {'trainable':>10s} {'% of model':>10s} {'tok/s':>8s} {'peak RSS':>9s} "
        f"{'loss@1':>8s} {'loss@N':>8s} {'eval 0':>8s} {'eval N':>8s}")
    for r in results:
        if "tokens_per_s" not in r:
            log(f"{r['row']:14s} {r['method']:8s} {r.get('skipped') or r.get('error')}")
            continue
        log(f"{r['row']:14s} {r['method']:8s} {r['trainable_params']:10d} "
            f"{100 * r['trainable_params'] / r['model_params']:9.2f}% {r['tokens_per_s']:8.0f} "
            f"{r['maxrss_mib']:6.0f} MiB {r['loss_first']:8.4f} {r['loss_last']:8.4f} {r['eval_before']:8.4f} "
            f"{r['eval_after']:8.4f}")
    log(f"# load at end {loadavg()}")
    if a.out:
        Path(a.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": results}, indent=1))
        log(f"# wrote {a.out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        out, argv = sys.argv[2], sys.argv[4:]
        sys.exit(child(argv, out))
    main()

"""Plan a run before renting the machine: per-device memory and FLOPs of the real train step.

    python -m sft_jax.plan --config=configs/llama3_8b_lora.py --target=tpu-v5e-8 [--json] \
        [--config.mesh.fsdp=8 ...] [--model_config=path/to/config.json]

What it does, on this (CPU) machine, with no weights allocated:
1. sets `--xla_force_host_platform_device_count` to the target's device count *before* JAX is
   imported (below, at module import when run as a script; re-executes itself otherwise), so
   the mesh has the target's shape;
2. reads the model shapes: `--model_config`, else `model.path`'s config.json, else the config
   file's `SHAPES` directory (the 8B configs ship `configs/shapes/llama3_8b/config.json`), else
   the tiny model of `model.init=tiny`;
3. builds the trainer's own train step (`train_step.make_train_step`) and lowers it on abstract
   arguments (`jax.ShapeDtypeStruct` with the real shardings: frozen base, trainable tree,
   optimizer state, a [batch, max_length] batch, the step's PRNG key);
4. compiles it ahead of time for the CPU backend with the target's device count and reports
   `compiled.memory_analysis()` (per device: arguments, outputs, aliased (donated) bytes,
   temporaries, generated code), `compiled.cost_analysis()` FLOPs and the analytical
   6N/4N(+attention) FLOPs (`metrics.model_flops_per_token`), and whether the peak fits the
   target's HBM; suggests remat / fsdp / tensor / micro-batching / shorter rows when not.

Caveat, stated in the output: the numbers come from XLA's CPU compiler. TPU and GPU compilers
fuse and schedule differently (and keep bf16 where CPU may upcast), so temporaries there are
usually lower; arguments (params, optimizer state, batch) are exact.
"""

from __future__ import annotations

import os
import re
import sys

GiB = 1024**3

# name -> (HBM bytes per device, dense bf16 peak FLOP/s per device, note).
TARGETS: dict[str, tuple[int, float, str]] = {
    "tpu-v4": (32 * GiB, 275e12, "TPU v4 (per chip)"),
    "tpu-v5e": (16 * GiB, 197e12, "TPU v5e / v5litepod"),
    "tpu-v5p": (95 * GiB, 459e12, "TPU v5p"),
    "tpu-v6e": (32 * GiB, 918e12, "TPU v6e (Trillium)"),
    "h100": (80 * GiB, 989e12, "NVIDIA H100 80GB SXM"),
    "h200": (141 * GiB, 989e12, "NVIDIA H200 141GB"),
    "a100-40g": (40 * GiB, 312e12, "NVIDIA A100 40GB"),
    "a100-80g": (80 * GiB, 312e12, "NVIDIA A100 80GB"),
    "l4": (24 * GiB, 121e12, "NVIDIA L4"),
}
# Part of HBM a run may use: XLA's own reservations on TPU; the allocator fraction on GPU
# (launch/gpu_slurm.sh sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.92).
USABLE_FRACTION = {"tpu": 0.95, "gpu": 0.92}


class PlanError(ValueError):
    pass


def parse_target(target: str) -> tuple[str, int]:
    """'tpu-v5e-8' -> ('tpu-v5e', 8); the count is the number of devices (chips / GPUs)."""
    m = re.fullmatch(r"(.+)-(\d+)", target.strip().lower())
    if not m or m.group(1) not in TARGETS:
        raise PlanError(
            f"unknown target {target!r}: use NAME-DEVICES with NAME one of {sorted(TARGETS)} (e.g. tpu-v5e-8, h100-8)"
        )
    n = int(m.group(2))
    if n < 1:
        raise PlanError(f"target {target!r} has no devices")
    return m.group(1), n


def _early_target(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--target="):
            return a.split("=", 1)[1]
        if a == "--target" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _set_device_count(n: int) -> None:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__" and "jax" not in sys.modules:
    _t = _early_target(sys.argv[1:])
    if _t:
        try:
            _set_device_count(parse_target(_t)[1])
        except PlanError:
            pass  # reported properly by main()

import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402


# ------------------------------------------------------------------------ the model shapes
def _config_module_shapes(config_file: str | None) -> str | None:
    """The `SHAPES` directory declared by a configs/*.py file (read without running get_config)."""
    if not config_file or not os.path.isfile(config_file):
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sft_jax_plan_cfg", config_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, "SHAPES", None)


def model_config_for(cfg, *, model_config: str | None = None, config_file: str | None = None):
    """ModelConfig (with the run's dtype/scan/remat policy) and where its shapes came from."""
    from sft_jax.models.config import ModelConfig

    policy = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers,
                  remat=cfg.model.remat, attention=cfg.model.attention, attention_block=cfg.model.attention_block)
    candidates = [model_config, cfg.model.path or None, _config_module_shapes(config_file)]
    for c in candidates:
        if not c:
            continue
        path = os.path.join(c, "config.json") if os.path.isdir(c) else c
        if os.path.isfile(path):
            with open(path) as f:
                return ModelConfig.from_hf(json.load(f), **policy), path
        if c is model_config:
            raise PlanError(f"--model_config={model_config!r}: no config.json there")
    if cfg.model.init == "tiny":
        from sft_jax import tiny

        return ModelConfig.from_hf(tiny.tiny_model_config(cfg.model.tiny), **policy), "model.tiny"
    raise PlanError(
        "no model shapes: pass --model_config=path/to/config.json (a Hugging Face config.json or its "
        "directory), set --config.model.path, or give the config file a SHAPES directory"
    )


# ------------------------------------------------------------------------------ the plan
def _with_sharding(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree)))


def _cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def build_plan(cfg, target: str, *, model_config: str | None = None, config_file: str | None = None) -> dict:
    """Lower + compile the train step of `cfg` for `target` on abstract arguments; the plan dict."""
    import jax
    import jax.numpy as jnp

    from sft_jax import metrics as metrics_lib
    from sft_jax import peft
    from sft_jax import optim, sharding
    from sft_jax.config import validate
    from sft_jax.models import llama
    from sft_jax.train_step import BATCH_KEYS, StepOptions, make_train_step

    validate(cfg)
    name, n = parse_target(target)
    if jax.device_count() != n:
        raise PlanError(
            f"this process has {jax.device_count()} devices but {target} has {n}: run the planner as "
            f"`python -m sft_jax.plan` (it sets XLA_FLAGS before JAX starts)"
        )
    hbm, peak, desc = TARGETS[name]
    usable = hbm * USABLE_FRACTION["tpu" if name.startswith("tpu") else "gpu"]
    mc, shapes_from = model_config_for(cfg, model_config=model_config, config_file=config_file)

    t0 = time.perf_counter()
    mesh = sharding.make_mesh(cfg.mesh)
    axes = llama.param_logical_axes(mc)
    params = llama.abstract_params(mc)  # ShapeDtypeStructs in param_dtype: nothing allocated
    method = peft.from_config(cfg.peft)
    trainable, frozen = method.abstract_init(params, mc, jax.random.PRNGKey(0))
    total_steps = int(cfg.train.steps) if cfg.train.steps > 0 else 1000
    optimizer, schedule = optim.make_optimizer(cfg.train, total_steps)
    B, T = int(cfg.train.batch_size), int(cfg.data.max_length)
    steps = make_train_step(mc, mesh, trainable=trainable, frozen=frozen, optimizer=optimizer, schedule=schedule,
                            method=method, opts=StepOptions.from_cfg(cfg), batch_size=B, param_logical_axes=axes)
    tr = _with_sharding(trainable, steps.shardings.trainable)
    fr = _with_sharding(frozen, steps.shardings.frozen) if frozen else {}
    opt = _with_sharding(jax.eval_shape(optimizer.init, trainable), steps.shardings.opt_state)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=steps.shardings.batch) for k in BATCH_KEYS}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    lowered = steps.train_step.lower(tr, fr, opt, batch, rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    ma = compiled.memory_analysis()
    mem = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
        "generated_code": int(ma.generated_code_size_in_bytes),
    }
    # donated trainable/opt_state outputs reuse their argument buffers (aliased)
    mem["peak"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated_code"]
    state = {"frozen_params": _bytes_per_device(fr), "trainable_params": _bytes_per_device(tr),
             "optimizer_state": _bytes_per_device(opt), "batch": _bytes_per_device(batch)}

    n_total = _count(params)
    n_trainable = method.count_trainable(trainable)
    n_lookup = mc.vocab_size * mc.hidden_size if not mc.tie_embeddings else 0
    fpt = metrics_lib.model_flops_per_token(n_total, mc.num_layers, T, mc.hidden_size,
                                            frozen_base=not method.trains_base, n_lookup_params=n_lookup,
                                            n_trainable_params=0 if method.trains_base else n_trainable)
    analytical_step = fpt * B * T
    xla = _cost_flops(compiled)
    ideal_s = analytical_step / (n * peak)
    fits = mem["peak"] <= usable
    plan = {
        "target": target, "target_description": desc, "devices": n, "hbm_per_device": hbm,
        "usable_hbm_per_device": int(usable), "peak_flops_per_device": peak,
        "config_file": config_file, "model_shapes": shapes_from,
        "model": {"params": n_total, "trainable_params": n_trainable, "layers": mc.num_layers,
                  "hidden": mc.hidden_size, "vocab": mc.vocab_size, "param_dtype": mc.param_dtype,
                  "dtype": mc.dtype, "scan_layers": mc.scan_layers, "remat": mc.remat},
        "run": {"mode": method.describe(), "method": method.run_config(), "batch_size": B,
                "max_length": T, "micro_batches": int(cfg.train.micro_batches),
                "loss_chunk_size": int(cfg.train.loss_chunk_size), "mesh": dict(mesh.shape),
                "tokens_per_step": B * T},
        "memory_per_device": mem,
        "state_per_device": state,
        "flops": {
            "analytical_per_token": fpt,
            "analytical_per_step": analytical_step,
            "analytical_per_step_per_device": analytical_step / n,
            "xla_per_step_per_device": xla,
            "formula": "frozen base: 4N + 6N_trainable + 12LdT; full: 6N + 12LdT (N without the input embedding)",
            "ideal_step_time_s": ideal_s,
            "step_time_s_at_40pct_mfu": ideal_s / 0.4,
        },
        "fits": bool(fits),
        "headroom_bytes": int(usable - mem["peak"]),
        "suggestions": [] if fits else suggest(cfg, mc, mesh, mem, state, usable, method.trains_base),
        "timing_s": {"lower": t1 - t0, "compile": t2 - t1},
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "caveat": "memory from XLA's CPU compiler for the target's device count: arguments/outputs are "
                  "exact; TPU/GPU compilers fuse differently, temporaries there are usually lower",
    }
    if mc.scan_layers and xla is not None:
        plan["flops"]["xla_note"] = ("XLA's cost analysis counts a scanned (while-loop) body once, so with "
                                     "scan_layers it covers about one layer plus the embedding and loss")
    return plan


def suggest(cfg, mc, mesh, mem, state, usable, trains_base: bool) -> list[str]:
    """What to change when the plan does not fit (most effective first)."""
    s = dict(mesh.shape)
    n = math.prod(s.values())
    dp = s["data"] * s["fsdp"]
    B, T = int(cfg.train.batch_size), int(cfg.data.max_length)
    per_dev_rows = B // dp // max(int(cfg.train.micro_batches), 1)
    out = []
    resident = state["frozen_params"] + state["trainable_params"] + state["optimizer_state"]
    if s["fsdp"] < n and s["data"] > 1:
        out.append(f"--config.mesh.data=1 --config.mesh.fsdp=-1: shard params and optimizer state over all {n} "
                   f"devices (now {resident / GiB:.1f} GiB of state per device)")
    if cfg.model.remat == "none":
        out.append("--config.model.remat=full (or save_dots): recompute activations in the backward pass")
    if not cfg.model.scan_layers:
        out.append("--config.model.scan_layers=True: one layer's temporaries live at a time, faster compile")
    if per_dev_rows > 1:
        k = per_dev_rows
        out.append(f"--config.train.micro_batches={k * max(int(cfg.train.micro_batches), 1)}: one row per device "
                   f"per micro-batch (same global batch, gradient accumulation)")
    if cfg.train.loss_chunk_size == 0 and mc.vocab_size >= 32000:
        out.append("--config.train.loss_chunk_size=1024: chunked cross-entropy (no [rows, T, vocab] logits)")
    m = max(int(cfg.train.micro_batches), 1)
    if s["tensor"] == 1 and mc.num_kv_heads > 1:
        t = math.gcd(mc.num_kv_heads, n)
        out.append(f"--config.mesh.tensor={t} --config.mesh.fsdp=-1 --config.train.micro_batches={m * t}: shard "
                   f"heads/MLP over {t} devices, same rows per device")
    if T > 1024 and mc.attention == "dense":
        out.append("--config.model.attention=flash: block-sparse attention without the [heads, T, T] scores")
    elif T > 1024:
        out.append(f"--config.data.max_length={T // 2} --config.train.batch_size={B * 2} "
                   f"--config.train.micro_batches={m * 2}: shorter rows, same tokens per step")
    if trains_base:
        out.append("--config.peft.method=lora: no gradients/optimizer state for the base, bf16 base weights")
    elif cfg.model.param_dtype == "float32":
        out.append("--config.model.param_dtype=bfloat16: halve the frozen base")
    out.append("or a target with more devices / more HBM per device")
    return out


def format_plan(p: dict) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    m, st, f = p["memory_per_device"], p["state_per_device"], p["flops"]
    lines = [
        f"plan: {p['config_file'] or ''} on {p['target']} ({p['devices']} x {p['target_description']}, "
        f"{p['hbm_per_device'] / GiB:.0f} GiB HBM each, {p['usable_hbm_per_device'] / GiB:.1f} GiB usable)",
        f"model: {p['model']['params'] / 1e9:.3f}B params ({p['model_shapes']}), {p['run']['mode']}, "
        f"{p['model']['trainable_params'] / 1e6:.1f}M trainable; param {p['model']['param_dtype']}, compute "
        f"{p['model']['dtype']}, scan {p['model']['scan_layers']}, remat {p['model']['remat']}",
        f"run: batch {p['run']['batch_size']} x {p['run']['max_length']} tokens, micro-batches "
        f"{p['run']['micro_batches']}, loss chunk {p['run']['loss_chunk_size']}, mesh {p['run']['mesh']}",
        "memory per device (compiled train step):",
        f"  arguments        {g(m['arguments'])}   (frozen params {st['frozen_params'] / GiB:.2f}, trainable "
        f"{st['trainable_params'] / GiB:.2f}, optimizer {st['optimizer_state'] / GiB:.2f}, batch "
        f"{st['batch'] / GiB:.3f} GiB)",
        f"  outputs          {g(m['outputs'])}   (of which {m['aliased'] / GiB:.2f} GiB reuse donated arguments)",
        f"  temporaries      {g(m['temporaries'])}",
        f"  generated code   {g(m['generated_code'])}",
        f"  peak             {g(m['peak'])}   -> {'FITS' if p['fits'] else 'DOES NOT FIT'} "
        f"(headroom {p['headroom_bytes'] / GiB:.2f} GiB)",
        "FLOPs per step:",
        f"  analytical       {f['analytical_per_step']:.3e} total, {f['analytical_per_step_per_device']:.3e} per "
        f"device ({f['analytical_per_token']:.3e}/token; {f['formula']})",
        f"  XLA cost model   {f['xla_per_step_per_device'] or float('nan'):.3e} per device"
        + (f"  [{f['xla_note']}]" if f.get("xla_note") else ""),
        f"  step time        {f['ideal_step_time_s']:.2f} s at 100% MFU, {f['step_time_s_at_40pct_mfu']:.2f} s at 40%",
        f"planner: lower {p['timing_s']['lower']:.1f} s, compile {p['timing_s']['compile']:.1f} s, host peak RSS "
        f"{p['host_peak_rss_bytes'] / GiB:.2f} GiB",
        f"note: {p['caveat']}",
    ]
    if p["suggestions"]:
        lines.append(f"over by {-p['headroom_bytes'] / GiB:.1f} GiB per device; to make it fit, try (and plan again):")
        lines += [f"  - {s}" for s in p["suggestions"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    from sft_jax.cli import UsageError, run_absl

    config_flags.DEFINE_config_file("config", None, "configs/NAME.py; override with --config.a.b=v", lock_config=True)
    flags.DEFINE_string("target", None, "NAME-DEVICES, NAME in " + ", ".join(sorted(TARGETS)))
    flags.DEFINE_string("model_config", None, "a Hugging Face config.json (or its directory) for the shapes")
    flags.DEFINE_bool("json", False, "print the plan as one JSON object")

    def _main(_argv):
        import logging

        logging.getLogger("absl").setLevel(logging.WARNING)
        FLAGS = flags.FLAGS
        if FLAGS.config is None or not FLAGS.target:
            raise UsageError("usage: python -m sft_jax.plan --config=configs/NAME.py --target=tpu-v5e-8 [--json]")
        _, n = parse_target(FLAGS.target)
        import jax

        if jax.device_count() != n and not os.environ.get("SFT_JAX_PLAN_CHILD"):
            # JAX was imported before the device count could be set: run again in a fresh process
            import subprocess

            _set_device_count(n)
            env = dict(os.environ, SFT_JAX_PLAN_CHILD="1")
            return subprocess.call([sys.executable, "-m", "sft_jax.plan", *sys.argv[1:]], env=env)
        plan = build_plan(FLAGS.config, FLAGS.target, model_config=FLAGS.model_config,
                          config_file=flags.FLAGS["config"].config_filename)
        print(json.dumps(plan, indent=1, default=float) if FLAGS.json else format_plan(plan))
        return 0 if plan["fits"] else 3

    return run_absl(_main, argv, "python -m sft_jax.plan")  # the shared error-to-exit path (sft_jax/cli.py)


if __name__ == "__main__":
    sys.exit(main())

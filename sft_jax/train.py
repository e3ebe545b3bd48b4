"""The trainer: `python -m sft_jax.train --config=configs/NAME.py [--config.a.b=v ...] [--workdir=DIR]`.

config -> (jax.distributed) -> mesh -> tokenizer and model -> data -> state -> jitted step -> loop
with evaluation, metrics, Orbax checkpoints (exact resume), SIGTERM saves and NaN stops.

The workdir layout is documented in README.md ("Workdir layout") and `sft_jax/workdir.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np

from sft_jax.restart import keep_aside

log = logging.getLogger("sft_jax.train")


class TrainError(RuntimeError):
    """A run that cannot go on (NaN loss, ...); the message says why and what was kept."""


# ------------------------------------------------------------------ set-up helpers
def _setup_compilation_cache() -> None:
    import jax

    cache = os.environ.get("SFT_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/sft_jax/xla"))
    if cache and cache.lower() != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _model_policy(cfg) -> dict:
    return dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers,
                remat=cfg.model.remat, attention=cfg.model.attention, attention_block=cfg.model.attention_block,
                kernels=cfg.model.kernels)


def _prepare_tiny(cfg, workdir: pathlib.Path, is_main: bool):
    """Make the tiny run's data, tokenizer and model config (deterministic; written once)."""
    from sft_jax import distributed, tiny

    data_dir = workdir / "tiny_data"
    tok_dir = workdir / "tiny_tokenizer"
    train_rows, eval_rows = tiny.make_tiny_dataset(seed=0, n_train=4000, n_eval=200)
    if is_main and not (tok_dir / "tokenizer_config.json").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            tmp = data_dir / f"{name}.jsonl.tmp"
            with open(tmp, "w") as f:
                for r in rows:
                    f.write(json.dumps({"messages": r["messages"]}) + "\n")
            os.replace(tmp, data_dir / f"{name}.jsonl")
        tiny.build_tiny_tokenizer(str(tok_dir), train_rows, vocab_size=int(cfg.model.tiny.vocab_size))
    distributed.barrier("tiny_assets")
    with cfg.unlocked():
        cfg.data.path = str(data_dir / "train.jsonl")
        cfg.data.eval_path = str(data_dir / "eval.jsonl")
        cfg.data.tokenizer = str(tok_dir)
    return tiny.tiny_model_config(cfg.model.tiny), eval_rows


def _resize_vocab(params: dict, config, new_vocab: int):
    """Grow the embedding (and untied lm_head) to `new_vocab` rows; new rows = the mean row
    (as transformers' resize_token_embeddings does), so added tokens start as an average token."""
    import jax.numpy as jnp

    def grow(w, axis):
        old = w.shape[axis]
        mean = jnp.mean(w.astype(jnp.float32), axis=axis, keepdims=True).astype(w.dtype)
        reps = [1] * w.ndim
        reps[axis] = new_vocab - old
        return jnp.concatenate([w, jnp.tile(mean, reps)], axis=axis)

    params = dict(params)
    params["embed"] = {"embedding": grow(params["embed"]["embedding"], 0)}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"], 1)}
    return params, config.replace(vocab_size=new_vocab)


def _save_base(base_dir: pathlib.Path, model_config, params, tokenizer, is_main: bool) -> None:
    """Write the base model the project made or resized (HF layout, with its tokenizer) to base_dir.
    Call on every process: gathering sharded params to the host is a collective."""
    from sft_jax.models import hf_io

    host_params = _to_host(params)
    if is_main:
        hf_io.save_hf(str(base_dir), model_config, host_params)
        tokenizer.save_pretrained(str(base_dir))


def _to_host(tree):
    import jax

    if jax.process_count() > 1:  # arrays span several hosts: all-gather (a collective: call on every process)
        from jax.experimental import multihost_utils

        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ------------------------------------------------------------------ evaluation
def _evaluate(steps, trainable, frozen, eval_batches, mesh) -> dict:
    import jax
    from jax.sharding import PartitionSpec as P

    from sft_jax.data.pipeline import global_batch
    from sft_jax.sharding import BATCH_AXES

    tot = {"loss_sum": 0.0, "ce_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for hb in eval_batches:
        sums = jax.device_get(steps.eval_step(trainable, frozen, global_batch(hb, mesh, P(BATCH_AXES))))
        for k in tot:
            tot[k] += float(sums[k])
    n = max(tot["tokens"], 1.0)
    return {"loss": tot["ce_sum"] / n, "accuracy": tot["correct"] / n, "tokens": tot["tokens"]}


@dataclasses.dataclass
class _GenSetup:
    tokenizer: Any
    template: str
    stop_ids: list
    prompts: list  # list of message lists (ending before the assistant answer)
    answers: list  # reference answers (strings)
    tasks: list  # tiny task names (None for real data)
    tools: list  # per prompt: the row's tool schemas (None when it has none)


def _prompt_ids(tokenizer, template: str, messages, tools=None) -> list[int]:
    from sft_jax.data import masking

    messages = masking.prepare_messages(template, messages, tools)
    text = masking.render(tokenizer, template, messages, add_generation_prompt=True, tools=tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generations(gen: _GenSetup, trainable, frozen, model_config, method, max_new_tokens: int, limit: int):
    """Greedy generations of the first `limit` prompts (0 = all) -> (texts, ids, finish reasons), the
    ids without their stop token and the reason "stop" (ended on a stop id) or "length" (hit the cap)."""
    from sft_jax import sampling

    n = len(gen.prompts) if limit <= 0 else min(limit, len(gen.prompts))
    prompts = [_prompt_ids(gen.tokenizer, gen.template, m, t) for m, t in zip(gen.prompts[:n], gen.tools[:n])]
    params, method_vars = method.model_inputs(trainable, frozen)
    outs = sampling.generate(params, model_config, prompts, max_new_tokens=max_new_tokens, eos_ids=gen.stop_ids,
                             method=method, method_vars=method_vars, keep_eos=True)
    stop = set(gen.stop_ids)
    finish = ["stop" if o and o[-1] in stop else "length" for o in outs]
    ids = [o[:-1] if why == "stop" else o for o, why in zip(outs, finish)]
    return [gen.tokenizer.decode(o, skip_special_tokens=True) for o in ids], ids, finish


def _generation_report(gen: _GenSetup, texts: list[str], ids: list[list[int]], finish: list[str],
                       show: int) -> tuple[dict, list[str]]:
    """The generation metrics of `sft_jax.eval` (exact match: the tiny tasks' scorer when the prompts
    are tiny tasks) and the lines to print: the metrics, per-task exact match, `show` samples."""
    from sft_jax import tiny
    from sft_jax.eval import generation_metrics

    metrics = generation_metrics(texts, ids, finish, gen.answers[:len(texts)])
    metrics.pop("generations", None)
    lines = [f"generations ({len(texts)}): stop rate {metrics['stop_rate']:.1%}, ROUGE-L {metrics['rouge_l']:.3f}, "
             f"mean length {metrics['mean_length']:.1f} tokens, repeated 4-grams {metrics['repetition']:.1%}"]
    if gen.tasks and gen.tasks[0] is not None:
        per_task: dict[str, list[int]] = {}
        for msgs, task, text in zip(gen.prompts, gen.tasks, texts):
            per_task.setdefault(task, []).append(int(tiny.score_answer(task, msgs, text)))
        total = [x for v in per_task.values() for x in v]
        metrics["exact_match"] = float(np.mean(total)) if total else 0.0
        lines.append(
            f"held-out exact match {metrics['exact_match']:.1%} over {len(total)} prompts: "
            + ", ".join(f"{t} {np.mean(v):.0%}" for t, v in sorted(per_task.items()))
        )
    for msgs, text, ref in list(zip(gen.prompts, texts, gen.answers))[:show]:
        user = msgs[-1]["content"].replace("\n", " ")
        lines.append(f"  user: {user[:120]}\n  model: {text.strip()[:200]!r}\n  reference: {ref[:120]!r}")
    return metrics, lines


# ------------------------------------------------------------------ the run
def run(cfg, workdir: str | os.PathLike) -> dict:
    """Train according to `cfg` in `workdir`; returns a summary dict (final metrics).

    The work directory is locked for the whole run (`sft_jax.workdir_lock`, taken by process 0;
    every process agrees on the outcome): a second run on it raises `WorkdirLocked`. The config is
    validated first, so a bad one touches nothing."""
    from sft_jax import distributed
    from sft_jax.config import validate
    from sft_jax.workdir_lock import WorkdirLock, WorkdirLocked

    validate(cfg)
    lock, refusal = None, ""
    if distributed.is_main():
        try:
            lock = WorkdirLock(workdir)
        except WorkdirLocked as e:
            refusal = str(e)
    if distributed.agree_any(bool(refusal)):
        raise WorkdirLocked(refusal or f"process 0 could not lock the work directory {workdir}")
    try:
        return _run(cfg, workdir)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg, workdir: str | os.PathLike) -> dict:
    """The training run itself (`run` holds the work directory's lock around it)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from sft_jax import checkpoint as ckpt_lib
    from sft_jax import distributed
    from sft_jax import kernels as kernels_lib
    from sft_jax import metrics as metrics_lib
    from sft_jax import peft
    from sft_jax import optim, sharding, workdir as workdir_lib
    from sft_jax.config import ConfigError
    from sft_jax.data import pipeline, templates
    from sft_jax.models import hf_io, llama
    from sft_jax.models.config import ModelConfig
    from sft_jax.train_step import StepOptions, make_train_step

    if cfg.model.init == "pretrained" and not cfg.model.path:
        raise ConfigError(
            "model.path is empty: this config fine-tunes a pretrained model. Pass "
            "--config.model.path=/path/to/hf_model (a Hugging Face directory with config.json and "
            "*.safetensors; convert a llama2.c checkpoint with `python -m sft_jax.convert llama2c ...`)"
        )
    if cfg.model.init == "pretrained" and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path={cfg.model.path!r} has no config.json (a Hugging Face model directory)")
    if cfg.model.init == "pretrained" and not cfg.data.path:
        raise ConfigError(pipeline.missing_data_message(cfg.data))
    workdir = pathlib.Path(workdir).resolve()
    is_main = distributed.is_main()
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    distributed.barrier("workdir")
    _setup_compilation_cache()

    # ---- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    batch_spec = P(sharding.BATCH_AXES)

    # ---- tokenizer, model config
    tiny_eval_rows = None
    if cfg.model.init == "tiny":
        hf_cfg, tiny_eval_rows = _prepare_tiny(cfg, workdir, is_main)
        model_config = ModelConfig.from_hf(hf_cfg, **_model_policy(cfg))
    else:
        model_config = hf_io.read_config(cfg.model.path, **_model_policy(cfg))
    tokenizer, added = pipeline.tokenizer_from_config(cfg)
    template_name = cfg.data.template
    if len(tokenizer) > model_config.vocab_size and not added:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.vocab_size}"
        )

    # ---- parameters (frozen base), straight onto their shardings (QLoRA: quantised as they are read,
    # unless the vocabulary is resized: the resized float base is saved first)
    method = peft.from_config(cfg.peft).with_tokenizer(tokenizer)
    transform = None if added else method.load_transform()
    base_dir = workdir / "base_model"
    axes = llama.param_logical_axes(model_config)
    param_sh = sharding.logical_shardings(axes, mesh, llama.abstract_params(model_config))
    if cfg.model.init == "tiny":
        # decided once for all processes (process 0 may write base_model/ while another still checks)
        if distributed.broadcast_from_main(int((base_dir / "config.json").exists())):
            model_config, params = hf_io.load_hf(str(base_dir), shardings=param_sh, transform=transform,
                                                 **_model_policy(cfg))
        else:
            params = jax.jit(lambda r: llama.init_params(model_config, r), out_shardings=param_sh)(
                jax.random.PRNGKey(cfg.train.seed + 1)
            )
            _save_base(base_dir, model_config, params, tokenizer, is_main)
            distributed.barrier("base_model")
        base_model = str(base_dir)
    else:
        model_config, params = hf_io.load_hf(cfg.model.path, shardings=param_sh, transform=transform,
                                             **_model_policy(cfg))
        base_model = os.path.abspath(cfg.model.path)
    if added:
        params, model_config = _resize_vocab(params, model_config, len(tokenizer))
        if is_main:
            log.warning("added %d template tokens %s: vocab resized to %d; the resized base is saved in %s",
                        len(added), added, len(tokenizer), base_dir)
        # the resized base is deterministic (mean-initialised rows): written once, reused on resume
        if not distributed.broadcast_from_main(int((base_dir / "config.json").exists())):
            _save_base(base_dir, model_config, params, tokenizer, is_main)
        distributed.barrier("resized_base")
        base_model = str(base_dir)
        axes = llama.param_logical_axes(model_config)
        param_sh = sharding.logical_shardings(axes, mesh, llama.abstract_params(model_config))
        params = jax.device_put(params, param_sh)
    stop_ids = templates.stop_token_ids(tokenizer, template_name)
    if is_main:
        tokenizer.save_pretrained(str(workdir / "tokenizer"))

    # ---- the fine-tuning method: its trainable tree (float32) and the frozen tree it trains against
    rng_init = jax.random.PRNGKey(cfg.train.seed)
    trainable, frozen = method.init(params, model_config, workdir_lib.method_rng(cfg.to_dict()))
    del params

    # ---- data
    global_bs = int(cfg.train.batch_size)
    seed = int(cfg.train.seed)
    if cfg.train.steps > 0:
        total_steps = int(cfg.train.steps)
        per_epoch = None
    else:
        per_epoch = pipeline.count_train_batches(cfg.data, tokenizer, global_batch_size=global_bs, seed=seed)
        total_steps = int(cfg.train.epochs) * per_epoch
    if is_main and cfg.train.warmup_steps > total_steps:  # a short smoke run of a long recipe: allowed, said
        log.warning("train.warmup_steps=%d is more than the run's %d steps: the learning rate never reaches "
                    "train.lr=%g", cfg.train.warmup_steps, total_steps, cfg.train.lr)
    train_iter = pipeline.build_train_iterator(cfg.data, tokenizer, global_batch_size=global_bs, seed=seed,
                                               epochs=None)
    has_eval = bool(cfg.data.eval_path) or cfg.data.eval_fraction > 0
    eval_batches = []
    if has_eval:
        eval_batches, _ = pipeline.build_eval_batches(cfg.data, tokenizer, global_batch_size=global_bs, seed=seed,
                                                      max_batches=int(cfg.eval.max_batches))

    # ---- generation prompts for evaluation
    gen = None
    if cfg.eval.num_generations > 0 and jax.process_count() == 1:
        if tiny_eval_rows is not None:
            rows = tiny_eval_rows
            gen = _GenSetup(tokenizer, tokenizer.chat_template, stop_ids, [r["messages"][:-1] for r in rows],
                            [r["messages"][-1]["content"] for r in rows], [r["task"] for r in rows],
                            [None] * len(rows))
        else:
            try:
                groups = pipeline.split_records(cfg.data, "eval", seed)  # lazy with data.streaming: take a few
                convs = list(itertools.islice((g[i] for g in groups for i in range(len(g))),
                                              int(cfg.eval.num_generations)))
                recs = [c for c in convs if c["messages"][-1]["role"] == "assistant"]
                gen = _GenSetup(tokenizer, tokenizer.chat_template, stop_ids, [c["messages"][:-1] for c in recs],
                                [c["messages"][-1]["content"] for c in recs], [None] * len(recs),
                                [c.get("tools") for c in recs])
            except Exception as e:  # generation samples are a convenience; never stop training for them
                log.warning("no sample generations: %s", e)

    # ---- optimizer, step
    optimizer, schedule = optim.make_optimizer(cfg.train, total_steps)
    opts = StepOptions.from_cfg(cfg)
    steps = make_train_step(model_config, mesh, trainable=trainable, frozen=frozen, optimizer=optimizer,
                            schedule=schedule, method=method, opts=opts, batch_size=global_bs,
                            param_logical_axes=axes)
    trainable = jax.device_put(trainable, steps.shardings.trainable)
    frozen = jax.device_put(frozen, steps.shardings.frozen) if frozen else frozen
    opt_state = sharding.init_opt_state(optimizer, trainable, steps.shardings.opt_state)
    rep = sharding.replicated(mesh)  # step/rng as global replicated arrays (Orbax multi-host needs global arrays)

    def rep_array(v):  # same host value on every process -> replicated global array (no communication)
        v = np.asarray(v)
        return jax.make_array_from_callback(v.shape, rep, lambda _: v)

    state = {"trainable": trainable, "opt_state": opt_state, "step": rep_array(np.int32(0)),
             "rng": rep_array(jax.random.key_data(rng_init))}

    # ---- run files, checkpoints, resume
    if is_main:
        workdir_lib.write_run_json(
            workdir, base_model=base_model, template=template_name,
            method=method, model_policy=_model_policy(cfg), eos_ids=stop_ids,
            config=cfg.to_dict(),
        )
    if is_main and cfg.checkpoint.resume == "none":  # starting over: the earlier run's checkpoints are kept aside
        keep_aside(workdir / "checkpoints", "checkpoint.resume=none")
    distributed.barrier("checkpoints_aside")
    ck = ckpt_lib.Checkpointer(workdir, keep=int(cfg.checkpoint.keep), every_steps=int(cfg.checkpoint.every_steps),
                               async_save=bool(cfg.checkpoint.async_save))
    start_step = 0
    if cfg.checkpoint.resume == "auto":
        latest = ck.latest_step()
        latest = distributed.broadcast_from_main(-1 if latest is None else latest)
        if latest >= 0:
            # The grain iterator state is per process (process_i-of-n.json): after a change of the
            # process count it cannot be restored, so the new iterator is fast-forwarded instead.
            def saved_by_same_count(meta: dict) -> bool:
                return int(meta.get("process_count", jax.process_count())) == jax.process_count()

            try:  # the newest readable step: any unreadable file of a step (its meta too) falls back
                state, meta = ck.restore(abstract_state=ckpt_lib.abstract_like(state), data_iterator=train_iter,
                                         restore_data_if=saved_by_same_count)
            except ckpt_lib.CheckpointNotFound as e:
                raise TrainError(f"{e}. Set checkpoint.resume=none to start over (they are kept in "
                                 f"checkpoints.<n>) or use another --workdir") from None
            saved_pc = int(meta.get("process_count", jax.process_count()))
            same_topology = distributed.agree_all(saved_by_same_count(meta))
            start_step = int(state["step"])
            if distributed.agree_any(distributed.broadcast_from_main(start_step) != start_step):
                raise TrainError(f"processes restored different checkpoints (this one: step {start_step}); "
                                 f"check that every host sees the same {ck.directory}")
            if not same_topology:
                log.warning("checkpoint written by %d processes, resuming with %d: the data iterator is "
                            "fast-forwarded by %d batches (exact for data.packing=False without skipped "
                            "examples; with packing each process's packed stream differs)",
                            saved_pc, jax.process_count(), start_step)
                for _ in range(start_step):
                    next(train_iter)
    trainable, opt_state = state["trainable"], state["opt_state"]
    rng_base = jax.random.wrap_key_data(state["rng"]) if state["rng"].dtype == jnp.uint32 else state["rng"]

    # ---- metrics
    n_total = peft.count_params(llama.abstract_params(model_config))
    n_trainable = method.count_trainable(trainable)
    n_lookup = model_config.vocab_size * model_config.hidden_size if not model_config.tie_embeddings else 0
    flops_tok = metrics_lib.model_flops_per_token(
        n_total, model_config.num_layers, int(cfg.data.max_length), model_config.hidden_size,
        frozen_base=not method.trains_base, n_lookup_params=n_lookup,
        n_trainable_params=0 if method.trains_base else n_trainable,
    )
    kernel_info = kernels_lib.describe(model_config)
    # CPUs differ too much for a table: measure a jitted matmul once (accelerators: the device-kind table)
    peak = metrics_lib.peak_flops_per_device(float(cfg.train.peak_flops), dtype=cfg.model.dtype, measure_cpu=True)
    mw = metrics_lib.MetricsWriter(workdir, is_main, total_steps=total_steps,
                                   resume_step=start_step if start_step > 0 else None)
    mw.write_run_info(cfg, extra={
        "model_params": n_total, "trainable_params": n_trainable, "total_steps": total_steps,
        "method": method.run_config(), "kernels": kernel_info,
        "steps_per_epoch": per_epoch, "mesh": dict(mesh.shape), "flops_per_token": flops_tok,
        "peak_flops_per_device": peak, "base_model": base_model,
    })
    mw.print(
        f"sft_jax: {model_config.model_type} {n_total / 1e6:.2f}M params, "
        f"{method.describe()} ({n_trainable / 1e6:.3f}M trainable), kernels {kernel_info}, mesh {dict(mesh.shape)}, {total_steps} steps"
        + (f" ({per_epoch}/epoch)" if per_epoch else "") + (f", resuming at step {start_step}" if start_step else "")
    )

    def do_eval(step: int, label: str) -> dict:
        out = {}
        if eval_batches:
            out.update(_evaluate(steps, trainable, frozen, eval_batches, mesh))
        if gen is not None and gen.prompts:
            limit = 0 if gen.tasks[0] is not None else int(cfg.eval.num_generations)
            texts, ids, finish = _generations(gen, trainable, frozen, model_config, method,
                                              int(cfg.eval.max_new_tokens), limit)
            gm, lines = _generation_report(gen, texts, ids, finish, int(cfg.eval.num_generations))
            out.update(gm)
            out["_lines"] = lines
        lines = out.pop("_lines", [])
        if out:
            mw.write_eval(step, {k: v for k, v in out.items() if k != "tokens"})
            desc = ", ".join(f"{k} {v:.4f}" for k, v in out.items()
                             if k in ("loss", "accuracy", "exact_match", "stop_rate"))
            mw.print(f"eval ({label}, step {step}): {desc}")
        for ln in lines:
            mw.print(ln)
        return out

    first_eval = do_eval(start_step, "before training") if start_step == 0 else {}

    # ---- the loop
    flag = ckpt_lib.PreemptionFlag().install()
    counter = metrics_lib.CompileCounter("train_step")
    real_tokens_fn = jax.jit(lambda s: jnp.sum(s > 0))
    seen_shapes: set = set()  # batch shapes compiled so far (one with packing; one per bucket when padding)
    step = start_step
    last = {}
    stopped_by = None
    t_start = time.time()
    try:
        while step < total_steps:
            host = next(train_iter)
            batch = pipeline.global_batch(host, mesh, batch_spec)
            rng = jax.random.fold_in(rng_base, step)
            before = counter.count
            t0 = time.perf_counter()
            trainable, opt_state, m = steps.train_step(trainable, frozen, opt_state, batch, rng)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            step += 1
            compiled = counter.count - before
            shape = tuple(host["inputs"].shape)
            if compiled and shape in seen_shapes:
                log.warning("step %d recompiled the train step for an already-compiled batch shape %s "
                            "(%d compilations so far)", step, shape, counter.count)
            elif compiled and seen_shapes:
                log.info("step %d: new padded-length bucket %s compiled", step, shape)
            seen_shapes.add(shape)
            real = int(real_tokens_fn(batch["segment_ids"]))
            loss = float(m["loss"])
            if distributed.agree_any(not math.isfinite(loss) or not math.isfinite(float(m["grad_norm"]))):
                good = ck.latest_step()
                raise TrainError(
                    f"non-finite loss {loss} (grad_norm {float(m['grad_norm'])}) at step {step}: stopping. "
                    f"The last good checkpoint is kept (step {good}); lower train.lr or check the data."
                )
            tps = real / dt
            last = {
                "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                "accuracy": float(m["accuracy"]), "trainable_tokens": int(m["trainable_tokens"]),
                "real_tokens": real, "tokens_per_s": tps, "step_time_s": dt,
                "compile_time_s": dt if compiled else 0.0,
                "mfu": metrics_lib.mfu(flops_tok, tps, peak, jax.device_count()),
            }
            mw.write(step, last)
            state = {"trainable": trainable, "opt_state": opt_state,
                     "step": rep_array(np.int32(step)),
                     "rng": jax.random.key_data(rng_base) if jnp.issubdtype(rng_base.dtype, jax.dtypes.prng_key)
                     else rng_base}
            meta = {"config": cfg.to_dict(), "step": step, "process_count": jax.process_count()}
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                do_eval(step, "during training")
            ck.save(step, state, train_iter, meta)
            if flag.should_stop():
                ck.save(step, state, train_iter, meta, force=True)
                stopped_by = "SIGTERM"
                mw.print(f"SIGTERM: saved checkpoint at step {step}; exiting (resume with the same command)")
                break
        else:
            if step > start_step:
                ck.save(step, state, train_iter, {"config": cfg.to_dict(), "step": step,
                                                  "process_count": jax.process_count()}, force=True)
        ck.wait()
    finally:
        flag.uninstall()
        counter.close()
    train_time = time.time() - t_start
    final_eval = do_eval(step, "after training") if stopped_by is None else {}
    ck.close()
    mw.close()
    summary = {"step": step, "total_steps": total_steps, "train_time_s": train_time, "last": last,
               "eval_before": {k: v for k, v in first_eval.items() if not k.startswith("_")},
               "eval_after": {k: v for k, v in final_eval.items() if not k.startswith("_")},
               "stopped_by": stopped_by, "compilations": counter.count}
    if is_main:
        with open(workdir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return summary


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/NAME.py (ml_collections); override with --config.a.b=v",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "run directory (checkpoints, metrics); default runs/<config name>")
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")

    def _main(_argv):
        FLAGS = flags.FLAGS
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "jax._src", "orbax", "grain", "jax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from sft_jax import distributed
        from sft_jax.config import ConfigError
        from sft_jax.workdir_lock import WorkdirLocked

        cfg = FLAGS.config
        if cfg is None:
            print("error: --config=configs/NAME.py is required (e.g. configs/tiny.py)", file=sys.stderr)
            return 2
        workdir = FLAGS.workdir or os.path.join("runs", pathlib.Path(flags.FLAGS["config"].config_filename).stem)
        try:
            distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            summary = run(cfg, workdir)
        except (ConfigError, TrainError, WorkdirLocked) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2 if isinstance(e, ConfigError) else 1
        except Exception as e:
            from sft_jax.data.formats import DataError
            from sft_jax.sharding import ShardingError

            known = (DataError, ShardingError)
            try:
                from sft_jax.models.config import UnsupportedModelError
                from sft_jax.models.hf_io import CheckpointMismatchError

                known += (UnsupportedModelError, CheckpointMismatchError)
            except ImportError:
                pass
            if isinstance(e, known):
                print(f"error: {e}", file=sys.stderr)
                return 2
            raise
        print(f"done: {summary['step']} steps in {summary['train_time_s']:.1f}s; workdir {os.path.abspath(workdir)}")
        return 0

    try:
        app.run(lambda a: sys.exit(_main(a)), argv=argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

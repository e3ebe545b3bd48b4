"""The trainer: `python -m sft_jax.train --config=configs/NAME.py [--config.a.b=v ...] [--workdir=DIR]`.

    main -> run(cfg, workdir): validate, parse into typed sections (`sft_jax.run_config`), lock the workdir
         -> phases: _prepare_assets -> _load_model -> _build_data -> _build_state -> _resume
         -> fit: `sft_jax.train_loop.Loop` with hooks (evaluation, best checkpoint / early stopping,
            checkpoint, preemption); metrics rows, non-finite / loss-spike stops and SIGTERM at its sync points.

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
import re
import sys
import time
from typing import Any

# transformers (imported by the data pipeline) prints "PyTorch was not found ..." at import without this
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sft_jax import checkpoint as ckpt_lib  # noqa: E402
from sft_jax import distributed, optim, peft, run_config, sampling, sharding, tiny  # noqa: E402
from sft_jax import kernels as kernels_lib  # noqa: E402
from sft_jax import metrics as metrics_lib  # noqa: E402
from sft_jax import workdir as workdir_lib  # noqa: E402
from sft_jax.config import ConfigError, validate  # noqa: E402
from sft_jax.data import masking, pipeline, templates  # noqa: E402
from sft_jax.eval import generation_metrics  # noqa: E402
from sft_jax.models import hf_io, llama  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402
from sft_jax.restart import keep_aside  # noqa: E402
from sft_jax.train_loop import EarlyStopping, Loop, TrainError, TrainState  # noqa: E402
from sft_jax.train_step import StepOptions, make_train_step  # noqa: E402
from sft_jax.workdir_lock import WorkdirLock, WorkdirLocked  # noqa: E402

log = logging.getLogger("sft_jax.train")

__all__ = ["run", "main", "TrainError"]

# Fields whose change on resume changes what the run means (checkpoint.allow_config_change=True to allow);
# every other changed field is listed as a warning.
MEANING_PREFIXES = ("model.", "peft.", "data.", "train.batch_size")
HARMLESS = ("model.kernels", "model.attention", "model.attention_block", "model.remat", "data.num_workers",
            "data.source_help")


# ------------------------------------------------------------------ set-up helpers
def _setup_compilation_cache() -> None:
    cache = os.environ.get("SFT_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/sft_jax/xla"))
    if cache and cache.lower() != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _model_policy(rc) -> dict:
    m = rc.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
                attention=m.attention, attention_block=m.attention_block, kernels=m.kernels)


def _resize_vocab(params: dict, config, new_vocab: int):
    """Grow the embedding (and untied lm_head) to `new_vocab` rows; new rows = the mean row
    (as transformers' resize_token_embeddings does), so added tokens start as an average token."""

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
    host_params = _to_host(params)
    if is_main:
        hf_io.save_hf(str(base_dir), model_config, host_params)
        tokenizer.save_pretrained(str(base_dir))


def _to_host(tree):
    if jax.process_count() > 1:  # arrays span several hosts: all-gather (a collective: call on every process)
        from jax.experimental import multihost_utils  # a submodule jax does not import by itself

        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def parse_eval_sets(eval_path: str) -> list[tuple[str, str]]:
    """`data.eval_path` -> [(name, path)]: "name=path,name2=path2" names each set (logged as eval_NAME/loss);
    a plain path (no "name=") is one unnamed set (logged as eval_loss); "" -> []."""
    if not eval_path:
        return []
    entries = [e.strip() for e in eval_path.split(",") if e.strip()]
    named = [re.fullmatch(r"([A-Za-z0-9_.-]+)=(.+)", e) for e in entries]
    if not any(named):
        return [("", eval_path)]
    if not all(named):
        bad = next(e for e, m in zip(entries, named) if not m)
        raise ConfigError(f"data.eval_path: {bad!r} has no NAME= (give every set a name: name=path,name2=path2)")
    names = [m.group(1) for m in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.eval_path: a set name is used twice ({', '.join(names)})")
    return [(m.group(1), m.group(2)) for m in named]


# ------------------------------------------------------------------ evaluation
def _evaluate(steps, trainable, frozen, eval_batches, mesh) -> dict:
    tot = {"loss_sum": 0.0, "ce_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for hb in eval_batches:
        sums = jax.device_get(steps.eval_step(trainable, frozen,
                                              pipeline.global_batch(hb, mesh, P(sharding.BATCH_AXES))))
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

    messages = masking.prepare_messages(template, messages, tools)
    text = masking.render(tokenizer, template, messages, add_generation_prompt=True, tools=tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generations(gen: _GenSetup, trainable, frozen, model_config, method, max_new_tokens: int, limit: int):
    """Greedy generations of the first `limit` prompts (0 = all) -> (texts, ids, finish reasons), the
    ids without their stop token and the reason "stop" (ended on a stop id) or "length" (hit the cap)."""

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




# ------------------------------------------------------------------ phases
@dataclasses.dataclass
class Context:
    """What every phase shares: the parsed config, the work directory, the mesh."""

    rc: Any  # run_config.RunConfig
    workdir: pathlib.Path
    is_main: bool
    mesh: Any


@dataclasses.dataclass
class ModelParts:
    model_config: Any
    tokenizer: Any
    method: Any
    trainable: Any
    frozen: Any
    base_model: str
    stop_ids: list
    axes: Any
    trainable_shapes: Any = None  # ShapeDtypeStructs of the trainable tree (the state holds the arrays)


@dataclasses.dataclass
class DataParts:
    train_iter: Any
    total_steps: int
    per_epoch: int | None
    eval_sets: list  # [(name, host batches)]; name "" = the unnamed set (eval_loss)
    gen: _GenSetup | None
    accounting: dict  # per-file rows read / skipped / truncated (filled by the data-accounting block)


def _check_inputs(rc) -> None:
    """Errors that need no model or data read: before anything is written."""
    if rc.model.init == "pretrained" and not rc.model.path:
        raise ConfigError(
            "model.path is empty: this config fine-tunes a pretrained model. Pass "
            "--config.model.path=/path/to/hf_model (a Hugging Face directory with config.json and "
            "*.safetensors; convert a llama2.c checkpoint with `python -m sft_jax.convert llama2c ...`)"
        )
    if rc.model.init == "pretrained" and not os.path.isfile(os.path.join(rc.model.path, "config.json")):
        raise ConfigError(f"model.path={rc.model.path!r} has no config.json (a Hugging Face model directory)")
    if rc.model.init == "pretrained" and not rc.data.path:
        raise ConfigError(pipeline.missing_data_message(rc.data))
    parse_eval_sets(rc.data.eval_path)


def _prepare_assets(ctx: Context):
    """The tiny run's data, tokenizer and model config (deterministic; written once) -> (rc with the data
    paths filled in, HF model config dict, held-out rows); a pretrained run: (rc, None, None)."""
    rc = ctx.rc
    if rc.model.init != "tiny":
        return rc, None, None
    data_dir, tok_dir = ctx.workdir / "tiny_data", ctx.workdir / "tiny_tokenizer"
    train_rows, eval_rows = tiny.make_tiny_dataset(seed=0, n_train=int(rc.model.tiny.train_rows), n_eval=200)
    if ctx.is_main and not (tok_dir / "tokenizer_config.json").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            tmp = data_dir / f"{name}.jsonl.tmp"
            with open(tmp, "w") as f:
                for r in rows:
                    f.write(json.dumps({"messages": r["messages"]}) + "\n")
            os.replace(tmp, data_dir / f"{name}.jsonl")
        tiny.build_tiny_tokenizer(str(tok_dir), train_rows, vocab_size=int(rc.model.tiny.vocab_size))
    distributed.barrier("tiny_assets")
    data = rc.data.replace(path=str(data_dir / "train.jsonl"), tokenizer=str(tok_dir),
                           eval_path=rc.data.eval_path or str(data_dir / "eval.jsonl"))
    return rc.replace(data=data), tiny.tiny_model_config(rc.model.tiny), (None if rc.data.eval_path else eval_rows)


def _init_base(ctx: Context, model_config, param_sh, transform, tokenizer):
    """The frozen base's params on their shardings -> (model_config, params, base_model path)."""
    rc, base_dir = ctx.rc, ctx.workdir / "base_model"
    if rc.model.init != "tiny":
        model_config, params = hf_io.load_hf(rc.model.path, shardings=param_sh, transform=transform,
                                             **_model_policy(rc))
        return model_config, params, os.path.abspath(rc.model.path)
    # decided once for all processes (process 0 may write base_model/ while another still checks)
    if distributed.broadcast_from_main(int((base_dir / "config.json").exists())):
        model_config, params = hf_io.load_hf(str(base_dir), shardings=param_sh, transform=transform,
                                             **_model_policy(rc))
    else:
        params = jax.jit(lambda r: llama.init_params(model_config, r), out_shardings=param_sh)(
            jax.random.PRNGKey(rc.train.seed + 1))
        _save_base(base_dir, model_config, params, tokenizer, ctx.is_main)
        distributed.barrier("base_model")
    return model_config, params, str(base_dir)


def _load_model(ctx: Context, hf_cfg) -> ModelParts:
    """Tokenizer, model config, the frozen base (QLoRA: quantised as read, unless the vocabulary is resized:
    the resized float base is saved first) and the method's trainable tree (float32)."""
    rc = ctx.rc
    model_config = (ModelConfig.from_hf(hf_cfg, **_model_policy(rc)) if hf_cfg is not None
                    else hf_io.read_config(rc.model.path, **_model_policy(rc)))
    tokenizer, added = pipeline.tokenizer_from_config(rc)
    if len(tokenizer) > model_config.vocab_size and not added:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.vocab_size}")
    method = peft.from_config(rc.peft).with_tokenizer(tokenizer)
    axes = llama.param_logical_axes(model_config)
    param_sh = sharding.logical_shardings(axes, ctx.mesh, llama.abstract_params(model_config))
    model_config, params, base_model = _init_base(ctx, model_config, param_sh,
                                                  None if added else method.load_transform(), tokenizer)
    if added:
        base_dir = ctx.workdir / "base_model"
        # a model whose embedding already has rows past the tokenizer (padded vocabularies: Gemma, Qwen) takes
        # the new ids as they are; only a smaller one grows (never shrinks: the rows past the tokenizer stay)
        grow = len(tokenizer) > model_config.vocab_size
        if grow:
            params, model_config = _resize_vocab(params, model_config, len(tokenizer))
        if ctx.is_main:
            log.warning("added %d template tokens %s: %s; the base with the new tokenizer is saved in %s",
                        len(added), added, f"vocab resized to {len(tokenizer)}" if grow else
                        f"their ids fit the model's {model_config.vocab_size}-row embedding (not resized)", base_dir)
        # the resized base is deterministic (mean-initialised rows): written once, reused on resume
        if not distributed.broadcast_from_main(int((base_dir / "config.json").exists())):
            _save_base(base_dir, model_config, params, tokenizer, ctx.is_main)
        distributed.barrier("resized_base")
        base_model = str(base_dir)
        axes = llama.param_logical_axes(model_config)
        param_sh = sharding.logical_shardings(axes, ctx.mesh, llama.abstract_params(model_config))
        params = jax.device_put(params, param_sh)
    stop_ids = templates.stop_token_ids(tokenizer, rc.data.template)
    if ctx.is_main:
        tokenizer.save_pretrained(str(ctx.workdir / "tokenizer"))
    trainable, frozen = method.init(params, model_config, workdir_lib.method_rng(rc.to_dict()))
    return ModelParts(model_config, tokenizer, method, trainable, frozen, base_model, stop_ids, axes)


def _generation_setup(rc, model: ModelParts, tiny_eval_rows) -> _GenSetup | None:
    """The prompts generated from at each evaluation (tiny: every held-out task; else a few eval rows)."""
    if rc.eval.num_generations <= 0 or jax.process_count() > 1:
        return None
    tok, template = model.tokenizer, model.tokenizer.chat_template
    if tiny_eval_rows is not None:
        rows = tiny_eval_rows
        return _GenSetup(tok, template, model.stop_ids, [r["messages"][:-1] for r in rows],
                         [r["messages"][-1]["content"] for r in rows], [r["task"] for r in rows], [None] * len(rows))
    try:
        sets = parse_eval_sets(rc.data.eval_path)
        data = rc.data.replace(eval_path=sets[0][1]) if sets else rc.data
        groups = pipeline.split_records(data, "eval", int(rc.train.seed))  # lazy with data.streaming: take a few
        convs = list(itertools.islice((g[i] for g in groups for i in range(len(g))), int(rc.eval.num_generations)))
        recs = [c for c in convs if c["messages"][-1]["role"] == "assistant" and not c.get("skip")]
        return _GenSetup(tok, template, model.stop_ids, [c["messages"][:-1] for c in recs],
                         [c["messages"][-1]["content"] for c in recs], [None] * len(recs),
                         [c.get("tools") for c in recs])
    except Exception as e:  # noqa: BLE001 - generation samples are a convenience; never stop training for them
        log.warning("no sample generations: %s", e)
        return None


def _build_data(ctx: Context, model: ModelParts, tiny_eval_rows) -> DataParts:
    rc, tok = ctx.rc, model.tokenizer
    bs, seed = int(rc.train.batch_size), int(rc.train.seed)
    per_epoch = None
    epoch_stats: list = []  # the epoch count's DataStats: the data accounting of the training split, for free
    if rc.train.steps <= 0 or rc.eval.every_epoch:
        per_epoch = pipeline.count_train_batches(rc.data, tok, global_batch_size=bs, seed=seed, stats_out=epoch_stats)
    total_steps = int(rc.train.steps) if rc.train.steps > 0 else int(rc.train.epochs) * per_epoch
    if ctx.is_main and rc.train.warmup_steps > total_steps:  # a short smoke run of a long recipe: allowed, said
        log.warning("train.warmup_steps=%d is more than the run's %d steps: the learning rate never reaches "
                    "train.lr=%g", rc.train.warmup_steps, total_steps, rc.train.lr)
    train_iter = pipeline.build_train_iterator(rc.data, tok, global_batch_size=bs, seed=seed, epochs=None)
    eval_sets, eval_configs, eval_stats = [], [], {}
    named = parse_eval_sets(rc.data.eval_path)
    if named or rc.data.eval_fraction > 0:
        for name, path in named or [("", "")]:
            data = rc.data.replace(eval_path=path) if path else rc.data
            eval_configs.append((name, data))
            batches, stats = pipeline.build_eval_batches(data, tok, global_batch_size=bs, seed=seed,
                                                         max_batches=int(rc.eval.max_batches))
            if not rc.eval.max_batches and jax.process_count() == 1:  # a pass over every row of the set
                eval_stats[name] = stats
            if batches:
                eval_sets.append((name, batches))
    # Data accounting (issue 19): rows read / kept / skipped by reason / truncated, per split and file, and
    # the directory entries not read, over every row (a streaming source: its first rows, marked partial).
    # Passes made anyway are reused (the epoch count's, the eval batches'); the rest is one batched pass
    # (pipeline.TokenizeFn.many).  Printed at start, written into run_info.json.
    accounting: dict = {}
    if ctx.is_main:
        accounting = pipeline.account_data(
            rc.data, tok, seed=seed, train_stats=epoch_stats[0] if epoch_stats else None,
            eval_configs=eval_configs, eval_stats=eval_stats)
    return DataParts(train_iter, total_steps, per_epoch, eval_sets, _generation_setup(rc, model, tiny_eval_rows),
                     accounting)


def _eval_metric_names(data: DataParts) -> list[str]:
    names = []
    for name, _ in data.eval_sets:
        names += [f"{name}/loss", f"{name}/accuracy"] if name else ["loss", "accuracy"]
    if data.gen is not None and data.gen.prompts:
        names += ["stop_rate", "rouge_l", "mean_length", "repetition"]
        names += ["exact_match"] if data.gen.tasks[0] is not None else []
    return names


def _early_stopping(rc, data: DataParts) -> EarlyStopping | None:
    """The tracker of train.early_stopping.metric (also for checkpoint.keep_best); None when neither is on."""
    es = rc.train.early_stopping
    if not (es.patience or rc.checkpoint.keep_best):
        return None
    names = _eval_metric_names(data)
    metric = es.metric
    if metric == "loss" and "loss" not in names and data.eval_sets:
        metric = f"{data.eval_sets[0][0]}/loss"  # only named sets: the first one's loss
    if metric not in names:
        raise ConfigError(f"train.early_stopping.metric={es.metric!r} is not an evaluation metric of this run "
                          f"(it has: {', '.join(names) or 'no evaluation set'})")
    return EarlyStopping(metric, es.patience, es.min_delta)


def _rep_array_fn(mesh):
    rep = sharding.replicated(mesh)  # step/rng as global replicated arrays (Orbax multi-host needs global arrays)

    def rep_array(v):  # same host value on every process -> replicated global array (no communication)
        v = np.asarray(v)
        return jax.make_array_from_callback(v.shape, rep, lambda _: v)

    return rep_array


def _build_state(ctx: Context, model: ModelParts, data: DataParts):
    """Optimizer, the jitted steps and the initial TrainState on its shardings -> (steps, state, rep_array)."""
    rc = ctx.rc
    optimizer, schedule = optim.make_optimizer(rc.train, data.total_steps)
    steps = make_train_step(model.model_config, ctx.mesh, trainable=model.trainable, frozen=model.frozen,
                            optimizer=optimizer, schedule=schedule, method=model.method,
                            opts=StepOptions.from_cfg(rc), batch_size=int(rc.train.batch_size),
                            param_logical_axes=model.axes)
    trainable = jax.device_put(model.trainable, steps.shardings.trainable)
    model.frozen = jax.device_put(model.frozen, steps.shardings.frozen) if model.frozen else model.frozen
    model.trainable = None  # the state holds it from here on
    opt_state = sharding.init_opt_state(optimizer, trainable, steps.shardings.opt_state)
    rep_array = _rep_array_fn(ctx.mesh)
    state = TrainState(trainable=trainable, opt_state=opt_state,
                       rng=rep_array(jax.random.key_data(jax.random.PRNGKey(rc.train.seed))), step=0)
    return steps, state, rep_array


def _workdir_relative(flat: dict) -> dict:
    """The tiny run's generated data/tokenizer paths lie inside the work directory: compared relative to it
    (a copied or moved work directory resumes)."""
    for k in ("data.path", "data.eval_path", "data.tokenizer"):
        if isinstance(flat.get(k), str):
            flat[k] = re.sub(r"[^,=]*/(tiny_data/|tiny_tokenizer\b)", r"WORKDIR/\1", flat[k])
    return flat


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Fields that differ between a checkpoint's config and this run's -> (meaning-changing, other), each
    as "field: old -> new"; fields one side does not have (an older checkpoint) are not compared."""
    old, new = (_workdir_relative(run_config.flatten(c or {})) for c in (saved, current))
    meaning, other = [], []
    for k in sorted(set(old) & set(new)):
        if old[k] != new[k] and not (isinstance(old[k], (int, float)) and isinstance(new[k], (int, float))
                                     and float(old[k]) == float(new[k])):
            line = f"{k}: {old[k]!r} -> {new[k]!r}"
            (meaning if k.startswith(MEANING_PREFIXES) and k not in HARMLESS else other).append(line)
    return meaning, other


def _check_config_change(rc, meta: dict, step: int) -> list[str]:
    """ConfigError when a meaning-changing field differs from the checkpoint's config (unless
    checkpoint.allow_config_change); -> every changed field as "field: old -> new"."""
    meaning, other = config_changes(meta.get("config") or {}, rc.to_dict())
    if meaning and not rc.checkpoint.allow_config_change:
        raise ConfigError(f"resuming step {step} with changed fields that change the meaning of the run: "
                          f"{'; '.join(meaning)}. Set checkpoint.allow_config_change=True to resume anyway, "
                          f"checkpoint.resume=none to start over, or use another --workdir")
    return meaning + other


def _resume(ctx: Context, ck, state: TrainState, train_iter) -> tuple[TrainState, dict]:
    """The newest readable checkpoint (checkpoint.resume=auto) -> (state, its meta); none: (state, {})."""
    if ctx.rc.checkpoint.resume != "auto":
        return state, {}
    latest = ck.latest_step()
    if distributed.broadcast_from_main(-1 if latest is None else latest) < 0:
        return state, {}

    # The grain iterator state is per process (process_i-of-n.json): after a change of the
    # process count it cannot be restored, so the new iterator is fast-forwarded instead.
    def saved_by_same_count(meta: dict) -> bool:
        return int(meta.get("process_count", jax.process_count())) == jax.process_count()

    abstract = ckpt_lib.abstract_like(state.checkpoint_tree(_rep_array_fn(ctx.mesh)))
    try:  # the newest readable step: any unreadable file of a step (its meta too) falls back
        tree, meta = ck.restore(abstract_state=abstract, data_iterator=train_iter,
                                restore_data_if=saved_by_same_count)
    except ckpt_lib.CheckpointNotFound as e:
        raise TrainError(f"{e}. Set checkpoint.resume=none to start over (they are kept in "
                         f"checkpoints.<n>) or use another --workdir") from None
    state = TrainState.from_checkpoint(tree)
    if distributed.agree_any(distributed.broadcast_from_main(state.step) != state.step):
        raise TrainError(f"processes restored different checkpoints (this one: step {state.step}); "
                         f"check that every host sees the same {ck.directory}")
    if not distributed.agree_all(saved_by_same_count(meta)):
        log.warning("checkpoint written by %d processes, resuming with %d: the data iterator is fast-forwarded "
                    "by %d batches (exact for data.packing=False without skipped examples; with packing each "
                    "process's packed stream differs)", int(meta.get("process_count", 0)), jax.process_count(),
                    state.step)
        for _ in range(state.step):
            next(train_iter)
    return state, meta


def _evaluator(ctx: Context, model: ModelParts, data: DataParts, steps, mw):
    """-> evaluate(trainable, step, label) -> metrics: every eval set's loss/accuracy (NAME/loss for named
    sets) and the generation metrics; one metrics row and one printed line per evaluation."""
    rc = ctx.rc

    def evaluate(trainable, step: int, label: str) -> dict:
        out, lines = {}, []
        for name, batches in data.eval_sets:
            r = _evaluate(steps, trainable, model.frozen, batches, ctx.mesh)
            prefix = f"{name}/" if name else ""
            out.update({f"{prefix}loss": r["loss"], f"{prefix}accuracy": r["accuracy"]})
        gen = data.gen
        if gen is not None and gen.prompts:
            limit = 0 if gen.tasks[0] is not None else int(rc.eval.num_generations)
            texts, ids, finish = _generations(gen, trainable, model.frozen, model.model_config, model.method,
                                              int(rc.eval.max_new_tokens), limit)
            gm, lines = _generation_report(gen, texts, ids, finish, int(rc.eval.num_generations))
            out.update(gm)
        if out:
            mw.write_eval(step, out, echo=False)
            desc = ", ".join(f"{k} {v:.4f}" for k, v in out.items()
                             if k.split("/")[-1] in ("loss", "accuracy", "exact_match", "stop_rate"))
            mw.print(f"eval ({label}, step {step}): {desc}")
        for ln in lines:
            mw.print(ln)
        return out

    return evaluate


def _metrics_writer(ctx: Context, model: ModelParts, data: DataParts, start_step: int, es=None):
    """-> (MetricsWriter, model FLOPs per token, peak FLOP/s per device); writes run_info.json, prints the start line."""
    rc, mc, method = ctx.rc, model.model_config, model.method
    n_total = peft.count_params(llama.abstract_params(mc))
    n_trainable = method.count_trainable(model.trainable_shapes)
    n_lookup = mc.vocab_size * mc.hidden_size if not mc.tie_embeddings else 0
    flops_tok = metrics_lib.model_flops_per_token(
        n_total, mc.num_layers, int(rc.data.max_length), mc.hidden_size, frozen_base=not method.trains_base,
        n_lookup_params=n_lookup, n_trainable_params=0 if method.trains_base else n_trainable)
    kernel_info = kernels_lib.describe(mc)
    # CPUs differ too much for a table: measure a jitted matmul once (accelerators: the device-kind table)
    peak = metrics_lib.peak_flops_per_device(float(rc.train.peak_flops), dtype=rc.model.dtype, measure_cpu=True)
    mw = metrics_lib.MetricsWriter(ctx.workdir, ctx.is_main, total_steps=data.total_steps,
                                   resume_step=start_step if start_step > 0 else None)
    mw.write_run_info(rc, extra={
        "model_params": n_total, "trainable_params": n_trainable, "total_steps": data.total_steps,
        "method": method.run_config(), "kernels": kernel_info, "steps_per_epoch": data.per_epoch,
        "mesh": dict(ctx.mesh.shape), "flops_per_token": flops_tok, "peak_flops_per_device": peak,
        "base_model": model.base_model, **({"data": data.accounting} if data.accounting else {}),
        **({"best_metric": es.metric} if es is not None else {}),  # the run report's best step reads it
    })
    if data.accounting:
        mw.print(pipeline.format_accounting(data.accounting))
    mw.print(
        f"sft_jax: {mc.model_type} {n_total / 1e6:.2f}M params, {method.describe()} ({n_trainable / 1e6:.3f}M "
        f"trainable), kernels {kernel_info}, mesh {dict(ctx.mesh.shape)}, {data.total_steps} steps"
        + (f" ({data.per_epoch}/epoch)" if data.per_epoch else "")
        + (f", resuming at step {start_step}" if start_step else ""))
    return mw, flops_tok, peak


def _add_hooks(loop: Loop, ctx: Context, data: DataParts, evaluate, es: EarlyStopping | None, best_ck) -> None:
    """Evaluation -> best checkpoint / early stopping -> checkpoint -> preemption, in this order."""
    rc, total = ctx.rc, data.total_steps
    every_eval, per_epoch = int(rc.eval.every_steps), data.per_epoch if rc.eval.every_epoch else 0

    def eval_due(s: int) -> bool:
        return s == total or bool(every_eval and s % every_eval == 0) or bool(per_epoch and s % per_epoch == 0)

    def run_eval(lp: Loop) -> None:
        s = lp.state.step
        lp.last_eval = evaluate(lp.state.trainable, s, "after training" if s == total else "during training")
        lp.eval_step = s

    def track_best(lp: Loop) -> None:
        s = lp.state.step
        if es is None or lp.eval_step != s:
            return
        value = lp.last_eval.get(es.metric)
        if es.update(s, value) and best_ck is not None:
            lp.save(best_ck, force=True)
            lp.mw.print(f"best {es.metric} {value:.4f} at step {s}: kept in {best_ck.directory}")
        if es.should_stop and s < total:
            lp.stop = "early_stopping"
            lp.mw.print(f"early stopping at step {s}: {es.metric} did not improve by more than "
                        f"{es.min_delta:g} in {es.bad_evals} evaluations (best {es.best:.4f} at step {es.best_step})")

    def checkpoint(lp: Loop) -> None:
        lp.save(force=True)

    def preempted(lp: Loop) -> None:
        lp.ck.wait()
        lp.mw.print(f"SIGTERM: saved checkpoint at step {lp.state.step}; exiting (resume with the same command)")

    loop.add_hook("eval", run_eval, when=eval_due)
    loop.add_hook("best", track_best, when=eval_due)
    loop.add_hook("checkpoint", checkpoint, every=int(rc.checkpoint.every_steps),
                  when=lambda s: s == total or loop.stop is not None)
    loop.add_hook("preemption", preempted, when=lambda s: loop.stop == "SIGTERM")


def _summary(ctx: Context, loop: Loop, data: DataParts, first_eval: dict, final_eval: dict, train_time: float):
    summary = {"step": loop.state.step, "total_steps": data.total_steps, "train_time_s": train_time,
               "last": loop.last, "eval_before": first_eval, "eval_after": final_eval, "stopped_by": loop.stop,
               "compilations": loop.counter.count}
    if ctx.is_main:
        with open(ctx.workdir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return summary


# ------------------------------------------------------------------ the run
def run(cfg, workdir: str | os.PathLike) -> dict:
    """Train according to `cfg` (a ConfigDict) in `workdir`; returns a summary dict (final metrics).

    The config is validated and parsed into typed sections first, so a bad one touches nothing. The work
    directory is then locked for the whole run (`sft_jax.workdir_lock`, taken by process 0; every process
    agrees on the outcome): a second run on it raises `WorkdirLocked`."""
    rc = run_config.parse(validate(cfg))
    lock, refusal = None, ""
    if distributed.is_main():
        try:
            lock = WorkdirLock(workdir)
        except WorkdirLocked as e:
            refusal = str(e)
    if distributed.agree_any(bool(refusal)):
        raise WorkdirLocked(refusal or f"process 0 could not lock the work directory {workdir}")
    try:
        return _run(rc, workdir)
    finally:
        if lock is not None:
            lock.release()


def _run(rc, workdir: str | os.PathLike) -> dict:
    """The phases, then fit (`run` holds the work directory's lock around it)."""
    _check_inputs(rc)
    ctx = Context(rc, pathlib.Path(workdir).resolve(), distributed.is_main(), None)
    if ctx.is_main:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
    distributed.barrier("workdir")
    _setup_compilation_cache()
    ctx.mesh = sharding.make_mesh(rc.mesh)
    ctx.rc, hf_cfg, tiny_eval_rows = _prepare_assets(ctx)
    rc = ctx.rc
    model = _load_model(ctx, hf_cfg)
    data = _build_data(ctx, model, tiny_eval_rows)
    es = _early_stopping(rc, data)
    model.trainable_shapes = jax.eval_shape(lambda t: t, model.trainable)
    steps, state, rep_array = _build_state(ctx, model, data)
    if ctx.is_main and rc.checkpoint.resume == "none":  # starting over: the earlier run's checkpoints kept aside
        for d in ("checkpoints", workdir_lib.BEST_DIR):
            keep_aside(ctx.workdir / d, "checkpoint.resume=none")
    distributed.barrier("checkpoints_aside")
    ck = ckpt_lib.Checkpointer(ctx.workdir, keep=int(rc.checkpoint.keep), every_steps=int(rc.checkpoint.every_steps),
                               async_save=bool(rc.checkpoint.async_save))
    best_ck = (ckpt_lib.Checkpointer(ctx.workdir, keep=1, async_save=False, subdir=workdir_lib.BEST_DIR)
               if rc.checkpoint.keep_best else None)
    try:
        return _fit(ctx, model, data, es, steps, state, rep_array, ck, best_ck)
    finally:
        ck.close()
        if best_ck is not None:
            best_ck.close()


def _fit(ctx: Context, model: ModelParts, data: DataParts, es, steps, state: TrainState, rep_array, ck,
         best_ck) -> dict:
    """Resume, evaluate before training, run the loop with its hooks, evaluate after; -> the summary."""
    rc = ctx.rc
    state, meta = _resume(ctx, ck, state, data.train_iter)
    changed = _check_config_change(rc, meta, state.step) if meta else []  # before any file is rewritten
    if ctx.is_main:
        workdir_lib.write_run_json(ctx.workdir, base_model=model.base_model, template=rc.data.template,
                                   method=model.method, model_policy=_model_policy(rc), eos_ids=model.stop_ids,
                                   config=rc.to_dict())
    start_step = state.step
    mw, flops_tok, peak = _metrics_writer(ctx, model, data, start_step, es)
    if changed:
        mw.print(f"resuming step {start_step} with a changed config: {'; '.join(changed)}")
    if es is not None:
        es.load(meta.get("early_stopping"))
    evaluate = _evaluator(ctx, model, data, steps, mw)
    first_eval = evaluate(state.trainable, 0, "before training") if start_step == 0 else {}
    loop = Loop(state=state, steps=steps, frozen=model.frozen, train_iter=data.train_iter,
                make_batch=lambda host: pipeline.global_batch(host, ctx.mesh, P(sharding.BATCH_AXES)),
                total_steps=data.total_steps, mw=mw, ck=ck, rep_array=rep_array, log_every=int(rc.train.log_every),
                meta=lambda lp: {"config": rc.to_dict(), "step": lp.state.step, "process_count": jax.process_count(),
                                 **({"early_stopping": es.state()} if es is not None else {})},
                flops_per_token=flops_tok, peak_flops=peak, spike_factor=float(rc.train.loss_spike.factor),
                spike_window=int(rc.train.loss_spike.window))
    _add_hooks(loop, ctx, data, evaluate, es, best_ck)
    if es is not None and es.should_stop:
        loop.stop = "early_stopping"
        mw.print(f"early stopping was reached before (best {es.metric} at step {es.best_step}): nothing to train")
    t_start = time.time()
    try:
        loop.fit()
        final_eval = loop.last_eval
        if loop.stop is None and loop.eval_step != loop.state.step:
            final_eval = evaluate(loop.state.trainable, loop.state.step, "after training")
    finally:
        mw.close()
    return _summary(ctx, loop, data, first_eval, final_eval if loop.stop != "SIGTERM" else {},
                    time.time() - t_start)


# ------------------------------------------------------------------ CLI
def _quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # absl's own handler (orbax logs through absl) prints INFO lines unless told otherwise
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def main(argv=None) -> int:
    from absl import flags  # the CLI's flag parser: only the entry point needs it
    from ml_collections import config_flags

    from sft_jax.cli import UsageError, run_absl

    config_flags.DEFINE_config_file("config", None, "configs/NAME.py (ml_collections); override with --config.a.b=v",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "run directory (checkpoints, metrics); default runs/<config name>")
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")

    def _main(_argv):
        FLAGS = flags.FLAGS
        _quiet_logs()
        if FLAGS.config is None:
            raise UsageError("--config=configs/NAME.py is required (e.g. configs/tiny.py)")
        workdir = FLAGS.workdir or os.path.join("runs", pathlib.Path(flags.FLAGS["config"].config_filename).stem)
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = run(FLAGS.config, workdir)
        print(f"done: {summary['step']} steps in {summary['train_time_s']:.1f}s; workdir {os.path.abspath(workdir)}")
        return 0

    return run_absl(_main, argv, "python -m sft_jax.train")  # the shared error-to-exit path (sft_jax/cli.py)


if __name__ == "__main__":
    sys.exit(main())

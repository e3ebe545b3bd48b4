"""Evaluate a trained work directory or a Hugging Face model on a held-out file.

    python -m sft_jax.eval --workdir=DIR [--step=N|latest|best] | --model=HF_DIR  --data=FILE
        [--compare=OTHER (a workdir or an HF dir)] [--json=OUT.json] [--num_examples=N]
        [--max_new_tokens=N] [--temperature=0 --seed=0] [--batch_size=16]

Loss: the assistant-token cross-entropy over the file (the trainer's template, masking and eval step,
`train_step.build_eval_step`) and its perplexity.  Generations (greedy, or sampled with
`--temperature`) from each conversation's prompt (every turn before its last assistant message),
scored against that message: exact match (after collapsing whitespace and a trailing full stop),
ROUGE-L F1 (`rouge-score`, with stemming), the stop rate (share of generations ending with an
end-of-turn / EOS token before `--max_new_tokens`: an untrained end-of-turn shows as ~0), the mean
length in tokens and the repetition (share of repeated 4-grams of generated ids).

The data settings (format, template, max_length, train_on, ...) are the work directory's training
config; an HF dir uses the defaults with its tokenizer's chat template, or, beside a work directory
(`--compare`), that run's settings, so both models see the same prompts.  `--compare` prints both
models side by side; `--json` writes {"data", "num_examples", "models": [{"name", "metrics"}, ...]}.
Bad arguments or data print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from rouge_score import rouge_scorer

from sft_jax import peft
from sft_jax.config import default_config
from sft_jax.data import pipeline, templates
from sft_jax.data.formats import DataError
from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli
from sft_jax.generate import Generator, check_model_dir, load_model_dir
from sft_jax.train_step import build_eval_step
from sft_jax.workdir import check_workdir, load_run, parse_step

PROG = "python -m sft_jax.eval"
REPETITION_N = 4  # n-gram length of the repetition metric
METRICS = ("loss", "perplexity", "exact_match", "rouge_l", "stop_rate", "mean_length", "repetition")


@dataclasses.dataclass
class EvalModel:
    """A model to evaluate: its Generator and the trainer's eval step over its weights."""

    gen: Generator
    loss_sums: Callable  # jitted batch -> {"ce_sum", "tokens", ...}
    data_config: dict | None = None  # the training run's data section (work directories only)


def _eval_model(gen: Generator, trainable, frozen, method: peft.Method, data_config=None) -> EvalModel:
    step = jax.jit(build_eval_step(gen.config, method))
    return EvalModel(gen, lambda batch: step(trainable, frozen, batch), data_config)


def load_workdir_model(workdir: str, step: int | None = None) -> EvalModel:
    """A trained run at `step` (latest when None): base and trained tree through its method (unmerged)."""
    run = load_run(workdir, step)
    params, method_vars = run.method.model_inputs(run.trainable, run.frozen)
    gen = Generator(config=run.model_config, params=params, tokenizer=run.tokenizer, template=run.chat_template(),
                    eos_ids=list(run.eos_ids), method=run.method, method_vars=method_vars,
                    name=f"{workdir}@{run.step}")
    return _eval_model(gen, run.trainable, run.frozen, run.method, dict(run.config_dict.get("data") or {}))


def load_hf_model(path: str) -> EvalModel:
    """A Hugging Face model directory (plain weights, its own tokenizer and stop ids)."""
    gen = load_model_dir(path)
    if gen.tokenizer is None:
        raise UsageError(f"{path}: no tokenizer files; evaluation renders the data with a tokenizer")
    return _eval_model(gen, gen.params, {}, peft.Full())


def data_config(data: str, train_data: dict | None) -> ml_collections.ConfigDict:
    """The trainer's data section for reading `data` as the held-out file."""
    cfg = default_config().data
    if train_data:
        cfg.update({k: v for k, v in train_data.items() if k in cfg})
    cfg.path = data
    cfg.eval_path = data
    cfg.streaming = False
    return cfg


# ------------------------------------------------------------------------------ metrics


def normalise(text: str) -> str:
    """Whitespace runs collapsed, a trailing full stop dropped (the exact-match comparison)."""
    return " ".join(text.split()).rstrip(".").strip()


def repeated_ngram_share(sequences: Sequence[Sequence[int]], n: int = REPETITION_N) -> float:
    """Share of the n-grams of all `sequences` that repeat an earlier n-gram of the same sequence."""
    total = repeated = 0
    for s in sequences:
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def generation_metrics(texts: Sequence[str], ids: Sequence[Sequence[int]], finish: Sequence[str],
                       references: Sequence[str]) -> dict:
    """exact_match, rouge_l, stop_rate, mean_length, repetition over generations and their references."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    n = len(texts)
    if n == 0:
        return {}
    return {
        "exact_match": sum(normalise(t) == normalise(r) for t, r in zip(texts, references)) / n,
        "rouge_l": float(np.mean([scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, references)])),
        "stop_rate": sum(f == "stop" for f in finish) / n,
        "mean_length": float(np.mean([len(i) for i in ids])),
        "repetition": repeated_ngram_share(ids),
        "generations": n,
    }


def _batches(examples: list[dict], batch_size: int):
    """Unpacked examples -> padded host batches (the trainer's layout, lengths rounded up to PAD_MULTIPLE)."""
    for i in range(0, len(examples), batch_size):
        rows = examples[i:i + batch_size]
        longest = max(len(r["inputs"]) for r in rows)
        yield pipeline._pad_rows(rows, batch_size, -(-longest // pipeline.PAD_MULTIPLE) * pipeline.PAD_MULTIPLE)


def loss_metrics(model: EvalModel, cfg_data, num_examples: int, batch_size: int) -> dict:
    """Assistant-token loss / perplexity over the first `num_examples` rows (0 = all)."""
    tokenizer = model.gen.tokenizer
    examples, stats = pipeline.examples_for_split(cfg_data, tokenizer, "eval", limit=num_examples)
    ce = tokens = 0.0
    for batch in _batches(examples, batch_size):
        sums = jax.device_get(model.loss_sums(batch))
        ce += float(sums["ce_sum"])
        tokens += float(sums["tokens"])
    if not tokens:
        raise DataError(f"{cfg_data.eval_path}: no assistant tokens to score ({stats.rows} rows read)")
    loss = ce / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens),
            "examples": len(examples), "skipped": stats.rows - len(examples)}


def prompts_and_references(cfg_data, num_examples: int) -> tuple[list[list[dict]], list[str], list]:
    """(prompt messages, reference answers, tools) of the first `num_examples` rows (0 = all)."""
    prompts, refs, tools = [], [], []
    for group in pipeline.split_records(cfg_data, "eval"):
        for i in range(len(group)):
            if num_examples and len(prompts) >= num_examples:
                return prompts, refs, tools
            rec = group[i]
            if rec.get("skip"):  # nothing right to train on / compare with (formats.SKIP_REASONS)
                continue
            msgs = rec["messages"]
            last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            prompts.append(msgs[:last])
            refs.append(msgs[last]["content"])
            tools.append(rec.get("tools"))
    return prompts, refs, tools


def evaluate(model: EvalModel, cfg_data, *, num_examples: int = 0, max_new_tokens: int = 128,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 16, truncate_prompt: bool = False) -> dict:
    """Loss and generation metrics of `model` on `cfg_data.eval_path` (see the module doc).
    A prompt longer than the model's context is an error unless `truncate_prompt` (cut from the left)."""
    gen = model.gen
    if cfg_data.template:  # render prompts exactly as the data were rendered for the loss
        gen = dataclasses.replace(gen, template=templates.get_template(cfg_data.template))
    out = loss_metrics(model, cfg_data, num_examples, batch_size)
    prompts, refs, tools = prompts_and_references(cfg_data, num_examples)
    texts, ids, finish = [], [], []
    for i in range(0, len(prompts), batch_size):
        enc = [gen.encode_messages(m, t) for m, t in zip(prompts[i:i + batch_size], tools[i:i + batch_size])]
        for o, why in gen.generate_ids(enc, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i,
                                       truncate_prompt=truncate_prompt):
            texts.append(gen.decode(o))
            ids.append(o)
            finish.append(why)
    out.update(generation_metrics(texts, ids, finish, refs))
    out["samples"] = [{"prompt": p[-1]["content"] if p else "", "generation": t, "reference": r, "finish_reason": f}
                      for p, t, r, f in list(zip(prompts, texts, refs, finish))[:3]]
    return out


# -------------------------------------------------------------------------------- CLI


def format_table(names: Sequence[str], results: Sequence[dict]) -> str:
    """The metrics of one or more models as aligned columns."""
    width = max(12, *(len(n) for n in names))
    rows = [f"{'':<12} " + " ".join(f"{n:>{width}}" for n in names)]
    for k in METRICS:
        vals = [r.get(k) for r in results]
        cells = ["-" if v is None else (f"{v:.1%}" if k in ("exact_match", "stop_rate", "repetition")
                                        else f"{v:.4f}" if k != "mean_length" else f"{v:.1f}") for v in vals]
        rows.append(f"{k:<12} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(rows)


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="a training work directory")
    p.add_argument("--step", default="latest", help="--workdir checkpoint: N, latest or best")
    p.add_argument("--model", default=None, help="a Hugging Face model directory")
    p.add_argument("--data", default=None, help="the held-out file (any format the trainer reads, or hf:ID)")
    p.add_argument("--compare", default=None, help="a second model (work directory or HF dir) shown beside")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--num_examples", type=int, default=0, help="first N rows of --data (0 = all)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--truncate_prompt", action="store_true",
                   help="cut a prompt longer than the model's context from the left (with a warning; default: error)")
    return p


def _check_args(args) -> int | None:
    """Validate the arguments; -> the --step as int (None = latest)."""
    if (args.model is None) == (args.workdir is None):
        raise UsageError("give exactly one of --model=HF_DIR or --workdir=DIR")
    if not args.data:
        raise UsageError("--data=FILE is required (the held-out file)")
    if not args.data.startswith("hf:") and not os.path.exists(args.data):
        raise UsageError(f"--data: {args.data} does not exist")
    for name in ("num_examples", "max_new_tokens", "batch_size"):
        v = getattr(args, name)
        if v < (0 if name == "num_examples" else 1):
            raise UsageError(f"--{name} must be {'>= 0' if name == 'num_examples' else '> 0'}, got {v}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.step != "latest" and args.model is not None:
        raise UsageError("--step needs --workdir")
    if args.step not in ("latest", "best") and not args.step.isdigit():
        raise UsageError(f"--step must be an integer, 'latest' or 'best', got {args.step!r}")
    step = parse_step(args.step)
    if args.workdir is not None:
        check_workdir(args.workdir, step)
    else:
        check_model_dir(args.model)
    if args.compare is not None:
        if not os.path.isdir(args.compare):
            raise UsageError(f"--compare: not a directory: {args.compare}")
        if os.path.isfile(os.path.join(args.compare, "run.json")):
            check_workdir(args.compare)
        else:
            check_model_dir(args.compare)
    return step


def _load(path: str, step: int | None, is_workdir: bool) -> EvalModel:
    return load_workdir_model(path, step) if is_workdir else load_hf_model(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    step = _check_args(args)
    models = [_load(args.workdir or args.model, step, args.workdir is not None)]
    if args.compare is not None:
        models.append(_load(args.compare, None, os.path.isfile(os.path.join(args.compare, "run.json"))))
    train_data = next((m.data_config for m in models if m.data_config is not None), None)
    results = []
    for m in models:
        try:
            results.append(evaluate(m, data_config(args.data, train_data), num_examples=args.num_examples,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    seed=args.seed, batch_size=args.batch_size,
                                    truncate_prompt=args.truncate_prompt))
        except DataError as e:
            raise UsageError(f"--data: {e}") from None
    names = [m.gen.name for m in models]
    print(f"{args.data}: {results[0]['examples']} examples, {results[0]['tokens']} assistant tokens")
    print(format_table(names, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "num_examples": args.num_examples,
                       "models": [{"name": n, "metrics": r} for n, r in zip(names, results)]}, f, indent=2,
                      ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

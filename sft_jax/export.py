"""Export a trained run for transformers / vLLM / peft.

    python -m sft_jax.export --workdir=DIR [--step=N|latest|best] --out=DIR --format=merged|peft [--dtype=bfloat16|float32]
    python -m sft_jax.export --workdir=DIR [--step=N|latest|best] --out=DIR --format=gguf [--dtype=f16|bf16|q8_0|f32]
    python -m sft_jax.export --workdir=DIR [--step=N|latest|best] --out=DIR --format=adapter [--dtype=float32|bfloat16]

* `merged`: plain weights from the run's fine-tuning method (`Method.merge`: e.g. LoRA's update
  merged into the base; full fine-tuning: the trained weights; a method that cannot be merged
  says why), written by `save_hf` with the method's `merged_config` (BitFit turns on bias flags;
  config.json of the original family, safetensors sharded with an
  index above --max_shard_mb; the text part of a multimodal Gemma 3 is written back as the same
  Gemma3ForConditionalGeneration, its vision tower and projector copied from the base), plus the run's tokenizer files (with the chat template used in
  training) and a `generation_config.json` whose `eos_token_id` lists the end-of-turn token and
  EOS, so `model.generate` stops where the fine-tuned model learnt to.
* `peft`: the method's PEFT adapter (`Method.save_peft`: `adapter_config.json` +
  `adapter_model.safetensors`, `PeftModel.from_pretrained(base, DIR)`), plus the tokenizer files
  (the training tokenizer may carry added template tokens); methods PEFT does not have say so.
* `gguf`: `DIR/model-<dtype>.gguf` for llama.cpp / Ollama / transformers (`gguf_file=`): the merged
  export (float32, in a temporary directory) converted by `sft_jax.gguf_export.write_gguf`, with the
  tokenizer, special tokens and chat template in its metadata (default dtype f16).
* `adapter`: sft_jax's own adapter format for any method with a frozen base (`sft_jax.adapter_format`:
  `adapter.safetensors` + `sft_jax_adapter.json` + the tokenizer files; default dtype float32), loaded by
  `python -m sft_jax.generate --model=BASE --adapter=DIR`; the one export of bottleneck adapters.

Every format is written into a staging directory beside --out and renamed into place when
complete (`sft_jax.staged_dir`; files 0644): a non-empty --out is refused unless --overwrite, which
replaces it whole (no file of an earlier export survives); an interrupted export leaves --out as it was.

Bad arguments (missing workdir, unknown step or format, ...) print one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli
from sft_jax.staged_dir import TargetExistsError, check_target, staged_dir  # noqa: F401
from sft_jax.workdir import STEP_HELP

FORMATS = ("merged", "peft", "gguf", "adapter")
DTYPES = ("float32", "bfloat16")


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m sft_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training work directory (run.json, checkpoints/)")
    p.add_argument("--step", default=None, help=STEP_HELP)
    p.add_argument("--out", required=True, help="output directory (must be empty or new, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.add_argument("--format", required=True, help="merged | peft | gguf | adapter")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the run's model.param_dtype); "
                   "gguf: f16 | bf16 | q8_0 | f32 (default f16)")
    p.add_argument("--max_shard_mb", type=float, default=5 * 1024, help="merged: shard size limit in MiB")
    return p


def generation_config(model_config, eos_ids, tokenizer=None) -> dict:
    eos = list(dict.fromkeys(int(i) for i in eos_ids)) or list(model_config.eos_token_ids)
    pad = model_config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return {
        "bos_token_id": model_config.bos_token_id,
        "eos_token_id": eos if len(eos) != 1 else eos[0],
        "pad_token_id": pad,
        "do_sample": False,
    }


def copy_tokenizer(src: str, out: str) -> None:
    if not os.path.isdir(src):
        return
    for name in os.listdir(src):
        s = os.path.join(src, name)
        if os.path.isfile(s):
            shutil.copyfile(s, os.path.join(out, name))


def export_merged(run, out: str, *, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write the merged HF directory for a loaded `Run`; returns the safetensors files."""
    from sft_jax.models.hf_io import save_hf
    params = run.merged_params()
    config = run.merged_config()  # the method may need other flags in config.json (BitFit: biases)
    os.makedirs(out, exist_ok=True)
    files = save_hf(out, config, params, dtype=dtype, max_shard_bytes=max_shard_bytes)
    copy_tokenizer(run.tokenizer_path, out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation_config(config, run.eos_ids, run.tokenizer), f, indent=2)
    return files


def export_peft(run, out: str, *, dtype: str = "float32") -> list[str]:
    """Write the PEFT adapter directory of a loaded `Run`; returns the adapted module names."""
    modules = run.method.save_peft(out, run.trainable, run.frozen, run.model_config,
                                   base_model_name_or_path=run.base_model, dtype=dtype)
    copy_tokenizer(run.tokenizer_path, out)
    return modules


def export_adapter(run, out: str, *, dtype: str = "float32") -> dict:
    """Write sft_jax's adapter directory of a loaded `Run` (`sft_jax.adapter_format`); returns its JSON."""
    from sft_jax.adapter_format import save_adapter

    meta = save_adapter(out, method=run.method, trainable=run.trainable, model_config=run.model_config,
                        base_model=run.base_model, seed=int((run.config_dict.get("train") or {}).get("seed", 0)),
                        step=run.step, template=run.template, eos_ids=run.eos_ids, dtype=dtype)
    copy_tokenizer(run.tokenizer_path, out)
    return meta


def export_gguf(run, out: str, *, dtype: str = "f16"):
    """Write `<out>/model-<dtype>.gguf` for a loaded `Run`; returns the `GGUFSummary`."""
    from sft_jax.gguf_export import write_gguf

    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".merged-") as tmp:
        export_merged(run, tmp, dtype="float32")
        return write_gguf(tmp, os.path.join(out, f"model-{dtype}.gguf"), dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.format not in FORMATS:
        raise UsageError(f"--format={args.format!r} is not one of {', '.join(FORMATS)}")
    if args.format == "gguf":
        from sft_jax.gguf_export import GGUF_DTYPES

        dtypes = tuple(GGUF_DTYPES)
    else:
        dtypes = DTYPES
    if args.dtype is not None and args.dtype not in dtypes:
        raise UsageError(f"--dtype={args.dtype!r} is not one of {', '.join(dtypes)} (--format={args.format})")
    check_target(args.out, args.overwrite)
    if args.max_shard_mb <= 0:
        raise UsageError("--max_shard_mb must be > 0")
    from sft_jax.workdir import check_workdir

    run_json, step, _ = check_workdir(args.workdir, args.step)  # cheap checks before jax loads
    dtype = args.dtype or {"gguf": "f16", "adapter": "float32"}.get(args.format) or run_json["model"].get(
        "param_dtype", "float32")
    if args.format == "adapter":  # refuse before the base loads
        from sft_jax import peft

        if not peft.get(str(run_json["peft"].get("method"))).needs_base_weights:
            raise UsageError(f"--format=adapter: method {run_json['peft'].get('method')!r} trains every weight "
                             "(no frozen base), so there is no adapter: use --format=merged")

    from sft_jax.workdir import load_run

    # Merge in float32 whatever the training param dtype was; cast once when writing.
    run = load_run(args.workdir, args.step, param_dtype="float32", dtype="float32", load_tokenizer=True)
    with staged_dir(args.out, overwrite=args.overwrite) as tmp:
        if args.format == "merged":
            files = export_merged(run, tmp, dtype=dtype, max_shard_bytes=int(args.max_shard_mb * 2**20))
            what = run.model_config.model_type
            if run.model_config.multimodal:
                what = (f"{run.model_config.multimodal} (trained {what} language model; vision tower and projector "
                        f"copied unchanged from {run.model_config.hf_wrapper['source']})")
            done = (f"wrote merged {what} model of step {run.step} to {args.out} "
                    f"({len(files)} safetensors file(s), {dtype}, eos_token_id={run.eos_ids})")
        elif args.format == "gguf":
            s = export_gguf(run, tmp, dtype=dtype)
            fallback = f"; F16 (rows not a multiple of 32): {', '.join(s.f16_fallback)}" if s.f16_fallback else ""
            done = (f"wrote GGUF ({s.arch}, {s.tokenizer_model} vocab of {s.n_tokens}) of step {run.step} to "
                    f"{os.path.join(args.out, os.path.basename(s.path))} ({dtype}{fallback})")
        elif args.format == "adapter":
            meta = export_adapter(run, tmp, dtype=dtype)
            done = (f"wrote sft_jax adapter of step {run.step} to {args.out} ({meta['describe']}, "
                    f"{meta['trainable_params']} parameters, {dtype}; load with sft_jax.generate "
                    f"--model={run.base_model} --adapter={args.out})")
        else:
            modules = export_peft(run, tmp, dtype=dtype)
            done = (f"wrote peft adapter of step {run.step} to {args.out} ({run.method.describe()}, "
                    f"{len(modules)} modules, {dtype})")
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "python -m sft_jax.export"))

"""Checkpoint conversion CLI.

    python -m sft_jax.convert llama2c --checkpoint=stories260K.bin --tokenizer=tok512.model --out=DIR

writes a Hugging Face Llama directory (config.json, model.safetensors, tokenizer files)
loadable by `transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR)` and by
`sft_jax.models.hf_io.load_hf(DIR)`.
"""

from __future__ import annotations

import os
import sys

from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli

PROG = "python -m sft_jax.convert"


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineArgumentParser)
    l2c = sub.add_parser("llama2c", help="llama2.c legacy .bin + sentencepiece .model -> Hugging Face directory")
    l2c.add_argument("--checkpoint", required=True, help="llama2.c legacy-format .bin")
    l2c.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    l2c.add_argument("--out", required=True, help="output directory")
    l2c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of saved weights")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: llama2c")
    if args.command == "llama2c":
        for flag, path in (("--checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer)):
            if not os.path.isfile(path):
                parser.error(f"{flag}: file not found: {path}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"--out: {args.out} exists and is not a directory")
        from sft_jax.models.llama2c import convert_llama2c

        try:
            config = convert_llama2c(args.checkpoint, args.tokenizer, args.out, dtype=args.dtype)
        except ValueError as e:  # a malformed checkpoint or tokenizer: bad input
            raise UsageError(str(e)) from None
        print(
            f"wrote {args.out}: llama, {config.num_layers} layers, hidden {config.hidden_size}, "
            f"heads {config.num_heads}/{config.num_kv_heads}, vocab {config.vocab_size}, "
            f"tied={config.tie_embeddings}, dtype={args.dtype}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

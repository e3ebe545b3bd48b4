"""Data inspector: render examples with their trainable spans, and print data statistics.

    python -m sft_jax.data.inspect --config=configs/data_demo.py [--config.data.max_length=1024]
        [--num_examples=3] [--split=train] [--json]

Trainable tokens are shown in green on a terminal and in ``[[double brackets]]``
otherwise.  ``--json`` prints one JSON object (rows, examples, skipped, truncated,
tokens, trainable_tokens, trainable_fraction, length_percentiles, packing_efficiency,
added_tokens, template, files (per file: rows, examples, skipped by reason, truncated) and
accounting (the trainer's data block: both splits, per file, ignored directory entries)) and
nothing else on stdout.  Errors (bad data, config, paths) are one ``error:`` line, exit 2
(``sft_jax.cli``).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config() -> ConfigDict)")
_NUM = flags.DEFINE_integer("num_examples", 3, "examples to render")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "which split to inspect")
_JSON = flags.DEFINE_boolean("json", False, "print one JSON object of statistics")
_COLOR = flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "ANSI colour for trainable spans")


def inspect_data(cfg, *, num_examples: int = 3, split: str = "train") -> tuple[dict, list[str]]:
    """Statistics dict and ``num_examples`` rendered (marked) examples for ``cfg``."""
    from sft_jax.data import pipeline

    tokenizer, added = pipeline.tokenizer_from_config(cfg)
    examples, stats = pipeline.examples_for_split(cfg.data, tokenizer, split, seed=cfg.train.seed)
    out = stats.summary()
    out["files"] = stats.files_summary()
    out["packing"] = bool(cfg.data.packing)
    out["max_length"] = cfg.data.max_length
    out["packing_efficiency"] = pipeline.packing_efficiency(
        examples, cfg.data, batch_size=max(1, cfg.train.batch_size), seed=cfg.train.seed)
    out["template"] = cfg.data.template or "(tokenizer's own)"
    out["added_tokens"] = list(added)
    out["vocab_size"] = len(tokenizer)
    # the trainer's accounting block (both splits, per file, ignored directory entries)
    out["accounting"] = pipeline.account_data(cfg.data, tokenizer, seed=cfg.train.seed, limit=0,
                                              train_stats=stats if split == "train" else None)
    return out, [(ex, tokenizer) for ex in examples[:num_examples]]


def _render(ex, tokenizer, color: bool) -> str:
    from sft_jax.data.masking import render_marked

    # Re-attach the first token (inputs[0]) so the whole sequence shows; mask is per target.
    ids = [int(ex["inputs"][0])] + [int(t) for t in ex["targets"]]
    mask = [0] + [int(m) for m in ex["loss_mask"]]
    return render_marked(tokenizer, ids, mask, color=color)


def main(argv):
    del argv
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required")
    from sft_jax.config import validate

    validate(cfg)
    stats, shown = inspect_data(cfg, num_examples=_NUM.value, split=_SPLIT.value)
    if _JSON.value:
        print(json.dumps(stats, sort_keys=True))
        return
    color = _COLOR.value == "always" or (_COLOR.value == "auto" and sys.stdout.isatty())
    for i, (ex, tok) in enumerate(shown):
        print(f"===== example {i} ({ex['source']}{', truncated' if ex['truncated'] else ''}) "
              f"tokens={len(ex['inputs'])} trainable={int(ex['loss_mask'].sum())}")
        print(_render(ex, tok, color))
    print("===== statistics")
    print(f"rows read:          {stats['rows']}")
    print(f"examples kept:      {stats['examples']}")
    print(f"skipped:            {stats['skipped'] or 0}")
    print(f"truncated:          {stats['truncated']}")
    print(f"tokens:             {stats['tokens']}")
    print(f"trainable tokens:   {stats['trainable_tokens']} ({stats['trainable_fraction']:.1%})")
    print(f"length percentiles: {stats['length_percentiles']}")
    mode = "packed" if stats["packing"] else "padded"
    print(f"packing efficiency: {stats['packing_efficiency']:.4f} ({mode}, max_length={stats['max_length']})")
    print(f"template:           {stats['template']}; vocab {stats['vocab_size']}"
          + (f"; ADDED tokens {stats['added_tokens']} (resize the model vocab)" if stats["added_tokens"] else ""))
    from sft_jax.data.pipeline import format_accounting

    print("===== " + format_accounting(stats["accounting"]))


if __name__ == "__main__":
    from sft_jax.cli import run_absl

    sys.exit(run_absl(main, None, "python -m sft_jax.data.inspect"))  # the shared error-to-exit path

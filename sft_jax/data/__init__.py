"""Data: formats -> chat template + masks -> grain pipeline (packed/padded host batches).

Public API (see BUILD_NOTES.md "## Data (issue 4)")."""

from sft_jax.data.formats import DataError, load_conversations
from sft_jax.data.masking import encode, render_marked
from sft_jax.data.pipeline import (
    DataIterator,
    DataStats,
    build_eval_batches,
    build_train_iterator,
    count_train_batches,
    examples_for_split,
    global_batch,
    load_tokenizer,
    packing_efficiency,
    tokenizer_from_config,
)
from sft_jax.data.templates import BUILTIN_TEMPLATES, prepare_tokenizer, stop_token_ids

__all__ = [
    "DataError", "load_conversations", "encode", "render_marked", "DataIterator", "DataStats",
    "build_eval_batches", "build_train_iterator", "count_train_batches", "examples_for_split", "global_batch", "load_tokenizer",
    "packing_efficiency", "tokenizer_from_config", "BUILTIN_TEMPLATES", "prepare_tokenizer", "stop_token_ids",
]

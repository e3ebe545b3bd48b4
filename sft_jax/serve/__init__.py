"""OpenAI-compatible serving: `python -m sft_jax.serve` (see `sft_jax.serve.server`)."""

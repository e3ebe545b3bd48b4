"""Data construction from a teacher model: Self-Instruct, Evol-Instruct and best-of-n distillation.

    python -m sft_jax.synth self-instruct | evol-instruct | distill --teacher=... --out=FILE ...

Modules: `teachers` (an OpenAI-compatible endpoint or an in-process sft_jax model), `filters`
(ROUGE-L novelty against a growing pool, the instruction/response heuristics), `jobs` (a
resumable append-only JSONL job with its parameters, journal and filter summary beside the
output), one module per method, and `__main__` (the CLI).
"""

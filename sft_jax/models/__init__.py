"""Llama-family models: config, Flax Linen module, Hugging Face and llama2.c I/O."""

from sft_jax.models.config import ModelConfig, UnsupportedModelError
from sft_jax.models.llama import (
    Llama,
    abstract_params,
    forward,
    forward_with_cache,
    init_cache,
    init_params,
    lm_head_kernel,
    param_logical_axes,
)

__all__ = [
    "ModelConfig",
    "UnsupportedModelError",
    "Llama",
    "abstract_params",
    "forward",
    "forward_with_cache",
    "init_cache",
    "init_params",
    "lm_head_kernel",
    "param_logical_axes",
]

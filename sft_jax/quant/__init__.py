"""Frozen-weight quantisation for QLoRA: bitsandbytes-compatible NF4 (`nf4`) and int8 (`int8`).

Quantisers run on the host (NumPy), one tensor at a time, so a model is quantised while it is
loaded (`models.hf_io.load_hf(..., transform=...)`); dequantisers are JAX functions of the stored
arrays (jit-able, sharded like the kernel): `t.dequantize(dtype)` gives the frozen `[in, out]` kernel.
"""

from sft_jax.quant import int8, nf4
from sft_jax.quant.int8 import Int8Tensor
from sft_jax.quant.nf4 import NF4Tensor

QUANT_TYPES = ("nf4", "int8")



__all__ = ["QUANT_TYPES", "Int8Tensor", "NF4Tensor", "int8", "nf4"]

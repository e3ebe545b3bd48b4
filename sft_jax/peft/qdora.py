"""QDoRA (`peft.method=qdora`): DoRA (`peft/dora.py`) on QLoRA's quantised frozen base (`peft/qlora.py`).

What peft computes for `LoraConfig(use_dora=True)` on a bitsandbytes `Linear4bit` / `Linear8bitLt` base
(peft/tuners/lora/bnb.py + dora.py): the frozen base output of the quantised layer, and DoRA's column norm
`||W + s A B||_c` taken from the DEQUANTISED weight (`dequantize_module_weight`), cast to the compute dtype,
detached; the initial magnitude is that norm of the dequantised weight (float32).

Here the pieces compose without new numerics: the quantised base, `load_transform`, `frozen_base`,
`frozen_axes`, `variables` and the dequantising `base_kernel` hook are QLoRA's; DoRA's `linear` /
`low_rank` read the kernel through `base_kernel`, so the norm comes from the dequantised kernel in the
compute dtype, as peft's. Only the two places that read the base outside the hooks differ: the magnitude
init (each module's kernel dequantised in float32, one module at a time) and the merge (dequantised base,
then DoRA's `m / ||W + s A B||_c * (W + s A B)`). Fields: `peft.lora.*` (the adapter) and `peft.qlora.*`
(the base format). PEFT export: DoRA's adapter (`use_dora: true`, `lora_magnitude_vector`), which peft
loads unchanged on transformers' bitsandbytes base.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from sft_jax.peft.base import Params
from sft_jax.peft.dora import Dora, init_magnitude
from sft_jax.peft.lora import _get, adapter_leaves, init_adapters
from sft_jax.peft.qlora import QLora


@dataclasses.dataclass(frozen=True)
class QDora(QLora, Dora):
    """DoRA on a frozen base stored as bitsandbytes NF4 (double-quantised scales) or int8."""

    name: ClassVar[str] = "qdora"

    def describe(self) -> str:
        base = (f"NF4 (block {self.block_size}{', double-quantised scales' if self.double_quant else ''})"
                if self.quant_type == "nf4" else "int8 (row-wise)")
        return f"QDoRA: {base} frozen base + {Dora.describe(self)}"

    def _base_kernel(self, frozen: Params, path: tuple[str, ...]):
        """The module's frozen kernel in float32: dequantised from `frozen["quant"]`, or the float kernel."""
        node = frozen["quant"]
        for k in path:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if "kernel" in node:
            return node["kernel"].dequantize(jnp.float32)
        return _get(frozen["params"], path)["kernel"]  # a projection QLoRA leaves in float (none today)

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        tree = init_adapters(params, self.targets, self.rank, rng)
        for path, leaf in adapter_leaves(tree):
            leaf["magnitude"] = init_magnitude(self._base_kernel(frozen, path), leaf["A"], leaf["B"], self.scale)
        return tree

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        """Dequantised base (float32) with DoRA merged in: the model that was trained, as plain weights."""
        return Dora.merge(self, trainable, self.dequantized_base(frozen), model_config)

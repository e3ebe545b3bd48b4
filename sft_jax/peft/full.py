"""Full fine-tuning: every base weight is trained.

trainable = the whole params tree (float32), frozen = {}; the hooks are the identity; the merge is
the trained tree itself (cast back to the base dtype by the exporter). PEFT has no adapter format
for it (export `--format=merged`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sft_jax.peft.base import Method, Params, PeftFormatError, as_float32


@dataclasses.dataclass(frozen=True)
class Full(Method):
    name: ClassVar[str] = "full"
    trains_base: ClassVar[bool] = True
    needs_base_weights: ClassVar[bool] = False

    @classmethod
    def from_config(cls, peft_cfg) -> "Full":
        return cls()

    def describe(self) -> str:
        return "full fine-tuning"

    def frozen_base(self, params: Params, model_config, rng) -> Params:
        return {}

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        return as_float32(params)

    def variables(self, trainable: Params, frozen: Params) -> dict[str, Params]:
        return {"params": trainable}

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        return param_axes

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        return trainable

    def save_peft(self, out_dir, trainable, frozen, model_config, **kw) -> list[str]:
        raise PeftFormatError("this run is full fine-tuning: there is no adapter to export; use --format=merged")

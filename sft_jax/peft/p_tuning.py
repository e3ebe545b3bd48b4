"""P-tuning (`peft.method=p_tuning`): virtual tokens produced by a small MLP encoder (Liu et al.
2021; PEFT's P_TUNING with `encoder_reparameterization_type="MLP"`).

Trees: trainable `{"embedding": [N, D], "mlp": {"0", "1", "2": {"kernel", "bias"}}}` (float32) -
PEFT's `PromptEncoder`: embedding N(0, 1), then `Linear(D, H) ReLU Linear(H, H) ReLU Linear(H, D)`
with torch's default Linear init; H = `peft.p_tuning.encoder_hidden_size` (0 = the model's hidden
size, PEFT's default). `variables` runs the encoder (inside the step, so gradients reach it) and
hands the [N, D] result to the prompt-tuning hooks (`prompt_tuning.VirtualTokens`: prepended with
positions 0..N-1, real tokens shifted by N, dropped again before the LM head; exact with packing
and the KV cache - see prompt_tuning.py).

PEFT format: as PEFT saves a P_TUNING adapter, `prompt_embeddings` = the encoder's output [N, D]
(inference_mode true: the loaded PeftModel uses them as they are). Reading one back gives a
prompt-tuning method (the encoder is not stored). Not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sft_jax.peft.base import MethodConfigError, Params
from sft_jax.peft.prompt_tuning import PromptTuning, VirtualTokens, dense, torch_linear, write_prompt_adapter


@dataclasses.dataclass(frozen=True)
class PTuning(VirtualTokens):
    name: ClassVar[str] = "p_tuning"
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 0

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise MethodConfigError(f"config field 'peft.p_tuning.num_virtual_tokens' must be > 0, "
                                    f"got {self.num_virtual_tokens}")
        if self.encoder_hidden_size < 0:
            raise MethodConfigError(f"config field 'peft.p_tuning.encoder_hidden_size' must be >= 0 (0 = the model's "
                                    f"hidden size), got {self.encoder_hidden_size}")

    @classmethod
    def from_config(cls, peft_cfg) -> "PTuning":
        s = peft_cfg["p_tuning"]
        return cls(num_virtual_tokens=int(s["num_virtual_tokens"]), encoder_hidden_size=int(s["encoder_hidden_size"]))

    def describe(self) -> str:
        h = self.encoder_hidden_size or "hidden"
        return f"P-tuning: {self.num_virtual_tokens} virtual tokens, MLP encoder (H={h})"

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        d = int(params["embed"]["embedding"].shape[-1])
        h = int(self.encoder_hidden_size) or d
        ke, k0, k1, k2 = jax.random.split(rng, 4)
        return {"embedding": jax.random.normal(ke, (int(self.num_virtual_tokens), d), jnp.float32),
                "mlp": {"0": torch_linear(k0, d, h), "1": torch_linear(k1, h, h), "2": torch_linear(k2, h, d)}}

    def prompt_embeddings(self, trainable: Params):
        m = trainable["mlp"]
        h = jax.nn.relu(dense(trainable["embedding"], m["0"]))
        h = jax.nn.relu(dense(h, m["1"]))
        return dense(h, m["2"])

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        cfg = {**self.peft_common(model_config, base_model_name_or_path), "peft_type": "P_TUNING",
               "encoder_reparameterization_type": "MLP",
               "encoder_hidden_size": int(self.encoder_hidden_size) or int(model_config.hidden_size),
               "encoder_num_layers": 2, "encoder_dropout": 0.0}
        return write_prompt_adapter(out_dir, cfg, self.prompt_embeddings(trainable), dtype)

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config):
        return PromptTuning.load_peft(adapter_dir, params_or_config)

"""Prefix tuning / P-tuning v2 (`peft.method=prefix_tuning`): learned key/value prefixes in every
layer (Li & Liang 2021; Liu et al. 2022; PEFT's PREFIX_TUNING).

PEFT's layout (matched exactly): with `token_dim = num_kv_heads * head_dim` (PEFT's GQA rule), the
prefix encoder yields `past_key_values` [N, num_layers * 2 * token_dim], viewed as
[N, L * 2, KV, hd]; layer i's keys are index 2 i and its values 2 i + 1 (per layer [N, 2, KV, hd]). They are used as they are
(no RoPE: they sit in the rotated space), and the real tokens' positions are shifted by N (PEFT
offsets `position_ids`, transformers numbers the tokens after an N-slot cache from N).

Trees (float32), PEFT's `PrefixEncoder`:
* `projection=False` (P-tuning v2): `{"prefix": [N, L * 2 * token_dim]}`, N(0, 1) (torch.nn.Embedding);
* `projection=True` (Li & Liang's reparametrisation): `{"embedding": [N, token_dim], "mlp": {"0":
  Linear(token_dim, H), "1": Linear(H, L * 2 * token_dim)}}` with tanh between, torch's default
  Linear init, H = `encoder_hidden_size` (0 = token_dim, PEFT's default).
`variables` computes the prefix (inside the step: gradients reach the encoder) and places layer i's
[N, 2 * token_dim] slice at `layers_i/attn/prefix` (stacked [L, ...] under `layers` when scanned),
where `attention_kv` returns them as a `Prefix`: every non-padding query of a row attends
to all N slots, so each packed example sees the whole prefix (positions are per example), and with
the KV cache the prefix is supplied at every step, not stored. `embed` only shifts positions by N.

PEFT format: `prompt_embeddings` = the encoder's output [N, L * 2 * token_dim] (what
`save_pretrained` writes; `PeftModel.from_pretrained` runs in inference mode and uses it as it is,
with or without `prefix_projection`). Reading one back gives `projection=False`. Not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sft_jax.models.hooks import METHOD, Prefix, Site
from sft_jax.peft.base import Method, MethodConfigError, NotMergeable, Params
from sft_jax.peft.prompt_tuning import (dense, read_prompt_adapter, replicated_axes, torch_linear,
                                        write_prompt_adapter)


def _scanned(params) -> bool:
    return isinstance(params, dict) and "layers" in params


@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
    name: ClassVar[str] = "prefix_tuning"
    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int = 0
    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise MethodConfigError(f"config field 'peft.prefix_tuning.num_virtual_tokens' must be > 0, "
                                    f"got {self.num_virtual_tokens}")
        if self.encoder_hidden_size < 0:
            raise MethodConfigError(f"config field 'peft.prefix_tuning.encoder_hidden_size' must be >= 0 (0 = "
                                    f"num_kv_heads * head_dim), got {self.encoder_hidden_size}")

    @classmethod
    def from_config(cls, peft_cfg) -> "PrefixTuning":
        s = peft_cfg["prefix_tuning"]
        return cls(num_virtual_tokens=int(s["num_virtual_tokens"]), projection=bool(s["projection"]),
                   encoder_hidden_size=int(s["encoder_hidden_size"]))

    def describe(self) -> str:
        kind = f"reparametrised by an MLP (H={self.encoder_hidden_size or 'token_dim'})" if self.projection \
            else "P-tuning v2, no reparametrisation"
        return f"prefix tuning: {self.num_virtual_tokens} virtual tokens per layer, {kind}"

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        n_layers, token_dim = int(model_config.num_layers), int(model_config.num_kv_heads * model_config.head_dim)
        n = int(self.num_virtual_tokens)
        out_dim = n_layers * 2 * token_dim
        if not self.projection:
            return {"prefix": jax.random.normal(rng, (n, out_dim), jnp.float32)}
        h = int(self.encoder_hidden_size) or token_dim
        ke, k0, k1 = jax.random.split(rng, 3)
        return {"embedding": jax.random.normal(ke, (n, token_dim), jnp.float32),
                "mlp": {"0": torch_linear(k0, token_dim, h), "1": torch_linear(k1, h, out_dim)}}

    def past_key_values(self, trainable: Params):
        """[N, L * 2 * token_dim] float32 (PEFT's prefix-encoder output for one row)."""
        if "prefix" in trainable:
            return trainable["prefix"]
        m = trainable["mlp"]
        return dense(jnp.tanh(dense(trainable["embedding"], m["0"])), m["1"])

    def variables(self, trainable: Params, frozen: Params) -> dict[str, Params]:
        """Layer i's slice [N, 2 * token_dim] (keys then values) at `layers_i/attn/prefix`, or all of
        them [L, N, 2 * token_dim] at `layers/attn/prefix` for a scanned base (the layer count is read
        from the frozen base; `attention_kv` splits heads from the keys' shape)."""
        n = int(self.num_virtual_tokens)
        if _scanned(frozen):
            n_layers = int(jnp.shape(frozen["layers"]["input_norm"]["scale"])[0])
        else:
            n_layers = sum(1 for k in frozen if k.startswith("layers_"))
        pkv = self.past_key_values(trainable)
        per_layer = jnp.moveaxis(pkv.reshape(n, n_layers, pkv.shape[-1] // n_layers), 1, 0)  # [L, N, 2 td]
        if _scanned(frozen):
            tree = {"layers": {"attn": {"prefix": per_layer}}}
        else:
            tree = {f"layers_{i}": {"attn": {"prefix": per_layer[i]}} for i in range(n_layers)}
        return {"params": frozen, METHOD: tree}

    # hooks
    def embed(self, x, input_ids, positions, segment_ids, site: Site):
        return x, positions + int(self.num_virtual_tokens), segment_ids

    def attention_kv(self, k, v, site: Site):
        p = site.get("prefix")
        if p is None:
            return k, v, None
        b, _, kv, hd = k.shape
        p = p.reshape(p.shape[0], 2, kv, hd)  # PEFT: [N, 2, KV, hd] per layer (keys, values)
        shape = (b, p.shape[0], kv, hd)
        return k, v, Prefix(jnp.broadcast_to(p[:, 0].astype(k.dtype)[None], shape),
                            jnp.broadcast_to(p[:, 1].astype(v.dtype)[None], shape))

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        return replicated_axes(trainable)

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        raise NotMergeable(f"{self.describe()}: learned key/value slots in every attention layer are not a change of "
                           "the weights, so there is no merged model: export --format=peft "
                           "(PeftModel.from_pretrained) or generate from the work directory")

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        n_layers, kv, hd = int(model_config.num_layers), int(model_config.num_kv_heads), int(model_config.head_dim)
        cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
               "base_model_name_or_path": base_model_name_or_path or None,
               "num_virtual_tokens": int(self.num_virtual_tokens), "token_dim": kv * hd,
               "num_transformer_submodules": 1, "num_attention_heads": kv, "num_layers": n_layers,
               "encoder_hidden_size": int(self.encoder_hidden_size) or kv * hd,
               "prefix_projection": bool(self.projection), "init_weights": None,
               "inference_mode": True, "revision": None, "modules_to_save": None}
        return write_prompt_adapter(out_dir, cfg, self.past_key_values(trainable), dtype)

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config):
        from sft_jax.models.config import ModelConfig
        from sft_jax.peft.base import PeftFormatError

        ac, emb = read_prompt_adapter(adapter_dir, ("PREFIX_TUNING",))
        if isinstance(params_or_config, ModelConfig):
            c = params_or_config
            want = c.num_layers * 2 * c.num_kv_heads * c.head_dim
            if emb.shape[1] != want:
                raise PeftFormatError(f"{adapter_dir}: prompt_embeddings width {emb.shape[1]} is not num_layers * 2 * "
                                      f"num_kv_heads * head_dim = {want} of this model")
        return {"prefix": jnp.asarray(emb)}, cls(num_virtual_tokens=int(ac["num_virtual_tokens"]))

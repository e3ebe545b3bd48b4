"""BitFit (Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"), `peft.method=bitfit`.

Only bias terms train. The projections `peft.bitfit.targets` selects (the `peft.lora.targets` syntax; default
`all-linear` = q/k/v/o and gate/up/down of every layer) each get a trained bias [out]: initialised to the base
bias where the checkpoint has one (Qwen2's q/k/v, a Llama with `attention_bias`), else to zeros (bias-free
families: the first forward is the base model exactly). The paper trains every bias of BERT, its LayerNorms'
too; RMSNorm has no bias, so the projections are all there is.

Trainable tree: `{..module path..: {"bias": [*lead, out]}}` (float32; `lead` = the layer axis of a scanned
base); frozen = the base params. Hook: `bias(call)` returns the trained bias instead of the checkpoint's, and
the projections stay `fusable` (the default `linear` and the fused CPU q/k/v and gate/up dots add
`hooks.bias`), so `model.kernels=cpu` computes them in one dot as for the base model.

Merge: the base weights with the trained biases. The merged HF config must declare them: `merged_config`
turns on the family's flags (Llama: `attention_bias` = q/k/v/o together, `mlp_bias` = gate/up/down; Qwen3:
`attention_bias` = q/k/v/o; Qwen2: q/k/v always have one) and fills zeros where a flag covers an untrained
projection; a bias the family's transformers config cannot express (Qwen2 o_proj / MLP, Qwen3 MLP, Mistral,
Phi-3, Gemma) is `NotMergeable` naming the projection and the family. PEFT has no BitFit: no PEFT export.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sft_jax.models.hooks import Hooks, LinearCall
from sft_jax.peft.base import Method, MethodConfigError, NotMergeable, Params, PeftFormatError
from sft_jax.peft.lora import _get, _set, target_paths

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Per family: (projections, the ModelConfig flags that give each of them a bias in the HF config). A
# projection of no group here has no bias its transformers config can express.
BIAS_FLAGS: dict[str, list[tuple[tuple[str, ...], dict]]] = {
    "llama": [(ATTN, {"attention_bias": True, "attention_out_bias": True}), (MLP, {"mlp_bias": True})],
    "qwen3": [(ATTN, {"attention_bias": True, "attention_out_bias": True})],
    "qwen2": [(ATTN[:3], {"attention_bias": True})],  # Qwen2 q/k/v always have one, o_proj and the MLP never
}
_WHY = {
    "qwen2": "Qwen2Config has no bias flag: q/k/v always have a bias, o_proj and the MLP never",
    "qwen3": "Qwen3Config's attention_bias covers q/k/v/o only; its MLP has no bias",
    "mistral": "MistralConfig has no bias flags (every projection is bias-free)",
    "phi3": "Phi3Config has no bias flags (qkv_proj, o_proj, gate_up_proj, down_proj are bias-free)",
    "gemma2": "sft_jax does not read or write Gemma's attention_bias, and Gemma's MLP has no bias",
    "gemma3_text": "sft_jax does not read or write Gemma's attention_bias, and Gemma's MLP has no bias",
}


def bias_leaves(tree, prefix=()):
    """(module path, bias array) of every trained bias."""
    if isinstance(tree, dict) and "bias" in tree and not isinstance(tree["bias"], dict):
        yield prefix, tree["bias"]
        return
    for k in sorted(tree):
        if isinstance(tree[k], dict):
            yield from bias_leaves(tree[k], prefix + (k,))


def _has_bias(config, proj: str) -> bool:
    if proj in ATTN[:3] or proj == "qkv_proj":
        return config.attention_bias
    if proj == "o_proj":
        return config.attention_out_bias
    return config.mlp_bias


@dataclasses.dataclass(frozen=True)
class BitFit(Method):
    """Trained biases on the target projections (see the module docstring)."""

    name: ClassVar[str] = "bitfit"
    targets: str = "all-linear"

    @classmethod
    def from_config(cls, peft_cfg) -> "BitFit":
        return cls(targets=str(peft_cfg["bitfit"]["targets"]))

    def describe(self) -> str:
        return f"BitFit targets={self.targets}"

    # trees
    def _paths(self, params: Params) -> list:
        paths = target_paths(params, self.targets, "peft.bitfit.targets")
        head = [p for p in paths if p[-1] == "lm_head"]
        if head:
            raise MethodConfigError(f"config field 'peft.bitfit.targets' = {self.targets!r} selects {head[0][-1]}: "
                                    "the LM head has no bias in any family; target the layers' projections")
        return paths

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        out: Params = {}
        for path in self._paths(params):
            node = _get(params, path)
            if "bias" in node:
                b = jnp.asarray(node["bias"], jnp.float32)
            else:
                *lead, _, fan_out = node["kernel"].shape
                b = jnp.zeros((*lead, fan_out), jnp.float32)
            _set(out, path, {"bias": b})
        return out

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        def walk(node, axes):
            if "bias" in node and not isinstance(node["bias"], dict):
                *lead, _, ax_out = axes["kernel"]
                return {"bias": (*lead, ax_out)}
            return {k: walk(v, axes[k]) for k, v in node.items()}

        return walk(trainable, param_axes)

    # hooks
    def bias(self, call: LinearCall):
        b = call.get("bias")
        return Hooks.bias(self, call) if b is None else b

    def fusable(self, call: LinearCall) -> bool:
        return True  # only the bias changes, and fused kernels add `hooks.bias`

    # export
    def merged_config(self, trainable: Params, model_config):
        need = sorted({path[-1] for path, _ in bias_leaves(trainable) if not _has_bias(model_config, path[-1])})
        if not need:
            return model_config
        mt = model_config.model_type
        flags: dict = {}
        for proj in need:
            group = next((f for projs, f in BIAS_FLAGS.get(mt, []) if proj in projs), None)
            if group is None:
                where = next("/".join(p) for p, _ in bias_leaves(trainable) if p[-1] == proj)
                why = _WHY.get(mt, f"the {mt} config has no bias flag for it")
                raise NotMergeable(f"BitFit trained a bias on {proj} ({where}), which a merged {mt} checkpoint "
                                   f"cannot hold: {why}. Train with peft.bitfit.targets excluding {proj}, or "
                                   "generate from the work directory")
            flags.update(group)
        new = dataclasses.replace(model_config, **flags)
        from sft_jax.models.config import ModelConfig

        back = ModelConfig.from_hf(new.to_hf())
        if not all(_has_bias(back, p) for p in need):  # the family's config.json must read back with the flags
            raise NotMergeable(f"the {mt} config.json cannot carry biases on {', '.join(need)}")
        return new

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        from sft_jax.models import hf_io

        config = self.merged_config(trainable, model_config)
        out = jax.tree.map(lambda x: x, frozen)  # a new tree (dicts copied), the same arrays
        for path, b in bias_leaves(trainable):
            node = _get(out, path)
            dtype = node.get("bias", node["kernel"]).dtype
            _set(out, path, {**node, "bias": jnp.asarray(b, jnp.float32).astype(dtype)})
        scanned = "layers" in out
        for path, _, _ in hf_io.param_mapping(config, scan_layers=scanned):  # zeros where a flag covers no trained bias
            if path[-1] == "bias":
                node = _get(out, path[:-1])
                if "bias" not in node:
                    *lead, _, fan_out = node["kernel"].shape
                    _set(out, path, jnp.zeros((*lead, fan_out), node["kernel"].dtype))
        return out

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        raise PeftFormatError("method 'bitfit' has no PEFT adapter format (the PEFT library has no BitFit method); "
                              "use --format=merged, or generate from the work directory")

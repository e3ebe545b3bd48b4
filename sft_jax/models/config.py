"""`ModelConfig`: the architecture of one Llama-family checkpoint plus the run-time policy.

One frozen, hashable dataclass (usable as a static argument of `jax.jit`) covers
Llama 2, Llama 3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 and Phi-3/3.5/4 (`phi3`: fused qkv_proj /
gate_up_proj, partial rotary, longrope).  RoPE types: see `models/rope.py`.  `from_hf` reads a
Hugging Face `config.json` dict (transformers 4 style `rope_theta`/`rope_scaling`
or transformers 5 style `rope_parameters`); `to_hf` writes one back with the
family's own fields.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
# transformers' Phi3Config accepts only these (and reads "su"/"yarn" as longrope)
PHI3_ROPE_TYPES = ("default", "longrope")

# Multimodal checkpoints whose text part is one of the families above: config.json model_type ->
# (its architecture, the text part's model_type). Only the language model is loaded (`hf_wrapper`).
MULTIMODAL = {"gemma3": ("Gemma3ForConditionalGeneration", "gemma3_text")}
# transformers' Gemma3TextConfig defaults: published multimodal config.json files (google/gemma-3-4b-it) write
# only the text_config fields that differ from them
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

# Keys of config.json that `from_hf` interprets itself (everything else is kept in
# `hf_extra` and written back unchanged by `to_hf`).
_MANAGED_HF_KEYS = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "hidden_act", "pretraining_tp",
    "_name_or_path", "auto_map", "partial_rotary_factor", "hidden_activation", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq", "sliding_window_pattern",
}


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture this port does not implement."""


class ModelConfigError(ValueError):
    """A model the chosen `model.attention` / `model.kernels` cannot compute (the message names the config field)."""


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, list):
        return tuple(v)
    return v


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3 | phi3
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "linear"|"llama3"|"yarn"|"dynamic"|"longrope", "factor": ..., ...} (models/rope.py);
    # llama3/yarn/longrope always carry "original_max_position_embeddings"
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0  # Phi-3/4: RoPE on the first int(head_dim * factor) features
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    sliding_window: int | None = None  # every layer (or, with layer_types, each sliding layer) attends to the last `sliding_window` positions
    # per-layer attention (HF `layer_types`): None = every layer sliding when sliding_window is set, else full;
    # else one "sliding_attention" | "full_attention" per layer (Gemma 2/3, Qwen2 max_window_layers)
    layer_types: tuple | None = None
    # Gemma 2 / Gemma 3 text (model_type gemma2 | gemma3_text): RMSNorm (1 + w), embeddings * sqrt(hidden),
    # GeGLU (gelu tanh), 4 norms per layer; these are their extra fields
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar**-0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    rope_local_base_freq: float | None = None  # Gemma 3: sliding layers' RoPE base (unscaled); None = rope_theta
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    # Addition to the contract: bias on o_proj (Llama/Qwen3 `attention_bias` sets it, Qwen2 never does).
    attention_out_bias: bool = False
    # run-time policy
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"  # none | full | save_dots
    # training-path attention: "flash" (block-sparse online softmax, skips causal-upper and
    # cross-segment blocks, kernels/flash_attention.py; with kernels=cpu on one CPU device
    # the native kernel of kernels/native_attention.py) | "dense" (the [B,H,T,T] reference) | "pallas" (GPU: jax's Pallas/Triton
    # flash-attention kernel, kernels/pallas_attention.py)
    attention: str = "flash"
    # which implementations compute the ops (sft_jax/kernels): auto (cpu on a CPU backend, else
    # tokamax when importable, else reference) | reference (the port's plain JAX) | cpu (custom-VJP
    # dots, fused projections, ...) | tokamax (reference ops + tokamax's flash attention)
    kernels: str = "auto"
    attention_block: int = 0  # flash block size; 0 = chosen from batch, heads and length
    # Unmanaged config.json fields, written back by to_hf (not part of hash/eq).
    hf_extra: dict | None = dataclasses.field(default=None, compare=False)
    # The text part of a multimodal checkpoint (Gemma3ForConditionalGeneration): {"config": its whole
    # config.json, "layout": "legacy" (language_model.model.*) | "modules" (model.language_model.*), "source":
    # the directory read}; to_hf / save_hf write that class back (vision tower copied from "source"). Not hashed.
    hf_wrapper: dict | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"layer_types must hold num_layers={self.num_layers} entries of {list(LAYER_TYPES)}, "
                                 f"got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"unsupported hidden_act {self.hidden_act!r} (silu | gelu_pytorch_tanh)")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {self.model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not divisible by num_kv_heads={self.num_kv_heads}")
        if self.remat not in ("none", "full", "save_dots"):
            raise ValueError(f"remat must be none|full|save_dots, got {self.remat!r}")
        if self.attention not in ("flash", "dense", "pallas"):
            raise ValueError(f"attention must be flash|dense|pallas, got {self.attention!r}")
        if self.kernels not in ("auto", "reference", "cpu", "tokamax"):
            raise ValueError(f"kernels must be auto|reference|cpu|tokamax, got {self.kernels!r}")
        if self.attention_block < 0 or (self.attention_block and self.attention_block % 16):
            raise ValueError(f"attention_block must be 0 (auto) or a positive multiple of 16, got {self.attention_block}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{f} must be float32|bfloat16|float16, got {getattr(self, f)!r}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            allowed = PHI3_ROPE_TYPES if self.model_type == "phi3" else SUPPORTED_ROPE_TYPES
            if rt not in allowed:
                raise UnsupportedModelError(
                    f"{self.model_type}: unsupported rope_scaling type {rt!r}; supported: {list(allowed)}"
                )
            need = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "original_max_position_embeddings"),
                    "yarn": ("original_max_position_embeddings",),
                    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}.get(rt, ())
            missing = [k for k in need if self.rope_scaling.get(k) is None]
            if missing:
                raise ValueError(f"rope_scaling {rt}: missing {missing}")
            if rt == "longrope":
                half = int(self.head_dim * self.partial_rotary_factor) // 2
                for k in ("short_factor", "long_factor"):
                    if len(self.rope_scaling[k]) != half:
                        raise ValueError(f"rope_scaling longrope: {k} has {len(self.rope_scaling[k])} entries, "
                                         f"rotary_dim/2 = {half}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.partial_rotary_factor != 1.0 and self.model_type != "phi3":
            raise UnsupportedModelError(f"{self.model_type}: partial_rotary_factor={self.partial_rotary_factor} "
                                        "is implemented for phi3 only")
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError(f"rotary dim int(head_dim * partial_rotary_factor) = "
                             f"{int(self.head_dim * self.partial_rotary_factor)} must be even")

    def __hash__(self):
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self) if f.compare))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def fused_projections(self) -> bool:
        """Phi-3: q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (the checkpoint's and
        PEFT's modules), so adapters and exports use the checkpoint's own module names."""
        return self.model_type == "phi3"

    @property
    def gemma(self) -> bool:
        """Gemma 2/3: RMSNorm (1 + w), embeddings * sqrt(hidden), pre- and post-sublayer norms."""
        return self.model_type in GEMMA_TYPES

    @property
    def layer_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def mixed_layers(self) -> bool:
        """Layers differ in attention window (or RoPE): the model selects per layer."""
        return len(set(self.layer_sliding)) > 1

    @property
    def local_rope(self) -> "ModelConfig | None":
        """Gemma 3: the config whose RoPE the sliding layers use (rope_local_base_freq, no scaling)."""
        if self.rope_local_base_freq is None or not any(self.layer_sliding):
            return None
        return self.replace(rope_theta=self.rope_local_base_freq, rope_scaling=None, rope_local_base_freq=None,
                            layer_types=None, sliding_window=None)

    @property
    def multimodal(self) -> str | None:
        """The architecture of the multimodal checkpoint this is the language model of (None: a text model)."""
        return MULTIMODAL[self.hf_wrapper["config"]["model_type"]][0] if self.hf_wrapper else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, d: dict, **policy) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; `policy` sets dtype/param_dtype/scan_layers/remat.
        A multimodal config (`MULTIMODAL`: Gemma 3's model_type gemma3) gives its language model's config,
        with the whole dict kept in `hf_wrapper`."""
        mt = d.get("model_type")
        if mt in MULTIMODAL:
            return cls._from_multimodal(d, **policy)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {mt!r} (architectures={d.get('architectures')}); "
                f"supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        gemma = mt in GEMMA_TYPES
        act = (d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh") if gemma else d.get("hidden_act", "silu")
        if act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
            raise UnsupportedModelError(f"{mt}: unsupported hidden_act {act!r} (only "
                                        f"{'gelu_pytorch_tanh' if gemma else 'silu'})")
        if d.get("pretraining_tp", 1) != 1:
            pass  # only a torch-side compute split; weights are identical
        rope_params = d.get("rope_parameters")
        local_base = None
        if mt == "gemma3_text":  # transformers 5: rope_parameters per layer type; 4: rope_theta + rope_local_base_freq
            if rope_params and "full_attention" in rope_params:
                local_base = float((rope_params.get("sliding_attention") or {}).get("rope_theta", 10000.0))
                rope_params = rope_params.get("full_attention")
            else:
                local_base = float(d.get("rope_local_base_freq", 10000.0))
            if not rope_params and "rope_theta" not in d:
                rope_params = {"rope_theta": 1_000_000.0, **(d.get("rope_scaling") or {})}
        if rope_params:
            rope_theta = float(rope_params.get("rope_theta", d.get("rope_theta", 10000.0)))
            rs = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        else:
            rope_theta = float(d.get("rope_theta", 10000.0))
            rs = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
        partial = float((rs or {}).pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0)
        if rs is not None:
            if "type" in rs and "rope_type" not in rs:
                rs["rope_type"] = rs.pop("type")
            rs.pop("type", None)
            if mt == "phi3" and rs.get("rope_type") in ("su", "yarn"):  # transformers' Phi3Config reads these so
                rs["rope_type"] = "longrope"
            if rs.get("rope_type", "default") == "default":
                rs = None
        if rs is not None and rs["rope_type"] in ("llama3", "yarn", "longrope"):
            # transformers' standardize_rope_params: Phi-3 keeps the pretraining length at the top level
            # (default 4096), which wins; other families fall back to max_position_embeddings
            if mt == "phi3":
                rs["original_max_position_embeddings"] = int(d.get("original_max_position_embeddings", 4096))
            else:
                rs.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        hidden = d["hidden_size"]
        heads = d["num_attention_heads"]
        layers = d["num_hidden_layers"]
        head_dim = d.get("head_dim") or hidden // heads
        bias = bool(d.get("attention_bias", False))
        out_bias = bias
        qk_norm = False
        window = None
        types = None
        if mt == "mistral":
            window = d.get("sliding_window")
        elif mt in ("qwen2", "qwen3"):
            if mt == "qwen2":
                bias, out_bias = True, False
            else:
                qk_norm = True
            if d.get("use_sliding_window") and d.get("sliding_window") is not None:
                types = d.get("layer_types") or [
                    "sliding_attention" if i >= d.get("max_window_layers", layers) else "full_attention"
                    for i in range(layers)
                ]
                window = d["sliding_window"]
                types = list(types)
        elif mt == "phi3":
            window = d.get("sliding_window")
            if bias:
                raise UnsupportedModelError("phi3 with attention_bias is not a Phi3ForCausalLM checkpoint")
        elif gemma:
            window = d.get("sliding_window")
            if bias:
                raise UnsupportedModelError(f"{mt} with attention_bias is not implemented")
            types = d.get("layer_types")
            if types is None:
                pattern = 2 if mt == "gemma2" else d.get("sliding_window_pattern", 6)
                types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
                if mt == "gemma2":
                    types = ["sliding_attention" if not i % 2 else "full_attention" for i in range(layers)]
            qk_norm = mt == "gemma3_text"
        elif mt == "llama":
            pass
        if types is not None and window is None:
            types = None if not any(t == "sliding_attention" for t in types) else types
        if types is not None and not (len(set(types)) > 1 or (gemma and local_base is not None)):
            if types[0] == "full_attention":
                window = None
            types = None
        extra = {k: v for k, v in d.items() if k not in _MANAGED_HF_KEYS}
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rs,
            partial_rotary_factor=partial,
            tie_embeddings=bool(d.get("tie_word_embeddings", gemma)),  # Gemma's configs default to tied
            attention_bias=bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=qk_norm,
            sliding_window=window,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            layer_types=tuple(types) if types is not None else None,
            hidden_act=act,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if gemma else None,
            rope_local_base_freq=local_base,
            hf_extra=extra or None,
            **policy,
        )

    @classmethod
    def _from_multimodal(cls, d: dict, **policy) -> "ModelConfig":
        mt = d["model_type"]
        arch, text_type = MULTIMODAL[mt]
        text = d.get("text_config") or {}
        if text.get("model_type", text_type) != text_type:
            raise UnsupportedModelError(f"{mt} ({arch}): text_config.model_type {text.get('model_type')!r} is not "
                                        f"{text_type!r}")
        td = {**_GEMMA3_TEXT_DEFAULTS, **text, "model_type": text_type}
        td.pop("architectures", None)
        # Gemma3ForConditionalGeneration reads tying and the special tokens from the top-level config
        td["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
        for k in _TOKEN_KEYS:
            if d.get(k) is not None:
                td[k] = d[k]
        # ... and never soft-caps its final logits (its forward has no final_logit_softcapping)
        td["final_logit_softcapping"] = None
        return dataclasses.replace(cls.from_hf(td, **policy), hf_wrapper={"config": d, "layout": None, "source": None})

    def _to_hf_multimodal(self, text: dict, torch_dtype: str | None) -> dict:
        """The multimodal config.json: the original dict with this text part (and its tying / tokens)."""
        orig = self.hf_wrapper["config"]
        d = {k: v for k, v in orig.items() if k not in ("torch_dtype", "dtype")}
        text = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype", "dtype")}
        otext = orig.get("text_config") or {}
        text["final_logit_softcapping"] = otext.get("final_logit_softcapping")
        for k in _TOKEN_KEYS:
            if k in orig:  # top-level keys stay at the top; the text part keeps its own where it had one
                d[k] = text[k]
                if k in otext:
                    text[k] = otext[k]
                else:
                    text.pop(k)
        d.update(architectures=[MULTIMODAL[orig["model_type"]][0]], tie_word_embeddings=self.tie_embeddings,
                 text_config=text)
        if torch_dtype is not None:
            d["torch_dtype"] = torch_dtype
            d["dtype"] = torch_dtype
        return d

    def to_hf(self, torch_dtype: str | None = None) -> dict:
        """config.json dict for this family (transformers 4 style rope fields, read by 4 and 5); the text
        part of a multimodal checkpoint gives that checkpoint's whole config.json back (`hf_wrapper`)."""
        if self.hf_wrapper:
            return self._to_hf_multimodal(dataclasses.replace(self, hf_wrapper=None).to_hf(), torch_dtype)
        d: dict[str, Any] = dict(self.hf_extra or {})
        d.update(
            model_type=self.model_type,
            architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            attention_dropout=0.0,
        )
        if self.model_type == "llama":
            if self.attention_bias != self.attention_out_bias:
                raise ValueError("llama: attention_bias applies to q/k/v and o together")
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
        elif self.model_type == "mistral":
            if self.attention_bias or self.attention_out_bias or self.mlp_bias or self.qk_norm:
                raise ValueError("mistral has no attention/mlp biases or qk norm")
            d.update(sliding_window=self.sliding_window)
        elif self.model_type == "phi3":
            if self.attention_bias or self.attention_out_bias or self.mlp_bias or self.qk_norm:
                raise ValueError("phi3 has no attention/mlp biases or qk norm")
            rs = dict(self.rope_scaling) if self.rope_scaling else None
            orig = (self.hf_extra or {}).get("original_max_position_embeddings", 4096)  # Phi3Config's default
            if rs is not None:  # the layout of Microsoft's config.json (read by transformers 4 and 5)
                orig = rs.pop("original_max_position_embeddings")
                rs = {"type": rs.pop("rope_type"), **rs}
            d.update(sliding_window=self.sliding_window, rope_scaling=rs, partial_rotary_factor=self.partial_rotary_factor,
                     original_max_position_embeddings=orig)
        elif self.model_type in ("qwen2", "qwen3"):
            types = [("sliding_attention" if s else "full_attention") for s in self.layer_sliding]
            first_sliding = next((i for i, s in enumerate(self.layer_sliding) if s), self.num_layers)
            d.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                max_window_layers=first_sliding if self.sliding_window is not None else self.num_layers,
                layer_types=types,
            )
            if self.model_type == "qwen3":
                d.update(attention_bias=self.attention_bias)
        elif self.gemma:
            if self.attention_bias or self.attention_out_bias or self.mlp_bias:
                raise ValueError(f"{self.model_type} has no attention/mlp biases")
            d.pop("hidden_act")
            d.update(hidden_activation=self.hidden_act, sliding_window=self.sliding_window,
                     layer_types=[("sliding_attention" if s else "full_attention") for s in self.layer_sliding],
                     query_pre_attn_scalar=self.query_pre_attn_scalar, attention_bias=False)
            if self.model_type == "gemma2":
                d.update(attn_logit_softcapping=self.attn_logit_softcapping,
                         final_logit_softcapping=self.final_logit_softcapping)
            else:
                d.update(attn_logit_softcapping=self.attn_logit_softcapping,
                         final_logit_softcapping=self.final_logit_softcapping,
                         rope_local_base_freq=self.rope_local_base_freq
                         if self.rope_local_base_freq is not None else self.rope_theta)
        if torch_dtype is not None:
            d["torch_dtype"] = torch_dtype
            d["dtype"] = torch_dtype
        return d

"""Prompt tuning (`peft.method=prompt_tuning`): N learned virtual-token embeddings prepended to every
example (Lester et al. 2021; PEFT's PROMPT_TUNING).

Trees: trainable `{"prompt": [N, D]}` (float32), at the root of the `method` collection; frozen =
the base params unchanged. Initialisation (`peft.prompt_tuning.init_from`) as PEFT's
`prompt_tuning_init`: `random` = N(0, 1) (torch.nn.Embedding's default), `vocab` = the embeddings of
N token ids drawn uniformly from the vocabulary (SAMPLE_VOCAB), `text` = the embeddings of the
tokenised `init_text` repeated / truncated to N (TEXT; the trainer binds the run's tokenizer,
`with_tokenizer`, and the token ids are recorded in run.json as `init_ids`).

Hooks (models/hooks.py): `embed` prepends the N vectors to every row with segment id
`SHARED_SEGMENT`, positions 0..N-1, and shifts the real tokens' positions by N. This is exactly what
PEFT + transformers do for one example (PEFT drops `position_ids` for prompt learning and the model
numbers the `N + T` inputs 0..N+T-1). Packed rows stay exact: the virtual tokens attend only to
each other, so their hidden states do not depend on the example, and every segment of the row
attends to them at relative distances equal to those of an unpacked example. `final_hidden` drops
the N positions again, so logits, labels and the loss mask keep their [B, T] alignment and virtual
tokens never receive loss. In a KV-cache decode step (`site.decode`) nothing is prepended (the
prefill wrote the N slots; `embed_slots()` sizes the cache) and positions are still shifted by N.

PEFT format: adapter_config.json (peft_type PROMPT_TUNING, num_virtual_tokens, token_dim, ...,
inference_mode true) and adapter_model.safetensors `{"prompt_embeddings": [N, D]}` - what
`PeftModel.save_pretrained` writes. Not mergeable (no weight change expresses extra input tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.hooks import SHARED_SEGMENT, Site
from sft_jax.peft.base import Method, MethodConfigError, NotMergeable, Params, PeftFormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INITS = ("random", "vocab", "text")


def replicated_axes(tree: Params) -> Params:
    """Logical axes (None per dim) for a small method tree kept whole on every device."""
    return jax.tree.map(lambda x: (None,) * jnp.ndim(x), tree)


def torch_linear(key, fan_in: int, fan_out: int) -> dict:
    """torch.nn.Linear's default init (kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(in)), same bound for
    the bias), stored [in, out]."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / float(np.sqrt(fan_in))
    return {"kernel": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)}


def dense(x, layer: dict):
    return x @ layer["kernel"].astype(x.dtype) + layer["bias"].astype(x.dtype)


def write_prompt_adapter(out_dir: str, config: dict, embeddings, dtype: str) -> list[str]:
    """adapter_model.safetensors {"prompt_embeddings"} + adapter_config.json, as PEFT saves a
    prompt-learning adapter; returns [] (no module is adapted)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    npdt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    os.makedirs(out_dir, exist_ok=True)
    save_file({"prompt_embeddings": np.ascontiguousarray(np.asarray(embeddings, np.float32).astype(npdt))},
              os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return []


def read_prompt_adapter(adapter_dir: str, peft_types: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    """(adapter_config, prompt_embeddings float32) of a PEFT prompt-learning adapter directory."""
    from safetensors import safe_open

    cfg_path, w_path = os.path.join(adapter_dir, ADAPTER_CONFIG), os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise PeftFormatError(f"{p} not found (a peft adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        ac = json.load(f)
    if ac.get("peft_type") not in peft_types:
        raise PeftFormatError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not one of {list(peft_types)}")
    if int(ac.get("num_transformer_submodules") or 1) != 1:
        raise PeftFormatError(f"{cfg_path}: num_transformer_submodules={ac['num_transformer_submodules']} "
                              "(only decoder-only models, 1)")
    with safe_open(w_path, framework="numpy") as f:
        keys = list(f.keys())
        if keys != ["prompt_embeddings"]:
            raise PeftFormatError(f"{w_path}: expected the one tensor 'prompt_embeddings', found {keys[:5]}")
        emb = f.get_tensor("prompt_embeddings").astype(np.float32)
    n = int(ac["num_virtual_tokens"])
    if emb.ndim != 2 or emb.shape[0] != n:
        raise PeftFormatError(f"{w_path}: prompt_embeddings has shape {emb.shape}, adapter_config says "
                              f"num_virtual_tokens={n}")
    return ac, emb


class VirtualTokens(Method):
    """Hooks shared by prompt tuning and P-tuning: `variables` puts the [N, D] virtual-token
    embeddings at `method/prompt`; `embed` prepends them, `final_hidden` drops them."""

    num_virtual_tokens: int = 20

    def embed_slots(self) -> int:
        return int(self.num_virtual_tokens)

    def prompt_embeddings(self, trainable: Params):
        """[N, D] float32: the virtual-token embeddings the model reads."""
        raise NotImplementedError

    def variables(self, trainable: Params, frozen: Params) -> dict[str, Params]:
        from sft_jax.models.hooks import METHOD

        return {"params": frozen, METHOD: {"prompt": self.prompt_embeddings(trainable)}}

    def embed(self, x, input_ids, positions, segment_ids, site: Site):
        n = self.embed_slots()
        positions = positions + n
        if site.decode:
            return x, positions, segment_ids
        b = x.shape[0]
        prompt = jnp.broadcast_to(site.get("prompt").astype(x.dtype)[None], (b, n, x.shape[-1]))
        vpos = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n))
        vseg = jnp.full((b, n), SHARED_SEGMENT, segment_ids.dtype)
        return (jnp.concatenate([prompt, x], axis=1), jnp.concatenate([vpos, positions], axis=1),
                jnp.concatenate([vseg, segment_ids], axis=1))

    def final_hidden(self, x, site: Site):
        return x if site.decode else x[:, self.embed_slots():]

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        return replicated_axes(trainable)

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        raise NotMergeable(f"{self.describe()} prepends {self.embed_slots()} learned virtual tokens to every input; "
                           "no change of the weights expresses them, so there is no merged model: export "
                           "--format=peft (PeftModel.from_pretrained) or generate from the work directory")

    def peft_common(self, model_config, base_model_name_or_path: str) -> dict:
        return {
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or None,
            "num_virtual_tokens": int(self.num_virtual_tokens),
            "token_dim": int(model_config.hidden_size),
            "num_transformer_submodules": 1,
            "num_attention_heads": int(model_config.num_heads),
            "num_layers": int(model_config.num_layers),
            "inference_mode": True,
            "revision": None,
            "modules_to_save": None,
        }


@dataclasses.dataclass(frozen=True)
class PromptTuning(VirtualTokens):
    """Prompt tuning: the trained [N, D] embeddings themselves."""

    name: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = 20
    init_from: str = "random"
    init_text: str = ""
    init_ids: tuple = ()

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise MethodConfigError(f"config field 'peft.prompt_tuning.num_virtual_tokens' must be > 0, "
                                    f"got {self.num_virtual_tokens}")
        if self.init_from not in INITS:
            raise MethodConfigError(f"config field 'peft.prompt_tuning.init_from' = {self.init_from!r} is not one of {list(INITS)}")
        if self.init_from == "text" and not self.init_text:
            raise MethodConfigError("config field 'peft.prompt_tuning.init_text' is empty but "
                                    "peft.prompt_tuning.init_from='text' needs it")
        object.__setattr__(self, "init_ids", tuple(int(i) for i in self.init_ids))

    @classmethod
    def from_config(cls, peft_cfg) -> "PromptTuning":
        s = peft_cfg["prompt_tuning"]
        return cls(num_virtual_tokens=int(s["num_virtual_tokens"]), init_from=str(s["init_from"]),
                   init_text=str(s["init_text"]), init_ids=tuple(s.get("init_ids", None) or ()))

    def with_tokenizer(self, tokenizer) -> "PromptTuning":
        if self.init_from != "text" or self.init_ids:
            return self
        ids = list(tokenizer(self.init_text)["input_ids"])  # as PEFT: the tokenizer's own special tokens
        if not ids:
            raise MethodConfigError(f"config field 'peft.prompt_tuning.init_text' = {self.init_text!r} "
                                    "tokenises to no token")
        return dataclasses.replace(self, init_ids=tuple(int(i) for i in ids))

    def describe(self) -> str:
        return f"prompt tuning: {self.num_virtual_tokens} virtual tokens (init {self.init_from})"

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        n = int(self.num_virtual_tokens)
        emb = params["embed"]["embedding"]
        v, d = emb.shape
        if self.init_from == "random":
            prompt = jax.random.normal(rng, (n, d), jnp.float32)
        elif self.init_from == "vocab":
            prompt = jnp.take(emb, jax.random.randint(rng, (n,), 0, v), axis=0)
        else:
            if not self.init_ids:
                raise MethodConfigError("peft.prompt_tuning.init_from='text' needs the run's tokenizer (with_tokenizer) "
                                        "or peft.prompt_tuning.init_ids")
            ids = list(self.init_ids)
            ids = (ids * (-(-n // len(ids))))[:n]  # PEFT: repeat the text's ids, then truncate to N
            if max(ids) >= v:
                raise MethodConfigError(f"config field 'peft.prompt_tuning.init_text': token id {max(ids)} is "
                                        f"outside the model's vocabulary ({v})")
            prompt = jnp.take(emb, jnp.asarray(ids, jnp.int32), axis=0)
        return {"prompt": prompt.astype(jnp.float32)}

    def prompt_embeddings(self, trainable: Params):
        return trainable["prompt"]

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        cfg = {**self.peft_common(model_config, base_model_name_or_path), "peft_type": "PROMPT_TUNING",
               "prompt_tuning_init": {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[self.init_from],
               "prompt_tuning_init_text": self.init_text or None, "tokenizer_name_or_path": None,
               "tokenizer_kwargs": None}
        return write_prompt_adapter(out_dir, cfg, self.prompt_embeddings(trainable), dtype)

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config) -> tuple[Params, "PromptTuning"]:
        """PROMPT_TUNING or P_TUNING (whose saved embeddings are the encoder's output) -> prompt tuning."""
        ac, emb = read_prompt_adapter(adapter_dir, ("PROMPT_TUNING", "P_TUNING"))
        return {"prompt": jnp.asarray(emb)}, cls(num_virtual_tokens=int(ac["num_virtual_tokens"]))

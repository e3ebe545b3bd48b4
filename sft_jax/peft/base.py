"""The fine-tuning-method interface: every method (full, LoRA, DoRA, QLoRA, ...) is one `Method`.

A method is a frozen (hashable, static) dataclass holding its own configuration, and a *pure tree
transform* over the plain parameter tree (`models.llama.init_params` / `hf_io.load_hf` layout,
paths like `layers_{i}/attn/q_proj/kernel`, or `layers/...` with a leading layer axis when scanned):

    frozen    = method.frozen_base(params, model_config, rng)        # what training reads, never updates
    trainable = method.init_trainable(params, frozen, model_config, rng)   # what the optimizer updates
    variables = method.variables(trainable, frozen)                   # Flax collections for the model

* `trainable`: a pytree of float32 arrays (optimizer state and gradients exist for it only);
  full fine-tuning: the whole params tree; LoRA: `{..module path..: {"A": [in, r], "B": [r, out]}}`.
* `frozen`: a pytree the method reads but never trains: `{}` (full), the base params (LoRA), the
  residual base W - s B A (PiSSA) or `{"params": <base without the quantised kernels>,
  "quant": <codes/scales by module path>}` (QLoRA). It is recomputed from the base on every load
  (`frozen_base` is deterministic given `rng`; the trainer passes the run's seed-derived key), so
  checkpoints hold only `trainable`.
* `variables(trainable, frozen)` -> `{"params": ..., hooks.METHOD: ..., hooks.METHOD_FROZEN: ...}`:
  the model's `params` collection (the plain layout, kernels possibly left out, see models/hooks.py)
  plus the method's collections (mirroring the module paths) that its hooks read.
* The method *is* the model's `Hooks` (models/hooks.py): `linear`, `base_kernel`, `low_rank`,
  `embed`, `attention_kv`, `sublayer_out`, `final_hidden`; it overrides the points it needs.

Everything outside `sft_jax/peft/` (train, train_step, plan, export, generate, workdir, sampling)
uses only this interface; nothing there branches on the method's name.

Configuration: one section `peft` with `peft.method` (a name in `METHODS`, see
`sft_jax/peft/__init__.py`) and one sub-section per method (`peft.lora.rank`, ...), declared in
`sft_jax/config.py` (jax-free, so config errors come before JAX loads). A method reads them in
`from_config(peft_cfg)`, which receives the whole `peft` section (QLoRA may read `peft.lora` for
its adapter), and records itself with `run_config()` (read back by `from_config` too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sft_jax.models.hooks import METHOD, METHOD_FROZEN, Hooks

Params = dict[str, Any]


class NotMergeable(ValueError):
    """The method's result cannot be written as plain weights; the message says why."""


class PeftFormatError(ValueError):
    """An adapter the PEFT conversion cannot write or read (missing files, unsupported features)."""


class MethodConfigError(ValueError):
    """A `peft.*` configuration a method cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Method(Hooks):
    """Base class of the fine-tuning methods. Subclasses set `name` and implement the abstract
    functions below; the hooks default to the identity (`models.hooks.Hooks`)."""

    name: ClassVar[str] = ""
    # True when the base weights themselves are trained (full fine-tuning): the loss then needs the
    # LM head's gradient and FLOP accounting counts 6 N instead of 4 N + 6 N_trainable.
    trains_base: ClassVar[bool] = False
    # True when `frozen_base` reads the base weights. False (full fine-tuning): the checkpoint holds
    # every trained weight, the work directory does not load the base, and `frozen_base` is called
    # with ShapeDtypeStructs (it must then build its tree from shapes alone, e.g. {}).
    needs_base_weights: ClassVar[bool] = True

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, peft_cfg) -> "Method":
        """Build from the whole `peft` ConfigDict (or a plain dict of the same shape); raise
        `MethodConfigError` naming the field on a bad value."""
        raise NotImplementedError

    def with_tokenizer(self, tokenizer) -> "Method":
        """The method bound to the run's tokenizer (called by the trainer after `from_config`, before
        `init`; e.g. prompt tuning's init from a text). Default: self."""
        return self

    def run_config(self) -> dict:
        """JSON-able record of this method for run.json: `{"method": name, name: {fields}}` (the
        shape of the `peft` config section, so `from_config` reads it back)."""
        return {"method": self.name, self.name: {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def describe(self) -> str:
        """One line for logs, e.g. "LoRA r=16 alpha=32 (rsLoRA)"."""
        return self.name

    # ------------------------------------------------------------------ trees
    def frozen_base(self, params: Params, model_config, rng: jax.Array) -> Params:
        """The frozen tree derived from the base params (deterministic given `rng`). Default: the
        params themselves."""
        return params

    def init_trainable(self, params: Params, frozen: Params, model_config, rng: jax.Array) -> Params:
        """The initial trainable tree (float32)."""
        raise NotImplementedError

    def init(self, params: Params, model_config, rng: jax.Array) -> tuple[Params, Params]:
        """`(trainable, frozen)`. Both functions get the same `rng` (the work directory recomputes
        `frozen_base` with it on load); a method needing independent streams folds it itself."""
        frozen = self.frozen_base(params, model_config, rng)
        return self.init_trainable(params, frozen, model_config, rng), frozen

    def abstract_init(self, abstract_params: Params, model_config, rng: jax.Array) -> tuple[Params, Params]:
        """`init` on `jax.ShapeDtypeStruct` params -> abstract `(trainable, frozen)` (memory plans).
        Default: `jax.eval_shape` of `init`; a method whose `frozen_base` runs on the host (QLoRA
        quantises in NumPy) overrides it."""
        return jax.eval_shape(lambda p: self.init(p, model_config, rng), abstract_params)

    def load_transform(self):
        """The per-tensor transform for `hf_io.load_hf(..., transform=...)` while the base loads (QLoRA:
        quantise each projection as it is read, so the whole float base never sits in memory), or None."""
        return None

    def variables(self, trainable: Params, frozen: Params) -> dict[str, Params]:
        """The model's variable collections. Default: base params in `params`, `trainable` in
        `METHOD`."""
        return {"params": frozen, METHOD: trainable}

    def model_inputs(self, trainable: Params, frozen: Params) -> tuple[Params, dict[str, Params]]:
        """`(params, method_vars)`: the arguments of `llama.forward(params, ..., method=self,
        method_vars=method_vars)` (and of `forward_with_cache`, `sampling.generate`)."""
        v = dict(self.variables(trainable, frozen))
        return v.pop("params"), v

    def forward(self, trainable: Params, frozen: Params, model_config, input_ids, positions=None,
                segment_ids=None, **kw):
        """`llama.forward` of the trained model (keywords as `llama.forward`)."""
        from sft_jax.models import llama

        params, method_vars = self.model_inputs(trainable, frozen)
        return llama.forward(params, model_config, input_ids, positions, segment_ids, method=self,
                             method_vars=method_vars, **kw)

    # ------------------------------------------------------------------ sharding
    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        """Logical axis names for `trainable` (a tree of tuples with `trainable`'s structure), from
        the model's `param_logical_axes`."""
        raise NotImplementedError

    def frozen_axes(self, frozen: Params, param_axes: Params) -> Params:
        """Logical axis names for `frozen`. Default: the params' (or {} for an empty tree)."""
        return param_axes if frozen else {}

    # ------------------------------------------------------------------ export
    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        """Plain weights (the params layout, base dtype) equal to the trained model, or raise
        `NotMergeable` with the reason."""
        raise NotMergeable(f"method {self.name!r} has no merge")

    def merged_config(self, trainable: Params, model_config):
        """The ModelConfig the merged export writes (its config.json) for `merge`'s weights. Default:
        `model_config`; a method whose merged weights need other flags (BitFit: biases on bias-free
        projections) returns the widened config, or raises `NotMergeable` naming what the family's
        config cannot express."""
        return model_config

    def count_trainable(self, trainable: Params) -> int:
        """Number of trained scalars."""
        return count_params(trainable)

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        """Write the PEFT library's adapter directory (adapter_config.json +
        adapter_model.safetensors) and return the adapted module names; raise `PeftFormatError`
        when PEFT has no such method or the result cannot be expressed in it."""
        raise PeftFormatError(f"method {self.name!r} has no PEFT adapter format; use --format=merged")

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config) -> tuple[Params, "Method"]:
        """Read a PEFT adapter directory -> (trainable tree, method with its config)."""
        raise PeftFormatError(f"method {cls.name!r} cannot read PEFT adapters")


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays / ShapeDtypeStructs."""
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def as_float32(tree):
    """Every leaf cast to float32 (trainable trees and their optimizer state are float32)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


__all__ = ["METHOD", "METHOD_FROZEN", "Method", "MethodConfigError", "NotMergeable", "PeftFormatError",
           "as_float32", "count_params"]

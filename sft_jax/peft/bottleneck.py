"""Bottleneck adapters (`peft.method=bottleneck`): Houlsby et al. 2019 and Pfeiffer et al. 2020, as the
AdapterHub `adapters` library builds them for Llama (`DoubleSeqBnConfig` / `SeqBnConfig`).

Each adapter is `f(z) = up(act(down(z)))` (down [D, m] + bias, up [m, D] + bias; m = `peft.bottleneck.size`,
or hidden_size // `peft.bottleneck.reduction_factor` when 0: AdapterHub's `reduction_factor=16`), placed at
`Hooks.sublayer_out` as AdapterHub's `LlamaDecoderLayerWithAdapters` does (no layer norm in either config:
ln_before / ln_after False, and Llama passes no layer norm to the adapter layer):

* `houlsby` (`DoubleSeqBnConfig`: mh_adapter + output_adapter, original_ln_before False, residual_before_ln
  True): after the attention output projection and after the MLP, on the sublayer output h:
  `x + h + f(h)`;
* `pfeiffer` (`SeqBnConfig`: output_adapter only, original_ln_before True, residual_before_ln True): after
  the MLP only; with `original_ln_before` the adapter reads the sum with the residual stream x (the layer
  norm is None for Llama), and its own residual is h: `x + h + f(x + h)`.

Activation `peft.bottleneck.activation`: `auto` = AdapterHub's default of the style (Houlsby "swish" = SiLU,
Pfeiffer "relu"), or relu | silu | gelu (exact, erf) | tanh. Init = AdapterHub's `init_weights="mam_adapter"`
(He et al. 2022): down kaiming-uniform(a=sqrt 5) (= U(+-1/sqrt D), torch's Linear default), down bias 0, up
weight and bias 0, so the first forward is the base model exactly. (AdapterHub's default "bert" init draws
both projections N(0, 0.02): not an identity at step 0.)

Trainable tree (float32): `{"layers_i": {"bottleneck_attn" | "bottleneck_mlp": {"down": {"kernel", "bias"},
"up": {"kernel", "bias"}}}}` (`layers` with a leading layer axis when scanned), read at the decoder layer's
site. Frozen = the base. Not mergeable (a nonlinearity between the projections), no PEFT type: exported with
`sft_jax.export --format=adapter` (sft_jax's own adapter format, `sft_jax/adapter_format.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from sft_jax.models.hooks import SublayerSite
from sft_jax.peft.base import Method, MethodConfigError, NotMergeable, Params, PeftFormatError

STYLES = ("houlsby", "pfeiffer")
ACTIVATIONS = ("auto", "relu", "silu", "gelu", "tanh")
AUTO_ACTIVATION = {"houlsby": "silu", "pfeiffer": "relu"}  # AdapterHub: DoubleSeqBn "swish", SeqBn "relu"
_ACT = {"relu": jax.nn.relu, "silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "tanh": jnp.tanh}
KEY = "bottleneck_"  # + "attn" | "mlp": the adapter's node under the decoder layer


def _layer_keys(params: Params) -> list[str]:
    if "layers" in params:
        return ["layers"]
    return sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))


@dataclasses.dataclass(frozen=True)
class Bottleneck(Method):
    """Bottleneck adapters after the sublayers (see the module docstring)."""

    name: ClassVar[str] = "bottleneck"
    style: str = "houlsby"
    size: int = 0
    reduction_factor: float = 16.0
    activation: str = "auto"

    def __post_init__(self):
        if self.style not in STYLES:
            raise MethodConfigError(f"config field 'peft.bottleneck.style' = {self.style!r} is not one of "
                                    f"{list(STYLES)}")
        if self.activation not in ACTIVATIONS:
            raise MethodConfigError(f"config field 'peft.bottleneck.activation' = {self.activation!r} is not one "
                                    f"of {list(ACTIVATIONS)}")
        if self.size < 0:
            raise MethodConfigError(f"config field 'peft.bottleneck.size' must be >= 0 (0 = hidden_size // "
                                    f"peft.bottleneck.reduction_factor), got {self.size}")
        if not self.reduction_factor > 0:
            raise MethodConfigError(f"config field 'peft.bottleneck.reduction_factor' must be > 0, got "
                                    f"{self.reduction_factor}")

    @classmethod
    def from_config(cls, peft_cfg) -> "Bottleneck":
        s = peft_cfg["bottleneck"]
        return cls(style=str(s["style"]), size=int(s["size"]), reduction_factor=float(s["reduction_factor"]),
                   activation=str(s["activation"]))

    @property
    def act_name(self) -> str:
        return AUTO_ACTIVATION[self.style] if self.activation == "auto" else self.activation

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("attn", "mlp") if self.style == "houlsby" else ("mlp",)

    def bottleneck_size(self, hidden_size: int) -> int:
        """m: `size`, else AdapterHub's `int(hidden_size // reduction_factor)` (at least 1)."""
        return int(self.size) if self.size else max(1, int(hidden_size // self.reduction_factor))

    def describe(self) -> str:
        where = "after attention and MLP" if self.style == "houlsby" else "after the MLP"
        m = f"size {self.size}" if self.size else f"size hidden/{self.reduction_factor:g}"
        return f"bottleneck adapters ({self.style}: {where}), {m}, {self.act_name}"

    # ------------------------------------------------------------------ trees
    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        d = int(model_config.hidden_size)
        m = self.bottleneck_size(d)
        n_layers = int(model_config.num_layers)
        bound = 1.0 / math.sqrt(d)  # kaiming_uniform(a=sqrt 5) on a [m, D] torch weight

        def one(i, j):
            k = jax.random.fold_in(jax.random.fold_in(rng, i), j)
            return {"down": {"kernel": jax.random.uniform(k, (d, m), jnp.float32, -bound, bound),
                             "bias": jnp.zeros((m,), jnp.float32)},
                    "up": {"kernel": jnp.zeros((m, d), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}}

        per_layer = [{KEY + kind: one(i, j) for j, kind in enumerate(self.kinds)} for i in range(n_layers)]
        if _layer_keys(params) == ["layers"]:  # scanned base: one stacked tree (the same values as unscanned)
            return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}
        return {f"layers_{i}": t for i, t in enumerate(per_layer)}

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        out = {}
        for layer, node in trainable.items():
            *lead, _, hid = param_axes[layer]["attn"]["o_proj"]["kernel"]  # (["layers",] heads, embed)
            ax = {"down": {"kernel": (*lead, hid, None), "bias": (*lead, None)},
                  "up": {"kernel": (*lead, None, hid), "bias": (*lead, hid)}}
            out[layer] = {k: ax for k in node}
        return out

    # ------------------------------------------------------------------ hooks
    def sublayer_out(self, kind: str, h, site: SublayerSite):
        p = site.get(KEY + kind)
        if p is None:
            return h
        dt = site.dtype
        z = h if self.style == "houlsby" else site.residual + h
        z = z.astype(dt)
        a = jnp.dot(z, p["down"]["kernel"].astype(dt)) + p["down"]["bias"].astype(dt)
        a = _ACT[self.act_name](a.astype(jnp.float32)).astype(dt)
        return h + (jnp.dot(a, p["up"]["kernel"].astype(dt)) + p["up"]["bias"].astype(dt)).astype(h.dtype)

    # ------------------------------------------------------------------ export
    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        raise NotMergeable(f"{self.describe()}: each adapter adds up({self.act_name}(down(h))) to a sublayer "
                           "output, a nonlinear function that no change of the base weights expresses, so there "
                           "are no merged weights (merged / gguf): export --format=adapter (load it with "
                           "sft_jax.generate --model=BASE --adapter=DIR) or generate from the work directory")

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        raise PeftFormatError("the PEFT library has no bottleneck-adapter type (PeftModel cannot load one): "
                              "export --format=adapter (sft_jax's adapter format, read by sft_jax.generate "
                              "--model=BASE --adapter=DIR)")

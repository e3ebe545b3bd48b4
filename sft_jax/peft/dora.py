"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) as pure JAX functions, as peft's `use_dora=True`.

A DoRA projection keeps LoRA's low-rank pair (A [in, r], B [r, out]; scale s = alpha / r, or alpha / sqrt(r)
for rsLoRA) and adds a learned magnitude vector m [out] over the column norms of the adapted weight:

    W' = m * (W + s A B) / ||W + s A B||_c          (||.||_c: the L2 norm of each output column, [out])

Layout: our kernels are [*lead, in, out] (peft/torch weights are [out, in]; `lead` is the layer axis of a
scanned base), so the column norm is taken over the `in` axis (-2).
As in peft (and section 4.3 of the paper), the norm is treated as a constant: it is computed from the current
A, B but gets no gradient.  At initialisation B = 0 and m = ||W||_c, so the layer equals the base layer.

Dropout (peft's `DoraLinearVariant.forward`): without dropout the output is `m / n * (x W + s x A B) + bias`;
with dropout the frozen path keeps the undropped input and only the DoRA correction sees the dropped one:
`x W + bias + (m / n - 1) * (x_d W) + m / n * s * (x_d A B)`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.hooks import Hooks, LinearCall, LowRank, dropout
from sft_jax.peft.base import Params, PeftFormatError
from sft_jax.peft.lora import (ADAPTER_CONFIG, Lora, _get, adapter_from_peft_tensors, adapter_leaves,
                               adapter_to_peft_tensors, init_adapters, read_adapter, write_adapter)

PEFT_MAGNITUDE = "lora_magnitude_vector"  # peft's name of the magnitude tensor ([out] per module)


def _adapted(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + s A B in float32, [*lead, in, out]."""
    return kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """||W + s A B||_c: the L2 norm of every output column of the adapted kernel, [*lead, out], float32, no
    gradient.  `kernel` [*lead, in, out] (dequantised if the base is quantised), `a` [*lead, in, r],
    `b` [*lead, r, out]."""
    return jax.lax.stop_gradient(jnp.linalg.norm(_adapted(kernel, a, b, scale), axis=-2))


def init_magnitude(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """peft's initial magnitude vector: ||W + s A B||_c (= ||W||_c for the usual B = 0), float32 [*lead, out]."""
    return weight_norm(kernel, a, b, scale)


def _reference_matmul(u: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(u, w, preferred_element_type=jnp.float32).astype(u.dtype)


def dora_linear(
    x: jax.Array,
    kernel: jax.Array,
    a: jax.Array,
    b: jax.Array,
    magnitude: jax.Array,
    scale: float,
    *,
    bias: jax.Array | None = None,
    x_dropped: jax.Array | None = None,
    matmul=_reference_matmul,
) -> jax.Array:
    """The output of a DoRA projection: x [..., in] -> [..., out] in x's dtype (one layer: kernel [in, out],
    a [in, r], b [r, out], magnitude [out]).

    `x_dropped`: dropout(x) for training with adapter dropout (None: no dropout, the one-dot form).
    `matmul(u, w)`: the dot to use (the model's selected kernel; default `u @ w` in u's dtype with float32
    accumulation).  The matmuls run in x's dtype; the norm and the column scale in float32."""
    dt = x.dtype
    k, a_, b_ = kernel.astype(dt), a.astype(dt), b.astype(dt)
    col_scale = magnitude.astype(jnp.float32) / weight_norm(kernel, a, b, scale)
    if x_dropped is None:
        y = col_scale * (matmul(x, k) + scale * matmul(matmul(x, a_), b_))
    else:
        xd = x_dropped.astype(dt)
        y = matmul(x, k) + (col_scale - 1.0) * matmul(xd, k) + col_scale * scale * matmul(matmul(xd, a_), b_)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dt)


def merge(kernel: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float) -> jax.Array:
    """The plain kernel equal to the DoRA projection: m / ||W + s A B||_c * (W + s A B), [*lead, in, out] in
    the kernel's dtype (peft's `merge_unsafe`; the bias is unchanged)."""
    w = _adapted(kernel, a, b, scale)
    col_scale = magnitude.astype(jnp.float32) / jnp.linalg.norm(w, axis=-2)
    return (col_scale[..., None, :] * w).astype(kernel.dtype)


# ------------------------------------------------------------------ the method
def _dora_leaves(tree):
    """(module path, leaf) of every DoRA-adapted module (A, B and magnitude)."""
    return [(p, leaf) for p, leaf in adapter_leaves(tree) if "magnitude" in leaf]


@dataclasses.dataclass(frozen=True)
class Dora(Lora):
    """DoRA (`peft.method=dora`) on the projections `peft.lora.targets` selects, with LoRA's fields
    (`peft.lora.rank/alpha/dropout/rslora/targets`; peft's `LoraConfig(use_dora=True)`).

    Trainable tree: LoRA's `{"A", "B"}` plus `"magnitude"` [*lead, out] per adapted module; frozen = the base
    params. `low_rank` states an adapted projection as LoRA's low-rank form plus the per-column output
    scale m / ||W + s A B||_c when there is no adapter dropout (fused CPU kernels); with dropout it is None
    and the projection goes through `linear`."""

    name: ClassVar[str] = "dora"

    def run_config(self) -> dict:
        return {"method": self.name, "lora": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def describe(self) -> str:
        return f"DoRA{' (rsLoRA scale)' if self.rslora else ''} r={self.rank} alpha={self.alpha:g} targets={self.targets}"

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        tree = init_adapters(params, self.targets, self.rank, rng)
        for path, leaf in adapter_leaves(tree):
            leaf["magnitude"] = init_magnitude(_get(frozen, path)["kernel"], leaf["A"], leaf["B"], self.scale)
        return tree

    def low_rank(self, call: LinearCall) -> LowRank | None:
        """Without adapter dropout (or at inference) a DoRA projection is `(x W + s x A B) * m / ||W + s A B||_c
        + bias`: LoRA's fused form with a per-column output scale, so the fused CPU kernels take it. With
        dropout the frozen path sees the undropped input (not of that form): None, the model calls `linear`."""
        a = call.get("A")
        if a is None or not (call.deterministic or self.dropout == 0):
            return None
        b = call.get("B")
        col_scale = call.get("magnitude").astype(jnp.float32) / weight_norm(self.base_kernel(call), a, b, self.scale)
        return LowRank(a, b, self.scale, 0.0, out_scale=col_scale)

    def linear(self, call: LinearCall) -> jax.Array:
        a = call.get("A")
        if a is None:
            return Hooks.linear(self, call)
        x = call.x.astype(call.dtype)
        x_dropped = None if call.deterministic or self.dropout == 0 else dropout(x, self.dropout, call)
        return dora_linear(x, self.base_kernel(call), a, call.get("B"), call.get("magnitude"), self.scale,
                           bias=self.bias(call), x_dropped=x_dropped, matmul=call.matmul)

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        def walk(node, ad):
            if ad is None:
                return node
            if "magnitude" in ad and not isinstance(ad["magnitude"], dict):
                return {**node, "kernel": merge(node["kernel"], ad["A"], ad["B"], ad["magnitude"], self.scale)}
            return {k: walk(v, ad.get(k)) if isinstance(v, dict) else v for k, v in node.items()}

        return walk(frozen, trainable)

    # PEFT: LoRA's files plus `lora_magnitude_vector` [out] per module and `use_dora: true`
    def peft_config(self, model_config, modules: list[str], base_model_name_or_path: str = "") -> dict:
        return {**super().peft_config(model_config, modules, base_model_name_or_path), "use_dora": True}

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        tensors = adapter_to_peft_tensors(trainable, model_config, rename={"magnitude": PEFT_MAGNITUDE})
        return write_adapter(out_dir, tensors, dtype,
                             lambda modules: self.peft_config(model_config, modules, base_model_name_or_path))

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config) -> tuple[Params, "Dora"]:
        ac, tensors = read_adapter(adapter_dir, "LORA", allowed={"lora_A", "lora_B", PEFT_MAGNITUDE})
        cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
        if not ac.get("use_dora"):
            raise PeftFormatError(f"{cfg_path}: use_dora is not true: a plain LoRA adapter (peft.method=lora)")
        lacking = sorted(m for m, t in tensors.items() if PEFT_MAGNITUDE not in t)
        if lacking:
            raise PeftFormatError(f"{cfg_path}: DoRA modules without {PEFT_MAGNITUDE}: {lacking[:5]}")
        tree = adapter_from_peft_tensors(tensors, params_or_config, int(ac["r"]), adapter_dir,
                                         rename={PEFT_MAGNITUDE: "magnitude"})
        for path, leaf in adapter_leaves(tree):
            # a stacked (scanned) module the adapter covers in only some layers: those layers got LoRA's zero
            # update and a placeholder magnitude of 1, which is not DoRA's identity (||W||_c)
            uncovered = np.all(np.asarray(leaf["A"]) == 0, axis=(-2, -1)) & np.all(np.asarray(leaf["magnitude"]) == 1, axis=-1)
            if np.any(uncovered):
                raise PeftFormatError(f"{cfg_path}: the DoRA adapter covers {'/'.join(path)} in only some layers; "
                                      "load it with model.scan_layers=False")
        adapted = sorted("/".join(p) for p, _ in adapter_leaves(tree))
        targets = "^(" + "|".join(re.escape(p) for p in adapted) + ")$"
        return tree, cls(rank=int(ac["r"]), alpha=float(ac.get("lora_alpha", 8)),
                         dropout=float(ac.get("lora_dropout", 0.0)), rslora=bool(ac.get("use_rslora", False)),
                         targets=targets)

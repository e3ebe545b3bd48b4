"""Kernels: faster drop-ins for reference functions of the model, selected by `model.kernels`.

`models/llama.py` is the reference port; it asks `resolve(config)` for a `KernelSet` and calls a
kernel where the set has one, its own reference function elsewhere. Sets:

* `reference`: none (every op is the port's plain JAX);
* `cpu`: `kernels/cpu.py` (custom-VJP dots, fused q/k/v and gate/up projections with the
  LoRA-family low-rank terms in the same dot, RoPE, SwiGLU, causal block skipping for
  `attention=dense`) and, for `attention=flash` on a single CPU device, the native C++ attention
  (`native_attention.py`; `SFT_JAX_NATIVE_ATTENTION=0|1` is a logged debug override);
* `tokamax`: the reference ops, and for `attention=flash` the attention of tokamax (a maintained
  JAX kernel library: Mosaic/Triton flash attention on GPU, Mosaic on TPU, its XLA version elsewhere;
  `tokamax_attention.py`, optional extra `[gpu]` / `[tpu]`);
* `auto` (default): `cpu` on a CPU backend; on GPU/TPU `tokamax` when it imports, else `reference`
  (XLA's own fusion); `describe` says which and why.

`model.attention` stays the choice of the attention *algorithm*, orthogonal to the set:
`dense` (the reference `llama.attend`, [B,H,T,T] scores), `flash` (the block-sparse online-softmax
`flash_attention.segment_attention`, XLA, every backend) or `pallas` (jax's Pallas/Triton GPU
kernel, `pallas_attention.py`). Every kernel is tested equal to its reference (tests/test_kernels.py
and the attention tests). `describe(config)` says what a run uses; the trainer logs it at start and
writes it to run_info.json.

**Attention kernels declare what they support** (`AttentionKernel`: logit soft-capping, a sliding
window, layers of both kinds, segment ids), and `training_attention(config)` decides which one the
training path runs; the model asks and does not decide. The candidates for `model.attention`:
`flash`: the set's drop-in first (native C++ in `cpu`, tokamax's in `tokamax`), then the XLA block
kernel (`xla_blocks`, supports everything); `pallas`: only the Pallas kernel; `dense`: the reference
einsum (`kernels=cpu`: its causal block-skipping wrapper, which soft-caps through the reference). A drop-in
that lacks what the config needs is skipped with a logged reason (`describe()["attention_fallback"]`, also
in run_info.json); the requested algorithm itself lacking it is a `ModelConfigError` naming the config
field (`model.attention=pallas` with Gemma 2's `attn_logit_softcapping`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax

from sft_jax.kernels import cpu, flash_attention, native_attention, pallas_attention, tokamax_attention

log = logging.getLogger(__name__)

NAMES = ("auto", "reference", "cpu", "tokamax")


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """Optional drop-ins (None = the model's reference function). Signatures are those of the
    reference functions in models/llama.py, except the projection kernels, which receive the
    method (`Hooks`) and its `LinearCall`s and may return None (not fusable: use the reference)."""

    name: str
    matmul: Callable | None = None  # (x [..., in], w [in, *out]) -> [..., *out] in x's dtype
    logits_matmul: Callable | None = None  # (x, w) -> float32
    rope_tables: Callable | None = None  # (positions [B, T], inv_freq) -> (cos, sin) [B, T, 1, hd/2]
    rope: Callable | None = None  # (x f32 [B, T, N, hd], cos, sin) -> rotated x
    linear: Callable | None = None  # (hooks, call) -> y
    qkv: Callable | None = None  # (hooks, [q, k, v calls], num_kv_heads, head_dim) -> (q, k, v) | None
    gate_up: Callable | None = None  # (hooks, gate call, up call) -> silu(g) * u | None
    dense_attention: Callable | None = None  # (reference attend, q, k, v, mask, dtype) -> o
    native_attention: bool = False  # attention=flash computed by the native CPU kernel
    # attention=flash: (q, k, v, segment_ids, positions, *, dtype, sliding_window) -> [B, T, H*hd]
    flash_attention: Callable | None = None


REFERENCE = KernelSet("reference")
TOKAMAX = KernelSet("tokamax", flash_attention=tokamax_attention.attention)
CPU = KernelSet(
    "cpu", matmul=cpu.matmul, logits_matmul=cpu.logits_matmul, rope_tables=cpu.rope_tables, rope=cpu.rope,
    linear=cpu.linear, qkv=cpu.fused_qkv, gate_up=cpu.fused_gate_up, dense_attention=cpu.attend_causal,
)


# ------------------------------------------------------------------ training-path attention kernels
@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """One training-path attention implementation and what it supports. `fn(q, k, v, segment_ids,
    positions, *, dtype, sliding_window, softcap, block)` -> [B, T, H*hd] (None: the model's dense
    reference `llama.attend` on the [B, T, T] mask)."""

    name: str
    softcap: bool = False  # attention logit soft-capping (config attn_logit_softcapping, Gemma 2)
    sliding_window: bool = False  # a sliding window (config sliding_window: Mistral, Gemma, Qwen2 sliding layers)
    per_layer_windows: bool = False  # layers of both kinds in one model (config layer_types)
    segment_ids: bool = True  # packed rows (segment-block-diagonal); every kernel here has them
    fn: Callable | None = None


def _xla_blocks(q, k, v, seg, pos, *, dtype, sliding_window, softcap, block):
    return flash_attention.segment_attention(q, k, v, seg, pos, dtype=dtype, sliding_window=sliding_window,
                                             block=block, softcap=softcap)


def _native(q, k, v, seg, pos, *, dtype, sliding_window, softcap, block):  # noqa: ARG001
    return native_attention.attention(q, k, v, seg, pos, dtype=dtype, sliding_window=sliding_window)


def _tokamax(q, k, v, seg, pos, *, dtype, sliding_window, softcap, block):  # noqa: ARG001
    return tokamax_attention.attention(q, k, v, seg, pos, dtype=dtype, sliding_window=sliding_window)


def _pallas(q, k, v, seg, pos, *, dtype, sliding_window, softcap, block):  # noqa: ARG001
    return pallas_attention.attention(q, k, v, seg, dtype=dtype, sliding_window=sliding_window, block=block)


ATTENTION_KERNELS = {
    # the [B, T, T] einsum (llama.attend): the mask carries windows and segments, the scores are soft-capped
    "dense": AttentionKernel("dense", softcap=True, sliding_window=True, per_layer_windows=True),
    # kernels=cpu's wrapper of it (cpu.attend_causal: skips the causal upper blocks; soft-caps through attend)
    "dense_cpu": AttentionKernel("dense_cpu", softcap=True, sliding_window=True, per_layer_windows=True),
    # kernels/flash_attention.py: XLA loops of block dots, every backend
    "xla_blocks": AttentionKernel("xla_blocks", softcap=True, sliding_window=True, per_layer_windows=True,
                                  fn=_xla_blocks),
    # kernels/native_attention.py (C++, one CPU device): windows are static per layer kind (lax.cond)
    "native_cpu": AttentionKernel("native_cpu", softcap=False, sliding_window=True, per_layer_windows=True,
                                  fn=_native),
    # kernels/tokamax_attention.py: tokamax's local window counts slots, ours positions -> none
    "tokamax": AttentionKernel("tokamax", softcap=False, sliding_window=False, per_layer_windows=False, fn=_tokamax),
    # kernels/pallas_attention.py: jax's Pallas/Triton mha (causal + segment ids only)
    "pallas": AttentionKernel("pallas", softcap=False, sliding_window=False, per_layer_windows=False, fn=_pallas),
}


def attention_needs(config) -> dict[str, str]:
    """{capability: the config field that needs it} for this ModelConfig's attention."""
    need = {"segment_ids": "packed rows (segment_ids)"}
    if config.attn_logit_softcapping is not None:
        need["softcap"] = f"attn_logit_softcapping={config.attn_logit_softcapping}"
    kinds = config.layer_sliding
    if any(kinds):
        need["sliding_window"] = f"sliding_window={config.sliding_window}"
    if len(set(kinds)) > 1:
        need["per_layer_windows"] = f"layer_types ({sum(kinds)} sliding, {len(kinds) - sum(kinds)} full layers)"
    return need


def _lacks(kernel: AttentionKernel, need: dict[str, str]) -> list[str]:
    return [field for cap, field in need.items() if not getattr(kernel, cap)]


def _candidates(config, ks: "KernelSet") -> list[tuple[str, str]]:
    """[(kernel name, why it is a candidate)] for model.attention, best first; the last is the algorithm's own."""
    if config.attention == "pallas":
        return [("pallas", "model.attention=pallas")]
    if config.attention == "dense":
        return [("dense_cpu", "model.kernels=cpu")] * (ks.dense_attention is not None) + [("dense", "model.attention=dense")]
    out = []
    if ks.native_attention:
        out.append(("native_cpu", f"model.kernels={ks.name} ({native_attention.status(config.head_dim, config.dtype)[1]})"))
    if ks.flash_attention is not None:
        out.append(("tokamax", f"model.kernels={ks.name}"))
    return out + [("xla_blocks", "model.attention=flash")]


_logged: set = set()


def training_attention(config, ks: "KernelSet | None" = None) -> tuple[AttentionKernel, str | None]:
    """(the attention kernel of the training path, the fallback reason or None) for this ModelConfig.
    A set's drop-in that lacks a capability the config needs is skipped (reason logged once); when the
    requested algorithm itself lacks it: `ModelConfigError` naming the field."""
    from sft_jax.models.config import ModelConfigError

    ks = resolve(config) if ks is None else ks
    need = attention_needs(config)
    skipped = []
    cands = _candidates(config, ks)
    for i, (name, why) in enumerate(cands):
        kernel = ATTENTION_KERNELS[name]
        lacks = _lacks(kernel, need)
        if not lacks:
            reason = None
            if skipped:
                reason = "; ".join(skipped) + f": using {name}"
                key = (config.model_type, reason)
                if key not in _logged:
                    _logged.add(key)
                    (log.info if config.kernels == "auto" else log.warning)("attention: %s", reason)
            return kernel, reason
        if i == len(cands) - 1:
            alt = "model.attention=flash or dense" if config.attention == "pallas" else "another model.attention"
            raise ModelConfigError(f"model.attention={config.attention} does not support {', '.join(lacks)} "
                                   f"({config.model_type} config); use {alt}")
        skipped.append(f"{name} ({why}) does not support {', '.join(lacks)}")
    raise AssertionError("unreachable")


def resolved_name(name: str) -> str:
    """`auto` -> `cpu` on a CPU backend, else `tokamax` when it imports, else `reference`; other names
    unchanged."""
    if name not in NAMES:
        raise ValueError(f"model.kernels must be one of {list(NAMES)}, got {name!r}")
    if name == "auto":
        if jax.default_backend() == "cpu":
            return "cpu"
        return "tokamax" if tokamax_attention.status()[0] else "reference"
    return name


def resolve(config) -> KernelSet:
    """The kernel set a model with this `ModelConfig` uses (decided at trace time from the backend
    and the device count)."""
    name = resolved_name(config.kernels)
    if name == "reference":
        return REFERENCE
    if name == "tokamax":
        ok, why = tokamax_attention.status()
        if not ok:
            raise ValueError(f"model.kernels='tokamax': {why}")
        return TOKAMAX
    if config.attention == "flash" and native_attention.status(config.head_dim, config.dtype)[0]:
        return dataclasses.replace(CPU, native_attention=True)
    return CPU


def describe(config) -> dict[str, Any]:
    """What a run with this ModelConfig computes with, for the start log and run_info.json."""
    ks = resolve(config)
    out: dict[str, Any] = {"requested": config.kernels, "kernels": ks.name, "attention": config.attention,
                           "backend": jax.default_backend()}
    if ks.name == "tokamax" or (config.kernels == "auto" and jax.default_backend() != "cpu"):
        out["tokamax"] = tokamax_attention.status()[1]
    kernel, fallback = training_attention(config, ks)  # ModelConfigError when model.attention cannot run it
    out["attention_impl"] = kernel.name
    if fallback:
        out["attention_fallback"] = fallback
    if config.attention == "flash" and ks.name == "cpu":
        out["native_attention_reason"] = native_attention.status(config.head_dim, config.dtype)[1]
    override = os.environ.get(native_attention.ENV)
    if override is not None:
        out["override"] = f"{native_attention.ENV}={override}"
    return out


__all__ = ["ATTENTION_KERNELS", "AttentionKernel", "CPU", "KernelSet", "NAMES", "REFERENCE", "TOKAMAX", "attention_needs",
           "describe", "resolve", "resolved_name", "training_attention"]

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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax

from sft_jax.kernels import cpu, native_attention, tokamax_attention

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
    if config.attention == "flash":
        out["attention_impl"] = ("native_cpu" if ks.native_attention else
                                 "tokamax" if ks.flash_attention is not None else "xla_blocks")
        if ks.name == "cpu":
            out["native_attention_reason"] = native_attention.status(config.head_dim, config.dtype)[1]
    override = os.environ.get(native_attention.ENV)
    if override is not None:
        out["override"] = f"{native_attention.ENV}={override}"
    return out


__all__ = ["CPU", "KernelSet", "NAMES", "REFERENCE", "TOKAMAX", "describe", "resolve", "resolved_name"]

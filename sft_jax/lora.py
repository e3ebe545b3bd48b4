"""LoRA as a tree transform over the plain parameter dict.

The base tree is never modified. `init_lora` builds a separate *trainable* tree that mirrors the
paths of the targeted dense modules and holds only `{"A": [in, r], "B": [r, out]}` there (with a
leading `layers` axis when the base is scanned). The model's dense layers compute
`x W (+b) + scale * dropout(x) A B` when given this tree (`forward(..., lora=tree,
lora_scale=scale, lora_dropout=p)`); nothing is merged during training.

Full fine-tuning is the degenerate case: trainable = the whole params tree, frozen = {}.

Initialisation follows peft: A ~ kaiming_uniform(a=sqrt(5)) on peft's [r, in] weight, i.e.
U(-1/sqrt(in), 1/sqrt(in)), stored transposed as [in, r]; B = 0, so the first forward equals the
base model exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str = "all-linear"

    @classmethod
    def from_cfg(cls, lora_cfg) -> "LoraConfig":
        """From the `cfg.lora` ConfigDict section."""
        return cls(
            rank=int(lora_cfg.rank),
            alpha=float(lora_cfg.alpha),
            dropout=float(lora_cfg.dropout),
            rslora=bool(lora_cfg.rslora),
            targets=str(lora_cfg.targets),
        )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
    if rank <= 0:
        return 0.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _is_dense(node) -> bool:
    return isinstance(node, dict) and "kernel" in node and not isinstance(node["kernel"], dict)


def dense_paths(params: Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) of every module holding a `kernel` leaf, in sorted key order."""
    out = []
    for k in sorted(params):
        v = params[k]
        if _is_dense(v):
            out.append(prefix + (k,))
        elif isinstance(v, dict):
            out.extend(dense_paths(v, prefix + (k,)))
    return out


def target_paths(params: Params, targets: str) -> list[tuple[str, ...]]:
    """Dense-module paths selected by `targets`:

    - "all-linear": every dense except the output head (`lm_head`), as in peft;
    - a comma list of module names ("q_proj,v_proj"): matched against the last path component;
    - anything else is a regex, `re.search`ed over the '/'-joined module path
      (e.g. "layers_[0-3]/attn/(q|v)_proj" or ".*mlp/.*").
    Raises ValueError when nothing matches.
    """
    spec = targets.strip()
    paths = dense_paths(params)
    if spec == "all-linear":
        chosen = [p for p in paths if p[-1] != "lm_head"]
    elif re.fullmatch(r"[A-Za-z0-9_]+(\s*,\s*[A-Za-z0-9_]+)*", spec):
        names = {s.strip() for s in spec.split(",")}
        chosen = [p for p in paths if p[-1] in names]
    else:
        rx = re.compile(spec)
        chosen = [p for p in paths if rx.search("/".join(p))]
    if not chosen:
        raise ValueError(
            f"lora.targets={targets!r} matches no dense module; available: "
            + ", ".join(sorted({"/".join(p) for p in paths}))[:500]
        )
    return chosen


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init_lora(params: Params, cfg: LoraConfig, rng: jax.Array) -> Params:
    """The trainable LoRA tree (float32) for `params`: `{..path..: {"A": [*lead, in, r], "B": [*lead, r, out]}}`."""
    if cfg.rank <= 0:
        raise ValueError("init_lora needs lora.rank > 0")
    out: Params = {}
    paths = target_paths(params, cfg.targets)
    keys = jax.random.split(rng, len(paths))
    for key, path in zip(keys, paths):
        kernel = _get(params, path)["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (*lead, fan_in, cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, cfg.rank, fan_out), jnp.float32)
        _set(out, path, {"A": a, "B": b})
    return out


def split_trainable(params: Params, cfg: LoraConfig, rng: jax.Array) -> tuple[Params, Params]:
    """(trainable, frozen). LoRA: (init_lora(params), params). Full fine-tuning (rank 0):
    (params cast to float32, {}) — trainable weights and their optimizer state are always float32."""
    if cfg.enabled:
        return init_lora(params, cfg, rng), params
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), {}


def lora_logical_axes(lora: Params, param_logical_axes: Params) -> Params:
    """Logical axes for the LoRA leaves from the base kernel's: A -> (*lead, in_axis, None),
    B -> (*lead, None, out_axis)."""

    def walk(node, axes):
        if isinstance(node, dict) and "A" in node and "B" in node and not isinstance(node["A"], dict):
            *lead, ax_in, ax_out = axes["kernel"]
            return {"A": (*lead, ax_in, None), "B": (*lead, None, ax_out)}
        return {k: walk(v, axes[k]) for k, v in node.items()}

    return walk(lora, param_logical_axes)


def merge(frozen: Params, trainable: Params, scale: float) -> Params:
    """Plain weights: W + scale * A @ B at every adapted dense (computed in float32, cast back to
    W's dtype). With frozen == {} (full fine-tuning) returns `trainable` unchanged."""
    if not frozen:
        return trainable

    def walk(base, lora):
        if lora is None:
            return base
        if isinstance(lora, dict) and "A" in lora and "B" in lora and not isinstance(lora["A"], dict):
            w = base["kernel"]
            delta = jnp.einsum("...ir,...ro->...io", lora["A"].astype(jnp.float32), lora["B"].astype(jnp.float32))
            new = dict(base)
            new["kernel"] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
            return new
        return {k: walk(v, lora.get(k)) if isinstance(v, dict) else v for k, v in base.items()}

    return walk(frozen, trainable)


def count_params(tree) -> int:
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))

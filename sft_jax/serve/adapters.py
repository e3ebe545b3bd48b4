"""Per-request adapters: many low-rank adapters over one base, mixed in one decode batch.

A served model is `(params, method, method_vars)` (what `sft_jax.generate`'s `Generator` holds).
When its method states every projection it changes as `Hooks.low_rank` (`x W + s (x A) B`: LoRA,
rsLoRA, ...), overrides no other extension point, owns no frozen data (`METHOD_FROZEN`) and its
`params` equal the engine's base, it joins the base's *adapter stack*: at every adapted projection
path the stack holds `A [N+1, in, r_max]`, `B [N+1, r_max, out]` (ranks zero-padded) and
`scale [N+1]`, row 0 being the base (zeros).  Each decode step gathers the rows' own A/B/scale by
their adapter index (as S-LoRA / Punica do) into the model's `method` collection and runs the
model with the `RowAdapters` hooks, whose `linear` adds `scale_b * (x_b A_b) B_b` per row `b`.  A
row therefore computes what its adapter alone computes (`sft_jax.generate` greedy is the reference).

Any other method (DoRA, a quantised or residual base, prompt/prefix methods, ...) cannot share the
base's weights this way; `classify` says why, and the server runs it in an engine of its own,
unmerged, with its own method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.hooks import METHOD, METHOD_FROZEN, Hooks, LinearCall, LowRank, reference_matmul

_OTHER_POINTS = ("base_kernel", "bias", "embed", "attention_kv", "sublayer_out", "final_hidden")


class NotStackable(ValueError):
    """The method cannot ride in a shared-base adapter stack; the message says why."""


@dataclasses.dataclass(frozen=True)
class RowAdapters(Hooks):
    """Hooks for a batch whose rows use different low-rank adapters: the `method` collection holds,
    at each adapted projection, the rows' gathered `A [B, in, r]`, `B [B, r, out]`, `scale [B]`."""

    name = "row-adapters"

    def linear(self, call: LinearCall) -> jax.Array:
        y = Hooks.linear(self, call)
        a = call.get("A")
        if a is None:
            return y
        dt = call.dtype
        h = jnp.einsum("b...i,bir->b...r", call.x.astype(dt), a.astype(dt))
        d = jnp.einsum("b...r,bro->b...o", h, call.get("B").astype(dt))
        s = call.get("scale").astype(dt)
        return y + d * s.reshape(s.shape + (1,) * (d.ndim - 1))


ROW_ADAPTERS = RowAdapters()


def _modules(tree: dict, path: tuple = ()):
    """(path, variables) of every module node of a method collection: a dict whose values are arrays."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    if leaves:
        yield path, leaves
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _modules(v, path + (k,))


def low_rank_parts(method, method_vars: dict | None, config) -> dict[tuple, LowRank]:
    """{module path: LowRank} of a served model's method (empty for plain weights); NotStackable
    when the method is not purely low-rank updates of the base projections."""
    if method is None:
        return {}
    for point in _OTHER_POINTS:
        if getattr(type(method), point) is not getattr(Hooks, point):
            raise NotStackable(f"method {method.name!r} changes the model at '{point}', not only by low-rank "
                               f"updates of projections")
    method_vars = method_vars or {}
    if jax.tree.leaves(method_vars.get(METHOD_FROZEN, {})):
        raise NotStackable(f"method {method.name!r} keeps frozen data of its own ({METHOD_FROZEN})")
    out = {}
    for path, variables in _modules(method_vars.get(METHOD, {})):
        call = LinearCall(variables={METHOD: variables}, path=path, dtype=jnp.dtype(config.dtype), deterministic=True,
                          make_rng=None, matmul=reference_matmul)
        try:
            lr = method.low_rank(call)
        except ValueError as e:  # needs the base kernel (e.g. DoRA's column norm): not a stackable update
            raise NotStackable(f"method {method.name!r}: {'/'.join(path)}: {e}") from None
        if lr is None or lr.out_scale is not None or not method.fusable(call):
            raise NotStackable(f"method {method.name!r}: {'/'.join(path)} is not of the form x W + s (x A) B")
        out[path] = lr
    return out


def same_tree(a: Any, b: Any) -> bool:
    """Same structure, shapes, dtypes and values (the base weights two served models share)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if x is y:
            continue
        if np.shape(x) != np.shape(y) or jnp.dtype(x.dtype) != jnp.dtype(y.dtype):
            return False
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


def stack(adapters: list[dict[tuple, LowRank]], scanned: bool) -> dict:
    """The stacked `method` tree of adapters 1..N (row 0 = the base: zeros). With `scanned`
    (scan_layers), paths under "layers" carry a leading layer axis; the adapter axis is put after it
    so that `nn.scan` slices layers as usual."""
    paths = sorted({p for ad in adapters for p in ad})
    tree: dict = {}
    for path in paths:
        parts = [ad.get(path) for ad in adapters]
        ref = next(lr for lr in parts if lr is not None)
        r = max(int(lr.a.shape[-1]) for lr in parts if lr is not None)
        a_shape, b_shape = ref.a.shape[:-1] + (r,), ref.b.shape[:-2] + (r, ref.b.shape[-1])
        a_rows, b_rows, s_rows = [np.zeros(a_shape, np.float32)], [np.zeros(b_shape, np.float32)], [0.0]
        for lr in parts:
            if lr is None:
                a_rows.append(np.zeros(a_shape, np.float32))
                b_rows.append(np.zeros(b_shape, np.float32))
                s_rows.append(0.0)
                continue
            k = int(lr.a.shape[-1])
            a = np.zeros(a_shape, np.float32)
            a[..., :k] = np.asarray(lr.a, np.float32)
            b = np.zeros(b_shape, np.float32)
            b[..., :k, :] = np.asarray(lr.b, np.float32)
            a_rows.append(a)
            b_rows.append(b)
            s_rows.append(float(lr.scale))
        layer_axis = scanned and path[0] == "layers"
        axis = 1 if layer_axis else 0
        scale = np.asarray(s_rows, np.float32)
        if layer_axis:
            scale = np.broadcast_to(scale, (a_shape[0], len(s_rows))).copy()
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {"A": np.stack(a_rows, axis), "B": np.stack(b_rows, axis), "scale": scale}
    return jax.tree.map(jnp.asarray, tree)


def gather_rows(stacked: dict, rows: jax.Array, scanned: bool) -> dict:
    """(traced) The `method` collection of a batch: each row's adapter (index into the stack)."""

    def walk(node, top):
        if "A" in node and not isinstance(node["A"], dict):
            axis = 1 if scanned and top == "layers" else 0
            return {k: jnp.take(v, rows, axis=axis) for k, v in node.items()}
        return {k: walk(v, top if top is not None else k) for k, v in node.items()}

    return walk(stacked, None)

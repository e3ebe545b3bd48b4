"""Device mesh, logical-axis rules, and the shardings of params, LoRA, optimizer state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded over it),
`tensor` (tensor parallel over heads / mlp / vocab). The model annotates parameters and
activations with *logical* names (BUILD_NOTES "Module interfaces"); `LOGICAL_RULES` maps them
to mesh axes (MaxText style). Misconfigurations raise `ShardingError` (a ValueError) naming the
config fields, before anything is compiled (GUIDE pitfall 8).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sft_jax.models import llama

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class ShardingError(ValueError):
    """A mesh / batch / model combination that cannot be sharded; the message names the fields."""


def _mesh_get(mesh_cfg, name):
    return int(mesh_cfg[name] if isinstance(mesh_cfg, dict) else getattr(mesh_cfg, name))


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from `cfg.mesh`; at most one may be -1 (filled from the device count)."""
    sizes = [_mesh_get(mesh_cfg, a) for a in MESH_AXES]
    given = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"at most one of mesh.data/mesh.fsdp/mesh.tensor may be -1 ({given})")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh sizes must be positive or -1 ({given})")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ShardingError(
                f"mesh size does not match the device count: {given} cannot fill "
                f"{num_devices} devices ({num_devices} is not divisible by {known})"
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ShardingError(
            f"mesh size {known} ({given}) does not match the device count {num_devices}"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') (Auto axis types: classic jit shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / odd topologies: plain reshape
        arr = np.array(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def check_divisibility(
    mesh: Mesh, *, batch_size: int, micro_batches: int = 1, num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> None:
    """Raise ShardingError unless the global batch and micro-batch divide data*fsdp and the heads
    divide tensor. Call before compiling."""
    s = mesh_sizes(mesh)
    dp = s["data"] * s["fsdp"]
    problems = []
    if batch_size % dp:
        problems.append(
            f"train.batch_size={batch_size} is not divisible by the data-parallel size "
            f"mesh.data*mesh.fsdp={s['data']}*{s['fsdp']}={dp}"
        )
    if micro_batches < 1 or batch_size % micro_batches:
        problems.append(f"train.batch_size={batch_size} is not divisible by train.micro_batches={micro_batches}")
    elif (batch_size // micro_batches) % dp:
        problems.append(
            f"micro-batch size train.batch_size/train.micro_batches={batch_size}/{micro_batches}="
            f"{batch_size // micro_batches} is not divisible by mesh.data*mesh.fsdp={dp}"
        )
    if num_heads is not None and num_heads % s["tensor"]:
        problems.append(f"model num_heads={num_heads} is not divisible by mesh.tensor={s['tensor']}")
    if num_kv_heads is not None and num_kv_heads % s["tensor"]:
        problems.append(f"model num_kv_heads={num_kv_heads} is not divisible by mesh.tensor={s['tensor']}")
    if problems:
        raise ShardingError("cannot shard this run:\n  " + "\n  ".join(problems))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_to_spec(axes: tuple, rules=LOGICAL_RULES, shape=None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for one leaf. With `shape` and `mesh`, a dim that its mesh axes do not divide
    is replicated instead (e.g. a tiny vocab over a large tensor axis)."""
    spec = nn.logical_to_mesh_axes(axes, list(rules))
    if shape is None or mesh is None:
        return spec
    sizes = mesh_sizes(mesh)
    fixed = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
        n = math.prod(sizes[a] for a in names)
        fixed.append(ax if n == 1 or dim % n == 0 else None)
    return P(*fixed)


def logical_shardings(logical_tree, mesh: Mesh, shapes=None, rules=LOGICAL_RULES):
    """Tree of NamedSharding from a tree of logical-axis tuples (the model's `param_logical_axes`
    or a method's `trainable_axes`). `shapes`: the matching tree of arrays / ShapeDtypeStructs."""
    if shapes is None:
        return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, rules)), logical_tree, is_leaf=_is_axes)
    return jax.tree.map(
        lambda a, x: NamedSharding(mesh, logical_to_spec(a, rules, np.shape(x) if not hasattr(x, "shape") else x.shape, mesh)),
        logical_tree, shapes, is_leaf=_is_axes,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every [B, T] batch array: batch over ('data', 'fsdp'), length replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def opt_state_shardings(optimizer, trainable, trainable_shardings, mesh: Mesh):
    """Shardings of `optimizer.init(trainable)`: param-shaped parts (Adam mu/nu) mirror the params'
    shardings, everything else (step counts) is replicated."""
    shapes = jax.eval_shape(optimizer.init, trainable)
    return optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        shapes,
        trainable_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def init_opt_state(optimizer, trainable, opt_shardings):
    """`optimizer.init(trainable)` placed directly on its shardings."""
    return jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)


def jit_step(
    step_fn: Callable, mesh: Mesh, *, trainable_shardings, frozen_shardings, opt_shardings,
    rules=LOGICAL_RULES, donate: bool = True,
):
    """`jax.jit` of `step_fn(trainable, frozen, opt_state, batch, rng)` with explicit in/out
    shardings, trainable and opt_state donated. Inside, the mesh (abstract) and the logical-axis
    rules are active, so the model's `nn.with_logical_constraint` calls take effect."""

    def wrapped(trainable, frozen, opt_state, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
            return step_fn(trainable, frozen, opt_state, batch, rng)

    wrapped.__name__ = wrapped.__qualname__ = "train_step"  # the name compile counters and profiles see
    return jax.jit(
        wrapped,
        in_shardings=(trainable_shardings, frozen_shardings, opt_shardings, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(trainable_shardings, opt_shardings, replicated(mesh)),
        donate_argnums=(0, 2) if donate else (),
    )


def jit_eval_step(eval_fn: Callable, mesh: Mesh, *, trainable_shardings, frozen_shardings, rules=LOGICAL_RULES):
    """`jax.jit` of `eval_fn(trainable, frozen, batch)` -> replicated sums."""

    def wrapped(trainable, frozen, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
            return eval_fn(trainable, frozen, batch)

    wrapped.__name__ = wrapped.__qualname__ = "eval_step"
    return jax.jit(
        wrapped,
        in_shardings=(trainable_shardings, frozen_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def shard_params(params, config, mesh: Mesh, rules=LOGICAL_RULES):
    """Place a model's params on `mesh` by their logical axes (tensor-parallel heads / mlp / vocab
    over `tensor`; a dim its mesh axes do not divide stays replicated)."""
    shardings = logical_shardings(llama.param_logical_axes(config), mesh, params, rules)
    return jax.device_put(params, shardings)


def tensor_parallel_mesh(n: int, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """A (data=1, fsdp=1, tensor=n) mesh over the first n devices for generation; None for n == 1."""
    devices = list(jax.devices() if devices is None else devices)
    if n == 1:
        return None
    if n > len(devices):
        raise ShardingError(f"tensor parallel size {n} needs {n} devices, {len(devices)} available")
    return make_mesh({"data": 1, "fsdp": 1, "tensor": n}, devices[:n])

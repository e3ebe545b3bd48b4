"""AdamW with a warmup + decay schedule and global-norm clipping (optax).

`make_optimizer(train_cfg, total_steps, params)` -> (optax.GradientTransformation, schedule_fn).
Weight decay is masked off norms, biases and 1-D parameters (see `decay_mask`).
The optimizer state mirrors the *trainable* tree only (LoRA adapters, or the whole model for full
fine-tuning); it is float32 because trainable parameters are kept in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


def make_schedule(
    schedule: str, lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0
) -> Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then constant / linear / cosine decay to `end_lr`
    at `total_steps` (step index of the last update + 1). `lr(step)` is the rate of update `step`."""
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "linear":
        main = optax.linear_schedule(lr, end_lr, decay_steps)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=(end_lr / lr) if lr else 0.0)
    else:
        raise ValueError(f"train.schedule={schedule!r} is not one of constant, linear, cosine")
    if warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def decay_mask(params):
    """True where weight decay applies: matrices (kernels, embeddings, LoRA A/B); False for norms,
    biases and 1-D leaves. With scanned layers a norm scale is [L, D], so names are checked too."""

    def keep(path, x):
        names = [_key_name(k).lower() for k in path]
        if any("norm" in n for n in names) or (names and names[-1] in ("bias", "scale")):
            return False
        return jnp.ndim(x) >= 2

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg, total_steps: int, params=None):
    """optax chain: [clip_by_global_norm(train.grad_clip) if > 0] -> adamw(schedule, b1, b2, eps,
    weight_decay masked by `decay_mask`). `params` is unused beyond documenting the tree (the mask is
    a callable, so the same optimizer serves any tree). Returns (optimizer, schedule)."""
    del params
    sched = make_schedule(
        train_cfg.schedule,
        float(train_cfg.lr),
        total_steps,
        int(train_cfg.warmup_steps),
        float(train_cfg.end_lr),
    )
    parts = []
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(
        optax.adamw(
            sched,
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
            mask=decay_mask,
            mu_dtype=jnp.float32,
        )
    )
    return optax.chain(*parts), sched


def opt_step(opt_state) -> jax.Array:
    """The number of updates applied so far (the Adam `count`), an int32 scalar; 0 for an optimizer
    without a step count (e.g. plain SGD)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        return jnp.zeros((), jnp.int32)
    return counts[0][1]

"""The jitted training and evaluation steps.

`build_train_step(...)` returns the pure function

    train_step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)

- `trainable` / `frozen` are the fine-tuning method's trees (`sft_jax.peft.base.Method`: e.g. the
  LoRA adapters and the base params; full fine-tuning: the whole params tree (float32) and `{}`);
  the model is applied through the method (`Method.variables`). Gradients and optimizer state
  exist for `trainable` only.
- Gradient accumulation runs *inside* the step: the [B, T] batch is split into `micro_batches`
  micro-batches (rows m, m+M, m+2M, ... so every micro-batch stays spread over all data-parallel
  devices) and a `lax.scan` sums the gradients of the loss *numerators*; the total is divided by
  the trainable-token count of the whole global batch, computed up front. So 4 x 2 == 1 x 8 and
  the result does not depend on the mesh (GUIDE pitfall 4).
- NEFTune noise (per-segment real length) is added to the input embeddings in training only.

`build_eval_step(...)` returns `eval_step(trainable, frozen, batch) -> {"loss_sum", "correct",
"tokens"}` (sums; deterministic, no noise, no dropout).

`make_train_step(cfg, model_config, mesh, ...)` wires it all with explicit shardings (see its doc).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sft_jax import sharding as sharding_lib
from sft_jax.peft.base import Method
from sft_jax.loss import chunked_cross_entropy_sums, cross_entropy_sums
from sft_jax.neftune import neftune_noise
from sft_jax.optim import opt_step

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    micro_batches: int = 1
    neftune_alpha: float = 0.0
    loss_chunk_size: int = 0  # > 0: chunked cross-entropy
    z_loss: float = 0.0

    @classmethod
    def from_cfg(cls, cfg) -> "StepOptions":
        return cls(
            micro_batches=int(cfg.train.micro_batches),
            neftune_alpha=float(cfg.neftune.alpha),
            loss_chunk_size=int(cfg.train.loss_chunk_size),
            z_loss=float(cfg.train.z_loss),
        )


def _llama():
    from sft_jax.models import llama  # imported lazily: the model module is optional for unit tests

    return llama


def _loss_sums(trainable, frozen, batch, *, model_config, method: Method, opts, train, rng):
    """Loss numerators / counts of one (micro-)batch."""
    llama = _llama()
    params, method_vars = method.model_inputs(trainable, frozen)
    noise_rng, dropout_rng = jax.random.split(rng)
    noise = None
    if train and opts.neftune_alpha:
        noise = neftune_noise(
            noise_rng, batch["segment_ids"], model_config.hidden_size, opts.neftune_alpha,
            jnp.dtype(model_config.dtype),
        )
    out = llama.forward(
        params, model_config, batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
        method=method, method_vars=method_vars, embed_noise=noise, dropout_rng=dropout_rng,
        deterministic=not train, return_hidden=opts.loss_chunk_size > 0,
    )
    if opts.loss_chunk_size > 0:
        kernel = llama.lm_head_kernel(params, model_config)
        return chunked_cross_entropy_sums(
            out, kernel, batch["targets"], batch["loss_mask"], chunk_size=opts.loss_chunk_size, z_loss=opts.z_loss,
            kernel_grad=method.trains_base,  # a frozen LM head needs no kernel gradient
            softcap=model_config.final_logit_softcapping,
        )
    return cross_entropy_sums(out, batch["targets"], batch["loss_mask"], z_loss=opts.z_loss)


def split_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, m+2M, ... (stays spread over the
    data-parallel devices when B/M is divisible by data*fsdp)."""

    def split(x):
        b = x.shape[0]
        x = x.reshape(b // micro_batches, micro_batches, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        # no-op outside a mesh/rules context; under `jit_step` keeps each micro-batch data-sharded
        return nn.with_logical_constraint(x, (None, "act_batch") + ("act_length",) * (x.ndim - 2))

    return {k: split(v) for k, v in batch.items()}


def build_train_step(
    model_config, optimizer: optax.GradientTransformation, schedule: Callable | None,
    method: Method, opts: StepOptions = StepOptions(),
) -> Callable:
    """The pure `train_step(trainable, frozen, opt_state, batch, rng)`; see the module doc.

    metrics: loss (mean over trainable tokens of the global batch, incl. z-loss), ce (without
    z-loss), trainable_tokens, real_tokens (non-padding), accuracy, grad_norm (before clipping), lr (of this update)."""
    m = int(opts.micro_batches)

    def step(trainable, frozen, opt_state, batch, rng):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        total_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        real_tokens = jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32)  # non-padding tokens
        denom = jnp.maximum(total_tokens, 1.0)

        def micro(params, mb, key):
            sums = _loss_sums(params, frozen, mb, model_config=model_config, method=method,
                              opts=opts, train=True, rng=key)
            return sums["loss_sum"] / denom, sums

        grad_fn = jax.value_and_grad(micro, has_aux=True)
        if m == 1:
            (_, sums), grads = grad_fn(trainable, batch, rng)
        else:
            mbs = split_micro_batches(batch, m)
            keys = jax.random.split(rng, m)
            zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
            zero_s = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "ce_sum", "correct", "tokens")}

            def body(carry, xs):
                g_acc, s_acc = carry
                mb, key = xs
                (_, s), g = grad_fn(trainable, mb, key)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                s_acc = {k: s_acc[k] + s[k] for k in s_acc}
                return (g_acc, s_acc), None

            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), (mbs, keys))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

        grad_norm = optax.tree.norm(grads)
        count = opt_step(opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": sums["loss_sum"] / denom,
            "ce": sums["ce_sum"] / denom,
            "trainable_tokens": total_tokens,
            "real_tokens": real_tokens,
            "accuracy": sums["correct"] / denom,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(count) if schedule is not None else 0.0, jnp.float32),
        }
        return trainable, opt_state, metrics

    return step


def build_eval_step(model_config, method: Method, opts: StepOptions = StepOptions()) -> Callable:
    """`eval_step(trainable, frozen, batch) -> {"loss_sum", "ce_sum", "correct", "tokens"}` (sums over
    the batch; divide totals over the eval set). Deterministic: no NEFTune, no dropout."""

    def eval_step(trainable, frozen, batch):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        return _loss_sums(trainable, frozen, batch, model_config=model_config, method=method,
                          opts=opts, train=False, rng=jax.random.PRNGKey(0))

    return eval_step


class StepShardings(NamedTuple):
    trainable: Any
    frozen: Any
    opt_state: Any
    batch: Any  # one NamedSharding for every [B, T] array


class Steps(NamedTuple):
    train_step: Callable  # jitted (trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)
    eval_step: Callable  # jitted (trainable, frozen, batch) -> sums
    shardings: StepShardings


def make_train_step(
    model_config, mesh, *, trainable, frozen, optimizer, schedule, method: Method,
    opts: StepOptions = StepOptions(), batch_size: int, param_logical_axes=None,
    rules=sharding_lib.LOGICAL_RULES,
) -> Steps:
    """Validate the mesh/batch/model combination (ShardingError before compiling), derive all
    shardings and return the jitted train and eval steps.

    `trainable` / `frozen`: trees of arrays or ShapeDtypeStructs (only shapes are read).
    `param_logical_axes`: the model's `param_logical_axes(model_config)` (default: computed).
    Place state with `jax.device_put(tree, steps.shardings.<part>)` and the optimizer state with
    `sharding.init_opt_state(optimizer, trainable, steps.shardings.opt_state)`."""
    sharding_lib.check_divisibility(
        mesh, batch_size=batch_size, micro_batches=opts.micro_batches,
        num_heads=model_config.num_heads, num_kv_heads=model_config.num_kv_heads,
    )
    if param_logical_axes is None:
        param_logical_axes = _llama().param_logical_axes(model_config)
    tr_sh = sharding_lib.logical_shardings(method.trainable_axes(trainable, param_logical_axes), mesh, trainable, rules)
    fr_sh = (sharding_lib.logical_shardings(method.frozen_axes(frozen, param_logical_axes), mesh, frozen, rules)
             if frozen else {})
    opt_sh = sharding_lib.opt_state_shardings(optimizer, trainable, tr_sh, mesh)
    step = build_train_step(model_config, optimizer, schedule, method, opts)
    ev = build_eval_step(model_config, method, opts)
    return Steps(
        train_step=sharding_lib.jit_step(step, mesh, trainable_shardings=tr_sh, frozen_shardings=fr_sh,
                                         opt_shardings=opt_sh, rules=rules),
        eval_step=sharding_lib.jit_eval_step(ev, mesh, trainable_shardings=tr_sh, frozen_shardings=fr_sh, rules=rules),
        shardings=StepShardings(tr_sh, fr_sh, opt_sh, sharding_lib.batch_sharding(mesh)),
    )

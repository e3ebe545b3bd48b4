"""The model's extension points: where a fine-tuning method (sft_jax.peft) changes the forward pass.

The reference model (`models/llama.py`) knows no method. It calls a `Hooks` object at the points below;
`Hooks` itself is the identity everywhere (the plain model), and a method (`peft.base.Method`)
subclasses it and overrides only the points it needs:

====================  ==========================================  ===============================
point                 called                                      used by (this wave / issue 20)
====================  ==========================================  ===============================
`linear(call)`        every projection (q/k/v/o, gate/up/down)    LoRA, rsLoRA, DoRA, QLoRA, IA3
`bias(call)`          inside the default `linear` and the fused   BitFit (the trained bias)
                      kernels: the projection's bias
`base_kernel(call)`   inside the default `linear`: the frozen     QLoRA (dequantise NF4/int8 codes)
                      [in, out] kernel in the compute dtype
`low_rank(call)`      by a fused-projection kernel (optional)     LoRA family: `x W + s (x A) B`
`embed(x, ..)`        after the token embedding lookup            prompt tuning, P-tuning
`attention_kv(..)`    per layer, on the rotated keys and values   prefix tuning (P-tuning v2)
`sublayer_out(..)`    per layer, on the attention and MLP         bottleneck adapters
                      outputs before each residual add
`final_hidden(x, ..)` after the final norm, before the LM head    prompt tuning (drop the
                                                                  virtual-token positions)
====================  ==========================================  ===============================

Where a method's parameters live
--------------------------------
Two Flax variable collections mirror the `params` tree's module paths:

* `METHOD` ("method"): the method's trainable tree (what the optimizer updates), e.g. LoRA's
  `{"layers_0": {"attn": {"q_proj": {"A": [in, r], "B": [r, out]}}}}`;
* `METHOD_FROZEN` ("method_frozen"): frozen data the method owns, e.g. QLoRA's NF4 codes and block
  scales at `layers_0/attn/q_proj/...` in place of the `params` kernel.

With `scan_layers` both carry a leading layer axis, which `nn.scan` slices exactly as it slices
`params`. A hook reads the variables of the module that calls it (the projection for `linear`;
`layers_i/attn` for `attention_kv`; `layers_i` for `sublayer_out`; the root for `embed` and
`final_hidden`) through `Site.get(name, collection)`.

A frozen base weight in another form: a projection reads `params/.../kernel` only when the
`params` tree holds it. A method that stores the base otherwise (QLoRA) leaves the kernel out of
`params`; the projection then passes `kernel=None` and the method's `base_kernel(call)` rebuilds
the kernel from its `METHOD_FROZEN` variables (no Flax shape check is involved: those variables
are read, never created, by the model). Biases and norms stay in `params`.

All hooks are traced inside the jitted step: they must be pure functions of their arguments and
of the variables they read. A `Hooks` object is a static, hashable value (methods are frozen
dataclasses); arrays never live on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = Any

SHARED_SEGMENT = -1  # segment id of the tokens `Hooks.embed` prepends (seen by every segment of the row)

METHOD = "method"
METHOD_FROZEN = "method_frozen"
COLLECTIONS = (METHOD, METHOD_FROZEN)


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a hook is called: the calling module's own method variables and run-time state.

    `variables`: {collection: {name: value}} of the calling module (leaves or subtrees that are
    not submodules), for the collections in `COLLECTIONS`; `path`: the module path
    (e.g. `("layers_0", "attn", "q_proj")`, or `("layers", "attn", "q_proj")` inside a scan);
    `dtype`: the compute dtype; `deterministic`: False in training (dropout on);
    `make_rng`: a fresh PRNG key from the 'dropout' stream (call only when not deterministic).
    """

    variables: dict
    path: tuple
    dtype: Any
    deterministic: bool
    make_rng: Callable[[], Array]
    # True in a KV-cache decode step (`forward_with_cache(..., decode=True)`): the tokens `embed`
    # prepends at prefill are already in the cache, so `embed` must not prepend them again.
    decode: bool = False

    def get(self, name: str, collection: str = METHOD, default: Any = None) -> Any:
        """The variable `name` of this module in `collection`, or `default`."""
        return self.variables.get(collection, {}).get(name, default)

    def has(self, collection: str = METHOD) -> bool:
        """Whether this module holds any variable of `collection`."""
        return bool(self.variables.get(collection))


@dataclasses.dataclass(frozen=True)
class LinearCall(Site):
    """One projection `y = x @ kernel (+ bias)`.

    `x` [..., in] as the layer received it; `kernel` [in, out] (the `params` leaf, parameter dtype,
    None when the method keeps the base weight elsewhere), `bias` [out] or None; `features` = out;
    `matmul(x, w)`: the selected kernel set's dot (`x` [..., in] @ `w` [in, *out] in x's dtype) -
    methods should use it for their own products so that `model.kernels` applies to them too.
    """

    x: Array = None
    kernel: Array | None = None
    bias: Array | None = None
    features: int = 0
    matmul: Callable[[Array, Array], Array] = None


class LowRank(NamedTuple):
    """A method's update of one projection in the form `(x W + scale * dropout(x) A B) * out_scale`.

    a [in, r], b [r, out] (float32 or compute dtype); `scale` a Python float; `dropout` the rate
    on the adapter's input (0 = none); `out_scale` None or a per-output-column factor [out] (float32)
    applied to the projection before its bias (DoRA's m / ||W + s A B||_c). A fused-projection kernel
    (`model.kernels=cpu`) folds the low-rank term into the base dot and then scales the columns; a
    method that is not of this form returns None from `Hooks.low_rank`.
    """

    a: Array
    b: Array
    scale: float
    dropout: float
    out_scale: Array | None = None


@dataclasses.dataclass(frozen=True)
class SublayerSite(Site):
    """The site of `sublayer_out`: a decoder layer's (`layers_i`, or `layers` inside a scan) plus
    `residual` [B, T, D], the residual stream the sublayer output is added to (AdapterHub's Pfeiffer
    adapter reads `residual + h`)."""

    residual: Array = None


class Prefix(NamedTuple):
    """Extra key/value slots a layer's queries attend to (prefix tuning): k, v [B, P, KV, hd],
    already in the rotated (post-RoPE) space; every non-padding query of a row sees all P slots."""

    k: Array
    v: Array


class Hooks:
    """The identity at every extension point: the plain model (see the module docstring).

    Subclasses override what they need; every method has the signature documented here and must
    keep shapes unless stated."""

    name = "none"

    def embed_slots(self) -> int:
        """How many tokens `embed` prepends to every row (0: none). They carry segment id
        `SHARED_SEGMENT` (-1): every non-padding query of the row sees them (so each packed
        example sees them, causally by slot) and they see only each other. The model then builds
        the dense attention mask, and a KV cache needs this many extra slots."""
        return 0

    def base_kernel(self, call: LinearCall) -> Array:
        """The frozen [in, out] kernel in the compute dtype. Default: `call.kernel` cast."""
        if call.kernel is None:
            raise ValueError(f"{'/'.join(call.path)}: the params tree has no kernel here and "
                             f"method {self.name!r} does not supply one")
        return call.kernel.astype(call.dtype)

    def bias(self, call: LinearCall) -> Array | None:
        """The projection's bias [out] (any float dtype; the caller casts) or None. Default:
        `call.bias`. Read by the default `linear` and by the fused kernels, so a method that only
        changes biases (BitFit) overrides this and stays `fusable`."""
        return call.bias

    def linear(self, call: LinearCall) -> Array:
        """The projection's output [..., out] in the compute dtype. Default: `x W + b`."""
        dt = call.dtype
        y = call.matmul(call.x.astype(dt), self.base_kernel(call))
        b = self.bias(call)
        if b is not None:
            y = y + b.astype(dt)
        return y

    def low_rank(self, call: LinearCall) -> LowRank | None:
        """Optional capability for fused kernels: this projection's update as `LowRank`, or None
        when the method does not touch it or is not of that form. Return it only when
        `linear(call)` equals `(x base + scale * dropout(x) A B) * out_scale + bias` (fused kernels
        reimplement `linear` from it)."""
        return None

    def fusable(self, call: LinearCall) -> bool:
        """Whether a fused kernel may compute this projection as `x @ base_kernel + b (+ low_rank)`.
        Default: True when the method leaves the projection alone (no `METHOD` variables) or
        states it as `low_rank`; methods with another `linear` must return False for the
        projections they change (the model then calls `linear` per projection). A method that
        changes only `bias` may return True (the fused kernels add `bias(call)`)."""
        return not call.has(METHOD) or self.low_rank(call) is not None

    def embed(self, x: Array, input_ids: Array, positions: Array, segment_ids: Array,
              site: Site) -> tuple[Array, Array, Array]:
        """After the embedding lookup: x [B, T, D] (compute dtype), input_ids/positions/segment_ids
        [B, T] int32 -> (x, positions, segment_ids), possibly longer (`embed_slots()` virtual
        tokens prepended with segment id SHARED_SEGMENT; not in a decode step, `site.decode`);
        `final_hidden` must then restore T. Default: unchanged."""
        return x, positions, segment_ids

    def attention_kv(self, k: Array, v: Array, site: Site) -> tuple[Array, Array, Prefix | None]:
        """Per layer, after RoPE: k, v [B, T, KV, hd] -> (k, v, prefix or None). Default: unchanged,
        no prefix."""
        return k, v, None

    def sublayer_out(self, kind: str, h: Array, site: SublayerSite) -> Array:
        """Per layer: `kind` "attn" or "mlp", h [B, T, D] the sublayer output before its residual
        add (`site.residual` the stream it is added to) -> h. Default: unchanged."""
        return h

    def final_hidden(self, x: Array, site: Site) -> Array:
        """After the final norm: x [B, T', D] -> [B, T, D]. Default: unchanged."""
        return x


NO_HOOKS = Hooks()


def reference_matmul(x: Array, w: Array) -> Array:
    """`x @ w` for x [..., in], w [in, *out] in x's dtype (the reference dot)."""
    y = jnp.tensordot(x, w.astype(x.dtype), axes=((x.ndim - 1,), (0,)))
    return y.astype(x.dtype)


def dropout(x: Array, rate: float, site: Site) -> Array:
    """Inverted dropout of x at `rate` in training (`site.deterministic` False), else x."""
    if site.deterministic or rate <= 0:
        return x
    keep = jax.random.bernoulli(site.make_rng(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

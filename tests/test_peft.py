"""The fine-tuning-method interface (`sft_jax.peft`): LoRA / rsLoRA and full fine-tuning as tree
transforms, the model's extension points, and the rule that nothing outside the package branches on
the method."""

import io
import math
import pathlib
import re
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import config as config_lib
from sft_jax import peft
from sft_jax.models import hooks, llama
from sft_jax.models.config import ModelConfig
from sft_jax.peft import lora

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def scanned():
    c = CFG.replace(scan_layers=True)
    return c, llama.init_params(c, jax.random.PRNGKey(0))


def _names(paths):
    return sorted("/".join(p) for p in paths)


def test_target_specs(params):
    all_lin = lora.target_paths(params, "all-linear")
    assert len(all_lin) == 2 * 7 and not any(p[-1] == "lm_head" for p in all_lin)
    assert _names(lora.target_paths(params, "q_proj,v_proj")) == [
        "layers_0/attn/q_proj", "layers_0/attn/v_proj", "layers_1/attn/q_proj", "layers_1/attn/v_proj"]
    assert _names(lora.target_paths(params, r"layers_1/mlp/(up|down)_proj")) == [
        "layers_1/mlp/down_proj", "layers_1/mlp/up_proj"]
    with pytest.raises(peft.MethodConfigError, match="peft.lora.targets.*matches no dense module"):
        lora.target_paths(params, "nothing_here")


def test_init_shapes_bounds_and_scale(params):
    m = peft.Lora(rank=4, alpha=8.0)
    tr, fr = m.init(params, CFG, jax.random.PRNGKey(1))
    assert fr is params
    a = tr["layers_0"]["mlp"]["down_proj"]["A"]
    b = tr["layers_0"]["mlp"]["down_proj"]["B"]
    assert a.shape == (48, 4) and b.shape == (4, 32) and a.dtype == jnp.float32
    assert float(jnp.abs(a).max()) <= 1 / math.sqrt(48) and float(jnp.abs(a).max()) > 0.8 / math.sqrt(48)
    assert float(jnp.abs(b).max()) == 0.0
    assert m.scale == 2.0 and peft.Lora(rank=4, alpha=8.0, rslora=True).scale == 4.0
    # B = 0: identical forward
    ids = jnp.arange(10)[None] % 64
    np.testing.assert_array_equal(m.forward(tr, fr, CFG, ids), llama.forward(params, CFG, ids))
    with pytest.raises(peft.MethodConfigError, match="peft.lora.rank"):
        peft.Lora(rank=0)


def test_logical_axes_and_merge(params):
    m = peft.Lora(rank=4, alpha=8.0, targets="q_proj,down_proj")
    tr = jax.tree.map(lambda x: x + 0.05, m.init_trainable(params, params, CFG, jax.random.PRNGKey(1)))
    ax = m.trainable_axes(tr, llama.param_logical_axes(CFG))
    assert ax["layers_0"]["attn"]["q_proj"] == {"A": ("embed", None), "B": (None, "heads")}
    assert ax["layers_1"]["mlp"]["down_proj"] == {"A": ("mlp", None), "B": (None, "embed")}
    merged = m.merge(tr, params, CFG)
    ids = (jnp.arange(12)[None] * 7) % 64
    np.testing.assert_allclose(llama.forward(merged, CFG, ids), m.forward(tr, params, CFG, ids), rtol=1e-5, atol=1e-5)
    assert m.count_trainable(tr) == 2 * (32 * 4 + 4 * 32 + 48 * 4 + 4 * 32)


def test_scanned_base(scanned):
    c, p = scanned
    m = peft.Lora(rank=2, alpha=4.0)
    tr, fr = m.init(p, c, jax.random.PRNGKey(2))
    assert tr["layers"]["attn"]["k_proj"]["A"].shape == (2, 32, 2)
    assert tr["layers"]["attn"]["k_proj"]["B"].shape == (2, 2, 16)
    ax = m.trainable_axes(tr, llama.param_logical_axes(c))
    assert ax["layers"]["attn"]["k_proj"] == {"A": ("layers", "embed", None), "B": ("layers", None, "kv_heads")}
    tr = jax.tree.map(lambda x: x + 0.05, tr)
    ids = (jnp.arange(12)[None] * 5) % 64
    np.testing.assert_allclose(llama.forward(m.merge(tr, fr, c), c, ids), m.forward(tr, fr, c, ids),
                               rtol=1e-5, atol=1e-5)


def test_full_method(params):
    m = peft.Full()
    tr, fr = m.init(params, CFG, jax.random.PRNGKey(0))
    assert fr == {} and jax.tree.structure(tr) == jax.tree.structure(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tr))
    assert m.merge(tr, fr, CFG) is tr and m.trains_base and not m.needs_base_weights
    assert m.count_trainable(tr) == peft.count_params(params)
    with pytest.raises(peft.PeftFormatError, match="full fine-tuning"):
        m.save_peft("/nonexistent", tr, fr, CFG)


@pytest.mark.parametrize("scan", [False, True])
def test_no_method_equals_full_method_equals_no_hooks(scan):
    """The plain model (no method), the model through the `full` method and the model with an
    explicit identity `Hooks` give the same logits: the extension points are no-ops by default."""
    c = CFG.replace(scan_layers=scan, kernels="reference")
    p = llama.init_params(c, jax.random.PRNGKey(3))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    plain = llama.forward(p, c, ids)
    tr, fr = peft.Full().init(p, c, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(peft.Full().forward(tr, fr, c, ids), plain)
    np.testing.assert_array_equal(llama.forward(p, c, ids, method=hooks.Hooks()), plain)


class _Probe(hooks.Hooks):
    """Counts how often each extension point is called (at trace time) and changes nothing."""

    name = "probe"

    def __init__(self):
        self.calls: dict[str, int] = {}

    def _hit(self, k):
        self.calls[k] = self.calls.get(k, 0) + 1

    def linear(self, call):
        self._hit("linear")
        return super().linear(call)

    def embed(self, x, input_ids, positions, segment_ids, site):
        self._hit("embed")
        return super().embed(x, input_ids, positions, segment_ids, site)

    def attention_kv(self, k, v, site):
        self._hit("attention_kv")
        assert site.path[-1] == "attn"
        return super().attention_kv(k, v, site)

    def sublayer_out(self, kind, h, site):
        self._hit("sublayer_" + kind)
        return super().sublayer_out(kind, h, site)

    def final_hidden(self, x, site):
        self._hit("final_hidden")
        return super().final_hidden(x, site)

    def fusable(self, call):
        return False  # linear is observed: no fused kernel may bypass it


def test_every_extension_point_is_called_and_identity_is_a_no_op(params):
    probe = _Probe()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    for kernels in ("reference", "cpu"):
        c = CFG.replace(kernels=kernels)
        np.testing.assert_allclose(llama.forward(params, c, ids, method=probe), llama.forward(params, c, ids),
                                   rtol=1e-6, atol=1e-6)
    per_run = {"linear": 2 * 7, "embed": 1, "attention_kv": 2, "sublayer_attn": 2, "sublayer_mlp": 2,
               "final_hidden": 1}
    assert probe.calls == {k: 2 * v for k, v in per_run.items()}


class _Prefix(hooks.Hooks):
    """Prefix tuning through `attention_kv`: P zero keys and values (every real query sees them)."""

    name = "prefix"

    def attention_kv(self, k, v, site):
        z = jnp.zeros((k.shape[0], 3, *k.shape[2:]), k.dtype)
        return k, v, hooks.Prefix(z, z)


def test_attention_prefix_point(params):
    """Zero prefix keys get score 0 (weight e^0 against the real keys) and zero values: the output
    changes but stays finite, on the training path (flash mask tuple -> dense) and with a cache."""
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (1, 8)), jnp.int32)
    out = llama.forward(params, CFG, ids, method=_Prefix())
    assert np.isfinite(np.asarray(out)).all()
    assert not np.allclose(out, llama.forward(params, CFG, ids))
    cache = llama.init_cache(CFG, 1, 8)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    cached, _ = llama.forward_with_cache(params, CFG, ids, pos, cache, method=_Prefix())
    np.testing.assert_allclose(cached, out, rtol=1e-5, atol=1e-5)


def test_config_section_and_run_config_roundtrip():
    cfg = config_lib.default_config()
    assert set(config_lib.CHOICES["peft.method"]) == set(peft.METHODS)
    cfg.peft.method = "lora"
    cfg.peft.lora.rslora = True
    m = peft.from_config(cfg.peft)
    assert m == peft.Lora(rank=16, alpha=16.0, rslora=True)
    assert peft.from_run_config(m.run_config()) == m
    assert peft.from_run_config(peft.Full().run_config()) == peft.Full()
    with pytest.raises(peft.MethodConfigError, match="peft.method"):
        peft.get("nope")


def test_old_lora_fields_point_to_the_new_ones():
    cfg = config_lib.default_config()
    cfg.lora = {"rank": 8}
    with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'lora.rank' \(did you mean peft.lora.rank"):
        config_lib.validate(cfg)


_METHOD_NAMES = sorted(set(peft.METHODS) - {"full"})  # "full" is also a remat value


def _code_tokens(path: pathlib.Path):
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING):
            yield tok


def test_no_method_branches_outside_the_method_package():
    """Outside sft_jax/peft/ (and the config schema), no identifier names a method and no string
    literal is a method's name: code there goes through the `Method` interface."""
    root = pathlib.Path(peft.__file__).parent.parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("peft/") or rel == "config.py":
            continue
        for tok in _code_tokens(path):
            text = tok.string.lower()
            if tok.type == tokenize.NAME and any(n in text for n in _METHOD_NAMES):
                offenders.append(f"{rel}:{tok.start[0]}: {tok.string}")
            elif tok.type == tokenize.STRING and re.fullmatch(r"[rbuf]*['\"](%s)['\"]" % "|".join(_METHOD_NAMES), text):
                offenders.append(f"{rel}:{tok.start[0]}: {tok.string}")
    assert not offenders, offenders

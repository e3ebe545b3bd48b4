"""Hugging Face I/O: sharded loading, save_hf round trip through transformers, key errors, mesh placement."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402
from sft_jax.models import UnsupportedModelError, param_logical_axes  # noqa: E402
from sft_jax.models.hf_io import CheckpointMismatchError, load_hf, save_hf  # noqa: E402
from test_model_parity import FAMILIES, batch, hf_logits, jax_logits, make_hf_model, max_valid_diff  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (HF model, single-file dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = make_hf_model(FAMILIES[name]())
            d = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(d)
            cache[name] = (model, str(d))
        return cache[name]

    return get


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
    model, single = saved("qwen2")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    files = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert (sharded / "model.safetensors.index.json").exists() and len(files) >= 3, files
    c1, p1 = load_hf(single)
    c2, p2 = load_hf(str(sharded))
    assert c1 == c2
    a, b = _leaves(p1), _leaves(p2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_hf_roundtrip_through_transformers(saved, tmp_path, name):
    _, path = saved(name)
    config, params = load_hf(path, scan_layers=name == "qwen3")  # also saves from a scanned tree
    out = tmp_path / "out"
    max_shard = 40_000 if name == "llama2" else 5 * 2**30
    files = save_hf(str(out), config, params, max_shard_bytes=max_shard)
    if name == "llama2":
        assert len(files) >= 3 and (out / "model.safetensors.index.json").exists()
    if config.tie_embeddings:
        keys = set()
        for f in files:
            keys |= set(load_file(str(out / f)))
        assert "lm_head.weight" not in keys
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = batch()
    ref = hf_logits(hf, ids, mask)
    ours = jax_logits(params, config, ids, mask)
    assert max_valid_diff(ours, ref, mask) <= 1e-4
    # and sft_jax reads back its own output identically
    config2, params2 = load_hf(str(out), scan_layers=name == "qwen3")
    assert config2 == config
    a, b = _leaves(params), _leaves(params2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_save_hf_bfloat16(saved, tmp_path):
    _, path = saved("llama31")
    config, params = load_hf(path)
    save_hf(str(tmp_path), config, params, dtype="bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(hf.parameters()).dtype == torch.bfloat16
    c16, p16 = load_hf(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    assert p16["embed"]["embedding"].dtype == jax.numpy.bfloat16
    ids, mask = batch()
    ours = jax_logits(p16, c16, ids, mask)
    ref = hf_logits(hf.float(), ids, mask)  # same bf16-rounded weights, f32 compute
    assert max_valid_diff(ours, ref, mask) <= 0.15


def test_missing_and_unexpected_keys_are_listed(saved, tmp_path):
    _, path = saved("llama2")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((2,), np.float32)  # ignored buffer
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf(str(bad))
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "model.layers.0.self_attn.extra.weight" in msg and "unexpected" in msg
    assert "inv_freq" not in msg


def test_unsupported_model_type(saved, tmp_path):
    _, path = saved("llama2")
    bad = tmp_path / "gpt"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        load_hf(str(bad))


def test_load_onto_8_device_mesh(saved):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest sets XLA_FLAGS before jax import)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    _, path = saved("qwen3")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}
    config_ref, ref = load_hf(path)
    axes = param_logical_axes(config_ref.replace(scan_layers=True))

    def spec(names):
        return NamedSharding(mesh, P(*(rules.get(n) for n in names)))

    # callable form, unscanned
    logical = param_logical_axes(config_ref)
    flat_axes = {tuple(k.key for k in p): v for p, v in
                 jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, tuple))[0]}
    config, params = load_hf(path, shardings=lambda p: spec(flat_axes[tuple(p)]))
    q = params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding == spec(("embed", "heads"))
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (64 // 4, 128 // 2)
    a, b = _leaves(ref), _leaves(params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # tree form, scanned
    shard_tree = jax.tree.map(spec, axes, is_leaf=lambda x: isinstance(x, tuple))
    config_s, params_s = load_hf(path, shardings=shard_tree, scan_layers=True)
    assert params_s["layers"]["mlp"]["up_proj"]["kernel"].sharding == spec(("layers", "embed", "mlp"))
    ids, mask = batch()
    np.testing.assert_allclose(jax_logits(params_s, config_s, ids, mask), jax_logits(ref, config_ref, ids, mask),
                               atol=1e-5)


def test_load_bfloat16_checkpoint_onto_mesh(saved, tmp_path):
    """bf16 safetensors (safetensors' numpy get_slice cannot read BF16: whole-tensor fallback)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest sets XLA_FLAGS before jax import)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    _, path = saved("llama2")
    config, params = load_hf(path)
    save_hf(str(tmp_path), config, params, dtype="bfloat16")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    c_ref, ref = load_hf(str(tmp_path), param_dtype="bfloat16")
    c_sh, sh = load_hf(str(tmp_path), param_dtype="bfloat16",
                       shardings=lambda p: NamedSharding(mesh, P("fsdp", "tensor") if p[-1] == "kernel" else P()))
    assert sh["layers_1"]["mlp"]["down_proj"]["kernel"].dtype == jax.numpy.bfloat16
    a, b = _leaves(ref), _leaves(sh)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

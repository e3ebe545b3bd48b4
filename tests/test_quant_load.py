"""Quantise on load: `hf_io.load_hf(..., transform=...)` reads, quantises and drops one tensor at a time.

Correctness: the loaded NF4/int8 leaves equal quantising the normally loaded kernels (scanned and
per-layer trees). Memory (fresh subprocess, the technique of test_sharded_load_memory.py): the
anonymous resident peak while loading a 245 MB float32 checkpoint with NF4 quantisation stays within
the quantised result + a few copies of the largest tensor, far below the float32 model.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sft_jax.models import hf_io
from sft_jax.quant import Int8Tensor, NF4Tensor, int8, nf4

REPO = pathlib.Path(__file__).resolve().parents[1]
MiB = 2**20

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 128, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
}
BIG = dict(TINY, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, vocab_size=1024)


def _layer_kernel(path) -> bool:
    return path[-1] == "kernel" and path[0].startswith("layers")


def _write(out: pathlib.Path, cfg: dict, seed=0) -> int:
    """Random float32 weights for `cfg` (one safetensors file); returns the largest tensor's bytes."""
    from safetensors.numpy import save_file

    from sft_jax.models import llama
    from sft_jax.models.config import ModelConfig

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    config = ModelConfig.from_hf(cfg)
    shapes = llama.abstract_params(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for ours, names, transpose in hf_io.param_mapping(config):
        leaf = shapes
        for k in ours:
            leaf = leaf[k]
        shape = tuple(leaf.shape)[::-1] if transpose else tuple(leaf.shape)
        for n in names:
            tensors[n] = rng.standard_normal(shape, dtype=np.float32) * 0.02
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return max(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_load_equals_quantising_the_loaded_kernels(tmp_path, scan, kind):
    _write(tmp_path, TINY)
    quantize = nf4.quantize_kernel if kind == "nf4" else int8.quantize_kernel
    _, plain = hf_io.load_hf(str(tmp_path), scan_layers=scan)
    _, quant = hf_io.load_hf(str(tmp_path), scan_layers=scan,
                             transform=lambda path: quantize if _layer_kernel(path) else None)
    cls = NF4Tensor if kind == "nf4" else Int8Tensor
    flat_p = dict(jax.tree_util.tree_flatten_with_path(plain, is_leaf=lambda x: isinstance(x, cls))[0])
    flat_q = dict(jax.tree_util.tree_flatten_with_path(quant, is_leaf=lambda x: isinstance(x, cls))[0])
    assert flat_p.keys() == flat_q.keys()
    n_quant = 0
    for key, q in flat_q.items():
        p = np.asarray(flat_p[key])
        if not isinstance(q, cls):
            np.testing.assert_array_equal(np.asarray(q), p)  # norms, embeddings, lm_head untouched
            continue
        n_quant += 1
        assert isinstance(q.codes, jax.Array)
        ref = [quantize(k) for k in (p if scan else [p])]
        got = np.asarray(q.dequantize())
        want = np.stack([np.asarray(r.dequantize()) for r in ref]) if scan else np.asarray(ref[0].dequantize())
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(key))
    assert n_quant == (7 if scan else 14)


MEASURE = r"""
import json, sys, threading, time
import jax, numpy as np
from sft_jax.models import hf_io
from sft_jax.quant import nf4
path = sys.argv[1]
def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
base = anon()
th = threading.Thread(target=sample, daemon=True)
th.start()
_, params = hf_io.load_hf(path, transform=lambda p: nf4.quantize_kernel if p[-1] == "kernel" and p[0].startswith("layers") else None)
jax.block_until_ready(params)
stop.set(); th.join()
leaves = jax.tree.leaves(params)
print("RESULT " + json.dumps({"base": base, "peak": max(peak[0], anon()), "after": anon(),
                              "param_bytes": int(sum(x.nbytes for x in leaves))}))
"""


@pytest.mark.slow
def test_quantised_load_holds_one_unquantised_tensor_at_a_time(tmp_path):
    largest = _write(tmp_path, BIG)
    total_f32 = os.path.getsize(tmp_path / "model.safetensors")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    peak = res["peak"] - res["base"]
    print(f"\nfloat32 checkpoint {total_f32 / MiB:.0f} MiB, largest tensor {largest / MiB:.1f} MiB; loaded "
          f"(NF4 layers, float32 embeddings/head) {res['param_bytes'] / MiB:.0f} MiB; anonymous peak while "
          f"loading +{peak / MiB:.0f} MiB")
    # the result + transient work on one tensor (float32 copy, scaled values, codes: < 4 copies) + allocator slack
    assert peak <= res["param_bytes"] + 4 * largest + 48 * MiB, res
    assert peak < 0.4 * total_f32, res


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_load_onto_a_mesh_follows_the_kernel_shardings(tmp_path, kind):
    """fsdp x tensor mesh: each quantised kernel is placed from the kernel's sharding (codes sharded like
    the kernel, transposed for NF4) and dequantises to the one-device values."""
    from sft_jax import sharding
    from sft_jax.models import llama

    cfg = dict(TINY, intermediate_size=256)
    _write(tmp_path, cfg)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = hf_io.read_config(str(tmp_path))
    sh = sharding.logical_shardings(llama.param_logical_axes(config), mesh, llama.abstract_params(config))
    quantize = nf4.quantize_kernel if kind == "nf4" else int8.quantize_kernel
    fn = lambda path: quantize if _layer_kernel(path) else None  # noqa: E731
    _, on_mesh = hf_io.load_hf(str(tmp_path), shardings=sh, transform=fn)
    _, local = hf_io.load_hf(str(tmp_path), transform=fn)
    up = on_mesh["layers_0"]["mlp"]["up_proj"]["kernel"]  # [128, 256]: (embed, mlp)
    kernel_spec = sh["layers_0"]["mlp"]["up_proj"]["kernel"].spec
    assert kernel_spec[1] is not None  # the mlp axis is sharded
    if kind == "nf4":
        assert up.codes.shape == (256, 64) and up.codes.sharding.spec[0] == kernel_spec[1]
    else:
        assert up.codes.sharding.spec == kernel_spec
    for path in [("layers_0", "mlp", "up_proj"), ("layers_1", "attn", "k_proj"), ("layers_1", "mlp", "down_proj")]:
        a = on_mesh[path[0]][path[1]][path[2]]["kernel"]
        b = local[path[0]][path[1]][path[2]]["kernel"]
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(a)), np.asarray(b.dequantize()))

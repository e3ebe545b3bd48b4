"""RoPE types yarn / dynamic / longrope and Phi-3 (fused qkv_proj / gate_up_proj, partial rotary,
longrope, sliding window, tied) against transformers on tiny random configs made here (f32).

Per config: logits <= 1e-4 at positions past the rope-scaling boundary (one sequence longer than
the boundary, one shorter, in one batch: each row against transformers run on that row alone, the
semantics models/rope.py documents), packed == unpacked, greedy through the KV cache == transformers'
greedy (decoding across the boundary: dynamic recomputes the frequencies per step, Phi-3's longrope
re-encodes the cache), the HF save round trip exact, and for Phi-3 the LoRA PEFT export loaded by
PeftModel and the merged export (tied embeddings stay tied).
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_jax import peft as methods  # noqa: E402
from sft_jax.kernels import cpu  # noqa: E402
from sft_jax.models import hf_io, llama, rope  # noqa: E402
from sft_jax.models.config import ModelConfig, UnsupportedModelError  # noqa: E402

from helpers import hf_logits_1d as _hf_logits, hf_model_class, jit_forward, lazy_builder, save_random_hf  # noqa: E402
from helpers import assert_safetensors_equal, hf_greedy, rand_ids as _ids  # noqa: E402

BOUND = 16  # original_max_position_embeddings (yarn/longrope) / max_position_embeddings (dynamic)
T = 40
LONG, SHORT = 40, 11  # one row past the boundary, one inside it
F32_TOL = 1e-4
_C = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama_yarn": lambda: transformers.LlamaConfig(
        **_C, max_position_embeddings=64, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": BOUND}),
    "qwen2_yarn": lambda: transformers.Qwen2Config(
        **_C, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=20000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": BOUND,
                      "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0}),
    "qwen3_yarn": lambda: transformers.Qwen3Config(
        **_C, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": BOUND,
                      "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}),
    "llama_dynamic": lambda: transformers.LlamaConfig(
        **_C, max_position_embeddings=BOUND, tie_word_embeddings=False,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "mistral_dynamic": lambda: transformers.MistralConfig(
        **_C, max_position_embeddings=BOUND, tie_word_embeddings=False, sliding_window=24,
        rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
    "phi3_longrope": lambda: transformers.Phi3Config(
        **_C, max_position_embeddings=64, original_max_position_embeddings=BOUND, partial_rotary_factor=0.5,
        tie_word_embeddings=False,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 3.0, 6.0, 9.0]}),
    "phi3_tied_window": lambda: transformers.Phi3Config(
        **_C, max_position_embeddings=64, tie_word_embeddings=True, sliding_window=12),
}
_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}


def _hf(path):
    """A fresh transformers model (its dynamic-rope state starts empty)."""
    return hf_model_class(path, _CLASSES).from_pretrained(path, dtype=torch.float32).eval()


def _make(name, d):
    save_random_hf(CONFIGS[name](), _CLASSES, d, norm=lambda p: 1.0 + 0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return lazy_builder(tmp_path_factory, _make)


def _ours(params, config, ids, seg, pos):
    return np.asarray(jit_forward()(params, config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))


def _batch():
    rows = [_ids(LONG, 1), _ids(SHORT, 2)]
    ids = np.zeros((2, T), np.int32)
    seg = np.zeros((2, T), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], seg[i, :len(r)] = r, 1
    pos = np.where(seg > 0, np.arange(T)[None], 0).astype(np.int32)
    return rows, ids, seg, pos


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_past_the_boundary(built, name):
    path = built(name)
    config, params = hf_io.load_hf(path)
    rows, ids, seg, pos = _batch()
    hf = _hf(path)
    refs = [_hf_logits(hf, r) for r in rows]
    for kernels in ("auto", "reference"):
        out = _ours(params, config.replace(kernels=kernels), ids, seg, pos)
        for i, (r, ref) in enumerate(zip(rows, refs)):
            d = float(np.abs(out[i, :len(r)] - ref).max())
            print(f"{name} kernels={kernels} row {i} (len {len(r)}): max |diff| vs HF {d:.2e}, "
                  f"max |logit| {np.abs(ref).max():.2f}")
            assert d <= F32_TOL, f"{name} kernels={kernels} row {i}: max |diff| {d:.2e}"
            if i == 0:  # past the boundary the scaling matters: plain RoPE would be far off there
                tail = float(np.abs(out[0, BOUND:len(r)] - ref[BOUND:]).max())
                assert tail <= F32_TOL
    if rope.rope_type(config) != "default":
        plain = _ours(params, config.replace(rope_scaling=None), ids, seg, pos)
        assert float(np.abs(plain[0, BOUND + 1:LONG] - refs[0][BOUND + 1:]).max()) > 1e-3
    if config.sliding_window is not None and config.sliding_window < LONG:
        wide = _ours(params, config.replace(sliding_window=None), ids, seg, pos)
        assert float(np.abs(wide[0, :LONG] - refs[0]).max()) > 1e-3


@pytest.mark.parametrize("name", ["llama_dynamic", "qwen2_yarn", "phi3_longrope"])
def test_packed_equals_unpacked(built, name):
    """Segments on both sides of the boundary in one packed row: each segment's own length picks
    its frequencies (dynamic/longrope), so packing changes nothing."""
    config, params = hf_io.load_hf(built(name))
    exs = [_ids(26, 3), _ids(9, 4), _ids(4, 5)]
    ids = np.zeros((1, T), np.int32)
    seg = np.zeros((1, T), np.int32)
    pos = np.zeros((1, T), np.int32)
    o = 0
    for s, e in enumerate(exs, start=1):
        ids[0, o:o + len(e)], seg[0, o:o + len(e)], pos[0, o:o + len(e)] = e, s, np.arange(len(e))
        o += len(e)
    packed = _ours(params, config, ids, seg, pos)
    o = 0
    for e in exs:
        a_ids = np.zeros((1, T), np.int32)
        a_ids[0, :len(e)] = e
        a_seg = (np.arange(T) < len(e)).astype(np.int32)[None]
        alone = _ours(params, config, a_ids, a_seg, np.broadcast_to(np.arange(T, dtype=np.int32), (1, T)))
        assert float(np.abs(packed[0, o:o + len(e)] - alone[0, :len(e)]).max()) <= 1e-5
        o += len(e)


def _hf_greedy(path, prompt, n):
    return hf_greedy(_hf(path), prompt, n)


@pytest.mark.parametrize("name", ["llama_dynamic", "qwen3_yarn", "phi3_tied_window"])
def test_greedy_kv_cache_equals_transformers(built, name):
    """Prompts inside the boundary, decoding well past it, through the KV cache (batched rows of
    different lengths, each equal to transformers' greedy on that prompt alone)."""
    from sft_jax.sampling import generate

    path = built(name)
    config, params = hf_io.load_hf(path)
    prompts = [list(map(int, _ids(10, 6))), list(map(int, _ids(6, 7)))]
    n = 2 * BOUND
    ours = generate(params, config, prompts, max_new_tokens=n)
    for p, got in zip(prompts, ours):
        assert got == _hf_greedy(path, p, n), name


def test_generate_cli_phi3_longrope_equals_transformers(built, capsys):
    """`python -m sft_jax.generate --model=<tiny phi3 dir>` (in process) == transformers' greedy,
    decoding across original_max_position_embeddings (transformers re-encodes the cache there; so
    does sft_jax.sampling) and from a prompt already past it."""
    from sft_jax.generate import main as generate_main

    path = built("phi3_longrope")
    prompts = [list(map(int, _ids(9, 8))), list(map(int, _ids(20, 9)))]
    n = 2 * BOUND
    rc = generate_main([f"--model={path}", *[f"--prompt_ids={','.join(map(str, p))}" for p in prompts],
                        f"--max_new_tokens={n}", "--json"])
    assert rc == 0
    gens = json.loads(capsys.readouterr().out)["generations"]
    for p, g in zip(prompts, gens):
        ref = _hf_greedy(path, p, n)
        if 2 in ref:  # the CLI stops at eos (id 2), transformers was told not to
            ref = ref[:ref.index(2)]
        assert g["ids"] == ref
    # without the re-encode the long-factor decode would differ from transformers
    config, params = hf_io.load_hf(path)
    assert rope.reencode_at(config) == BOUND


def test_serve_engine_phi3_longrope_equals_transformers(built):
    """The serving engine (continuous batching, one slot cache) decoding across original_max_position_embeddings
    re-encodes a row's sequence there as transformers does: greedy == transformers for prompts before, at and
    past the boundary, decoded together with rows of other lengths."""
    import threading

    from sft_jax.serve.engine import Engine, SamplingParams, Seq

    path = built("phi3_longrope")
    config, params = hf_io.load_hf(path)
    prompts = [list(map(int, _ids(9, 8))), list(map(int, _ids(BOUND, 10))), list(map(int, _ids(20, 9))),
               list(map(int, _ids(3, 11)))]
    n = 2 * BOUND
    eng = Engine(params, config, max_batch=3, max_len=64).start()  # 4 prompts, 3 slots: one joins mid-run
    done = threading.Event()
    finished = []

    def notify(ids, why):
        if why is not None:
            finished.append(why)
            if len(finished) == len(prompts):
                done.set()

    seqs = [Seq(p, SamplingParams(max_tokens=n), notify=notify) for p in prompts]
    eng.submit(seqs)
    assert done.wait(300)
    eng.shutdown()
    for p, s in zip(prompts, seqs):
        assert s.finish_reason == "length"
        assert s.out_ids == _hf_greedy(path, p, n), len(p)


@pytest.mark.parametrize("name", ["phi3_longrope", "phi3_tied_window", "qwen2_yarn", "llama_dynamic"])
def test_hf_save_round_trip_exact(built, name, tmp_path):
    path = built(name)
    config, params = hf_io.load_hf(path)
    hf_io.save_hf(str(tmp_path), config, params)
    b = assert_safetensors_equal(path, tmp_path)
    if config.model_type == "phi3":
        assert any(k.endswith("qkv_proj.weight") for k in b) and any(k.endswith("gate_up_proj.weight") for k in b)
    again = hf_io.read_config(str(tmp_path))
    assert again == config
    orig, saved = (transformers.AutoConfig.from_pretrained(p) for p in (path, str(tmp_path)))
    for k in ("rope_parameters", "max_position_embeddings", "tie_word_embeddings", "sliding_window",
              "original_max_position_embeddings"):
        assert getattr(saved, k, None) == getattr(orig, k, None), k
    ids = _ids(LONG, 1)
    np.testing.assert_allclose(_hf_logits(_hf(str(tmp_path)), ids), _hf_logits(_hf(path), ids), atol=1e-6)


@pytest.mark.parametrize("name", ["phi3_longrope", "phi3_tied_window"])
def test_phi3_lora_peft_export_and_merged(built, name, tmp_path):
    """LoRA on Phi-3's own fused modules (qkv_proj, gate_up_proj, o_proj, down_proj: PEFT's names
    on Phi3): the PEFT export loads in PeftModel on the transformers base with our logits, reads back
    into sft_jax, and the merged export gives the same logits (tied stays tied)."""
    import peft as hf_peft
    from safetensors import safe_open

    path = built(name)
    config, params = hf_io.load_hf(path)
    lora = methods.Lora(rank=4, alpha=8.0)
    tr, fr = lora.init(params, config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tr = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.1), tr)
    assert set(tr["layers_0"]["attn"]) == {"qkv_proj", "o_proj"} and set(tr["layers_0"]["mlp"]) == {"gate_up_proj",
                                                                                                     "down_proj"}
    ids = _ids(LONG, 1)
    ours = np.asarray(lora.forward(tr, fr, config, jnp.asarray(ids[None]), None, jnp.ones((1, LONG), jnp.int32)))[0]
    modules = lora.save_peft(str(tmp_path / "peft"), tr, fr, config, base_model_name_or_path=path)
    assert any(m.endswith("self_attn.qkv_proj") for m in modules)
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    pm = hf_peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "peft")).eval()
    d = float(np.abs(_hf_logits(pm, ids) - ours).max())
    assert d <= F32_TOL, f"PeftModel vs ours {d:.2e}"
    tree, back = methods.Lora.load_peft(str(tmp_path / "peft"), params)
    again = np.asarray(back.forward(tree, params, config, jnp.asarray(ids[None]), None,
                                    jnp.ones((1, LONG), jnp.int32)))[0]
    assert float(np.abs(again - ours).max()) <= 1e-5
    hf_io.save_hf(str(tmp_path / "merged"), config, lora.merge(tr, fr, config))
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="numpy") as f:
        assert ("lm_head.weight" in set(f.keys())) == (not config.tie_embeddings)
    merged = _hf(str(tmp_path / "merged"))
    assert merged.config.tie_word_embeddings == config.tie_embeddings
    assert float(np.abs(_hf_logits(merged, ids) - ours).max()) <= F32_TOL


def test_inv_freq_and_scaling_equal_transformers():
    """rope.inv_freq / attention_scaling == transformers' ROPE_INIT_FUNCTIONS (dynamic at a length
    past the boundary, longrope short and long)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name, seq_len in (("llama_yarn", None), ("qwen2_yarn", None), ("qwen3_yarn", None), ("llama_dynamic", 37),
                          ("phi3_longrope", None), ("phi3_longrope", BOUND + 1)):
        hfc = CONFIGS[name]()
        ours = ModelConfig.from_hf(hfc.to_dict())
        rt = hfc.rope_parameters["rope_type"]
        inv, scale = ROPE_INIT_FUNCTIONS[rt](hfc, "cpu", seq_len=seq_len)
        np.testing.assert_allclose(rope.inv_freq(ours, seq_len), inv.numpy(), rtol=2e-6, err_msg=name)
        assert abs(rope.attention_scaling(ours) - scale) < 1e-7, name


def test_cpu_rope_tables_per_token_frequencies():
    """kernels.cpu.rope_tables (what model.kernels=cpu uses) == the reference tables for per-token
    (dynamic / longrope) frequencies, with the attention scaling."""
    c = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=8,
                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    pos = jnp.asarray(np.concatenate([np.arange(20), np.arange(12)])[None].astype(np.int32))
    seg = jnp.asarray(np.array([[1] * 20 + [2] * 12], np.int32))
    ref = rope.tables(c, pos, seg)
    ker = jax.jit(lambda p, s: rope.tables(c, p, s, tables_fn=cpu.rope_tables))(pos, seg)
    for a, b in zip(ref, ker):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    lengths = np.asarray(rope.sequence_lengths(pos, seg, True))[0]
    assert (lengths[:20] == 20).all() and (lengths[20:] == 12).all()
    assert float(np.abs(np.asarray(ref[0])[0, 0] - np.asarray(ref[0])[0, 20]).max()) == 0.0  # position 0 either way


def test_config_parsing_and_errors():
    phi35 = {  # the shape of Phi-3.5-mini-instruct's config.json (factors shortened to rotary_dim/2)
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 96,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "sliding_window": 262144, "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    }
    c = ModelConfig.from_hf(phi35)
    assert c.model_type == "phi3" and c.fused_projections and c.sliding_window == 262144
    assert c.rope_scaling["rope_type"] == "longrope" and c.rope_scaling["original_max_position_embeddings"] == 4096
    assert abs(rope.attention_scaling(c) - np.sqrt(1 + np.log(32) / np.log(4096))) < 1e-9
    back = c.to_hf()
    assert back["rope_scaling"] == {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    assert back["original_max_position_embeddings"] == 4096 and back["resid_pdrop"] == 0.0
    assert ModelConfig.from_hf(back) == c
    old = dict(phi35, rope_scaling=dict(phi35["rope_scaling"], type="su"))  # early Phi-3 128k name
    assert ModelConfig.from_hf(old).rope_scaling["rope_type"] == "longrope"
    phi4_mini = dict(phi35, partial_rotary_factor=0.75,
                     rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6})
    assert rope.rotary_dim(ModelConfig.from_hf(phi4_mini)) == 12
    with pytest.raises(ValueError, match="short_factor has 8 entries, rotary_dim/2 = 6"):
        ModelConfig.from_hf(dict(phi4_mini, rope_scaling=phi35["rope_scaling"]))
    with pytest.raises(UnsupportedModelError, match="phi3: unsupported rope_scaling type 'dynamic'"):
        ModelConfig.from_hf(dict(phi35, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        ModelConfig(partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedModelError, match="unsupported rope_scaling type 'mrope'"):
        ModelConfig(rope_scaling={"rope_type": "mrope"})
    qwen_yarn = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "vocab_size": 96, "max_position_embeddings": 32768,
                 "rope_scaling": {"type": "yarn", "factor": 4.0}}  # no original_max: transformers uses max_pos
    assert ModelConfig.from_hf(qwen_yarn).rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 32768}


def test_plain_rope_numbers_unchanged():
    """The moved default/linear/llama3 code gives bit-identical tables to the pre-move formula."""
    for rs in (None, {"rope_type": "linear", "factor": 4.0},
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}):
        c = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2, rope_theta=500000.0, rope_scaling=copy.deepcopy(rs))
        inv = (1.0 / (np.float32(c.rope_theta) ** (np.arange(0, 16, 2, dtype=np.float32) / np.float32(16)))).astype(
            np.float32)
        if rs and rs["rope_type"] == "linear":
            inv = (inv / np.float32(4.0)).astype(np.float32)
        if not rs or rs["rope_type"] != "llama3":
            np.testing.assert_array_equal(llama.rope_inv_freq(c), inv)
        pos = jnp.asarray(np.arange(30)[None].astype(np.int32))
        cos, sin = rope.tables(c, pos, jnp.ones_like(pos))
        rc, rsn = llama.rope_tables(pos, llama.rope_inv_freq(c))
        np.testing.assert_array_equal(np.asarray(cos), np.asarray(rc))
        np.testing.assert_array_equal(np.asarray(sin), np.asarray(rsn))

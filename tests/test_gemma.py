"""Gemma 2, Gemma 3 text and per-layer attention types (Qwen2 max_window_layers) against transformers
on tiny random configs made here (f32, transformers' eager attention: the one that soft-caps).

Per config: logits <= 1e-4 at positions beyond the sliding window (dense / flash / kernels=cpu /
scan_layers), packed == unpacked, greedy through the KV cache == transformers' greedy, the HF save
round trip exact, LoRA PEFT export loaded by PeftModel with equal logits, the merged export keeping
tied embeddings tied, the chunked loss with final-logit soft-capping == the reference loss.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_jax import peft as methods  # noqa: E402
from sft_jax.loss import chunked_cross_entropy_sums, cross_entropy_sums  # noqa: E402
from sft_jax.models import forward, hf_io, llama  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402

from helpers import hf_logits_1d as _hf_logits, hf_model_class, jit_forward, lazy_builder, save_random_hf  # noqa: E402
from helpers import assert_safetensors_equal, hf_greedy, rand_ids as _ids  # noqa: E402

W = 8  # sliding window
T = 24
F32_TOL = 1e-4
_C = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          vocab_size=96, bos_token_id=2, eos_token_id=1, pad_token_id=0, max_position_embeddings=64)

CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(
        **_C, num_hidden_layers=3, sliding_window=W, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_C, num_hidden_layers=3, sliding_window=W, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        tie_word_embeddings=True),
    "qwen2_mwl": lambda: transformers.Qwen2Config(
        **{k: v for k, v in _C.items() if k != "head_dim"}, num_hidden_layers=3, use_sliding_window=True,
        sliding_window=W, max_window_layers=1, tie_word_embeddings=False),
}
_CLASSES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _hf(path):
    return hf_model_class(path, _CLASSES).from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager").eval()


def _make(name, d):
    save_random_hf(CONFIGS[name](), _CLASSES, d, norm=lambda p: 0.2 * torch.randn_like(p), eager=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return lazy_builder(tmp_path_factory, _make)


def _ours(params, config, ids, seg=None, pos=None):
    ids = np.asarray(ids).reshape(1, -1) if np.asarray(ids).ndim == 1 else ids
    seg = np.ones_like(ids) if seg is None else seg
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape) if pos is None else pos
    return np.asarray(jit_forward()(params, config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))


VARIANTS = [dict(attention="dense", kernels="reference"), dict(attention="flash", kernels="reference"),
            dict(attention="flash", kernels="cpu"), dict(attention="dense", kernels="cpu"),
            dict(attention="flash", kernels="auto", scan="1")]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_beyond_the_window(built, name):
    path = built(name)
    ids = _ids(T, 1)
    ref = _hf_logits(_hf(path), ids)
    config, params = hf_io.load_hf(path)
    _, sparams = hf_io.load_hf(path, scan_layers=True)
    assert config.mixed_layers
    for v in VARIANTS:
        v = dict(v)
        scan = bool(v.pop("scan", None))
        c = config.replace(scan_layers=scan, **v)
        out = _ours(sparams if scan else params, c, ids)[0]
        d = float(np.abs(out - ref).max())
        print(f"{name} {v} scan={scan}: max |diff| vs HF {d:.2e}, max |logit| {np.abs(ref).max():.2f}")
        assert d <= F32_TOL, f"{name} {v} scan={scan}: {d:.2e}"
    # the window matters past W: all-full layers would be far off there
    wide = _ours(params, config.replace(layer_types=None, sliding_window=None), ids)[0]
    assert float(np.abs(wide[W:] - ref[W:]).max()) > 1e-3


def test_softcap_and_scalar_matter(built):
    config, params = hf_io.load_hf(built("gemma2"))
    ids = _ids(T, 1)
    ref = _hf_logits(_hf(built("gemma2")), ids)
    for kw in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None), dict(query_pre_attn_scalar=None)):
        assert float(np.abs(_ours(params, config.replace(**kw), ids)[0] - ref).max()) > 1e-3, kw
    assert np.abs(ref).max() <= 3.0 + 1e-6  # final soft-capping bounds the logits


def test_pallas_refuses_softcapping(built):
    config, params = hf_io.load_hf(built("gemma2"))
    with pytest.raises(ValueError, match="model.attention=pallas does not support attn_logit_softcapping"):
        _ours(params, config.replace(attention="pallas"), _ids(16, 1))


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_packed_equals_unpacked(built, name):
    config, params = hf_io.load_hf(built(name))
    exs = [_ids(13, 3), _ids(7, 4), _ids(4, 5)]
    n = 32
    ids, seg, pos = (np.zeros((1, n), np.int32) for _ in range(3))
    o = 0
    for s, e in enumerate(exs, start=1):
        ids[0, o:o + len(e)], seg[0, o:o + len(e)], pos[0, o:o + len(e)] = e, s, np.arange(len(e))
        o += len(e)
    for att in ("flash", "dense"):
        c = config.replace(attention=att)
        packed = _ours(params, c, ids, seg, pos)
        o = 0
        for e in exs:
            alone = _ours(params, c, e)
            assert float(np.abs(packed[0, o:o + len(e)] - alone[0]).max()) <= 1e-5
            o += len(e)


def _hf_greedy(path, prompt, n):
    return hf_greedy(_hf(path), prompt, n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_kv_cache_equals_transformers(built, name):
    from sft_jax.sampling import generate

    path = built(name)
    config, params = hf_io.load_hf(path)
    prompts = [list(map(int, _ids(10, 6))), list(map(int, _ids(5, 7)))]
    n = 2 * W
    ours = generate(params, config, prompts, max_new_tokens=n)
    for p, got in zip(prompts, ours):
        assert got == _hf_greedy(path, p, n), name


def test_generate_cli_gemma2_equals_transformers(built, capsys):
    from sft_jax.generate import main as generate_main

    path = built("gemma2")
    prompts = [list(map(int, _ids(9, 8)))]
    n = 2 * W
    rc = generate_main([f"--model={path}", *[f"--prompt_ids={','.join(map(str, p))}" for p in prompts],
                        f"--max_new_tokens={n}", "--json"])
    assert rc == 0
    gens = json.loads(capsys.readouterr().out)["generations"]
    ref = _hf_greedy(path, prompts[0], n)
    if 1 in ref:  # the CLI stops at eos (id 1), transformers was told not to
        ref = ref[:ref.index(1)]
    assert gens[0]["ids"] == ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_save_round_trip_exact(built, name, tmp_path):
    path = built(name)
    config, params = hf_io.load_hf(path)
    hf_io.save_hf(str(tmp_path), config, params)
    assert_safetensors_equal(path, tmp_path)
    again = hf_io.read_config(str(tmp_path))
    assert again == config
    orig, saved = (transformers.AutoConfig.from_pretrained(p) for p in (path, str(tmp_path)))
    for k in ("rope_parameters", "layer_types", "sliding_window", "tie_word_embeddings", "query_pre_attn_scalar",
              "attn_logit_softcapping", "final_logit_softcapping", "hidden_activation", "max_window_layers"):
        assert getattr(saved, k, None) == getattr(orig, k, None), k
    ids = _ids(T, 1)
    np.testing.assert_allclose(_hf_logits(_hf(str(tmp_path)), ids), _hf_logits(_hf(path), ids), atol=1e-6)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_lora_peft_export_and_merged_tied(built, name, tmp_path):
    import peft as hf_peft
    from safetensors import safe_open

    path = built(name)
    config, params = hf_io.load_hf(path)
    lora = methods.Lora(rank=4, alpha=8.0)
    tr, fr = lora.init(params, config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tr = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.1), tr)
    ids = _ids(T, 1)
    ours = np.asarray(lora.forward(tr, fr, config, jnp.asarray(ids[None]), None, jnp.ones((1, T), jnp.int32)))[0]
    lora.save_peft(str(tmp_path / "peft"), tr, fr, config, base_model_name_or_path=path)
    pm = hf_peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "peft")).eval()
    d = float(np.abs(_hf_logits(pm, ids) - ours).max())
    assert d <= F32_TOL, f"PeftModel vs ours {d:.2e}"
    hf_io.save_hf(str(tmp_path / "merged"), config, lora.merge(tr, fr, config))
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in set(f.keys())
    merged = _hf(str(tmp_path / "merged"))
    assert merged.config.tie_word_embeddings
    assert float(np.abs(_hf_logits(merged, ids) - ours).max()) <= F32_TOL


def test_chunked_loss_with_softcapping(built):
    config, params = hf_io.load_hf(built("gemma2"))
    ids = _ids(T, 1)[None]
    tgt = jnp.asarray(np.roll(ids, -1, 1))
    mask = jnp.asarray((np.arange(T) < T - 1).astype(np.float32)[None])
    inp = jnp.asarray(ids)

    def ref(p):
        return cross_entropy_sums(forward(p, config, inp), tgt, mask)["loss_sum"]

    def chunked(p):
        h = forward(p, config, inp, return_hidden=True)
        return chunked_cross_entropy_sums(h, llama.lm_head_kernel(p, config), tgt, mask, chunk_size=8,
                                          softcap=config.final_logit_softcapping)["loss_sum"]

    (a, ga), (b, gb) = jax.value_and_grad(ref)(params), jax.value_and_grad(chunked)(params)
    assert abs(float(a) - float(b)) <= 1e-4 * abs(float(a))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4)
    nocap = chunked_cross_entropy_sums(forward(params, config, inp, return_hidden=True),
                                       llama.lm_head_kernel(params, config), tgt, mask, chunk_size=8)["loss_sum"]
    assert abs(float(nocap) - float(a)) > 1e-3


def test_flash_softcap_gradients_equal_dense():
    """The XLA flash kernel's soft-capped backward == autodiff of the dense attention."""
    from sft_jax.kernels import flash_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, h, 16)).astype(np.float32)) for h in (4, 2, 2))
    # (no padding rows: there the dense reference's finite garbage and flash's zeros differ by design)
    seg = jnp.asarray(np.array([[1] * 20 + [2] * 12, [1] * 28 + [2] * 4], np.int32))
    pos = jnp.asarray(np.array([list(range(20)) + list(range(12)), list(range(28)) + list(range(4))], np.int32))
    for window in (None, 6):
        def f(q, k, v):
            return jnp.sum(jnp.sin(flash_attention.segment_attention(q, k, v, seg, pos, dtype=jnp.float32,
                                                                     sliding_window=window, block=16, softcap=2.0)))

        def g(q, k, v):
            m = llama.training_mask(seg, pos, window)
            return jnp.sum(jnp.sin(llama.attend(q, k, v, m, jnp.float32, 2.0)))

        a, b = jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_config_parsing():
    g2 = ModelConfig.from_hf(CONFIGS["gemma2"]().to_dict())
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g2.hidden_act == "gelu_pytorch_tanh" and g2.tie_embeddings and g2.gemma
    g3 = ModelConfig.from_hf(CONFIGS["gemma3"]().to_dict())
    assert g3.rope_local_base_freq == 10000.0 and g3.rope_theta == 1e6 and g3.qk_norm
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    old = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 96,
           "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "hidden_activation": "gelu_pytorch_tanh"}
    c = ModelConfig.from_hf(old)  # transformers 4 layout (Gemma-3-4B's)
    assert c.layer_sliding == (True,) * 5 + (False,) and c.rope_local_base_freq == 1e4
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    q = ModelConfig.from_hf(CONFIGS["qwen2_mwl"]().to_dict())
    assert q.layer_sliding == (False, True, True) and q.to_hf()["max_window_layers"] == 1
    # uniform Qwen2 sliding stays the single-window config it was
    allw = ModelConfig.from_hf(dict(q.to_hf(), max_window_layers=0, layer_types=None))
    assert allw.layer_types is None and allw.sliding_window == W
    with pytest.raises(ValueError, match="layer_types must hold num_layers=2"):
        ModelConfig(num_layers=2, sliding_window=4, layer_types=("full_attention",))


# Gemma 3's published chat_template (google/gemma-3-*-it), text part
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
)


def test_tokenizer_own_gemma_template_matches_builtin():
    """The tokenizer's own (marker-less) Gemma template, through the prefix diff, gives the built-in
    `gemma` template's ids and assistant mask: <bos> first (not trained), system folded into the first
    user turn, each reply and its <end_of_turn> trained."""
    import copy

    from sft_jax.data import masking, templates, testing

    base = testing.tiny_fast_tokenizer()
    ref_tok, _ = templates.prepare_tokenizer(copy.deepcopy(base), "gemma")
    ref_ids, ref_mask = masking.encode(ref_tok, ref_tok.chat_template, testing.CONVERSATION)
    tok = copy.deepcopy(base)
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    own = templates.resolve_template(tok, "")
    assert own == GEMMA3_CHAT_TEMPLATE and not templates.has_generation_markers(own)
    ids, mask = masking.encode(tok, own, testing.CONVERSATION)
    assert ids[0] == tok.bos_token_id and not mask[0]
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    n_assistant = sum(1 for m in testing.CONVERSATION if m["role"] == "assistant")
    assert sum(1 for i, t in enumerate(ids) if t == eot and mask[i]) == n_assistant
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)

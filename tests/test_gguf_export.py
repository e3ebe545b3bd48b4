"""GGUF export: read back with `gguf.GGUFReader` (metadata, tensor names / shapes / types, tokenizer, chat
template) and loaded by transformers (`gguf_file=`) with the logits of the merged HF export: f32 exact,
f16 / bf16 equal to the merged weights rounded to that dtype, q8_0 equal to them quantised by `gguf.quants`
and within 3% of the f32 logits; a numpy forward pass reading the file as llama.cpp does (its RoPE layout,
rope scaling, qk norm) gives the same logits; llama.cpp's q/k permutation checked against its RoPE; bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

from sft_jax.export import export_gguf, export_merged
from sft_jax.export import main as export_main
from sft_jax.export import run_cli
from sft_jax.gguf_export import (_LLAMA3_SPLIT, _QWEN2_SPLIT, GGUFExportError, llama3_rope_factors, llama_cpp_permute,
                                 strip_generation_tags, write_gguf)
from sft_jax.models import llama
from sft_jax.workdir import load_run
from test_workdir import shared_lora_run

torch = pytest.importorskip("torch")

IDS = np.array([[1, 17, 40, 99, 250, 7, 3, 300, 12, 401, 5, 64], [1, 9, 8, 7, 6, 5, 4, 3, 2, 100, 200, 399]])
DTYPES = ("f32", "f16", "bf16", "q8_0")
TEXTS = ("Hello world, this is a test.", "Reverse the letters: abc", "What is 12 + 30?")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shared tiny LoRA run exported merged (f32, the reference) and as GGUF in every dtype."""
    wd, made = shared_lora_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("gguf")
    run = load_run(wd, param_dtype="float32", dtype="float32", load_tokenizer=True)
    export_merged(run, str(out / "merged"), dtype="float32")
    summaries = {dt: export_gguf(run, str(out / "gguf"), dtype=dt) for dt in DTYPES}
    return out, summaries, run


def _fields(path):
    r = gguf.GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items()}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _hf(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _round_matrices(model, fn):
    """The model with every matrix (not the 1-D norms) replaced by fn(weight as float32 numpy)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(fn(p.detach().numpy().astype(np.float32))))
    return model


def test_metadata_tensors_and_tokenizer_read_back(exported):
    out, summaries, run = exported
    tj = json.load(open(out / "merged" / "tokenizer.json"))
    template = open(out / "merged" / "chat_template.jinja").read()
    for dt, qt in (("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        path = out / "gguf" / f"model-{dt}.gguf"
        assert summaries[dt].path == str(path) and summaries[dt].f16_fallback == ()
        r, f = _fields(str(path))
        assert f["general.architecture"] == "llama" and f["general.file_type"] == int(
            {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dt])
        assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
                f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
                f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (256, 64, 2, 128, 4, 2, 16, 402)
        assert f["llama.rope.freq_base"] == 10000.0
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        assert "llama.rope.scaling.type" not in f
        # tokenizer: byte-level BPE -> llama.cpp's "gpt2" vocab with its merges and GPT-2 pre-tokenizer
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
        tokens = f["tokenizer.ggml.tokens"]
        assert len(tokens) == 402 and tokens[400:] == ["<|im_start|>", "<|im_end|>"]
        assert all(tokens[i] == t for t, i in tj["model"]["vocab"].items())
        assert len(f["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
        types = f["tokenizer.ggml.token_type"]
        assert [types[i] for i in (0, 1, 2, 3, 400, 401)] == [3] * 6 and types[100] == 1  # CONTROL, NORMAL
        assert tuple(f[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding", "eot")) == (1, 2, 3, 401)
        assert f["tokenizer.chat_template"] == template.replace("{% generation %}", "").replace(
            "{% endgeneration %}", "")
        # tensors: llama.cpp names, HF shapes (GGUF lists dims innermost first), 1-D in F32
        t = {x.name: x for x in r.tensors}
        want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
            f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v",
                                                               "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                                                               "ffn_down")}
        assert set(t) == want
        assert list(t["blk.0.attn_k.weight"].shape) == [64, 32] and list(t["token_embd.weight"].shape) == [64, 402]
        assert {n: x.tensor_type.name for n, x in t.items()} == {
            n: ("F32" if n.endswith("norm.weight") else qt) for n in want} == summaries[dt].tensor_types


def test_q_k_permutation_is_llama_cpps_rope_layout():
    """llama.cpp rotates adjacent pairs (2i, 2i+1) of each head; HF rotates (i, i+d/2). Permuted rows
    under the adjacent-pair RoPE give the HF result permuted the same way, head by head."""
    rng = np.random.default_rng(0)
    heads, d, dim, pos = 3, 8, 12, 5
    w = rng.standard_normal((heads * d, dim)).astype(np.float32)
    x = rng.standard_normal(dim).astype(np.float32)
    theta = pos / 10000.0 ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(theta), np.sin(theta)

    def hf_rope(q):  # rotate-half per head
        a, b = q[:, : d // 2], q[:, d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)

    def llama_cpp_rope(q):  # adjacent pairs per head
        a, b = q[:, 0::2], q[:, 1::2]
        o = np.empty_like(q)
        o[:, 0::2], o[:, 1::2] = a * cos - b * sin, b * cos + a * sin
        return o

    hf = hf_rope((w @ x).reshape(heads, d))
    cpp = llama_cpp_rope((llama_cpp_permute(w, heads) @ x).reshape(heads, d))
    np.testing.assert_allclose(cpp, llama_cpp_permute(hf.reshape(-1, 1), heads).reshape(heads, d), rtol=1e-6)
    # the scores q.k are what attention sees: equal under both layouts
    k = rng.standard_normal((heads * d, dim)).astype(np.float32)
    np.testing.assert_allclose(
        (cpp * llama_cpp_rope((llama_cpp_permute(k, heads) @ x).reshape(heads, d))).sum(1),
        (hf * hf_rope((k @ x).reshape(heads, d))).sum(1), rtol=1e-5)
    assert not np.allclose(llama_cpp_permute(w, heads), w)


@pytest.mark.parametrize("dt", DTYPES)
def test_transformers_gguf_logits_equal_merged_export(exported, dt):
    out, _, _ = exported
    ref = _logits(_hf(out / "merged"))
    got = _logits(_hf(out / "gguf", gguf_file=f"model-{dt}.gguf"))
    # read as llama.cpp reads the file: the same logits as transformers' reading of it
    np.testing.assert_allclose(_llama_cpp_forward(out / "gguf" / f"model-{dt}.gguf", IDS), got, atol=1e-4, rtol=0)
    if dt == "f32":
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
        return
    import ml_dtypes

    qt = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}[dt]
    rounding = {"f16": lambda w: w.astype(np.float16).astype(np.float32),
                "bf16": lambda w: w.astype(ml_dtypes.bfloat16).astype(np.float32),
                "q8_0": lambda w: gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)}[dt]
    rounded = _logits(_round_matrices(_hf(out / "merged"), rounding))
    np.testing.assert_allclose(got, rounded, atol=2e-5, rtol=0)  # the same weights, bit for bit
    assert np.abs(got - ref).max() > 0  # the file really holds the narrower type
    tol = {"f16": 0.002, "bf16": 0.02, "q8_0": 0.03}[dt]  # of the largest |logit|
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


def test_transformers_gguf_tokenizer_and_chat_template(exported):
    from transformers import AutoTokenizer

    out, _, run = exported
    tok = AutoTokenizer.from_pretrained(out / "gguf", gguf_file="model-f16.gguf")
    ref = AutoTokenizer.from_pretrained(out / "merged")
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    for text in TEXTS + (ref.apply_chat_template(msgs, tokenize=False),):
        assert tok(text).input_ids == ref(text).input_ids, text
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ref("Reverse the letters: abc").input_ids) == "Reverse the letters: abc"


def test_generation_markers_stripped_without_changing_the_rendering(exported):
    from transformers import AutoTokenizer

    out, _, _ = exported
    tok = AutoTokenizer.from_pretrained(out / "merged")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  hello  "},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    templates = [open(out / "merged" / "chat_template.jinja").read(),
                 "{% for m in messages %}{{ m['role'] }}:   {%- if m['role'] == 'assistant' -%}  {%- generation -%}"
                 "  {{ m['content'] }}  {%- endgeneration %}  |\n{% else %} {{ m['content'] }}\n{% endif %}"
                 "{% endfor %}"]
    for t in templates:
        stripped = strip_generation_tags(t)
        assert not re.search(r"{%-?\s*(end)?generation", stripped)
        assert tok.apply_chat_template(msgs, chat_template=stripped, tokenize=False) == \
            tok.apply_chat_template(msgs, chat_template=t, tokenize=False)


def _llama_cpp_forward(path, ids: np.ndarray, scaled: bool = True) -> np.ndarray:
    """Logits of a GGUF file read the way llama.cpp reads it (an independent reference: no transformers):
    its keys, dequantised tensors, RoPE on adjacent pairs for `llama` (rotate-half for qwen2/qwen3) with
    `rope_freqs` factors or linear scaling (`scaled=False` ignores them), qk norm, GQA, tied output when
    `output.weight` is absent."""
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items()}
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    arch = f["general.architecture"]
    heads, kv, d = (f[f"{arch}.attention.{k}"] for k in ("head_count", "head_count_kv", "key_length"))
    eps, base = f[f"{arch}.attention.layer_norm_rms_epsilon"], f[f"{arch}.rope.freq_base"]
    inv = base ** (-np.arange(0, d, 2) / d) / (w.get("rope_freqs.weight", 1.0) if scaled else 1.0)
    pos = np.arange(ids.shape[1]) / (f.get(f"{arch}.rope.scaling.factor", 1.0) if scaled else 1.0)
    ang = pos[:, None] * inv[None]  # [T, d/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # [T, H, d]
        if arch == "llama":  # GGML_ROPE_TYPE_NORM
            a, b = x[..., 0::2], x[..., 1::2]
            o = np.empty_like(x)
            o[..., 0::2], o[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return o
        a, b = x[..., : d // 2], x[..., d // 2:]  # NEOX
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    def lin(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    out = []
    for row in ids:
        t = len(row)
        x = w["token_embd.weight"][row]
        for i in range(f[f"{arch}.block_count"]):
            p = f"blk.{i}."
            h = rms(x, w[p + "attn_norm.weight"])
            q, k, v = (lin(h, p + n).reshape(t, -1, d) for n in ("attn_q", "attn_k", "attn_v"))
            if p + "attn_q_norm.weight" in w:
                q, k = rms(q, w[p + "attn_q_norm.weight"]), rms(k, w[p + "attn_k_norm.weight"])
            q, k = rope(q), np.repeat(rope(k), heads // kv, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", a, np.repeat(v, heads // kv, axis=1)).reshape(t, -1)
            x = x + lin(o, p + "attn_output")
            h = rms(x, w[p + "ffn_norm.weight"])
            g = lin(h, p + "ffn_gate")
            x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "ffn_up"), p + "ffn_down")
        out.append(rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T)
    return np.stack(out)


@pytest.mark.parametrize("regex,name", [(_LLAMA3_SPLIT, "llama-bpe"), (_QWEN2_SPLIT, "qwen2")])
def test_byte_level_pre_tokenizers_named_as_llama_cpp(exported, tmp_path, regex, name):
    """Llama 3 / Qwen2 style split + byte level: llama.cpp's pre-tokenizer name, and transformers' tokenizer
    rebuilt from the file splits text as the original does."""
    from transformers import AutoTokenizer

    out, _, _ = exported
    d = tmp_path / name
    shutil.copytree(out / "merged", d)
    tj = json.load(open(d / "tokenizer.json"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    json.dump(tj, open(d / "tokenizer.json", "w"))
    s = write_gguf(str(d), str(d / "m.gguf"), dtype="f16")
    assert _fields(s.path)[1]["tokenizer.ggml.pre"] == name
    ref, tok = AutoTokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d, gguf_file="m.gguf")
    gpt2 = AutoTokenizer.from_pretrained(out / "merged")
    for text in TEXTS + ("It's 2026, we'll see 1234567 things!\n\n  ok",):
        assert tok(text).input_ids == ref(text).input_ids, text
    split = "We'LL pay $1234567 (now)!"
    pieces = [p for p, _ in ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(split)]
    assert [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(split)] == pieces
    assert pieces != [p for p, _ in gpt2.backend_tokenizer.pre_tokenizer.pre_tokenize_str(split)]


def _tiny_hf_dir(path, tokenizer_src, model_type="llama", **kw):
    """A random tiny transformers model of `model_type` / `kw` (every weight and bias random) saved with the
    tokenizer files of `tokenizer_src`; returns sft_jax's ModelConfig of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_jax.models.hf_io import read_config

    cfg = AutoConfig.for_model(model_type, vocab_size=402, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(os.path.join(tokenizer_src, name), path / name)
    return read_config(str(path))


def test_qwen2_qwen3_and_tied_llama_load_in_transformers(exported, tmp_path):
    out, _, _ = exported
    # transformers' GGUF loader reads no head_dim for qwen3 (it keeps Qwen3Config's 128; llama.cpp reads
    # attention.key_length): the qwen3 model here has head_dim 128
    for name, kw, arch in (("qwen2", dict(model_type="qwen2"), "qwen2"),
                           ("qwen3", dict(model_type="qwen3", head_dim=128), "qwen3"),
                           ("tied", dict(tie_word_embeddings=True), "llama")):
        d = tmp_path / name
        _tiny_hf_dir(d, out / "merged", **kw)
        s = write_gguf(str(d), str(d / "m.gguf"), dtype="f32")
        assert s.arch == arch and ("output.weight" in s.tensor_types) == (name != "tied")
        if name == "qwen2":
            assert "blk.1.attn_q.bias" in s.tensor_types and "blk.1.attn_output.bias" not in s.tensor_types
        if name == "qwen3":
            assert "blk.1.attn_q_norm.weight" in s.tensor_types and "blk.1.attn_k_norm.weight" in s.tensor_types
        ref = _logits(_hf(d))
        assert np.abs(ref).max() > 1.0
        np.testing.assert_allclose(_logits(_hf(d, gguf_file="m.gguf")), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
        np.testing.assert_allclose(_llama_cpp_forward(d / "m.gguf", IDS), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def _check_scaled_rope(d, gguf_path):
    """Under llama.cpp's reading the GGUF gives transformers' logits of the HF directory (which applies
    the rope scaling); the same file with the scaling ignored does not (64 positions make it matter)."""
    ids = np.random.default_rng(0).integers(4, 400, (1, 64))
    ref = _logits(_hf(d), ids)
    np.testing.assert_allclose(_llama_cpp_forward(gguf_path, ids), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    assert np.abs(_llama_cpp_forward(gguf_path, ids, scaled=False) - ref).max() > 1e-2 * np.abs(ref).max()


def test_rope_scaling_metadata_and_numerics(exported, tmp_path):
    out, _, _ = exported
    d = tmp_path / "linear"
    _tiny_hf_dir(d, out / "merged", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    s = write_gguf(str(d), str(d / "m.gguf"), dtype="f32")
    _, f = _fields(s.path)
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 4.0
    assert "rope_freqs.weight" not in s.tensor_types
    _check_scaled_rope(d, d / "m.gguf")

    d = tmp_path / "llama3"
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    config = _tiny_hf_dir(d, out / "merged", rope_parameters=rs)
    s = write_gguf(str(d), str(d / "m.gguf"), dtype="q8_0")
    r, f = _fields(s.path)
    freqs = {t.name: t for t in r.tensors}["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32" and "llama.rope.scaling.type" not in f
    # llama.cpp divides the unscaled inverse frequencies by these factors: that is sft_jax's llama3 rope
    unscaled = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(unscaled / np.asarray(freqs.data), llama.rope_inv_freq(config), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(freqs.data), llama3_rope_factors(config))
    assert 1.0 in freqs.data and 8.0 in freqs.data and len(set(np.asarray(freqs.data).tolist())) > 2
    _check_scaled_rope(d, write_gguf(str(d), str(d / "f32.gguf"), dtype="f32").path)


def test_bad_input_errors(exported, tmp_path, capsys):
    out, _, _ = exported
    d = tmp_path / "gemma"
    shutil.copytree(out / "merged", d)
    cfg = json.load(open(d / "config.json"))
    json.dump(cfg | {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, open(d / "config.json", "w"))
    with pytest.raises(GGUFExportError, match=r"config.json: model_type 'gemma2'.*Llama family"):
        write_gguf(str(d), str(tmp_path / "x.gguf"))
    json.dump(cfg | {"model_type": "mistral", "sliding_window": 64}, open(d / "config.json", "w"))
    with pytest.raises(GGUFExportError, match="sliding_window=64"):
        write_gguf(str(d), str(tmp_path / "x.gguf"))
    json.dump(cfg, open(d / "config.json", "w"))
    tj = json.load(open(d / "tokenizer.json"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    json.dump(tj, open(d / "tokenizer.json", "w"))
    with pytest.raises(GGUFExportError, match=r"tokenizer.json: field pre_tokenizer .*not a pre-tokenizer"):
        write_gguf(str(d), str(tmp_path / "x.gguf"))
    os.remove(d / "tokenizer.json")
    with pytest.raises(GGUFExportError, match="no tokenizer.json"):
        write_gguf(str(d), str(tmp_path / "x.gguf"))
    assert not list(tmp_path.glob("x.gguf*"))  # nothing half-written is left
    with pytest.raises(GGUFExportError, match="dtype 'q4_0'"):
        write_gguf(str(out / "merged"), str(tmp_path / "x.gguf"), dtype="q4_0")

    wd = out / "merged"  # not a workdir: the CLI checks the dtype first
    assert run_cli(export_main, [f"--workdir={wd}", f"--out={tmp_path}/o", "--format=gguf", "--dtype=bfloat16"],
                   "export") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype='bfloat16' is not one of f32, f16, bf16, q8_0 (--format=gguf)" in err


@pytest.mark.slow
def test_stories260k_finetuned_gguf_loads_in_transformers(shared_dir, tmp_path):
    """Acceptance: stories260K converted, fine-tuned (LoRA, a few steps, chatml tokens added) with
    `python -m sft_jax.train`, exported with `python -m sft_jax.export --format=gguf` (q8_0; f16 and the
    merged reference in-process) -> transformers
    loads the GGUF with the merged export's logits and the training tokenizer's ids."""
    from transformers import AutoTokenizer

    from sft_jax.models.llama2c import convert_llama2c

    assets = shared_dir / "assets" / "stories260K"
    base = tmp_path / "stories260K"
    convert_llama2c(str(assets / "stories260K.bin"), str(assets / "tok512.model"), str(base))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               SFT_JAX_COMPILATION_CACHE=os.environ.get("SFT_JAX_COMPILATION_CACHE", "off"))
    wd = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train = [sys.executable, "-m", "sft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}",
             "--config.model.init=pretrained", f"--config.model.path={base}",
             f"--config.data.path={shared_dir / 'data' / 'identity.json'}", "--config.data.template=chatml",
             "--config.data.max_length=128", "--config.train.steps=4", "--config.train.batch_size=4",
             "--config.train.lr=1e-3", "--config.peft.method=lora", "--config.peft.lora.rank=4",
             "--config.eval.num_generations=0", "--config.eval.max_batches=1"]
    p = subprocess.run(train, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'gguf'}",
                        "--format=gguf", "--dtype=q8_0"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "F16 (rows not a multiple of 32): blk.0.ffn_down.weight" in p.stdout  # stories260K's 172-wide MLP
    run = load_run(wd, param_dtype="float32", dtype="float32", load_tokenizer=True)
    export_merged(run, str(tmp_path / "merged"), dtype="float32")
    export_gguf(run, str(tmp_path / "gguf"), dtype="f16")

    _, f = _fields(str(tmp_path / "gguf" / "model-f16.gguf"))
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.tokens"][512:] == ["<|im_start|>", "<|im_end|>"]
    assert f["llama.vocab_size"] == 514 and f["tokenizer.ggml.add_space_prefix"] is True
    scores, types = f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert types[0] == 2 and types[1] == types[513] == 3 and types[3] == 6 and types[300] == 1  # UNK CONTROL BYTE
    # merged pieces score by merge rank: the same order as tok512.model's own sentencepiece scores
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(assets / "tok512.model"))
    merged = sorted((i for i in range(512) if scores[i] > -len(f["tokenizer.ggml.merges"])), key=lambda i: -scores[i])
    assert len(merged) > 100 and all(sp.get_score(a) >= sp.get_score(b) for a, b in zip(merged, merged[1:]))
    assert f["tokenizer.ggml.eot_token_id"] == 513 and "tokenizer.ggml.merges" in f

    ids = np.array([[1, 512, 318, 419, 285, 13, 513, 410, 13, 400, 300, 260, 7, 99]])
    merged = _hf(tmp_path / "merged")
    ref = _logits(merged, ids)
    np.testing.assert_allclose(_logits(_hf(tmp_path / "gguf", gguf_file="model-f16.gguf"), ids),
                               _logits(_round_matrices(merged, lambda w: w.astype(np.float16).astype(np.float32)),
                                       ids), atol=1e-4, rtol=0)
    got_q8 = _logits(_hf(tmp_path / "gguf", gguf_file="model-q8_0.gguf"), ids)
    assert np.abs(got_q8 - ref).max() <= 0.03 * np.abs(ref).max()
    tok = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf")
    ref_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    for text in ("Once upon a time, Lily saw a big dog.", "Who are you?"):
        assert tok(text).input_ids == ref_tok(text).input_ids

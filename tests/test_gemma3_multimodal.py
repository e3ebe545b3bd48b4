"""The text part of a multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`, model_type gemma3)
against transformers, on a tiny random one made here (3 text layers sliding/sliding/full, window 8, a one-layer
SigLIP vision tower; f32, eager attention).

sft_jax loads only the language model (`language_model.model.*`, as transformers 5.24's save_pretrained writes,
or `model.language_model.*`) and trains it on text; the vision tower and projector are left out. Checked:
logits == transformers' multimodal class on input_ids only (<= 1e-4), greedy == its greedy, the merged export
is the same multimodal class (vision tower + projector copied bit for bit, embeddings tied) with equal
logits, the PEFT export loads with PeftModel on the multimodal base (LoRA on the language model only) with
equal logits, the planner reads the published config.json, and one in-process LoRA training run on text
(gemma template) whose merged / PEFT exports load in transformers with the run's own logits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_jax import peft as methods  # noqa: E402
from sft_jax.models import forward, hf_io  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, T, V = 8, 24, 400
TOL = 1e-4
TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=3, max_position_embeddings=128,
            num_hidden_layers=3, sliding_window=W, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=2, image_size=28, patch_size=7)
IMAGE_TOKEN = V - 1


def _hf(path):
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """The tiny multimodal checkpoint (as save_pretrained writes it) with a tiny tokenizer beside it."""
    from sft_jax.data import testing

    d = str(tmp_path_factory.mktemp("gemma3mm"))
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                    image_token_index=IMAGE_TOKEN, boi_token_index=V - 3, eoi_token_index=V - 2)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    model.save_pretrained(d)
    tok = testing.tiny_fast_tokenizer()  # V = 400 tokens: the gemma template's 2 resize the vocabulary
    tok.save_pretrained(d)
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:  # a processor file the merged export copies
        json.dump({"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}}, f)
    return d


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(4, V - 3, size=n).astype(np.int32)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].float().numpy()


def _ours(params, config, ids):
    ids = jnp.asarray(np.asarray(ids)[None])
    return np.asarray(jax.jit(forward, static_argnums=1)(params, config, ids))[0]


@pytest.fixture(scope="module")
def hf_ref(mm):
    ids = _ids(T, 1)
    return ids, _hf_logits(_hf(mm), ids)


def test_config_is_the_text_part(mm):
    """config.json's text_config (with Gemma3TextConfig's defaults for what it omits) is the model; the
    wrapper's own ids/tying govern; the planner reads the published gemma-3-4b-it config.json."""
    from sft_jax import plan
    from sft_jax.config import default_config
    from sft_jax.models.llama import abstract_params

    config = hf_io.read_config(mm)
    assert config.multimodal == "Gemma3ForConditionalGeneration" and config.model_type == "gemma3_text"
    assert config.hf_wrapper["layout"] == "legacy" and config.hf_wrapper["source"] == os.path.abspath(mm)
    text = ModelConfig.from_hf(transformers.Gemma3TextConfig(**TEXT).to_dict())
    assert config == text  # the same language model as a Gemma3ForCausalLM of that text config
    shapes = os.path.join(ROOT, "configs", "shapes")
    cfg = default_config()
    published, where = plan.model_config_for(cfg, model_config=os.path.join(shapes, "gemma3_4b_it"))
    assert where.endswith(os.path.join("gemma3_4b_it", "config.json")) and published.multimodal
    with open(os.path.join(shapes, "gemma3_4b", "config.json")) as f:
        assert published == ModelConfig.from_hf(json.load(f), **{k: getattr(published, k) for k in (
            "dtype", "param_dtype", "scan_layers", "remat", "attention", "attention_block")})
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(published)))
    assert n == 3_880_263_168  # Gemma-3-4B's language model (tests/test_plan_new_families.py)
    # transformers' own defaults for the omitted fields
    with open(os.path.join(shapes, "gemma3_4b_it", "config.json")) as f:
        tc = transformers.Gemma3Config(**{k: v for k, v in json.load(f).items() if not k.startswith("_")}).text_config
    assert (published.num_heads, published.num_kv_heads, published.head_dim, published.vocab_size,
            published.query_pre_attn_scalar, published.rope_local_base_freq, published.eos_token_id) == (
        tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim, tc.vocab_size, tc.query_pre_attn_scalar,
        tc.rope_parameters["sliding_attention"]["rope_theta"], [1, 106])
    assert published.layer_sliding == tuple(t == "sliding_attention" for t in tc.layer_types)
    # the multimodal class never soft-caps its final logits
    d = json.load(open(os.path.join(mm, "config.json")))
    d["text_config"]["final_logit_softcapping"] = 30.0
    c = ModelConfig.from_hf(d)
    assert c.final_logit_softcapping is None and c.to_hf()["text_config"]["final_logit_softcapping"] == 30.0


def test_logits_equal_transformers_multimodal_class(mm, hf_ref, tmp_path, caplog):
    ids, ref = hf_ref
    with caplog.at_level(logging.INFO, logger="sft_jax.models.hf_io"):
        config, params = hf_io.load_hf(mm)
    assert "ignoring 34 vision tower / multi-modal projector tensors" in caplog.text
    for kw in (dict(attention="dense", kernels="reference"), dict(attention="flash", kernels="auto")):
        d = float(np.abs(_ours(params, config.replace(**kw), ids) - ref).max())
        print(f"gemma3 multimodal {kw}: max |diff| vs transformers {d:.2e} (max |logit| {np.abs(ref).max():.2f})")
        assert d <= TOL, (kw, d)
    sconfig, sparams = hf_io.load_hf(mm, scan_layers=True)
    assert float(np.abs(_ours(sparams, sconfig, ids) - ref).max()) <= TOL
    # the other name layout (model.language_model.*, transformers' module names) loads the same tensors
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "modules_layout"
    shutil.copytree(mm, other)
    t = load_file(str(other / "model.safetensors"))
    t = {("model.language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.")
          else "model." + k): v for k, v in t.items()}
    save_file(t, str(other / "model.safetensors"), metadata={"format": "pt"})
    c2, p2 = hf_io.load_hf(str(other))
    assert c2.hf_wrapper["layout"] == "modules"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(_hf_logits(_hf(str(other)), ids), ref, atol=1e-6)  # transformers reads it too


def test_greedy_equals_transformers(mm):
    from sft_jax.sampling import generate

    config, params = hf_io.load_hf(mm)
    hf = _hf(mm)
    prompts = [list(map(int, _ids(10, 6))), list(map(int, _ids(5, 7)))]
    n = 2 * W
    ours = generate(params, config, prompts, max_new_tokens=n)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=3,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert got == out[0, len(p):].tolist()


def _lora(config, params, seed=0):
    lora = methods.Lora(rank=4, alpha=8.0)
    tr, fr = lora.init(params, config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    tr = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.1), tr)
    return lora, tr, fr


def _assert_vision_copied(src, out):
    """Every non-language tensor of `src` is in `out` bit for bit (same dtype), and the image features agree."""
    from safetensors.numpy import load_file

    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    other = [k for k in a if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert len(other) == 34
    for k in other:
        assert b[k].dtype == a[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert "language_model.lm_head.weight" not in b and "lm_head.weight" not in b  # tied stays tied
    pix = torch.tensor(np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32))
    with torch.no_grad():
        fa = _hf(src).get_image_features(pix).pooler_output
        fb = _hf(out).get_image_features(pix).pooler_output
    np.testing.assert_array_equal(fa.numpy(), fb.numpy())


def test_merged_export_is_the_multimodal_class(mm, tmp_path):
    config, params = hf_io.load_hf(mm)
    lora, tr, fr = _lora(config, params)
    ids = _ids(T, 1)
    ours = np.asarray(lora.forward(tr, fr, config, jnp.asarray(ids[None]), None, jnp.ones((1, T), jnp.int32)))[0]
    out = str(tmp_path / "merged")
    hf_io.save_hf(out, config, lora.merge(tr, fr, config))
    merged = _hf(out)
    assert type(merged).__name__ == "Gemma3ForConditionalGeneration" and merged.config.tie_word_embeddings
    d = float(np.abs(_hf_logits(merged, ids) - ours).max())
    assert d <= TOL, d
    assert float(np.abs(_hf_logits(_hf(mm), ids) - ours).max()) > 1e-2  # the LoRA update is in the export
    _assert_vision_copied(mm, out)
    with open(os.path.join(mm, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
        a, b = json.load(f), json.load(g)
    skip = ("text_config", "torch_dtype", "dtype")  # (save_hf writes both dtype keys, as for every family)
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert b["dtype"] == a["dtype"] == "float32"
    at, bt = transformers.Gemma3Config(**a).text_config, transformers.Gemma3Config(**b).text_config
    for k in ("rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar", "tie_word_embeddings",
              "final_logit_softcapping", "hidden_activation", "vocab_size", "bos_token_id", "eos_token_id"):
        assert getattr(at, k) == getattr(bt, k), k
    c2, p2 = hf_io.load_hf(out)  # and it reads back as the same language model
    assert c2 == config
    merged_params = lora.merge(tr, fr, config)
    for x, y in zip(jax.tree.leaves(merged_params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="source checkpoint"):
        hf_io.save_hf(mm, config, params)


def test_peft_export_loads_in_peftmodel_on_the_multimodal_base(mm, tmp_path):
    import peft as hf_peft

    config, params = hf_io.load_hf(mm)
    lora, tr, fr = _lora(config, params, seed=1)
    ids = _ids(T, 1)
    ours = np.asarray(lora.forward(tr, fr, config, jnp.asarray(ids[None]), None, jnp.ones((1, T), jnp.int32)))[0]
    out = str(tmp_path / "peft")
    modules = lora.save_peft(out, tr, fr, config, base_model_name_or_path=mm)
    assert modules and all(m.startswith("model.language_model.layers.") for m in modules)
    pm = hf_peft.PeftModel.from_pretrained(_hf(mm), out).eval()
    adapted = [n for n, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == len(modules) and not any("vision" in n for n in adapted)  # language model only
    d = float(np.abs(_hf_logits(pm, ids) - ours).max())
    assert d <= TOL, d
    for base in (params, config):  # and our reader takes it back (onto the params alone, or the config)
        back, _ = methods.Lora.load_peft(out, base)
        assert jax.tree.structure(back) == jax.tree.structure(tr)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tr)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)


@pytest.mark.slow
def test_training_on_text_and_exports(mm, tmp_path):
    """One in-process LoRA run on the multimodal checkpoint (text only, `gemma` template, whose 2 added tokens
    resize the vocabulary: the resized base is saved as the multimodal class too): the loss falls,
    `export_merged` writes the multimodal class (with the processor's files) with the run's own logits."""
    from sft_jax import export, train
    from sft_jax.config import default_config
    from sft_jax.workdir import load_run

    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w} twice"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    c = default_config()
    c.model.init, c.model.path = "pretrained", mm
    c.data.path, c.data.template, c.data.max_length, c.data.eval_fraction = str(data), "gemma", 64, 0.0
    c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 8, 8, 1e-2, 0
    c.peft.method, c.peft.lora.rank = "lora", 4
    c.eval.every_steps, c.eval.num_generations = 0, 0
    c.checkpoint.async_save = False
    wd = tmp_path / "run"
    train.run(c, wd)
    losses = [json.loads(ln)["loss"] for ln in (wd / "metrics.jsonl").read_text().splitlines()
              if ln.strip() and "loss" in json.loads(ln)]
    assert len(losses) >= 2 and np.isfinite(losses).all() and losses[-1] < losses[0], losses
    run = load_run(wd, param_dtype="float32", dtype="float32", load_tokenizer=True)
    assert run.model_config.multimodal
    ids = _ids(T, 2)
    ours = np.asarray(run.method.forward(run.trainable, run.frozen, run.model_config, jnp.asarray(ids[None]), None,
                                         jnp.ones((1, T), jnp.int32)))[0]
    merged = str(tmp_path / "merged")
    export.export_merged(run, merged, dtype="float32")
    assert os.path.isfile(os.path.join(merged, "preprocessor_config.json"))
    assert float(np.abs(_hf_logits(_hf(merged), ids) - ours).max()) <= TOL
    _assert_vision_copied(mm, merged)
    base = json.load(open(wd / "base_model" / "config.json"))
    assert base["architectures"] == ["Gemma3ForConditionalGeneration"] and base["text_config"]["vocab_size"] == V + 2

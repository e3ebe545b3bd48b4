"""Train/eval step: LoRA and full fine-tuning against PyTorch (transformers + peft), gradient
accumulation, cross-mesh equality, packing, NEFTune, chunked loss, misconfiguration errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sft_jax.peft import Full, Lora, count_params
from sft_jax import sharding
from sft_jax.loss import cross_entropy_sums
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig
from sft_jax.neftune import neftune_noise
from sft_jax.optim import make_optimizer
from sft_jax.train_step import StepOptions, build_eval_step, build_train_step, make_train_step

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
LORA = Lora(rank=4, alpha=8.0, targets="all-linear")
LR, WD = 1e-2, 0.1


def train_cfg(**kw):
    c = ml_collections.ConfigDict(dict(lr=LR, end_lr=0.0, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999,
                                       eps=1e-8, weight_decay=WD, grad_clip=0.0))
    c.update(kw)
    return c


def make_batch(b, t, seed, pad_rows=True):
    """Unpacked rows with right padding; targets are the next token of the same sequence."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, CFG.vocab_size, size=(b, t + 1)).astype(np.int32)
    lengths = rng.integers(2, t + 1, size=b) if pad_rows else np.full(b, t)
    lengths[0] = t
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    mask = (seg * (rng.random((b, t)) > 0.25)).astype(np.float32)
    mask[1, :] = 0.0
    mask[1, 3] = 1.0 if seg[1, 3] else 0.0  # very different trainable counts per row
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask, "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, llama.init_params(CFG, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def adapters(params):
    """LoRA tree with nonzero B (so both A and B move at step one)."""
    tr = LORA.init_trainable(params, params, CFG, jax.random.PRNGKey(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 100))
    tr = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "A" else 0.05 * jax.random.normal(next(keys), x.shape), tr)
    return jax.tree.map(np.asarray, tr)


def run_step(trainable, frozen, batch, method=LORA, opts=StepOptions(), cfg=CFG, rng=0, **tc):
    opt, sched = make_optimizer(train_cfg(**tc), 10)
    step = jax.jit(build_train_step(cfg, opt, sched, method, opts))
    trainable = jax.tree.map(jnp.asarray, trainable)
    st = opt.init(trainable)
    new, st, m = step(trainable, frozen, st, batch, jax.random.PRNGKey(rng))
    return jax.tree.map(np.asarray, new), st, jax.tree.map(float, m)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def assert_trees_close(a, b, tol):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(fa) == len(fb)
    for (p, x), y in zip(fa, fb):
        assert rel(x, y) <= tol, (jax.tree_util.keystr(p), rel(x, y))


# ------------------------------------------------------------------ torch reference
def _hf_name(path):
    """our module path (layers_0, attn, q_proj) -> HF module name."""
    if path[0] == "embed":
        return "model.embed_tokens"
    if path[0] == "final_norm":
        return "model.norm"
    if path[0] == "lm_head":
        return "lm_head"
    i = path[0].split("_")[1]
    sub = {"attn": "self_attn", "mlp": "mlp", "input_norm": "input_layernorm",
           "post_attn_norm": "post_attention_layernorm"}[path[1]]
    return ".".join(["model.layers", i, sub] + list(path[2:]))


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def hf_state(params):
    out = {}
    for path, v in _flat(params):
        name = _hf_name(path[:-1]) + ".weight"
        out[name] = v.T if path[-1] == "kernel" else v
    return out


@pytest.fixture(scope="module")
def torch_model(params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                                  rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                                  attention_bias=False, mlp_bias=False, attn_implementation="eager")

    def build():
        m = transformers.LlamaForCausalLM(hf).float()
        sd = {k: torch.tensor(np.ascontiguousarray(v)) for k, v in hf_state(params).items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
        return m

    return torch, build


def torch_loss(torch, model, batch):
    """HF's own causal-LM loss (mean CE over labels != -100), given the already-shifted labels."""
    out = model(input_ids=torch.tensor(batch["inputs"], dtype=torch.long),
                attention_mask=torch.tensor(batch["segment_ids"] > 0, dtype=torch.long),
                position_ids=torch.tensor(batch["positions"], dtype=torch.long))
    shift_labels = np.where(batch["loss_mask"] > 0, batch["targets"], -100)
    return model.loss_function(out.logits, None, vocab_size=CFG.vocab_size,
                               shift_labels=torch.tensor(shift_labels, dtype=torch.long))


@pytest.fixture(scope="module")
def batch4():
    return make_batch(4, 12, seed=0)


def test_lora_step_matches_torch_peft(torch_model, params, adapters, batch4):
    torch, build = torch_model
    peft = pytest.importorskip("peft")
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, lora_dropout=0.0))
    mods = dict(model.named_modules())
    for path, ab in [(p[:-1], v) for p, v in _flat(adapters) if p[-1] == "A"]:
        mod = mods["base_model.model." + _hf_name(path)]
        node = adapters
        for k in path:
            node = node[k]
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(torch.tensor(node["A"].T))
            mod.lora_B["default"].weight.copy_(torch.tensor(node["B"].T))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    loss = torch_loss(torch, model, batch4)
    loss.backward()
    opt.step()

    new, st, m = run_step(adapters, params, batch4)
    assert rel(m["loss"], loss.item()) <= 1e-5, (m["loss"], loss.item())
    for path, _ in [(p[:-1], v) for p, v in _flat(adapters) if p[-1] == "A"]:
        mod = mods["base_model.model." + _hf_name(path)]
        node, old = new, adapters
        for k in path:
            node, old = node[k], old[k]
        ta = mod.lora_A["default"].weight.detach().numpy().T
        tb = mod.lora_B["default"].weight.detach().numpy().T
        assert rel(node["A"], ta) <= 1e-5 and rel(node["B"], tb) <= 1e-5, path
        # the update itself (new - old) also agrees, and both A and B moved
        assert rel(node["A"] - old["A"], ta - old["A"]) <= 1e-4 and rel(node["B"] - old["B"], tb - old["B"]) <= 1e-4
        assert np.abs(node["A"] - old["A"]).max() > 1e-4 and np.abs(node["B"] - old["B"]).max() > 1e-4


def test_full_finetune_step_matches_torch(torch_model, params, batch4):
    torch, build = torch_model
    model = build()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    loss = torch_loss(torch, model, batch4)
    loss.backward()
    opt.step()
    tsd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    trainable, frozen = Full().init(params, CFG, jax.random.PRNGKey(0))
    new, st, m = run_step(trainable, frozen, batch4, method=Full())
    assert rel(m["loss"], loss.item()) <= 1e-5
    ours = hf_state(new)
    for name, v in ours.items():
        assert rel(v, tsd[name]) <= 1e-5, (name, rel(v, tsd[name]))
        old = hf_state(params)[name]
        assert rel(v - old, tsd[name] - old) <= 1e-3, (name, rel(v - old, tsd[name] - old))


def test_lora_b0_equals_base_and_only_adapters_train(params, batch4):
    tr = jax.tree.map(np.asarray, LORA.init_trainable(params, params, CFG, jax.random.PRNGKey(1)))
    new, st, m = run_step(tr, params, batch4)
    base = cross_entropy_sums(llama.forward(params, CFG, batch4["inputs"], batch4["positions"],
                                            batch4["segment_ids"]), batch4["targets"], batch4["loss_mask"])
    # x A B with B = 0 adds exact zeros; the two programs (eager forward vs the jitted train step)
    # may still round the attention's online softmax differently in the last bit
    assert abs(m["loss"] - float(base["loss_sum"] / base["tokens"])) <= 2e-7 * abs(m["loss"])
    assert m["trainable_tokens"] == float(batch4["loss_mask"].sum())
    assert jax.tree.structure(new) == jax.tree.structure(tr)  # gradients/updates only for A and B
    leaves = jax.tree_util.tree_leaves_with_path(new)
    assert all(p[-1].key in ("A", "B") for p, _ in leaves)
    # step one with B = 0: dL/dA = 0, so only weight decay moves A; B moves by the gradient
    a_old, a_new = tr["layers_0"]["attn"]["q_proj"]["A"], new["layers_0"]["attn"]["q_proj"]["A"]
    np.testing.assert_allclose(a_new, a_old * (1 - LR * WD), rtol=1e-6)
    assert np.abs(new["layers_0"]["attn"]["q_proj"]["B"]).max() > 1e-3
    n_lora = count_params(tr)
    n_state = sum(np.size(x) for x in jax.tree.leaves(st))
    assert 2 * n_lora <= n_state <= 2 * n_lora + 8, (n_lora, n_state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st) if np.size(x) > 1)
    assert n_lora < count_params(params) / 5
    for k in ("loss", "ce", "trainable_tokens", "accuracy", "grad_norm", "lr"):
        assert np.isfinite(m[k])
    assert m["lr"] == pytest.approx(LR)


def test_accumulation_4x2_equals_1x8(params, adapters):
    batch = make_batch(8, 16, seed=1)
    counts = batch["loss_mask"].sum(1)
    assert counts.max() >= 5 * max(counts.min(), 1)
    # eps=1e-3: with eps=1e-8 Adam's first update is ~lr*sign(g), which turns float32 summation-order
    # noise (~1e-9 absolute) on near-zero gradient entries into lr-sized differences; that is not a
    # property of accumulation. The gradients themselves agree to ~1e-6 (see grad_norm).
    a, _, ma = run_step(adapters, params, batch, eps=1e-3)
    b, _, mb = run_step(adapters, params, batch, opts=StepOptions(micro_batches=4), eps=1e-3)
    for k in ("loss", "trainable_tokens", "accuracy", "grad_norm"):
        assert rel(mb[k], ma[k]) <= 1e-6, (k, ma[k], mb[k])
    assert_trees_close(b, a, 1e-6)


def test_chunked_loss_in_step(params, adapters, batch4):
    a, _, ma = run_step(adapters, params, batch4, opts=StepOptions(z_loss=1e-3))
    b, _, mb = run_step(adapters, params, batch4, opts=StepOptions(z_loss=1e-3, loss_chunk_size=5))
    assert rel(mb["loss"], ma["loss"]) <= 1e-6 and ma["loss"] > ma["ce"]
    assert_trees_close(b, a, 1e-6)


def test_chunked_loss_in_full_finetune_step(params, batch4):
    """Full fine-tuning: the fused chunked loss also trains the LM head (its [D, V] gradient)."""
    full = Full()
    trainable, frozen = full.init(params, CFG, jax.random.PRNGKey(0))
    # eps=1e-3 as in test_accumulation: Adam's first update with eps=1e-8 is ~lr*sign(g)
    a, _, ma = run_step(trainable, frozen, batch4, method=full, opts=StepOptions(z_loss=1e-3), eps=1e-3)
    b, _, mb = run_step(trainable, frozen, batch4, method=full, opts=StepOptions(z_loss=1e-3, loss_chunk_size=5),
                        eps=1e-3)
    assert rel(mb["loss"], ma["loss"]) <= 1e-6 and rel(mb["grad_norm"], ma["grad_norm"]) <= 1e-6
    assert_trees_close(b, a, 1e-6)


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_equal_across_meshes(params, adapters, full):
    batch = make_batch(16, 16, seed=2)
    opts = StepOptions(micro_batches=2)
    lcfg = Full() if full else LORA
    opt, sched = make_optimizer(train_cfg(grad_clip=1.0, eps=1e-3), 10)  # eps: see accumulation test
    results = []
    meshes = [m for m in MESHES if not (full and m == (8, 1, 1))]  # pure data parallel: covered by lora
    for shape in meshes:
        n = int(np.prod(shape))
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n])
        trainable, frozen = (params, {}) if full else (adapters, params)
        steps = make_train_step(CFG, mesh, trainable=trainable, frozen=frozen, optimizer=opt, schedule=sched,
                                method=lcfg, opts=opts, batch_size=16)
        sh = steps.shardings
        tr = jax.device_put(jax.tree.map(np.array, trainable), sh.trainable)
        fr = jax.device_put(frozen, sh.frozen)
        st = sharding.init_opt_state(opt, tr, sh.opt_state)
        b = jax.device_put(batch, sh.batch)
        new, st, m = steps.train_step(tr, fr, st, b, jax.random.PRNGKey(0))
        ev = steps.eval_step(new, fr, b) if shape in (MESHES[0], MESHES[-1]) else None
        results.append((jax.tree.map(np.asarray, new), jax.tree.map(float, m), ev and jax.tree.map(float, ev)))
        if shape == (2, 2, 2):
            leaf = new["layers_0"]["attn"]["q_proj"]["kernel" if full else "B"]
            assert "tensor" in str(leaf.sharding.spec)
    ref_p, ref_m, ref_e = results[0]
    for (p, m, e), shape in zip(results[1:], meshes[1:]):
        for k in ("loss", "grad_norm", "accuracy", "trainable_tokens"):
            assert rel(m[k], ref_m[k]) <= 1e-5, (shape, k)
        if e is not None:
            assert rel(e["loss_sum"], ref_e["loss_sum"]) <= 1e-5
        assert_trees_close(p, ref_p, 1e-5)


def test_packed_equals_unpacked(params, adapters):
    rng = np.random.default_rng(5)
    lens = [5, 7, 4]
    seqs = [rng.integers(0, 64, size=n + 1).astype(np.int32) for n in lens]
    masks = [(rng.random(n) > 0.3).astype(np.float32) for n in lens]
    t = 16
    packed = {k: np.zeros((1, t), dt) for k, dt in
              (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32), ("segment_ids", np.int32),
               ("positions", np.int32))}
    unpacked = {k: np.zeros((3, t), v.dtype) for k, v in packed.items()}
    o = 0
    for i, (s, mk, n) in enumerate(zip(seqs, masks, lens)):
        for d, r, off in ((packed, 0, o), (unpacked, i, 0)):
            d["inputs"][r, off:off + n] = s[:-1]
            d["targets"][r, off:off + n] = s[1:]
            d["loss_mask"][r, off:off + n] = mk
            d["segment_ids"][r, off:off + n] = i + 1 if d is packed else 1
            d["positions"][r, off:off + n] = np.arange(n)
        o += n
    ev = jax.jit(build_eval_step(CFG, LORA))
    sp, su = ev(adapters, params, packed), ev(adapters, params, unpacked)
    assert float(sp["tokens"]) == float(su["tokens"]) == sum(m.sum() for m in masks)
    assert rel(float(sp["loss_sum"]), float(su["loss_sum"])) <= 1e-5
    assert float(sp["correct"]) == float(su["correct"])


def test_neftune_in_train_only(params, adapters, batch4):
    alpha = 5.0
    opts = StepOptions(neftune_alpha=alpha)
    _, _, m_noise = run_step(adapters, params, batch4, opts=opts, rng=7)
    _, _, m_plain = run_step(adapters, params, batch4, rng=7)
    assert m_noise["loss"] != m_plain["loss"]
    # reproduce exactly: the step splits its rng into (noise, dropout)
    noise_rng, _ = jax.random.split(jax.random.PRNGKey(7))
    noise = neftune_noise(noise_rng, jnp.asarray(batch4["segment_ids"]), CFG.hidden_size, alpha)
    logits = LORA.forward(adapters, params, CFG, batch4["inputs"], batch4["positions"], batch4["segment_ids"],
                          embed_noise=noise)
    s = cross_entropy_sums(logits, batch4["targets"], batch4["loss_mask"])
    assert rel(m_noise["loss"], float(s["loss_sum"] / s["tokens"])) <= 1e-6
    # eval: deterministic, no noise
    e1 = jax.jit(build_eval_step(CFG, LORA, opts))(adapters, params, batch4)
    e0 = jax.jit(build_eval_step(CFG, LORA))(adapters, params, batch4)
    assert float(e1["loss_sum"]) == float(e0["loss_sum"])


def test_lora_dropout_bf16_base_and_scan_remat(params, adapters, batch4):
    # bf16 frozen base + bf16 compute: LoRA params and optimizer state stay f32
    c16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    drop = Lora(rank=4, alpha=8.0, dropout=0.1)
    new, st, m = run_step(adapters, p16, batch4, method=drop, cfg=c16)
    assert np.isfinite(m["loss"]) and all(x.dtype == np.float32 for x in jax.tree.leaves(new))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st) if np.size(x) > 1)
    # scanned + remat model == unrolled one (same weights stacked on a leading layers axis)
    cs = CFG.replace(scan_layers=True, remat="full")

    def stack(tree):
        layers = [tree[f"layers_{i}"] for i in range(CFG.num_layers)]
        out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
        out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
        return out

    a, _, ma = run_step(adapters, params, batch4)
    b, _, mb = run_step(stack(adapters), stack(params), batch4, cfg=cs)
    assert rel(mb["loss"], ma["loss"]) <= 1e-6
    assert_trees_close(b, stack(a), 1e-5)


def test_misconfiguration_errors_before_compiling(params, adapters):
    opt, sched = make_optimizer(train_cfg(), 10)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    kw = dict(trainable=adapters, frozen=params, optimizer=opt, schedule=sched, method=LORA)
    with pytest.raises(sharding.ShardingError, match=r"train.batch_size=6 is not divisible"):
        make_train_step(CFG, mesh, batch_size=6, **kw)
    with pytest.raises(sharding.ShardingError, match=r"micro-batch size"):
        make_train_step(CFG, mesh, batch_size=8, opts=StepOptions(micro_batches=4), **kw)
    with pytest.raises(sharding.ShardingError, match=r"num_kv_heads=1 is not divisible by mesh.tensor=2"):
        make_train_step(CFG.replace(num_kv_heads=1), mesh, batch_size=8, **kw)
    with pytest.raises(sharding.ShardingError, match=r"num_heads=3 is not divisible by mesh.tensor=2"):
        make_train_step(CFG.replace(num_heads=3, num_kv_heads=1, head_dim=8), mesh, batch_size=8, **kw)
    with pytest.raises(ValueError, match=r"does not match the device count 8"):
        sharding.make_mesh(dict(data=4, fsdp=1, tensor=1))

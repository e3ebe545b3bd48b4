"""DoRA and PiSSA numerics (sft_jax.peft.dora / .pissa) against peft's own modules, one layer at a time (f32).

peft's `use_dora=True` layer: output, gradients (A, B, magnitude, input), initial magnitude, dropout path, merge.
peft's `init_lora_weights="pissa"` / `"pissa_niter_K"`: A, B (up to the sign of each singular pair), residual
base; torch's `svd_lowrank` with the same random test matrix; the conversion back to a plain LoRA.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax.peft import dora, pissa

from helpers import rel

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-5


class _One(torch.nn.Module):
    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


class _FixedDropout(torch.nn.Module):
    """A dropout with a given mask (peft calls it on the adapter input), so both sides drop the same units."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def _peft_layer(n_in, n_out, *, bias, rank, alpha, seed=0, **cfg):
    torch.manual_seed(seed)
    model = _One(n_in, n_out, bias)
    w0 = model.proj.weight.detach().clone()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], **cfg))
    return pm, pm.base_model.model.proj, w0


def _np(t):
    return t.detach().numpy().astype(np.float32)


@pytest.mark.parametrize("bias,rslora,dropout", [(False, False, False), (True, False, False),
                                                 (False, True, False), (True, False, True)])
def test_dora_linear_matches_peft(bias, rslora, dropout):
    n_in, n_out, rank, alpha = 24, 20, 4, 8
    pm, layer, _ = _peft_layer(n_in, n_out, bias=bias, rank=rank, alpha=alpha, use_dora=True, use_rslora=rslora,
                               lora_dropout=0.1 if dropout else 0.0)
    scale = layer.scaling["default"]
    assert scale == pytest.approx(alpha / (np.sqrt(rank) if rslora else rank))
    kernel = _np(layer.base_layer.weight).T
    mag = layer.lora_magnitude_vector["default"].weight
    # the initial magnitude is the weight's column norm (B = 0)
    assert rel(dora.init_magnitude(kernel, _np(layer.lora_A["default"].weight).T,
                                   _np(layer.lora_B["default"].weight).T, scale), _np(mag)) < TOL
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from the identity init: B != 0, m != ||W||
        layer.lora_B["default"].weight.copy_(0.3 * torch.randn(n_out, rank, generator=g))
        mag.mul_(1.0 + 0.2 * torch.rand(n_out, generator=g))
    x = torch.randn(3, 5, n_in, generator=g, requires_grad=True)
    cot = torch.randn(3, 5, n_out, generator=g)
    mask = None
    if dropout:
        mask = (torch.rand(3, 5, n_in, generator=g) > 0.3).float() / 0.7
        layer.lora_dropout["default"] = _FixedDropout(mask)
        pm.train()
    else:
        pm.eval()
    y = pm(x)
    (y * cot).sum().backward()

    a, b = _np(layer.lora_A["default"].weight).T, _np(layer.lora_B["default"].weight).T
    bias_v = _np(layer.base_layer.bias) if bias else None

    def f(x_, a_, b_, m_):
        xd = None if mask is None else x_ * jnp.asarray(mask.numpy())
        return dora.dora_linear(x_, jnp.asarray(kernel), a_, b_, m_, scale, bias=bias_v, x_dropped=xd)

    yj, vjp = jax.vjp(f, _np(x), a, b, _np(mag))
    gx, ga, gb, gm = vjp(jnp.asarray(cot.numpy()))
    assert rel(yj, _np(y)) < TOL
    assert rel(gx, _np(x.grad)) < TOL
    assert rel(ga, _np(layer.lora_A["default"].weight.grad).T) < TOL
    assert rel(gb, _np(layer.lora_B["default"].weight.grad).T) < TOL
    assert rel(gm, _np(mag.grad)) < TOL

    if not dropout:  # merge: peft's merge_and_unload gives the plain weight
        merged = dora.merge(jnp.asarray(kernel), a, b, _np(mag), scale)
        plain = pm.merge_and_unload().proj.weight
        assert rel(merged, _np(plain).T) < TOL
        # and the merged kernel computes the adapter's output
        ym = jnp.asarray(_np(x)) @ merged + (0 if bias_v is None else bias_v)
        assert rel(ym, _np(y)) < 1e-5


def test_dora_bf16_compute_close_to_f32():
    """bf16 inputs/kernel (compute dtype) with float32 adapters: within bf16 rounding of the f32 result."""
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (4, 32))
    kernel = jax.random.normal(k[1], (32, 16)) / 6
    a, b = jax.random.normal(k[2], (32, 4)) / 6, jax.random.normal(k[3], (4, 16)) / 6
    m = dora.init_magnitude(kernel, a, b, 2.0) * (1 + 0.1 * jax.random.uniform(k[4], (16,)))
    y32 = dora.dora_linear(x, kernel, a, b, m, 2.0)
    y16 = dora.dora_linear(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), a, b, m, 2.0)
    assert y16.dtype == jnp.bfloat16
    assert rel(y16.astype(jnp.float32), y32) < 3e-2


def _align_signs(a, b, ref_a):
    """Flip each rank-1 pair (column i of A, row i of B) to A's sign convention in `ref_a` (SVD sign freedom)."""
    s = np.sign(np.sum(np.asarray(a) * ref_a, axis=0))
    return np.asarray(a) * s[None, :], np.asarray(b) * s[:, None]


@pytest.mark.parametrize("shape,rslora", [((24, 16), False), ((16, 24), False), ((20, 20), True)])
def test_pissa_init_matches_peft(shape, rslora):
    n_in, n_out = shape
    rank, alpha = 4, 8
    _, layer, w0 = _peft_layer(n_in, n_out, bias=False, rank=rank, alpha=alpha, init_lora_weights="pissa",
                               use_rslora=rslora)
    scale = layer.scaling["default"]
    a, b, res = pissa.pissa_init(jnp.asarray(_np(w0).T), rank, scale)
    pa, pb = _np(layer.lora_A["default"].weight).T, _np(layer.lora_B["default"].weight).T
    a, b = _align_signs(a, b, pa)
    assert rel(a, pa) < TOL and rel(b, pb) < TOL
    assert rel(res, _np(layer.base_layer.weight).T) < TOL
    # W_res + s A B is the original base; the residual lost exactly the top-r part
    assert rel(pissa.original_kernel(res, a, b, scale), _np(w0).T) < TOL
    assert a.shape == (n_in, rank) and b.shape == (rank, n_out)


def test_svd_lowrank_matches_torch():
    """torch.svd_lowrank and ours from the same random test matrix (seeded torch.randn, as torch draws it)."""
    g = torch.Generator().manual_seed(3)
    for m, n in ((30, 18), (18, 30)):
        w = torch.randn(m, n, generator=g)
        torch.manual_seed(11)
        u, s, v = torch.svd_lowrank(w, q=5, niter=2)
        torch.manual_seed(11)
        r_init = torch.randn(min(m, n), 5)
        uj, sj, vj = pissa.svd_lowrank_from(jnp.asarray(w.numpy()), jnp.asarray(r_init.numpy()), 2)
        assert rel(sj, s.numpy()) < TOL
        assert rel((uj * sj) @ vj.T, ((u * s) @ v.T).numpy()) < TOL


def test_pissa_niter_matches_peft(monkeypatch):
    """`pissa_niter_K`: peft's svd_lowrank and ours see the same test matrix; same A, B, residual."""
    n_in, n_out, rank, alpha, niter = 24, 16, 4, 8, 3
    import peft.tuners.lora.layer as peft_layer

    def seeded_svd_lowrank(w, q, niter):
        torch.manual_seed(5)
        return torch.svd_lowrank(w, q=q, niter=niter)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded_svd_lowrank)
    _, layer, w0 = _peft_layer(n_in, n_out, bias=False, rank=rank, alpha=alpha,
                               init_lora_weights=f"pissa_niter_{niter}")
    torch.manual_seed(5)
    r_init = jnp.asarray(torch.randn(min(n_in, n_out), rank).numpy())
    monkeypatch.setattr(pissa, "svd_lowrank", lambda w, q, it, key: pissa.svd_lowrank_from(w, r_init, it))
    scale = layer.scaling["default"]
    a, b, res = pissa.pissa_init(jnp.asarray(_np(w0).T), rank, scale, niter=niter, key=jax.random.key(0))
    pa, pb = _np(layer.lora_A["default"].weight).T, _np(layer.lora_B["default"].weight).T
    a, b = _align_signs(a, b, pa)
    assert rel(a, pa) < TOL and rel(b, pb) < TOL
    assert rel(res, _np(layer.base_layer.weight).T) < TOL


def test_pissa_niter_close_to_exact():
    """The randomised SVD finds the principal subspace of a matrix with a decaying spectrum."""
    k = jax.random.split(jax.random.key(0), 3)
    u = jnp.linalg.qr(jax.random.normal(k[0], (40, 40))).Q
    v = jnp.linalg.qr(jax.random.normal(k[1], (32, 32))).Q
    w = (u[:, :32] * (0.5 ** jnp.arange(32))) @ v.T  # [in 40, out 32]
    a, b, res = pissa.pissa_init(w, 4, 2.0)
    af, bf, resf = pissa.pissa_init(w, 4, 2.0, niter=4, key=k[2])
    assert rel(af @ bf, a @ b) < 1e-4 and rel(resf, res) < 1e-3
    with pytest.raises(ValueError, match="needs a key"):
        pissa.pissa_init(w, 4, 2.0, niter=2)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_to_plain_lora_matches_peft_conversion(tmp_path, rslora):
    """peft's save_pretrained(path_initial_model_for_weight_conversion=...) and ours: same rank-2r adapter,
    and it computes the trained PiSSA layer on the original base."""
    n_in, n_out, rank, alpha = 24, 16, 4, 8
    pm, layer, w0 = _peft_layer(n_in, n_out, bias=False, rank=rank, alpha=alpha, init_lora_weights="pissa",
                                use_rslora=rslora)
    init_dir, out_dir = tmp_path / "init", tmp_path / "out"
    pm.save_pretrained(str(init_dir))  # the initial PiSSA adapter (peft's documented first step)
    a0, b0 = _np(layer.lora_A["default"].weight).T, _np(layer.lora_B["default"].weight).T
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "training"
        layer.lora_A["default"].weight.add_(0.1 * torch.randn(rank, n_in, generator=g))
        layer.lora_B["default"].weight.add_(0.1 * torch.randn(n_out, rank, generator=g))
    a, b = _np(layer.lora_A["default"].weight).T, _np(layer.lora_B["default"].weight).T
    x = torch.randn(6, n_in, generator=g)
    with torch.no_grad():
        y = pm(x)
    pm.peft_config["default"].init_lora_weights = True  # as peft's docs: convert from the saved initial adapter
    pm.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(init_dir))

    from safetensors.numpy import load_file

    sd = load_file(str(out_dir / "adapter_model.safetensors"))
    cfg = peft.LoraConfig.from_pretrained(str(out_dir))
    a2, b2, alpha2 = pissa.to_plain_lora(a, b, a0, b0, alpha, rslora)
    (ka,) = [k for k in sd if "lora_A" in k]
    (kb,) = [k for k in sd if "lora_B" in k]
    assert rel(a2, sd[ka].T) < TOL and rel(b2, sd[kb].T) < TOL
    assert cfg.r == 2 * rank and cfg.lora_alpha == pytest.approx(alpha2)
    scale2 = alpha2 / (np.sqrt(2 * rank) if rslora else 2 * rank)
    assert scale2 == pytest.approx(layer.scaling["default"])
    y2 = _np(x) @ (_np(w0).T + scale2 * (a2 @ b2))
    assert rel(y2, _np(y)) < TOL


def test_dora_stacked_layers_merge_and_norm():
    """A scanned base ([L, in, out] kernels): norms and merge per layer equal the one-layer functions."""
    k = jax.random.split(jax.random.key(1), 4)
    kernel = jax.random.normal(k[0], (3, 12, 10))
    a, b = jax.random.normal(k[1], (3, 12, 2)), jax.random.normal(k[2], (3, 2, 10))
    m = jax.random.uniform(k[3], (3, 10)) + 1.0
    merged = dora.merge(kernel, a, b, m, 0.5)
    norms = dora.weight_norm(kernel, a, b, 0.5)
    for i in range(3):
        assert rel(merged[i], dora.merge(kernel[i], a[i], b[i], m[i], 0.5)) < 1e-6
        assert rel(norms[i], dora.weight_norm(kernel[i], a[i], b[i], 0.5)) < 1e-6
        x = jax.random.normal(k[0], (5, 12))
        assert rel(x @ merged[i], dora.dora_linear(x, kernel[i], a[i], b[i], m[i], 0.5)) < 1e-5


@pytest.mark.parametrize("niter", [None, 2])
def test_pissa_stacked_layers(niter):
    """A scanned base ([L, in, out]): each layer decomposed on its own, as the one-layer function does."""
    k = jax.random.split(jax.random.key(2), 2)
    kernel = jax.random.normal(k[0], (3, 16, 12))
    a, b, res = pissa.pissa_init(kernel, 4, 2.0, niter=niter, key=k[1])
    assert a.shape == (3, 16, 4) and b.shape == (3, 4, 12) and res.shape == kernel.shape
    assert rel(res + 2.0 * a @ b, kernel) < 1e-5
    if niter is None:
        for i in range(3):
            ai, bi, ri = pissa.pissa_init(kernel[i], 4, 2.0)
            assert rel(a[i] @ b[i], ai @ bi) < 1e-5 and rel(res[i], ri) < 1e-5

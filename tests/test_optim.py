import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sft_jax.optim import decay_mask, make_optimizer, make_schedule, opt_step


def _train_cfg(**kw):
    c = ml_collections.ConfigDict(dict(lr=1e-3, end_lr=0.0, schedule="constant", warmup_steps=0, b1=0.9,
                                       b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=0.0))
    c.update(kw)
    return c


def test_schedules():
    s = make_schedule("linear", 1e-5, 100, 0, 1e-6)  # LIMA
    np.testing.assert_allclose([s(0), s(50), s(100)], [1e-5, 5.5e-6, 1e-6], rtol=1e-5)
    s = make_schedule("cosine", 1.0, 110, 10, 0.1)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-7)
    s = make_schedule("constant", 2.0, 10, 4)
    np.testing.assert_allclose([s(0), s(2), s(4), s(9)], [0, 1, 2, 2], rtol=1e-6)
    with pytest.raises(ValueError, match="train.schedule"):
        make_schedule("exp", 1.0, 10)


def test_decay_mask():
    params = {"embed": {"embedding": jnp.ones((4, 3))}, "layers": {"input_norm": {"scale": jnp.ones((2, 3))},
              "attn": {"q_proj": {"kernel": jnp.ones((2, 3, 3)), "bias": jnp.ones((2, 3))}}},
              "final_norm": {"scale": jnp.ones(3)}, "lora": {"A": jnp.ones((3, 2)), "B": jnp.ones((2, 3))}}
    m = decay_mask(params)
    assert m["embed"]["embedding"] and m["layers"]["attn"]["q_proj"]["kernel"] and m["lora"]["A"]
    assert not m["layers"]["input_norm"]["scale"] and not m["layers"]["attn"]["q_proj"]["bias"]
    assert not m["final_norm"]["scale"]


def test_adamw_matches_formula_with_masked_decay_and_clip():
    p = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "norm": {"scale": jnp.array([1.0, 2.0])}}
    g = {"w": jnp.array([[0.3, -0.1], [2.0, 0.0]]), "norm": {"scale": jnp.array([0.5, -0.4])}}
    lr, wd, clip = 0.1, 0.01, 1.0
    opt, sched = make_optimizer(_train_cfg(lr=lr, weight_decay=wd, grad_clip=clip), 10, p)
    st = opt.init(p)
    upd, st = opt.update(g, st, p)
    newp = optax.apply_updates(p, upd)
    gn = np.sqrt(sum(float((x**2).sum()) for x in jax.tree.leaves(g)))
    for key, decay in (("w", True), ("norm", False)):
        pp = np.asarray(p[key] if key == "w" else p[key]["scale"])
        gg = np.asarray(g[key] if key == "w" else g[key]["scale"]) * min(1.0, clip / gn)
        m, v = 0.1 * gg, 0.001 * gg**2
        mh, vh = m / 0.1, v / 0.001
        ref = pp - lr * (mh / (np.sqrt(vh) + 1e-8) + (wd * pp if decay else 0))
        got = np.asarray(newp[key] if key == "w" else newp[key]["scale"])
        np.testing.assert_allclose(got, ref, rtol=1e-5)  # optax bias correction is float32
    assert int(opt_step(st)) == 1
    # state = mu + nu (2x params) + scalar counts
    n_params = sum(x.size for x in jax.tree.leaves(p))
    n_state = sum(np.size(x) for x in jax.tree.leaves(st))
    assert 2 * n_params <= n_state <= 2 * n_params + 4

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from sft_jax import sharding
from sft_jax.optim import make_optimizer


def mesh_cfg(data=-1, fsdp=1, tensor=1):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_fill_and_axes():
    m = sharding.make_mesh(mesh_cfg(-1, 2, 2))
    assert m.axis_names == ("data", "fsdp", "tensor") and m.devices.shape == (2, 2, 2)
    assert sharding.make_mesh(mesh_cfg(1, -1, 1)).devices.shape == (1, 8, 1)


@pytest.mark.parametrize("cfg,msg", [
    (mesh_cfg(2, 2, 1), r"mesh size 4 \(mesh.data=2, mesh.fsdp=2, mesh.tensor=1\) does not match the device count 8"),
    (mesh_cfg(-1, 3, 1), "does not match the device count"),
    (mesh_cfg(-1, -1, 1), "at most one"),
])
def test_mesh_errors(cfg, msg):
    with pytest.raises(sharding.ShardingError, match=msg):
        sharding.make_mesh(cfg)
    assert issubclass(sharding.ShardingError, ValueError)


def test_divisibility_errors():
    m = sharding.make_mesh(mesh_cfg(2, 2, 2))
    sharding.check_divisibility(m, batch_size=8, micro_batches=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(sharding.ShardingError, match=r"train.batch_size=6 is not divisible by the data-parallel size mesh.data\*mesh.fsdp"):
        sharding.check_divisibility(m, batch_size=6)
    with pytest.raises(sharding.ShardingError, match=r"micro-batch size .*=2 is not divisible by mesh.data\*mesh.fsdp=4"):
        sharding.check_divisibility(m, batch_size=8, micro_batches=4)
    with pytest.raises(sharding.ShardingError, match="num_heads=3 is not divisible by mesh.tensor=2"):
        sharding.check_divisibility(m, batch_size=8, num_heads=3, num_kv_heads=2)
    with pytest.raises(sharding.ShardingError, match="num_kv_heads=1 is not divisible by mesh.tensor=2"):
        sharding.check_divisibility(m, batch_size=8, num_heads=4, num_kv_heads=1)


def test_logical_rules_and_shardings():
    m = sharding.make_mesh(mesh_cfg(2, 2, 2))
    assert sharding.logical_to_spec(("embed", "heads")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert sharding.logical_to_spec(("act_batch", "act_length", "act_heads")) == P(("data", "fsdp"), None, "tensor")
    # non-divisible dims fall back to replication
    assert sharding.logical_to_spec(("vocab", "embed"), shape=(7, 8), mesh=m) == P(None, "fsdp")
    logical = {"w": ("embed", "mlp"), "n": ("norm",)}
    shapes = {"w": jnp.zeros((8, 4)), "n": jnp.zeros((8,))}
    sh = sharding.logical_shardings(logical, m, shapes)
    assert sh["w"].spec == P("fsdp", "tensor") and sh["n"].spec == P(None)


def test_opt_state_shardings_mirror_params():
    m = sharding.make_mesh(mesh_cfg(2, 2, 2))
    params = {"a": {"kernel": jnp.ones((8, 4))}, "n": {"scale": jnp.ones((8,))}}
    psh = sharding.logical_shardings({"a": {"kernel": ("embed", "mlp")}, "n": {"scale": ("norm",)}}, m, params)
    cfg = ml_collections.ConfigDict(dict(lr=1e-3, end_lr=0.0, schedule="cosine", warmup_steps=2, b1=0.9, b2=0.999,
                                         eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    opt, _ = make_optimizer(cfg, 10, params)
    osh = sharding.opt_state_shardings(opt, params, psh, m)
    specs = [s.spec for s in jax.tree.leaves(osh)]
    assert specs.count(P("fsdp", "tensor")) == 2  # mu, nu
    assert all(s in (P("fsdp", "tensor"), P(None), P()) for s in specs)
    st = sharding.init_opt_state(opt, jax.device_put(params, psh), osh)
    assert jax.tree.leaves(st)[1].sharding.spec in (P("fsdp", "tensor"), P())
    assert sharding.batch_sharding(m).spec == P(("data", "fsdp"))

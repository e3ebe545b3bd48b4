"""Config values that cannot be right are refused before anything runs (issue 19 item 5): one line
naming the field; the trainer CLI exits 2 without creating anything."""

from __future__ import annotations

import pytest

from sft_jax.config import BOUNDS, ConfigError, _flatten, default_config, validate
from test_train import _train

BAD = {
    "train.lr": (-1e-4, "'train.lr' must be > 0, got -0.0001"),
    "checkpoint.keep": (0, "'checkpoint.keep' must be > 0, got 0"),
    "train.warmup_steps": (-1, "'train.warmup_steps' must be >= 0"),
    "train.b2": (1.0, "'train.b2' must be in [0, 1), got 1.0"),
    "data.eval_fraction": (1.0, "'data.eval_fraction' must be in [0, 1)"),
    "eval.max_new_tokens": (0, "'eval.max_new_tokens' must be > 0"),
    "train.grad_clip": (-1.0, "'train.grad_clip' must be >= 0"),
    "train.end_lr": (1.0, "'train.end_lr' = 1.0 is above train.lr = 0.0001"),
    "model.tiny.num_kv_heads": (3, "'model.tiny.num_heads' = 4 is not a multiple of model.tiny.num_kv_heads = 3"),
}


def _with(**fields):
    cfg = default_config()
    for key, value in fields.items():
        section, *rest = key.split(".")
        node = cfg[section]
        for k in rest[:-1]:
            node = node[k]
        node[rest[-1]] = value
    return cfg


def test_defaults_and_shipped_bounds_pass():
    validate(default_config())
    assert set(BOUNDS) <= set(_flatten(default_config()))  # every bounded field exists


@pytest.mark.parametrize("key", sorted(BAD))
def test_value_that_cannot_be_right_is_one_line_naming_the_field(key):
    value, expected = BAD[key]
    cfg = _with(**{key: value}, **({"model.init": "tiny"} if key.startswith("model.tiny") else {}))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)


def test_several_problems_in_one_line():
    with pytest.raises(ConfigError) as e:
        validate(_with(**{"train.lr": 0.0, "checkpoint.keep": 0}))
    msg = str(e.value)
    assert "\n" not in msg and "train.lr" in msg and "checkpoint.keep" in msg


def test_trainer_cli_refuses_negative_lr_and_keep_0_before_anything(tmp_path):
    for i, arg in enumerate(("--config.train.lr=-0.001", "--config.checkpoint.keep=0")):
        wd = tmp_path / f"run{i}"
        p = _train(wd, arg, check=False)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1 and arg.split("=")[0][9:] in errors[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr and not wd.exists()  # refused before the work directory is made

"""The shipped LIMA / alpaca / 8B configs name no file beside the checkout: an empty data.path stops the
trainer (before any model is read) and the data readers with the config's note on where the data come from."""

from __future__ import annotations

import importlib.util
import json

import pytest

from sft_jax import train
from sft_jax.config import ConfigError, validate
from sft_jax.data import pipeline
from sft_jax.data.formats import DataError

CONFIGS = {"lima": "LIMA", "lima_lora": "LIMA", "lima_ia3": "LIMA", "alpaca": "hf:tatsu-lab/alpaca", "llama3_8b_full": "hf:org/name",
           "llama3_8b_lora": "hf:org/name"}


def _config(repo_dir, name):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", repo_dir / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_data_path_is_required_with_where_to_get_it(name, repo_dir, tmp_path):
    cfg = validate(_config(repo_dir, name))
    assert cfg.data.path == "" and CONFIGS[name] in cfg.data.source_help
    with pytest.raises(DataError, match="data.path is empty: .*" + CONFIGS[name].replace(":", ".")):
        pipeline.split_records(cfg.data, "train")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg.model.path = str(tmp_path / "model")
    with pytest.raises(ConfigError, match="data.path is empty") as e:
        train.run(cfg, tmp_path / "wd")
    assert cfg.data.source_help in str(e.value)
    assert not (tmp_path / "wd" / "run.json").exists()


def test_default_message_names_hub_ids():
    from sft_jax.config import default_config

    with pytest.raises(DataError, match=r"hf:org/name\[:config\]\[@split\]"):
        pipeline.split_records(default_config().data, "train")

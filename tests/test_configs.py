"""The shipped LIMA / alpaca / 8B configs name no file beside the checkout: an empty data.path stops the
trainer (before any model is read) and the data readers with the config's note on where the data come from."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from sft_jax import train
from sft_jax.config import ConfigError, validate
from sft_jax.data import pipeline
from sft_jax.data.formats import DataError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# every LIMA preset (configs/lima.py and one configs/lima_<method>.py per fine-tuning method) names LIMA
CONFIGS = {p.stem: "LIMA" for p in sorted(CONFIG_DIR.glob("lima*.py"))}
CONFIGS.update({"alpaca": "hf:tatsu-lab/alpaca", "llama3_8b_full": "hf:org/name", "llama3_8b_lora": "hf:org/name"})


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


def test_every_method_has_a_lima_preset_and_every_config_builds_its_method(repo_dir):
    """configs/lima.py is full fine-tuning; each other method of `peft.method` has configs/lima_<method>.py
    (README "Method presets"), and every shipped config validates and builds its method."""
    from sft_jax import peft
    from sft_jax.config import CHOICES

    missing = []
    for name in CHOICES["peft.method"]:
        preset = "lima" if name == "full" else f"lima_{name}"
        if not (repo_dir / "configs" / f"{preset}.py").exists():
            missing.append(f"configs/{preset}.py (peft.method={name})")
            continue
        assert _config(repo_dir, preset).peft.method == name, preset
    assert not missing, f"no LIMA preset for: {', '.join(missing)}"
    for path in sorted((repo_dir / "configs").glob("*.py")):
        cfg = validate(_config(repo_dir, path.stem))
        assert peft.from_config(cfg.peft).name == cfg.peft.method, path.name

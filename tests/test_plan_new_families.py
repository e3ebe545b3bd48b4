"""`python -m sft_jax.plan` answers "does it fit" for one real size of each family added by issue 21,
from the published config.json shapes in configs/shapes/ (no weights, no network)."""

import json
import os

import pytest

from test_plan import _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shapes dir -> exact parameter count of the published checkpoint (None: not pinned here)
FAMILIES = {
    "phi3_5_mini": 3_821_079_552,  # Phi-3.5-mini-instruct (untied 32064 x 3072 embedding and head)
    "gemma2_9b": 9_241_705_984,  # Gemma-2-9B (tied 256000 x 3584 embedding, 4 norms per layer)
    "gemma3_4b": 3_880_263_168,  # Gemma-3-4B's language model (tied 262208 x 2560, q/k norms)
}
PRESENT = [n for n in FAMILIES if os.path.isfile(os.path.join(ROOT, "configs", "shapes", n, "config.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESENT)
def test_plan_runs_on_the_new_families(repo_dir, name):
    r, _ = _run(repo_dir, "--config=configs/phi3_5_mini_lora.py", f"--model_config=configs/shapes/{name}",
                "--target=tpu-v5e-8", "--json")
    assert r.returncode in (0, 3), r.stderr[-3000:]  # 0 fits, 3 planned but does not fit
    p = json.loads(r.stdout)
    assert p["fits"] == (r.returncode == 0)
    if FAMILIES[name] is not None:
        assert p["model"]["params"] == FAMILIES[name]
    assert p["model_shapes"].endswith(os.path.join(name, "config.json"))
    assert p["memory_per_device"]["temporaries"] > 0 and p["flops"]["analytical_per_step"] > 0


def test_phi3_5_mini_lora_config_plans_from_its_shapes(repo_dir):
    """The config file's SHAPES directory alone is enough (no --model_config)."""
    if "phi3_5_mini" not in PRESENT:
        pytest.skip("no shapes")
    r, _ = _run(repo_dir, "--config=configs/phi3_5_mini_lora.py", "--target=h100-8", "--json")
    assert r.returncode in (0, 3), r.stderr[-3000:]
    p = json.loads(r.stdout)
    assert p["model"]["params"] == FAMILIES["phi3_5_mini"] and p["fits"]

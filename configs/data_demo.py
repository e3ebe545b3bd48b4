"""Data-inspector demo: LIMA + stories260K's tokenizer + chatml (markers as plain text).

    python -m sft_jax.data.inspect --config=configs/data_demo.py --num_examples=2
"""

import pathlib

from sft_jax.config import default_config

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def get_config():
    c = default_config()
    c.data.path = str(SHARED / "data" / "lima.json")
    c.data.tokenizer = str(SHARED / "assets" / "stories260K" / "tok512.model")
    c.data.template = "chatml"
    c.data.add_template_tokens = False  # keep the 512-piece vocab: markers tokenize as text
    c.data.max_length = 2048
    c.data.eval_fraction = 0.0
    return c

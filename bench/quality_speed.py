"""Speed of the quality command's model passes against the train step, same model, data and shapes.

    python bench/quality_speed.py [--rows=256] [--max_length=512] [--batch_size=8] [--out=bench/quality_speed.json]

Needs ../shared (stories260K + LIMA).  The first ``--rows`` LIMA rows, chatml, packed rows of
``--max_length``: (1) ``quality_model.score`` (conversation loss, response-alone loss, prompt
embeddings; real tokens/s over the three passes, compiling batches left out); (2) the baseline,
``python -m sft_jax.train`` on the same rows (full fine-tuning, float32, no remat): median real
tokens/s of its steps after the first.  One CPU device for both.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sft_jax.config import default_config  # noqa: E402
from sft_jax.data import formats, quality, quality_model  # noqa: E402
from sft_jax.data.testing import write_jsonl  # noqa: E402
from sft_jax.models.llama2c import convert_llama2c  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 256, "LIMA rows")
_LEN = flags.DEFINE_integer("max_length", 512, "packed row length")
_BATCH = flags.DEFINE_integer("batch_size", 8, "rows per batch")
_STEPS = flags.DEFINE_integer("steps", 12, "train steps of the baseline")
_OUT = flags.DEFINE_string("out", "", "write the results as JSON here")

SHARED = REPO.parent / "shared"


def main(argv):
    del argv
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="quality_speed_"))
    base = tmp / "stories260K"
    convert_llama2c(str(SHARED / "assets/stories260K/stories260K.bin"), str(SHARED / "assets/stories260K/tok512.model"),
                    str(base))
    records = formats.load_conversations(str(SHARED / "data" / "lima.json"))[: _ROWS.value]
    data = write_jsonl(str(tmp / "rows.jsonl"), [{"messages": r["messages"]} for r in records])
    cfg = default_config()
    cfg.model.path, cfg.data.path, cfg.data.template = str(base), data, "chatml"
    cfg.data.max_length, cfg.mesh.data = _LEN.value, 1
    tok, template = quality.load_tokenizer(cfg)
    tokenized = [quality_model.tokenize(tok, template, r, cfg.data.train_on) for r in records]
    scores = quality_model.score(str(base), cfg, tokenized, tok, batch_size=_BATCH.value, num_clusters=8)

    wd = tmp / "run"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/lima.py", f"--workdir={wd}",
           f"--config.model.path={base}", f"--config.data.path={data}", "--config.data.template=chatml",
           "--config.data.add_template_tokens=False", f"--config.data.max_length={_LEN.value}",
           f"--config.train.steps={_STEPS.value}", f"--config.train.batch_size={_BATCH.value}",
           "--config.model.dtype=float32", "--config.model.remat=none", "--config.data.eval_fraction=0.0",
           "--config.eval.num_generations=0", "--config.checkpoint.every_steps=0"]
    env = dict(os.environ, SFT_JAX_COMPILATION_CACHE="off")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(f"train failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(wd / "metrics.jsonl") if x.strip()]
    train_tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and r.get("step", 0) > 1]
    res = {
        "rows": len(records), "max_length": _LEN.value, "batch_size": _BATCH.value,
        "score_tokens_per_s": round(scores.tokens_per_second),
        "train_tokens_per_s_median": round(float(np.median(train_tps))),
        "ratio_score_over_train": round(scores.tokens_per_second / float(np.median(train_tps)), 2),
        "train_steps_measured": len(train_tps),
    }
    print(json.dumps(res, indent=1))
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)

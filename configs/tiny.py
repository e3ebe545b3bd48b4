"""The embedded default: a small Llama trained from scratch on multi-task chat data.

Everything is made by the project, offline and deterministically: the model (random init),
a sentencepiece tokenizer trained on the data (saved with the run), and an instruction data
set of small tasks (reverse, add, sort, uppercase, ...) written as multi-turn chat.
It trains for real in a few minutes on 2 CPU cores and prints held-out loss, accuracy and
sample generations before and after.

    python -m sft_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""

from sft_jax.config import default_config


def get_config():
    c = default_config()
    c.model.init = "tiny"
    c.model.tiny.hidden_size = 128
    c.model.tiny.intermediate_size = 352
    c.model.tiny.num_layers = 4
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    c.model.tiny.vocab_size = 512

    c.data.path = ""  # "" with model.init=tiny: the generated tasks
    c.data.template = "chatml"
    c.data.max_length = 128
    c.data.packing = True
    c.data.eval_fraction = 0.0  # the tiny tasks come with their own held-out prompts

    c.train.batch_size = 16
    c.train.steps = 600
    c.train.lr = 2e-3
    c.train.end_lr = 1e-4
    c.train.schedule = "cosine"
    c.train.warmup_steps = 25
    c.train.weight_decay = 0.01
    c.train.b2 = 0.98
    c.train.grad_clip = 1.0

    c.peft.method = "full"  # a randomly initialised model is trained fully

    c.checkpoint.every_steps = 300
    c.checkpoint.keep = 2
    c.eval.every_steps = 300
    c.eval.num_generations = 4
    c.eval.max_new_tokens = 40
    return c

"""The built-in tiny data set and tokenizer (used when ``data.path`` / the tokenizer path are empty).

Small, deterministic, learnable chat tasks (reverse words, add numbers, copy, count letters)
so the embedded tiny model can show its loss falling in seconds, with no file or network.
The tokenizer is a byte-level BPE trained in-process on these tasks (vocab 480 including the
chatml markers as special tokens; other built-in templates' markers still fit the tiny
model's 512-entry embedding).
"""

from __future__ import annotations

import functools
import random

WORDS = ("cat dog sun moon tree bird fish red blue green big small fast slow happy sad one two three "
         "apple ball car house river stone cloud rain snow star").split()
SYSTEM = "You are a tiny helpful assistant."


def generated_rows(n: int = 2000, seed: int = 0) -> list[dict]:
    """``n`` messages-format rows of four simple tasks (deterministic in ``seed``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            w = rng.choices(WORDS, k=rng.randint(2, 6))
            user, answer = "Reverse the words: " + " ".join(w), " ".join(reversed(w))
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            user, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 2:
            w = rng.choices(WORDS, k=rng.randint(1, 5))
            user, answer = "Repeat after me: " + " ".join(w), " ".join(w)
        else:
            w = rng.choice(WORDS)
            user, answer = f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."
        msgs = [{"role": "system", "content": SYSTEM}] if i % 5 == 0 else []
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        rows.append({"messages": msgs})
    return rows


def generated_records(n: int = 2000, seed: int = 0) -> list[dict]:
    return [{"messages": r["messages"], "source": f"<generated>:{i + 1}"} for i, r in enumerate(generated_rows(n, seed))]


@functools.lru_cache(maxsize=1)
def _trained():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [f"{m['content']}" for r in generated_rows(2000, 0) for m in r["messages"]]
    tok.train_from_iterator(text, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh PreTrainedTokenizerFast (bos ``<s>``, eos ``</s>``, pad ``<pad>``), chatml template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from sft_jax.data.templates import get_template

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained()), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = get_template("chatml")
    return tok

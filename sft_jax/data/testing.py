"""Offline tokenizers and sample rows for tests and benchmarks (no hub, no network)."""

from __future__ import annotations

import json
import os

CORPUS = (
    "Once upon a time there was a little girl named Lily. She liked to play outside in the sun. "
    "One day she saw a big red ball. The ball was shiny and round. Lily wanted to play with it. "
    "Hello there! How are you today? I am fine, thank you. What is two plus two? It is four. "
    "Tell me a story about a dog. The dog ran fast and jumped over the fence. Be nice and helpful. "
    "Write a poem about the sea. Waves crash, gulls cry, the tide goes out and comes back in.\n"
)


def tiny_fast_tokenizer(vocab_size: int = 400):
    """A byte-level BPE trained in-process, wrapped as a PreTrainedTokenizerFast (bos <s>, eos </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_sentencepiece_model(directory: str, vocab_size: int = 400) -> str:
    """Train a tiny sentencepiece model (byte fallback) into ``directory``; returns its path."""
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    text = os.path.join(directory, "corpus.txt")
    with open(text, "w") as f:
        for _ in range(20):
            f.write(CORPUS)
    prefix = os.path.join(directory, "tiny_sp")
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return prefix + ".model"


def slow_sentencepiece_tokenizer(model_path: str):
    """The python/sentencepiece backend (no offsets: ``apply_chat_template`` masks fail on it)."""
    from transformers import SentencePieceBackend

    return SentencePieceBackend(vocab_file=model_path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


CONVERSATION = [
    {"role": "system", "content": "You are a kind helper."},
    {"role": "user", "content": "Hello there! How are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is four."},
    {"role": "user", "content": "Tell me a story about a dog."},
    {"role": "assistant", "content": "The dog ran fast and jumped over the fence.\n"},
]


def conversation_rows(conv=CONVERSATION) -> dict[str, dict]:
    """One multi-turn conversation (with system) in alpaca, sharegpt and messages form."""
    system = conv[0]["content"]
    turns = conv[1:]
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
    alpaca = {"system": system, "history": pairs, "instruction": turns[-2]["content"], "input": "",
              "output": turns[-1]["content"]}
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in conv]}
    messages = {"messages": [dict(m) for m in conv]}
    return {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages}


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct messages-format rows of varied length (1-3 turns)."""
    import random

    rng = random.Random(seed)
    words = CORPUS.replace("\n", " ").split()
    rows = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "Be nice and helpful."})
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"Question {i}.{t}: " + " ".join(rng.choices(words, k=rng.randint(2, 12)))})
            msgs.append({"role": "assistant", "content": f"Answer {i}.{t}: " + " ".join(rng.choices(words, k=rng.randint(1, 40)))})
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path

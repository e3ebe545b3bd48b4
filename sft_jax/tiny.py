"""Assets of the embedded default run, made deterministically and offline.

* `make_tiny_dataset(seed, n_train, n_eval)`: a small instruction data set in OpenAI
  messages form (some rows multi-turn), eight toy tasks whose answers a ~1-3M parameter
  Llama learns in minutes on a CPU, each with an exact checker `score_answer`.
* `build_tiny_tokenizer(out_dir, rows, vocab_size=512)`: a sentencepiece BPE tokenizer
  (byte fallback, chatml markers as single tokens) saved so that
  `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it, with a chatml
  `chat_template` whose assistant turns are wrapped in `{% generation %}`.
* `tiny_model_config(cfg.model.tiny)`: a Hugging Face style Llama `config.json` dict.

Everything here is a pure function of its arguments (plus the pinned library versions).
"""

from __future__ import annotations

import json
import os
import random
import string
from typing import Any, Iterable, Sequence

# ----------------------------------------------------------------------------- tasks

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a precise assistant. Answer with the result only.",
)

# A fixed, small table: the model must memorise it from the training rows.
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Cuba": "Havana",
    "Chile": "Santiago",
    "Poland": "Warsaw",
    "India": "New Delhi",
}

WORDS = (
    "cat dog sun moon tree bird fish star rain snow lake hill road door book pen cup box "
    "map key ring bell lamp rose leaf wind fire ice salt milk bread apple lemon grape "
    "tiger zebra horse mouse river stone cloud green blue red gold jazz code data"
).split()

LETTERS = string.ascii_lowercase

# Per task: a few phrasings.  `{x}` fields are filled by the generator; the checker
# recovers the inputs from the text of the last user message (see `_parse`).
PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse": ("Reverse the letters: {x}", "Write these letters backwards: {x}", "Reverse: {x}"),
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "upper": ("Uppercase: {x}", "Write {x} in capital letters.", "Make this uppercase: {x}"),
    "sort": ("Sort the digits: {x}", "Put in increasing order: {x}", "Sort: {x}"),
    "count": (
        "How many times does the letter {c} appear in {w}?",
        "Count the letter {c} in {w}.",
        "Number of {c} in {w}?",
    ),
    "copy": ("Repeat exactly: {x}", "Copy this: {x}", "Say again: {x}"),
    "capital": ("What is the capital of {x}?", "Name the capital city of {x}.", "Capital of {x}?"),
    "next_letter": (
        "What letter comes after {x}?",
        "Next letter after {x}?",
        "Which letter follows {x} in the alphabet?",
    ),
}
TASKS: tuple[str, ...] = tuple(PHRASINGS)
# Tasks whose answer is a memorised fact of a small table (not computed from the prompt).
_TABLE_TASKS = ("capital", "next_letter", "upper")


def _sample(task: str, rng: random.Random) -> tuple[str, str]:
    """One (user prompt, reference answer) for `task`."""
    ph = rng.choice(PHRASINGS[task])
    if task == "reverse":
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 4))]
        return ph.format(x=" ".join(xs)), " ".join(reversed(xs))
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return ph.format(a=a, b=b), str(a + b)
    if task == "upper":
        w = rng.choice(WORDS)
        return ph.format(x=w), w.upper()
    if task == "sort":
        ds = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 4))]
        return ph.format(x=" ".join(ds)), " ".join(sorted(ds))
    if task == "count":
        w = rng.choice(WORDS)
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice(LETTERS)
        return ph.format(c=c, w=w), str(w.count(c))
    if task == "copy":
        x = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2)))
        return ph.format(x=x), x
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        return ph.format(x=country), CAPITALS[country]
    if task == "next_letter":
        x = rng.choice(LETTERS[:-1])
        return ph.format(x=x), LETTERS[LETTERS.index(x) + 1]
    raise ValueError(f"unknown tiny task {task!r}; known: {TASKS}")


def _parse(task: str, prompt: str) -> dict[str, str]:
    """Invert the phrasing: recover the template fields from a user prompt."""
    import re

    for ph in PHRASINGS[task]:
        pat = re.escape(ph)
        for field in ("x", "a", "b", "c", "w"):
            pat = pat.replace(re.escape("{" + field + "}"), f"(?P<{field}>.+?)")
        m = re.fullmatch(pat, prompt.strip())
        if m:
            return m.groupdict()
    raise ValueError(f"prompt {prompt!r} is not a {task!r} prompt")


def reference_answer(task: str, prompt: str) -> str:
    """The one correct answer to the user `prompt` of `task` (computed, not looked up)."""
    f = _parse(task, prompt)
    if task == "reverse":
        return " ".join(reversed(f["x"].split()))
    if task == "add":
        return str(int(f["a"]) + int(f["b"]))
    if task == "upper":
        return f["x"].upper()
    if task == "sort":
        return " ".join(sorted(f["x"].split()))
    if task == "count":
        return str(f["w"].count(f["c"]))
    if task == "copy":
        return f["x"]
    if task == "capital":
        return CAPITALS[f["x"]]
    if task == "next_letter":
        return LETTERS[LETTERS.index(f["x"]) + 1]
    raise ValueError(f"unknown tiny task {task!r}")


def _normalise(text: str) -> str:
    return " ".join(text.replace("<|im_end|>", " ").split()).rstrip(".").strip()


def score_answer(task: str, prompt_messages: Sequence[dict[str, str]], generated_text: str) -> bool:
    """Exact match of `generated_text` with the answer to the last user message.

    `prompt_messages` is the conversation up to (not including) the assistant turn to be
    generated.  Whitespace runs, a trailing full stop and a trailing `<|im_end|>` are
    ignored; everything else (case, order, spacing between items) must match.
    """
    users = [m["content"] for m in prompt_messages if m["role"] == "user"]
    if not users:
        raise ValueError("prompt_messages has no user message")
    return _normalise(generated_text) == _normalise(reference_answer(task, users[-1]))


def make_tiny_dataset(
    seed: int = 0, n_train: int = 2000, n_eval: int = 200
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train and held-out rows: `{"messages": [...], "task": name}`.

    About 30% of rows have a system prompt and 40% are multi-turn (2-3 user/assistant
    turns of different tasks).  `task` names the task of the *last* assistant turn, which
    is the one scored: `score_answer(row["task"], row["messages"][:-1], generated)`.
    Held-out rows are single-question (plus maybe a system prompt) and their user prompts
    never occur as any user turn of the training rows; tasks are balanced round-robin.
    For the table tasks (capital, next letter, uppercase of a known word) at least one
    phrasing of every fact stays in training: held-out rows ask a known fact in an unseen
    wording.  The prompt space is small (e.g. 16 capitals x 3 phrasings), so n_eval is
    limited to 256 (8 tasks x 32 held-out capital questions).
    """
    rng = random.Random(f"sft_jax.tiny/{seed}")

    eval_rows: list[dict[str, Any]] = []
    eval_prompts: set[str] = set()
    held_facts: dict[tuple[str, str], int] = {}
    attempts = 0
    while len(eval_rows) < n_eval:
        attempts += 1
        if attempts > 100 * (n_eval + 10):
            raise ValueError(
                f"cannot draw {n_eval} distinct held-out prompts (the small tasks have few prompts: "
                f"use n_eval <= 256)"
            )
        task = TASKS[len(eval_rows) % len(TASKS)]
        prompt, answer = _sample(task, rng)
        if prompt in eval_prompts:
            continue
        if task in _TABLE_TASKS:
            # Facts from a small table: keep at least one phrasing of every fact in training,
            # so held-out questions ask known facts in an unseen wording.
            if held_facts.get((task, answer), 0) >= len(PHRASINGS[task]) - 1:
                continue
            held_facts[(task, answer)] = held_facts.get((task, answer), 0) + 1
        eval_prompts.add(prompt)
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        eval_rows.append({"messages": msgs, "task": task})

    train_rows: list[dict[str, Any]] = []
    i = 0
    while len(train_rows) < n_train:
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        n_turns = 1 if rng.random() < 0.6 else rng.choice((2, 3))
        task = TASKS[0]
        for _ in range(n_turns):
            task = TASKS[i % len(TASKS)]
            i += 1
            for _ in range(1000):
                prompt, answer = _sample(task, rng)
                if prompt not in eval_prompts:
                    break
            else:  # pragma: no cover - only with absurd n_eval
                raise ValueError(f"held-out set exhausts the prompts of task {task!r}")
            msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        train_rows.append({"messages": msgs, "task": task})
    return train_rows, eval_rows


# ------------------------------------------------------------------------- tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
IM_START_ID, IM_END_ID = 4, 5

# chatml; assistant content and its end-of-turn marker are inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the trained
# tokens (pitfall 1: the end-of-turn token is trained).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chat_template() -> str:
    """The data package's built-in "chatml" template (the one training uses by name);
    the inline copy above only if that package cannot be imported."""
    try:
        from sft_jax.data.templates import get_template
    except ImportError:  # pragma: no cover - data package absent
        return CHATML_TEMPLATE
    return get_template("chatml")


def render_chatml(messages: Sequence[dict[str, str]]) -> str:
    """The text the chatml template renders (no generation prompt), for tokenizer training."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def build_tiny_tokenizer(out_dir: str | os.PathLike, rows: Iterable[dict[str, Any]], vocab_size: int = 512) -> str:
    """Train a sentencepiece BPE model on the chatml-rendered `rows`; save an HF tokenizer dir.

    Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `<|im_start|>`=4, `<|im_end|>`=5, then
    256 byte-fallback pieces, then merges.  The HF tokenizer's `eos_token` is `<|im_end|>`
    (the end-of-turn token generation stops on), `bos_token` is `<s>` (not added by the
    chat template), `pad_token` is `<pad>`.  Deterministic: BPE, one thread, no sampling.
    Writes `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` (and the
    `tokenizer.json` transformers derives), verifies the load, returns `out_dir`.
    """
    import io

    import sentencepiece as spm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    texts = [render_chatml(r["messages"]) for r in rows]
    # Lines: sentencepiece treats each sentence separately; newlines are byte-fallback.
    sentences = [line for t in texts for line in t.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=[IM_START, IM_END],
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    special = {"bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": PAD}
    tok_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "padding_side": "right",
        "chat_template": _chat_template(),
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, sort_keys=True)
    verify_tokenizer(out_dir, texts[:64])
    return out_dir


def verify_tokenizer(tok_dir: str, texts: Sequence[str] = ()) -> None:
    """Load `tok_dir` with AutoTokenizer; check markers are single ids and texts round-trip."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    want = {PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID, UNK: UNK_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}
    problems = []
    for piece, i in want.items():
        if tok.convert_tokens_to_ids(piece) != i:
            problems.append(f"{piece!r} has id {tok.convert_tokens_to_ids(piece)}, want {i}")
    for marker in (IM_START, IM_END):
        if tok.encode(marker, add_special_tokens=False) != [want[marker]]:
            problems.append(f"{marker!r} is not a single token")
    if tok.eos_token_id != want[IM_END] or tok.pad_token_id != PAD_ID:
        problems.append(f"eos/pad ids are {tok.eos_token_id}/{tok.pad_token_id}")
    for t in list(texts) + ["x  y\n\tz é 你好 ", " leading space"]:
        ids = tok.encode(t, add_special_tokens=False)
        if tok.decode(ids) != t:
            problems.append(f"round trip failed for {t!r}")
    if problems:
        raise RuntimeError(f"tokenizer at {tok_dir} is broken: " + "; ".join(problems[:5]))


# ----------------------------------------------------------------------------- model


def tiny_model_config(tiny: Any) -> dict[str, Any]:
    """An HF `config.json` dict (model_type llama) for `cfg.model.tiny` (a ConfigDict or dict).

    Untied embeddings, head_dim = hidden / heads, eos = [`<|im_end|>`, `</s>`] so generation
    stops at the end of the assistant turn.  Defaults (128 hidden, 4 layers, 512 vocab) give
    about 0.9M parameters.
    """
    get = tiny.get if hasattr(tiny, "get") else (lambda k, d=None: getattr(tiny, k, d))
    hidden, heads = int(get("hidden_size")), int(get("num_heads"))
    if hidden % heads:
        raise ValueError(f"model.tiny.hidden_size={hidden} is not divisible by num_heads={heads}")
    kv = int(get("num_kv_heads"))
    if heads % kv:
        raise ValueError(f"model.tiny.num_heads={heads} is not divisible by num_kv_heads={kv}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(get("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(get("intermediate_size")),
        "num_hidden_layers": int(get("num_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("max_position_embeddings")),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": [IM_END_ID, EOS_ID],
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
        "use_cache": True,
    }

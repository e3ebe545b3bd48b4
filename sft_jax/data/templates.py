"""Built-in chat templates (jinja, with ``{% generation %}`` markers) and tokenizer preparation.

Every built-in wraps exactly the trainable part of each assistant turn in
``{% generation %}...{% endgeneration %}``: the assistant content PLUS the token that
closes the turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, or ``eos_token`` for
llama2/mistral).  Scaffolding around it (role headers, the newline after ``<|im_end|>``)
stays outside.  The same rule -- "what an assistant turn adds after the generation
prompt, minus trailing whitespace" -- is what the prefix-diff method derives for
templates without markers, and the tests check both agree on every built-in.

Simplifications (documented, deliberate): ``qwen3`` always renders an empty think block
(``<think>\\n\\n</think>\\n\\n``) as part of the assistant header (as Qwen3 does with
``enable_thinking=False``), so history turns render the same as the generated one;
``gemma`` and ``mistral`` fold the system prompt into the first user turn;
``[INST]``/``[/INST]`` are plain text (real Mistral-v3 vocabularies have them as tokens
and then they tokenize as such anyway).
"""

from __future__ import annotations

import re

from sft_jax.data.formats import DataError

_GEN = "{% generation %}"
_END = "{% endgeneration %}"

_CHATML_BODY = (
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + THINK -}}" + _GEN + "{{- m['content'] + '<|im_end|>' -}}" + _END + "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' + THINK -}}{%- endif -%}"
)


def _chatml(default_system: str | None = None, think: bool = False) -> str:
    think_s = "'<think>\\n\\n</think>\\n\\n'" if think else "''"
    head = "{%- set loop_messages = messages -%}"
    if default_system is not None:
        head += (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' -}}"
            "{%- endif -%}"
        )
    return head + _CHATML_BODY.replace("THINK", think_s)


_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    + _GEN + "{{- m['content'] | trim -}}{{- '<|eot_id|>' -}}" + _END +
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Llama-2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...
_LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{- bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- bos_token + '[INST] ' + m['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}"
    + _GEN + "{{- ' ' + m['content'] + ' ' + eos_token -}}" + _END +
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Mistral instruct: <s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] ...
_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.first and system -%}{{- '[INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}"
    + _GEN + "{{- ' ' + m['content'] + eos_token -}}" + _END +
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Gemma: <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{assistant}<end_of_turn>\n
_GEMMA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}" + _GEN + "{{- (m['content'] | trim) + '<end_of_turn>' -}}" + _END
    + "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<start_of_turn>user\\n' + (system if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _chatml(),
    "qwen2.5": _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": _chatml(think=True),
    "llama3": _LLAMA3,
    "llama2": _LLAMA2,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
}

# Marker tokens a built-in needs in the vocabulary (added as special tokens when missing).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama2": (),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}

# The string that ends an assistant turn (what generation stops on); None = eos_token.
END_OF_TURN: dict[str, str | None] = {
    "chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
    "llama3": "<|eot_id|>", "llama2": None, "mistral": None, "gemma": "<end_of_turn>",
}

_GEN_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    return bool(_GEN_RE.search(template))


def get_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise DataError(f"unknown chat template {name!r}; built-ins: {sorted(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[name]


def resolve_template(tokenizer, name: str = "") -> str:
    """``data.template`` -> jinja source: a built-in name, or "" for the tokenizer's own."""
    if name:
        return get_template(name)
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    if not tmpl:
        raise DataError(
            "the tokenizer has no chat_template; set data.template to a built-in: " + ", ".join(sorted(BUILTIN_TEMPLATES))
        )
    return tmpl


def prepare_tokenizer(tokenizer, template_name: str = "", *, add_tokens: bool = True):
    """Install built-in template ``template_name`` on ``tokenizer`` (as its ``chat_template``).

    With ``add_tokens`` the template's marker tokens missing from the vocabulary are added
    as special tokens (so ``<|im_end|>`` is ONE token the model can learn to stop on).
    Returns ``(tokenizer, added_tokens)``; when ``added_tokens`` is non-empty the model's
    embedding (and untied lm_head) must be resized to ``len(tokenizer)`` -- the trainer does
    that.  With ``add_tokens=False`` the markers tokenize as plain text pieces (the vocab is
    unchanged; used for stories260K's 512-piece tokenizer).  ``template_name=""`` keeps the
    tokenizer's own template (and adds nothing).
    """
    added: list[str] = []
    if not template_name:
        resolve_template(tokenizer, "")  # raises when there is none
        return tokenizer, added
    tokenizer.chat_template = get_template(template_name)
    if template_name in ("llama2", "mistral", "llama3", "gemma"):
        if template_name in ("llama2", "mistral") and not tokenizer.eos_token:
            raise DataError(f"template {template_name!r} needs the tokenizer to have an eos_token")
        if not tokenizer.bos_token:
            raise DataError(f"template {template_name!r} needs the tokenizer to have a bos_token")
    if add_tokens:
        vocab = tokenizer.get_vocab()
        missing = [t for t in TEMPLATE_TOKENS[template_name] if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            added = missing
    return tokenizer, added


def end_of_turn_string(tokenizer, template_name: str) -> str:
    eot = END_OF_TURN.get(template_name)
    return eot if eot is not None else tokenizer.eos_token


def template_name_of(tokenizer) -> str:
    """The built-in name of ``tokenizer.chat_template`` ("" when it is not a built-in)."""
    tmpl = getattr(tokenizer, "chat_template", None)
    for name, src in BUILTIN_TEMPLATES.items():
        if tmpl == src:
            return name
    return ""


def stop_token_ids(tokenizer, template_name: str = "") -> list[int]:
    """Token ids generation should stop on: the end-of-turn token (when it is one token) and EOS.

    ``template_name`` "" = infer from the tokenizer's installed template (a built-in, or any
    known end-of-turn token its template text mentions)."""
    ids = []
    template_name = template_name or template_name_of(tokenizer)
    if template_name:
        eots = [end_of_turn_string(tokenizer, template_name)]
    else:
        tmpl = str(getattr(tokenizer, "chat_template", "") or "")
        eots = [t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>") if t in tmpl]
    for s in (*eots, tokenizer.eos_token):
        if s and s in tokenizer.get_vocab():
            i = tokenizer.convert_tokens_to_ids(s)
            if i not in ids:
                ids.append(i)
    return ids

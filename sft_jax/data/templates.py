"""Built-in chat templates (jinja, with ``{% generation %}`` markers) and tokenizer preparation.

Every built-in wraps exactly the trainable part of each assistant turn in
``{% generation %}...{% endgeneration %}``: what the model writes after the generation
prompt -- the content, the reasoning block and tool calls where the family renders them --
PLUS the token that closes the turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, or
``eos_token`` for llama2/mistral).  Scaffolding (role headers, the newline after
``<|im_end|>``), tool schemas and tool results stay outside.  The same rule -- "what an
assistant turn adds after the generation prompt, minus trailing whitespace" -- is what the
prefix-diff method derives for templates without markers; the tests check both agree on
every prefix-stable built-in.

Tool calls and reasoning (issue 22): ``qwen2.5``, ``qwen3``, ``llama3.1`` and ``mistral-v0.3``
render ``tools`` / ``tool_calls`` / ``tool`` results in their families' formats and give the
same text as the published templates (tests/fixtures/chat_templates) on the same
conversations.  ``qwen3`` renders reasoning as Qwen3 does: a ``<think>`` block on the turns
after the last user query (always on the final turn, empty when there is none), dropped from
earlier turns.  Templates that do not render ``reasoning_content`` get it folded into the
content (``masking.prepare_messages``).  Deliberate differences from the published templates:
``llama3.1`` / ``mistral-v0.3`` raise on an assistant turn with both text and tool calls
(theirs silently drop the text); ``mistral-v0.3`` puts the system prompt in front of the last
user turn also when the conversation ends with an assistant turn (theirs drops it then).

Other simplifications: ``gemma`` and ``mistral`` fold the system prompt into the first user
turn; ``[INST]``/``[/INST]`` are plain text in ``mistral`` (real Mistral-v3 vocabularies have
them as tokens and then they tokenize as such anyway).
"""

from __future__ import annotations

import json
import re

from sft_jax.data.formats import DataError

_GEN = "{% generation %}"
_END = "{% endgeneration %}"

_CHATML_BODY = (
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}" + _GEN + "{{- m['content'] + '<|im_end|>' -}}" + _END + "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CHATML = "{%- set loop_messages = messages -%}" + _CHATML_BODY

# Qwen's tool format (Qwen2.5 and Qwen3 share it): the schemas in the system turn, each call
# a <tool_call> JSON block in the assistant turn, results as <tool_response> blocks in a user turn.
_QWEN_TOOLS_HEAD = (
    "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n"
)
_QWEN_TOOL_SCHEMAS = (
    "{{- '" + _QWEN_TOOLS_HEAD + "' -}}"
    "{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '" + _QWEN_TOOLS_TAIL + "' -}}"
)
_QWEN_CALLS = (  # after the assistant text (`content`), inside the generation block
    "{%- for c in m.get('tool_calls', []) -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set f = c['function'] -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' -}}"
    "{{- (f['arguments'] if f['arguments'] is string else f['arguments'] | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
)
_QWEN_TOOL_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
)

_QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN25 = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '" + _QWEN25_SYSTEM + "' -%}"
    "{%- if tools -%}{{- '<|im_start|>system\\n' + system -}}" + _QWEN_TOOL_SCHEMAS +
    "{%- else -%}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{{- '<|im_start|>assistant\\n' -}}" + _GEN + "{{- content -}}" + _QWEN_CALLS + "{{- '<|im_end|>' -}}" + _END
    + "{{- '\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}" + _QWEN_TOOL_RESULT +
    "{%- elif not (m['role'] == 'system' and loop.first) -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3: the reasoning of an assistant turn is rendered (<think>...</think>) only after the
# last real user query (a user turn that is not a wrapped tool response), and there always on
# the final turn (empty when it has none); earlier turns drop it -- as Qwen3's template does.
_QWEN3 = (
    "{%- if tools -%}{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    + _QWEN_TOOL_SCHEMAS.replace("'\\n\\n# Tools", "'# Tools") +
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(last_query=messages | length - 1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' and not (m['content'].startswith('<tool_response>') "
    "and m['content'].endswith('</tool_response>')) -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- set reasoning = m.get('reasoning_content') or '' -%}"
    "{{- '<|im_start|>assistant\\n' -}}" + _GEN +
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    + _QWEN_CALLS + "{{- '<|im_end|>' -}}" + _END + "{{- '\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}" + _QWEN_TOOL_RESULT +
    "{%- elif not (m['role'] == 'system' and loop.first) -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

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

# Llama 3.1 (its JSON tool calling): a fixed system header (knowledge/today dates, "Environment:
# ipython" with tools), the schemas in the first user turn, a call as one JSON object with
# "parameters", results in an "ipython" turn (the content JSON-encoded).  One call per turn.
_LLAMA31_TOOLS_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\\n\\nRespond in the format {\"name\": function name, \"parameters\": "
    "dictionary of argument name and its value}.Do not use variables.\\n\\n"
)
_LLAMA31 = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if tools -%}{{- 'Environment: ipython\\n' -}}{%- endif -%}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + (date_string if date_string is defined "
    "else '26 Jul 2024') + '\\n\\n' + system + '<|eot_id|>' -}}"
    "{%- for m in loop_messages -%}"
    "{%- if tools and loop.first -%}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n" + _LLAMA31_TOOLS_PROMPT + "' -}}"
    "{%- for t in tools -%}{{- (t | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}"
    "{{- (m['content'] | trim) + '<|eot_id|>' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- if m.get('tool_calls') -%}"
    "{%- if m['tool_calls'] | length != 1 or m['content'] -%}"
    "{{- raise_exception('llama3.1 renders exactly one tool call per assistant turn, without text') -}}"
    "{%- endif -%}"
    "{%- set f = m['tool_calls'][0]['function'] -%}"
    + _GEN + "{{- '{\"name\": \"' + f['name'] + '\", \"parameters\": ' + (f['arguments'] | tojson) + '}<|eot_id|>' -}}"
    + _END +
    "{%- else -%}" + _GEN + "{{- (m['content'] | trim) + '<|eot_id|>' -}}" + _END + "{%- endif -%}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (m['content'] | tojson) + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Mistral v0.3 (Mistral-7B-Instruct-v0.3's tool format): [AVAILABLE_TOOLS] before the last user
# turn, [TOOL_CALLS] [{"name", "arguments", "id"}] as the assistant turn, [TOOL_RESULTS] with the
# call id (9 alphanumerics).  The system prompt goes in front of the last user turn (Mistral's own
# template drops it when the conversation ends with an assistant turn; this one keeps it there).
_MISTRAL3_TOOL_LIST = (
    "{{- '[AVAILABLE_TOOLS] [' -}}"
    "{%- for t in tools -%}"
    "{{- '{\"type\": \"function\", \"function\": {' -}}"
    "{%- for key, val in t['function'].items() if key != 'return' -%}"
    "{%- if val is string -%}{{- '\"' + key + '\": \"' + val + '\"' -}}"
    "{%- else -%}{{- '\"' + key + '\": ' + (val | tojson) -}}{%- endif -%}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '}}' + (', ' if not loop.last else ']') -}}"
    "{%- endfor -%}"
    "{{- '[/AVAILABLE_TOOLS]' -}}"
)
_MISTRAL3 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1, turn=0) -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- if not (m['role'] == 'tool' or m.get('tool_calls')) -%}"
    "{%- if (m['role'] == 'user') != (ns.turn % 2 == 0) -%}"
    "{{- raise_exception('mistral-v0.3: after the optional system message, roles must alternate "
    "user/assistant (tool calls and results aside)') -}}"
    "{%- endif -%}{%- set ns.turn = ns.turn + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if tools and loop.index0 == ns.last_user -%}" + _MISTRAL3_TOOL_LIST + "{%- endif -%}"
    "{%- if system and loop.index0 == ns.last_user -%}{{- '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + m['content'] + '[/INST]' -}}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{%- if m['content'] -%}"
    "{{- raise_exception('mistral-v0.3 renders an assistant turn with tool_calls without its text') -}}"
    "{%- endif -%}"
    + _GEN + "{{- '[TOOL_CALLS] [' -}}"
    "{%- for c in m['tool_calls'] -%}"
    "{%- if c.get('id') is none or c['id'] | length != 9 -%}"
    "{{- raise_exception('mistral-v0.3 tool call ids must be 9 alphanumeric characters') -}}"
    "{%- endif -%}"
    "{{- (c['function'] | tojson)[:-1] + ', \"id\": \"' + c['id'] + '\"}' + (', ' if not loop.last else ']') -}}"
    "{%- endfor -%}"
    "{{- eos_token -}}" + _END +
    "{%- elif m['role'] == 'assistant' -%}" + _GEN + "{{- ' ' + (m['content'] | trim) + eos_token -}}" + _END +
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if m.get('tool_call_id') is none or m['tool_call_id'] | length != 9 -%}"
    "{{- raise_exception('mistral-v0.3 tool results need a tool_call_id of 9 alphanumeric characters') -}}"
    "{%- endif -%}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + m['content'] + ', \"call_id\": \"' + m['tool_call_id'] + '\"}[/TOOL_RESULTS]' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Phi-3 / Phi-3.5-mini-instruct: `<|role|>\n content <|end|>\n`; the empty system turn is skipped as in
# Microsoft's template.  Deliberate difference: the published template appends `eos_token` after the
# last message when there is no generation prompt; this one does not (the turn ends with `<|end|>`,
# the token generation stops on, and the template stays prefix-stable).
_PHI3 = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}" + _GEN + "{{- m['content'] + '<|end|>' -}}" + _END + "{{- '\n' -}}"
    "{%- elif m['role'] != 'system' or m['content'] -%}"
    "{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

# Phi-4 (microsoft/phi-4): ChatML with `<|im_sep|>` after the role and no newlines.
_PHI4 = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant<|im_sep|>' -}}" + _GEN + "{{- m['content'] + '<|im_end|>' -}}" + _END +
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen2.5": _QWEN25,
    "qwen3": _QWEN3,
    "llama3": _LLAMA3,
    "llama3.1": _LLAMA31,
    "mistral-v0.3": _MISTRAL3,
    "llama2": _LLAMA2,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "phi3": _PHI3,
    "phi4": _PHI4,
}

# Marker tokens a built-in needs in the vocabulary (added as special tokens when missing).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama3.1": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral-v0.3": ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                     "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    "llama2": (),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "phi4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
}

# The string that ends an assistant turn (what generation stops on); None = eos_token.
END_OF_TURN: dict[str, str | None] = {
    "chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
    "llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "llama2": None, "mistral": None, "mistral-v0.3": None,
    "gemma": "<end_of_turn>", "phi3": "<|end|>", "phi4": "<|im_end|>",
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
    if template_name in ("llama2", "mistral", "mistral-v0.3", "llama3", "llama3.1", "gemma"):
        if template_name in ("llama2", "mistral", "mistral-v0.3") and not tokenizer.eos_token:
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


_QWEN_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_tool_calls(text: str, template_name: str) -> list[dict]:
    """The tool calls in generated ``text``, in the format of built-in ``template_name``:
    ``[{"name": str, "arguments": dict}]`` (Qwen ``<tool_call>`` blocks, Llama 3.1's bare JSON
    object with ``parameters``, Mistral's ``[TOOL_CALLS] [...]`` list).  Text holding no
    well-formed call gives ``[]``."""
    if template_name in ("qwen2.5", "qwen3"):
        found = [_json_or_none(m) for m in _QWEN_CALL_RE.findall(text)]
    elif template_name == "llama3.1":
        found = [_json_or_none(text.replace("<|eot_id|>", "").strip())]
        found = [{"name": c.get("name"), "arguments": c.get("parameters")} for c in found if isinstance(c, dict)]
    elif template_name == "mistral-v0.3" and "[TOOL_CALLS]" in text:
        body = text.split("[TOOL_CALLS]", 1)[1].strip()
        found = _json_or_none(body[: body.rfind("]") + 1]) or []
    else:
        return []
    return [{"name": c["name"], "arguments": c["arguments"]} for c in found
            if isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)]

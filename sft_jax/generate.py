"""Generate (or chat) with a Hugging Face model directory or a trained work directory.

    python -m sft_jax.generate --model=HF_DIR [--adapter=PEFT_DIR] | --workdir=DIR [--step=N|latest|best]
        [--prompt="..." (repeatable: one batch) | --prompt_ids=1,2,3 (repeatable) | --interactive]
        [--system="..."] [--tools=TOOLS.json] [--max_new_tokens=N] [--temperature=0 --top_p=1 --top_k=0 --seed=0]
        [--json] [--tensor_parallel=N]

Prompts are rendered with the chat template used in training (the work directory's template /
tokenizer, `add_generation_prompt=True`; tokenized without extra special tokens, exactly as the
data pipeline does), prefilled into the KV cache and decoded with `sampling.generate`; rows stop
at EOS or the end-of-turn token (run.json's `eos_ids`; for --model: generation_config.json's and
config.json's eos ids, the tokenizer's EOS and the end-of-turn marker its template uses).
`--prompt_ids` bypasses the template (raw ids, e.g. `1` = BOS).  A --model whose tokenizer has no
chat_template encodes --prompt as plain text with the tokenizer's special tokens (BOS).
`--json` prints one JSON object: {"generations": [{"prompt", "prompt_ids", "ids", "text",
"finish_reason"[, "tool_calls"]}, ...]}.  `--tools` (a JSON list of function schemas) renders them
into the prompt as training did and adds the generated `tool_calls` (parsed in the built-in
template's format) to each result.  `--interactive`: a multi-turn chat on stdin that keeps the history
(`/reset` clears it, `/exit` or EOF ends).  `--tensor_parallel=N` shards the weights over N devices
(heads / MLP / vocab, `sharding.LOGICAL_RULES`) for a model that does not fit one.

`--adapter` (with --model) applies an adapter directory unmerged: sft_jax's own format (a directory with
`sft_jax_adapter.json`, what `sft_jax.export --format=adapter` wrote, any method with a frozen base:
`sft_jax.adapter_format.load_adapter`, which checks the base's shapes and fingerprint and uses the run's
tokenizer, template and stop ids), else a PEFT adapter directory (`sft_jax.peft.load_peft_adapter`: LoRA /
DoRA, prompt tuning, P-tuning, prefix tuning; e.g. what `sft_jax.export --format=peft` wrote).

Bad arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli
from sft_jax.workdir import STEP_HELP

PROG = "python -m sft_jax.generate"


@dataclasses.dataclass
class Generator:
    """A model ready to generate: params (+ optional fine-tuning method and its variables, unmerged),
    tokenizer, template, stop ids."""

    config: Any
    params: dict
    tokenizer: Any = None
    template: str | None = None  # jinja source; None = no chat template
    eos_ids: list[int] = dataclasses.field(default_factory=list)
    method: Any = None  # a sft_jax.peft Method (its hooks), None = plain params
    method_vars: dict | None = None  # the method's variable collections (Method.model_inputs)
    name: str = ""
    mesh: Any = None  # a jax Mesh: decode tensor-parallel over it (sharding.tensor_parallel_mesh)

    # ------------------------------------------------------------------ prompts
    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Render with the training template (add_generation_prompt) -> ids (no extra specials).
        ``tools``: JSON schemas for the template, as in training (``apply_chat_template(tools=...)``)."""
        if self.tokenizer is None:
            raise UsageError(f"{self.name}: no tokenizer; use --prompt_ids")
        if not self.template:
            raise UsageError(f"{self.name}: the tokenizer has no chat_template; use --prompt_ids or a plain --prompt")
        from sft_jax.data.masking import render

        text = render(self.tokenizer, self.template, messages, add_generation_prompt=True, tools=tools)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str, system: str = "", tools: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.name}: no tokenizer; use --prompt_ids")
        if not self.template:  # a base model without a chat template: plain text (+ BOS)
            return list(self.tokenizer(prompt)["input_ids"])
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_messages(msgs, tools)

    def tool_calls(self, ids: Sequence[int]) -> list[dict]:
        """Tool calls in generated ``ids``, in the format of the built-in template (``[]`` for others)."""
        from sft_jax.data.templates import parse_tool_calls, template_name_of

        if self.tokenizer is None:
            return []
        return parse_tool_calls(self.tokenizer.decode(list(ids), skip_special_tokens=False),
                                template_name_of(self.tokenizer))

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ generate
    @property
    def context(self) -> int:
        """The model's context in tokens (``max_position_embeddings``): prompt + generation."""
        return int(self.config.max_position_embeddings)

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     truncate_prompt: bool = False) -> list[tuple[list[int], str]]:
        """Batched KV-cache generation -> [(new ids without the stop token, finish_reason)].

        The model's context (:attr:`context`) bounds prompt + generation (see :func:`fit_context`): a
        prompt that does not fit is a :class:`ContextLengthError`, or with ``truncate_prompt`` is cut
        from the left (with a warning); a generation that would run past the context stops there
        (finish_reason "length")."""
        from sft_jax.sampling import generate

        prompts, limits = fit_context(prompts, context=self.context, max_new_tokens=max_new_tokens,
                                      truncate_prompt=truncate_prompt, bos_id=self.config.bos_token_id)
        outs = generate(self.params, self.config, prompts, max_new_tokens=max(limits),
                        eos_ids=self.eos_ids, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        method=self.method, method_vars=self.method_vars, keep_eos=True, mesh=self.mesh)
        eos = set(self.eos_ids)
        res = []
        for o, limit in zip(outs, limits):
            o = o[:limit]  # the longer prompts of a batch stop at the context
            if o and o[-1] in eos:
                res.append((o[:-1], "stop"))
            else:
                res.append((o, "length"))
        return res


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context (bad input: one line, exit 2)."""


def fit_context(prompts: Sequence[Sequence[int]], *, context: int, max_new_tokens: int, truncate_prompt: bool = False,
                bos_id: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Prompts that fit a model of ``context`` positions, and each row's limit of new tokens.

    - A prompt of ``context`` tokens or more leaves no room for one new token: ContextLengthError
      naming its length and the context, unless ``truncate_prompt``.
    - ``truncate_prompt``: a prompt longer than ``context - max_new_tokens`` keeps its last tokens
      (and its first token when it is BOS) so that the whole ``max_new_tokens`` fits; a warning names
      what was cut.  ``max_new_tokens >= context`` cannot fit at all: ContextLengthError.
    - Otherwise a row whose prompt + ``max_new_tokens`` passes the context gets the room that is left
      (a warning says so): tokens past ``max_position_embeddings`` would be garbage."""
    import logging

    log = logging.getLogger("sft_jax.generate")
    out, limits = [], []
    if truncate_prompt and max_new_tokens >= context:
        raise ContextLengthError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                                 f"context of {context} tokens (max_position_embeddings)")
    for k, p in enumerate(prompts):
        p = list(p)
        n = len(p)
        if truncate_prompt and n + max_new_tokens > context:
            keep = context - max_new_tokens
            head = p[:1] if bos_id is not None and p and p[0] == bos_id and keep > 1 else []
            p = head + p[n - (keep - len(head)):]
            log.warning("prompt %d: %d tokens cut from the left to %d (the model's context is %d tokens, %d of them "
                        "kept for max_new_tokens)%s", k, n, len(p), context, max_new_tokens,
                        "; BOS kept" if head else "")
        elif n >= context:
            raise ContextLengthError(
                f"prompt {k} has {n} tokens but the model's context is {context} tokens (max_position_embeddings), "
                f"so nothing can be generated after it; shorten the prompt or let it be cut from the left "
                f"(--truncate_prompt)")
        elif n + max_new_tokens > context:
            log.warning("prompt %d: %d tokens + max_new_tokens %d pass the model's context of %d tokens; it stops "
                        "after %d new tokens", k, n, max_new_tokens, context, context - n)
        out.append(p)
        limits.append(min(max_new_tokens, context - len(p)))
    return out, limits


# ---------------------------------------------------------------------------- loading


def _model_stop_ids(path: str, config, tokenizer, template: str | None) -> list[int]:
    from sft_jax.workdir import default_stop_ids

    extra: list[int] = []
    gc = os.path.join(path, "generation_config.json")
    if os.path.isfile(gc):
        try:
            with open(gc) as f:
                e = json.load(f).get("eos_token_id")
            extra = [int(i) for i in (e if isinstance(e, list) else [e]) if i is not None]
        except (OSError, ValueError):
            extra = []
    ids = list(extra)
    for i in default_stop_ids(tokenizer, "", config):
        if i not in ids:
            ids.append(i)
    del template
    return ids


def check_model_dir(path: str):
    """Cheap checks of an HF directory (no jax): -> ModelConfig. UsageError (one line) when unusable."""
    if not os.path.isdir(path):
        raise UsageError(f"--model: not a directory: {path}")
    cfg = os.path.join(path, "config.json")
    try:
        with open(cfg) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--model: {cfg} not found") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: cannot read {cfg}: {type(e).__name__}: {e}") from None
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
        bins = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = f" (found pickle files {bins}: convert them to safetensors first; pickle is not loaded)" if bins else ""
        raise UsageError(f"--model: no model.safetensors or model.safetensors.index.json in {path}{hint}")
    from sft_jax.models.config import ModelConfig  # (imports jax via the package)

    try:
        return ModelConfig.from_hf(d)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model: {cfg}: {type(e).__name__}: {e}") from None


def load_model_dir(path: str, *, param_dtype: str = "float32", dtype: str = "float32") -> Generator:
    from sft_jax.models.hf_io import load_hf

    check_model_dir(path)
    config, params = load_hf(path, param_dtype=param_dtype, dtype=dtype)
    tokenizer = None
    if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default")
    return Generator(config=config, params=params, tokenizer=tokenizer, template=template or None,
                     eos_ids=_model_stop_ids(path, config, tokenizer, template), name=path)


def load_workdir(workdir: str, step: int | str | None = None, *, param_dtype: str | None = None,
                 dtype: str | None = None) -> Generator:
    """A trained run: its base and trained tree through its method (unmerged), its tokenizer,
    template and stop ids."""
    from sft_jax.workdir import load_run

    run = load_run(workdir, step, param_dtype=param_dtype, dtype=dtype)
    params, method_vars = run.method.model_inputs(run.trainable, run.frozen)
    return Generator(config=run.model_config, params=params, tokenizer=run.tokenizer, template=run.chat_template(),
                     eos_ids=list(run.eos_ids), method=run.method, method_vars=method_vars,
                     name=f"{workdir}@{run.step}")


# -------------------------------------------------------------------------------- CLI


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory")
    p.add_argument("--adapter", default=None, help="with --model: an adapter directory to apply (unmerged): "
                   "sft_jax's (export --format=adapter) or PEFT's")
    p.add_argument("--workdir", default=None, help="a training work directory")
    p.add_argument("--step", default=None, help=STEP_HELP)
    p.add_argument("--prompt", action="append", default=[], help="user message (repeat for a batch)")
    p.add_argument("--prompt_ids", action="append", default=[], help="raw comma-separated ids, no template")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin")
    p.add_argument("--system", default="", help="system message")
    p.add_argument("--tools", default=None, help="JSON file: a list of tool (function) schemas for the template")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="param dtype to load: float32 | bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tensor_parallel", type=int, default=1, help="devices to shard the weights over")
    p.add_argument("--truncate_prompt", action="store_true",
                   help="cut a prompt that does not fit the model's context from the left (with a warning; "
                        "default: an error)")
    return p


def _check_args(args) -> list[list[int]]:
    if (args.model is None) == (args.workdir is None):
        raise UsageError("give exactly one of --model=HF_DIR or --workdir=DIR")
    if args.adapter is not None and args.model is None:
        raise UsageError("--adapter needs --model (the base the adapter was trained on)")
    if args.step is not None and args.workdir is None:
        raise UsageError("--step needs --workdir")
    if not (args.prompt or args.prompt_ids or args.interactive):
        raise UsageError("nothing to generate: give --prompt, --prompt_ids or --interactive")
    if args.interactive and (args.prompt or args.prompt_ids or args.json):
        raise UsageError("--interactive cannot be combined with --prompt, --prompt_ids or --json")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0, got {args.top_k}")
    if args.dtype not in (None, "float32", "bfloat16"):
        raise UsageError(f"--dtype={args.dtype!r} is not one of float32, bfloat16")
    if args.tensor_parallel < 1:
        raise UsageError(f"--tensor_parallel must be >= 1, got {args.tensor_parallel}")
    ids = []
    for s in args.prompt_ids:
        try:
            row = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise UsageError(f"--prompt_ids={s!r}: expected comma-separated integers") from None
        if not row:
            raise UsageError("--prompt_ids: empty")
        ids.append(row)
    return ids


def _read_tools(path: str) -> list[dict]:
    from sft_jax.data.formats import DataError, parse_tools

    try:
        with open(path) as f:
            return parse_tools(f.read(), path, "tools")
    except (OSError, DataError) as e:
        raise UsageError(f"--tools={path}: {e}") from None


def _load(args) -> Generator:
    from sft_jax.sharding import ShardingError, tensor_parallel_mesh

    try:
        mesh = tensor_parallel_mesh(args.tensor_parallel)
    except ShardingError as e:
        raise UsageError(f"--tensor_parallel: {e}") from None
    if args.model is not None:
        check_model_dir(args.model)
        gen = load_model_dir(args.model, param_dtype=args.dtype or "float32")
        if args.adapter is not None:
            from sft_jax import adapter_format
            from sft_jax.peft import PeftFormatError, load_peft_adapter

            try:
                if adapter_format.is_adapter_dir(args.adapter):  # sft_jax's own format (export --format=adapter)
                    gen.method, trainable, frozen, gen.config, meta = adapter_format.load_adapter(
                        args.adapter, args.model, gen.config, gen.params)
                    _use_adapter_tokenizer(gen, args.adapter, meta)
                else:
                    trainable, gen.method = load_peft_adapter(args.adapter, gen.config)
                    frozen = gen.params
            except (OSError, ValueError, PeftFormatError) as e:
                raise UsageError(f"--adapter={args.adapter}: {e}") from None
            gen.params, gen.method_vars = gen.method.model_inputs(trainable, frozen)
            gen.name = f"{args.model}+{args.adapter}"
    else:
        from sft_jax.workdir import check_workdir

        check_workdir(args.workdir, args.step)
        gen = load_workdir(args.workdir, args.step, param_dtype=args.dtype)
    gen.mesh = mesh
    return gen


def _use_adapter_tokenizer(gen: Generator, adapter_dir: str, meta: dict) -> None:
    """An sft_jax adapter directory carries the run's tokenizer, template name and stop ids: generate as the
    work directory does."""
    if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        gen.tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        t = getattr(gen.tokenizer, "chat_template", None)
        gen.template = (t.get("default") if isinstance(t, dict) else t) or None
    if meta.get("template"):
        from sft_jax.data.templates import get_template

        gen.template = get_template(meta["template"])
    if meta.get("eos_ids"):
        gen.eos_ids = [int(i) for i in meta["eos_ids"]]


def _interactive(gen: Generator, args, stdin=None, stdout=None) -> None:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not gen.template:
        raise UsageError(f"{gen.name}: --interactive needs a chat template (the tokenizer has none)")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    n = 0
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=stdout, flush=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = gen.encode_messages(history)
        try:
            (out, _), = gen.generate_ids([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed + n,
                                         truncate_prompt=getattr(args, "truncate_prompt", False))
        except ContextLengthError as e:  # the history outgrew the context: say so, keep the session
            history.pop()
            print(f"(error: {e}; /reset clears the history)", file=stdout, flush=True)
            continue
        reply = gen.decode(out)
        history.append({"role": "assistant", "content": reply})
        print(reply, file=stdout, flush=True)
        n += 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    raw = _check_args(args)
    gen = _load(args)
    if args.interactive:
        _interactive(gen, args)
        return 0
    tools = _read_tools(args.tools) if args.tools else None
    prompts: list[tuple[str | None, list[int]]] = [(p, gen.encode_prompt(p, args.system, tools)) for p in args.prompt]
    prompts += [(None, r) for r in raw]
    vocab = gen.config.vocab_size
    for _, ids in prompts:
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    outs = gen.generate_ids([ids for _, ids in prompts], max_new_tokens=args.max_new_tokens,
                            truncate_prompt=args.truncate_prompt,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    results = [
        {"prompt": p, "prompt_ids": ids, "ids": out, "text": gen.decode(out), "finish_reason": why}
        for (p, ids), (out, why) in zip(prompts, outs)
    ]
    if tools:
        for r in results:
            r["tool_calls"] = gen.tool_calls(r["ids"])
    if args.json:
        print(json.dumps({"generations": results}, ensure_ascii=False))
    else:
        for i, r in enumerate(results):
            if len(results) > 1:
                print(f"=== {i}: {r['prompt'] if r['prompt'] is not None else r['prompt_ids']}")
            print(r["text"] if r["text"] is not None else " ".join(map(str, r["ids"])))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

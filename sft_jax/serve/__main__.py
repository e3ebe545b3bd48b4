"""Serve a trained work directory or a Hugging Face model with an OpenAI-compatible HTTP API.

    python -m sft_jax.serve --workdir=DIR [--step=N|latest|best] | --model=HF_DIR [--adapters=name=DIR,...]
        [--host=127.0.0.1] [--port=8000] [--served_model_name=NAME]
        [--max_batch=8] [--max_model_len=N] [--max_queue=64] [--tensor_parallel=1] [--dtype=float32|bfloat16]

The model id is `--served_model_name` (default: the directory's base name).  `--adapters` adds
models over the same base, each `name=DIR` with DIR a training work directory (its method and
trained tree; its own template and stop ids) or a PEFT adapter directory (adapter_config.json; the
base's template): a request's `model` picks one, and requests for different low-rank adapters are
decoded in one batch (`sft_jax.serve.adapters`); other methods run in an engine of their own.
Each engine compiles its decode step and every prefill length bucket before the port opens (no
request compiles).
SIGTERM / Ctrl-C: stop admitting (503), finish the in-flight requests (up to --drain_timeout s),
exit 0.  Bad arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import jax
import uvicorn

from sft_jax import generate as gen_lib
from sft_jax import peft
from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli
from sft_jax.peft import PeftFormatError
from sft_jax.serve.server import DrainingServer, build_models, create_app
from sft_jax.sharding import ShardingError, tensor_parallel_mesh
from sft_jax.workdir import STEP_HELP, check_workdir, parse_step

PROG = "python -m sft_jax.serve"
log = logging.getLogger("sft_jax.serve")


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory")
    p.add_argument("--workdir", default=None, help="a training work directory")
    p.add_argument("--step", default=None, help=STEP_HELP)
    p.add_argument("--served_model_name", default=None, help="model id (default: the directory's name)")
    p.add_argument("--adapters", default="", help="name=DIR,... : work directories or PEFT adapter directories")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=8, help="decode slots (sequences decoded together)")
    p.add_argument("--max_model_len", type=int, default=None,
                   help="context per slot, prompt + completion (default: min(max_position_embeddings, 2048))")
    p.add_argument("--max_queue", type=int, default=64, help="sequences that may wait for a slot (then 429)")
    p.add_argument("--tensor_parallel", type=int, default=1, help="devices to shard the weights over")
    p.add_argument("--dtype", default=None, help="param dtype to load: float32 | bfloat16")
    p.add_argument("--drain_timeout", type=float, default=120.0, help="seconds to finish requests on SIGTERM")
    p.add_argument("--log_level", default="info")
    return p


def _check_args(args) -> None:
    if (args.model is None) == (args.workdir is None):
        raise UsageError("give exactly one of --model=HF_DIR or --workdir=DIR")
    if args.step is not None and args.workdir is None:
        raise UsageError("--step needs --workdir")
    parse_step(args.step)  # N | latest | best, the resolver of export/generate/eval (WorkdirError: exit 2)
    for name in ("max_batch", "max_queue", "tensor_parallel"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max_model_len must be >= 2, got {args.max_model_len}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    if args.dtype not in (None, "float32", "bfloat16"):
        raise UsageError(f"--dtype={args.dtype!r} is not one of float32, bfloat16")
    if args.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise UsageError(f"--log_level={args.log_level!r} is not one of debug, info, warning, error, critical")


def parse_adapters(spec: str) -> list[tuple[str, str]]:
    """`name=DIR,name2=DIR2` -> [(name, DIR), ...] (UsageError on a malformed or repeated name)."""
    out: list[tuple[str, str]] = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapters: expected name=DIR, got {item!r}")
        if name in [n for n, _ in out]:
            raise UsageError(f"--adapters: the name {name!r} is given twice")
        out.append((name, path))
    return out


def load_adapter(path: str, base):
    """A Generator for an adapter directory over `base` (a Generator): a work directory (its own
    method, trained tree, template, stop ids) or a PEFT adapter directory (read by the method whose
    PEFT format it is; the base's tokenizer, template and stop ids)."""
    if os.path.isfile(os.path.join(path, "run.json")):
        check_workdir(path)
        return gen_lib.load_workdir(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UsageError(f"--adapters: {path} has neither run.json (a work directory) nor adapter_config.json "
                         f"(a PEFT adapter)")
    errors = []
    for cls in peft.METHODS.values():
        try:
            trainable, method = cls.load_peft(path, base.params)
        except PeftFormatError as e:
            errors.append(f"{cls.name}: {e}")
            continue
        frozen = method.frozen_base(base.params, base.config, jax.random.PRNGKey(0))
        params, method_vars = method.model_inputs(trainable, frozen)
        return dataclasses.replace(base, params=params, method=method, method_vars=method_vars, name=path)
    raise UsageError(f"--adapters: no method reads {path}: " + "; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    adapters = parse_adapters(args.adapters)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sft_jax").setLevel(args.log_level.upper())
    if args.model is not None:
        gen_lib.check_model_dir(args.model)
    else:
        check_workdir(args.workdir, args.step)
    try:
        mesh = tensor_parallel_mesh(args.tensor_parallel)
    except ShardingError as e:
        raise UsageError(f"--tensor_parallel: {e}") from None
    t0 = time.time()
    if args.model is not None:
        gen = gen_lib.load_model_dir(args.model, param_dtype=args.dtype or "float32")
    else:
        gen = gen_lib.load_workdir(args.workdir, args.step, param_dtype=args.dtype)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model or args.workdir))
    entries = [(name, gen)] + [(n, load_adapter(path, gen)) for n, path in adapters]
    if len({n for n, _ in entries}) < len(entries):
        raise UsageError(f"--adapters: a name repeats the base model's id {name!r}")
    try:
        models = build_models(entries, max_batch=args.max_batch, max_len=args.max_model_len,
                              max_queue=args.max_queue, mesh=mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    engines = list({id(m.engine): m.engine for m in models}.values())
    log.info("loaded %d model(s) in %.1fs into %d engine(s); compiling the prefill buckets %s + the decode step "
             "(batch %d)", len(models), time.time() - t0, len(engines), engines[0].buckets, args.max_batch)
    t0 = time.time()
    for e in engines:
        e.warmup()
        e.start()
    log.info("warm-up done in %.1fs; serving %s on http://%s:%d/v1", time.time() - t0,
             ", ".join(m.name for m in models), args.host, args.port)
    config = uvicorn.Config(create_app(models), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    DrainingServer(config, engines).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

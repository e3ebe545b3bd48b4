"""Serve a trained work directory or a Hugging Face model with an OpenAI-compatible HTTP API.

    python -m sft_jax.serve --workdir=DIR [--step=N] | --model=HF_DIR
        [--host=127.0.0.1] [--port=8000] [--served_model_name=NAME]
        [--max_batch=8] [--max_model_len=N] [--max_queue=64] [--tensor_parallel=1] [--dtype=float32|bfloat16]

The model id is `--served_model_name` (default: the directory's base name).  The engine compiles
its decode step and every prefill length bucket before the port opens (no request compiles).
SIGTERM / Ctrl-C: stop admitting (503), finish the in-flight requests (up to --drain_timeout s),
exit 0.  Bad arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import uvicorn

from sft_jax import generate as gen_lib
from sft_jax.export import OneLineArgumentParser, UsageError, run_cli
from sft_jax.serve.engine import Engine
from sft_jax.serve.server import DrainingServer, create_app, served_from_generator
from sft_jax.sharding import ShardingError, tensor_parallel_mesh
from sft_jax.workdir import check_workdir

PROG = "python -m sft_jax.serve"
log = logging.getLogger("sft_jax.serve")


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory")
    p.add_argument("--workdir", default=None, help="a training work directory")
    p.add_argument("--step", type=int, default=None, help="--workdir checkpoint step (default: the latest)")
    p.add_argument("--served_model_name", default=None, help="model id (default: the directory's name)")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
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
    try:
        served = served_from_generator(gen, name)
        engine = Engine(gen.params, gen.config, method=gen.method, method_vars=gen.method_vars,
                        max_batch=args.max_batch,
                        max_len=args.max_model_len, max_queue=args.max_queue, mesh=mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    log.info("loaded %s in %.1fs; compiling %d prefill buckets %s + the decode step (batch %d)", gen.name,
             time.time() - t0, len(engine.buckets), engine.buckets, engine.max_batch)
    t0 = time.time()
    engine.warmup()
    log.info("warm-up done in %.1fs; serving model '%s' on http://%s:%d/v1", time.time() - t0, name, args.host,
             args.port)
    engine.start()
    config = uvicorn.Config(create_app(engine, [served]), host=args.host, port=args.port,
                            log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout)
    DrainingServer(config, engine).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

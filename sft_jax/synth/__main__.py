"""Build SFT data from a teacher model.

    python -m sft_jax.synth self-instruct --teacher=T --seed-tasks=FILE --num=N --out=FILE [...]
    python -m sft_jax.synth evol-instruct --teacher=T --data=FILE --rounds=K --out=FILE [...]
    python -m sft_jax.synth distill       --teacher=T --prompts=FILE --n=K --out=FILE [...]

T is an OpenAI-compatible endpoint (`http://host:port/v1` with `--teacher-model=NAME`; the API key is
read from the environment variable named by `--api-key-env`, default OPENAI_API_KEY), or an sft_jax
model in this process (`hf:DIR`, `workdir:DIR[@STEP]`).  The output is JSONL in the trainer's
`alpaca` (default) or `messages` format; `OUT.synth/` beside it holds the parameters, the journal
that makes an interrupted job resume where it stopped, and summary.json.  Rerun the same command to
resume.  The filter summary is printed at the end.  Bad arguments or inputs: one line on stderr, exit 2.
"""

from __future__ import annotations

import sys

from sft_jax.data.formats import DataError
from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli
from sft_jax.synth import distill, evol_instruct, self_instruct
from sft_jax.synth.inputs import load_prompts, load_seed_tasks
from sft_jax.synth.jobs import Job, JobError
from sft_jax.synth.teachers import TeacherError, make_teacher

PROG = "python -m sft_jax.synth"
# settings that do not change the rows: recorded, but a resume may use other values
RUNTIME = ("concurrency", "max_retries", "request_timeout", "backoff", "batch_size", "api_key_env", "no_progress",
           "overwrite")


def _common(p: OneLineArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="http(s)://HOST:PORT/v1 | hf:DIR | workdir:DIR[@STEP]")
    p.add_argument("--teacher-model", default="", help="model name for an HTTP teacher")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=8, help="HTTP: requests in flight at once")
    p.add_argument("--max-retries", type=int, default=5, help="HTTP: retries on 429 / 5xx / timeouts")
    p.add_argument("--request-timeout", type=float, default=120.0, help="HTTP: seconds per request")
    p.add_argument("--backoff", type=float, default=1.0, help="HTTP: first retry delay in seconds (doubles)")
    p.add_argument("--batch-size", type=int, default=8, help="in-process teacher: prompts decoded together")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--format", default="alpaca", choices=("alpaca", "messages"), help="output row format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens per teacher answer")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--overwrite", action="store_true", help="discard an earlier job's output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)
    s = sub.add_parser("self-instruct", help="Self-Instruct from seed tasks")
    _common(s)
    s.add_argument("--seed-tasks", required=True, help="JSONL of {instruction, instances, is_classification}")
    s.add_argument("--num", type=int, required=True, help="instructions to generate")
    s.add_argument("--prompts-per-iteration", type=int, default=4)
    s.add_argument("--max-iterations", type=int, default=0, help="0: 4 x num / prompts-per-iteration, >= 10")
    s.add_argument("--rouge-threshold", type=float, default=0.7)
    s.add_argument("--max-instances", type=int, default=3, help="instances kept per instruction")
    s.add_argument("--language", default="en", choices=("en", "any"), help="en: drop non-English instructions")
    s.add_argument("--temperature", type=float, default=0.7)
    e = sub.add_parser("evol-instruct", help="Evol-Instruct over rounds")
    _common(e)
    e.add_argument("--data", required=True, help="instructions: JSON/JSONL rows (prompt / instruction / messages)")
    e.add_argument("--rounds", type=int, required=True)
    e.add_argument("--chunk", type=int, default=16, help="instructions per committed unit")
    e.add_argument("--no-original", action="store_true", help="do not write the round-0 originals")
    e.add_argument("--temperature", type=float, default=0.7)
    d = sub.add_parser("distill", help="best-of-n distillation")
    _common(d)
    d.add_argument("--prompts", required=True, help="prompts: JSON/JSONL rows (prompt / instruction / messages)")
    d.add_argument("--n", type=int, required=True, help="candidates per prompt")
    d.add_argument("--scorer", default="judge", choices=distill.SCORERS)
    d.add_argument("--judge", default="", help="judge teacher spec (default: the teacher)")
    d.add_argument("--judge-model", default="", help="model name for an HTTP judge")
    d.add_argument("--chunk", type=int, default=8, help="prompts per committed unit")
    d.add_argument("--temperature", type=float, default=1.0)
    return p


def _check(args) -> None:
    positive = {"concurrency": args.concurrency, "batch_size": args.batch_size, "max_tokens": args.max_tokens}
    for k in ("num", "prompts_per_iteration", "max_instances", "rounds", "chunk", "n"):
        if hasattr(args, k):
            positive[k] = getattr(args, k)
    for k, v in positive.items():
        if v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_retries < 0 or args.request_timeout <= 0 or args.backoff < 0:
        raise UsageError("need --max-retries >= 0, --request-timeout > 0 and --backoff >= 0")
    if args.command == "self-instruct" and not 0 < args.rouge_threshold <= 1:
        raise UsageError(f"--rouge-threshold must be in (0, 1], got {args.rouge_threshold}")


def _teacher(spec: str, model: str, args):
    return make_teacher(spec, model=model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                        max_retries=args.max_retries, timeout=args.request_timeout, backoff=args.backoff,
                        batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    try:
        return _run(args)
    except (DataError, TeacherError, JobError) as e:
        raise UsageError(str(e)) from None


def _run(args) -> int:
    # inputs first: a bad file fails before a model is loaded
    if args.command == "self-instruct":
        seeds = load_seed_tasks(args.seed_tasks)
        if len(seeds) < 8:
            raise UsageError(f"--seed-tasks={args.seed_tasks}: {len(seeds)} tasks; Self-Instruct needs at least 8")
    else:
        rows = load_prompts(args.data if args.command == "evol-instruct" else args.prompts)  # never empty
    runtime = set(RUNTIME)
    for k in ("teacher", "judge"):  # an endpoint's address may change between runs; its model name may not
        if getattr(args, k, "").startswith(("http://", "https://")):
            runtime.add(k)
    vals = {k: v for k, v in vars(args).items() if k not in runtime}
    job = Job(args.out, vals, runtime={k: v for k, v in vars(args).items() if k in runtime},
              overwrite=args.overwrite, progress=not args.no_progress,
              unit_name="instructions" if args.command != "distill" else "prompts")
    if job.resumed:
        print(f"resuming {args.out}: {job.n_rows} rows in {len(job.units)} committed units", file=sys.stderr)
    teacher = _teacher(args.teacher, args.teacher_model, args)
    if args.command == "self-instruct":
        o = self_instruct.Options(num=args.num, prompts_per_iteration=args.prompts_per_iteration,
                                  max_iterations=args.max_iterations, rouge_threshold=args.rouge_threshold,
                                  max_instances=args.max_instances, english=args.language == "en",
                                  temperature=args.temperature, top_p=0.5 if args.top_p is None else args.top_p,
                                  max_tokens=args.max_tokens, seed=args.seed, format=args.format)
        extra = self_instruct.SelfInstruct(teacher, seeds, o, job).run()
    elif args.command == "evol-instruct":
        o = evol_instruct.Options(rounds=args.rounds, batch=args.chunk, include_original=not args.no_original,
                                  temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                                  max_tokens=args.max_tokens, seed=args.seed, format=args.format)
        extra = evol_instruct.EvolInstruct(teacher, rows, o, job).run()
    else:
        judge = _teacher(args.judge, args.judge_model or args.teacher_model, args) if args.judge else None
        o = distill.Options(n=args.n, scorer=args.scorer, batch=args.chunk, temperature=args.temperature,
                            top_p=1.0 if args.top_p is None else args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed, format=args.format)
        extra = distill.Distill(teacher, rows, o, job, judge=judge).run()
    job.finish(extra)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

"""The one error-to-exit path of every command-line entry point.

Every ``python -m sft_jax.<tool>`` ends in :func:`run_cli` (argparse tools) or :func:`run_absl`
(absl / ml_collections tools: train, data.inspect, data.quality).  A known condition prints ONE line
``error: <message>`` on stderr and exits

- **2** for bad input or configuration (a wrong flag or config field, bad data, a model directory
  that cannot be read, a target that exists, ...): fix the input and rerun;
- **1** for a run that failed (a non-finite loss, no readable checkpoint, the work directory
  locked by another run, a disk that filled up, ...): the input was fine, the run could not go on;
- **130** on Ctrl-C.

The traceback is printed only with ``--verbose`` / ``-v`` (stripped from the arguments before the
tool parses them) or ``SFT_JAX_VERBOSE=1``.  An exception of a kind not listed here is a bug: it
keeps its traceback (and exit 1) so that it can be reported.

The known kinds are named as ``module:Class`` and looked up in ``sys.modules`` only when an error
happens (a module that was never imported cannot have raised), so importing this file pulls in
nothing heavy (no jax).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
VERBOSE_FLAGS = ("--verbose", "-v")


class UsageError(Exception):
    """A bad command-line argument or input: one line on stderr, exit code 2."""


class RunFailed(Exception):
    """A run that could not go on although its input was fine: one line on stderr, exit code 1."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``) on stderr and exit code 2;
    it knows ``--verbose`` / ``-v`` (the traceback of an error; see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true",
                          help="print the traceback of an error (default: one line)")

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


# Bad input / configuration -> exit 2.
BAD_INPUT = (
    "sft_jax.cli:UsageError", "sft_jax.config:ConfigError", "sft_jax.data.errors:DataError",
    "sft_jax.workdir:WorkdirError", "sft_jax.staged_dir:TargetExistsError",
    "sft_jax.models.config:UnsupportedModelError", "sft_jax.models.config:ModelConfigError",
    "sft_jax.models.hf_io:CheckpointMismatchError",
    "sft_jax.gguf_export:GGUFExportError", "sft_jax.peft.base:PeftFormatError", "sft_jax.peft.base:NotMergeable",
    "sft_jax.peft.base:MethodConfigError", "sft_jax.sharding:ShardingError", "sft_jax.plan:PlanError",
    "sft_jax.report:ReportError", "sft_jax.data.quality:QualityError", "sft_jax.serve.adapters:NotStackable",
    "sft_jax.serve.engine:ContextLengthError", "sft_jax.generate:ContextLengthError", "jinja2.exceptions:TemplateError",
    "safetensors_rust:SafetensorError", "absl.flags._exceptions:Error",
    "sft_jax.adapter_format:AdapterFormatError",
)
# A failed run -> exit 1.
FAILED = (
    "sft_jax.cli:RunFailed", "sft_jax.train:TrainError", "sft_jax.train_loop:TrainError", "sft_jax.workdir_lock:WorkdirLocked",
    "sft_jax.synth.jobs:JobError", "sft_jax.synth.teachers:TeacherError", "sft_jax.serve.engine:EngineError",
)
# OSErrors about a path the user gave -> exit 2; any other OSError (a full disk, I/O) -> exit 1.
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST,
                errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.ELOOP}
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _kinds(names) -> tuple[type, ...]:
    out = []
    main = sys.modules.get("__main__")  # `python -m sft_jax.train` runs that module as __main__:
    main_name = getattr(getattr(main, "__spec__", None), "name", None)  # its classes live there
    for name in names:
        mod, _, cls = name.partition(":")
        for m in (sys.modules.get(mod), main if main_name == mod else None):
            t = getattr(m, cls, None) if m is not None else None
            if isinstance(t, type):
                out.append(t)
    return tuple(out)


def exit_code(e: BaseException) -> int | None:
    """The exit code of a known condition, None for an unexpected exception (a bug)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, _kinds(FAILED)):
        return EXIT_FAILED
    if isinstance(e, _kinds(BAD_INPUT)):
        return EXIT_BAD_INPUT
    if isinstance(e, OSError):
        if e.errno is None or e.errno in _PATH_ERRNOS or isinstance(e, _PATH_ERRORS):
            return EXIT_BAD_INPUT  # a path the user gave (or a library's OSError about its input)
        return EXIT_FAILED  # a full disk, an I/O error, ...
    if isinstance(e, MemoryError):
        return EXIT_FAILED
    return None


def message(e: BaseException) -> str:
    """One line for ``e`` (whitespace collapsed; a disk-full error says so)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = e.filename or ""
        free = ""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(where)) if where else ".")
            free = f"; {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"
        except OSError:
            pass
        return f"no space left on the device{' writing ' + str(where) if where else ''}{free}"
    text = str(e)
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    text = " ".join(text.split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text or type(e).__name__


def strip_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose`` / ``-v`` and whether one was there (or SFT_JAX_VERBOSE=1)."""
    verbose = os.environ.get("SFT_JAX_VERBOSE", "") not in ("", "0")
    rest = []
    for a in argv:
        if a in VERBOSE_FLAGS or a == "--verbose=true":
            verbose = True
        else:
            rest.append(a)
    return rest, verbose


def report(e: BaseException, prog: str, verbose: bool) -> int:
    """Print ``e`` the CLI way and return its exit code; re-raises an unexpected exception.
    (``prog``, the tool's name, prefixes nothing: every tool's line starts with ``error:``.)"""
    code = exit_code(e)
    if code is None:
        raise e
    if verbose:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    print(f"error: {message(e)}", file=sys.stderr)
    return code


def run_cli(main_fn, argv: list[str] | None, prog: str) -> int:
    """Run ``main_fn(argv) -> int | None`` (an argparse tool) through the shared error path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _, verbose = strip_verbose(argv)  # the parser knows --verbose too: argv is passed unchanged
    try:
        return int(main_fn(argv) or 0)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report() re-raises what it does not know
        return report(e, prog, verbose)


def _config_flag_error(e: BaseException, argv: list[str]) -> str | None:
    """An ml_collections override of an unknown field (``--config.a.b=v``) -> one line, else None."""
    if not isinstance(e, (AttributeError, KeyError)):
        return None
    text = str(e.args[0]) if e.args else str(e)
    text = text.replace("\\n", "\n").replace("\\'", "'")
    first, _, hint = text.partition("\n")
    field = first.strip("'\" ")
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                 and (a.split("=", 1)[0].endswith("." + field) or f".{field}." in a.split("=", 1)[0])), None)
    hint = " ".join(hint.strip("'\" ").split())
    return f"{flag + ': ' if flag else ''}unknown config field {field!r}" + (f"; {hint}" if hint else "")


class _BadFlags(UsageError):
    """A flag that does not parse (raised by :func:`run_absl`'s flag parser)."""


def _parse_flags(argv: list[str]):
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise _BadFlags(message(e)) from e
    except (AttributeError, KeyError, ValueError, TypeError) as e:  # ml_collections' --config.* overrides
        raise _BadFlags(_config_flag_error(e, argv) or f"bad flag value: {message(e)}") from e


def run_absl(main_fn, argv: list[str] | None, prog: str) -> int:
    """Run an absl ``main_fn(argv) -> int | None`` under ``absl.app.run`` through the shared error path.

    Flag errors (an unknown flag, a bad value, an unknown ``--config.field``) and ``app.UsageError``
    are bad input (exit 2), one line each (not absl's usage text)."""
    from absl import app

    argv, verbose = strip_verbose(list(sys.argv if argv is None else argv))
    result: list[int] = []

    def _wrapped(args):
        try:
            result.append(int(main_fn(args) or 0))
        except app.UsageError as e:
            raise UsageError(str(e)) from e

    try:
        app.run(_wrapped, argv=argv, flags_parser=_parse_flags)
    except SystemExit as e:
        if result:
            return result[0]
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_FAILED)
    except BaseException as e:  # noqa: BLE001 - report() re-raises what it does not know
        return report(e, prog, verbose)
    return result[0] if result else EXIT_OK


__all__ = ["UsageError", "RunFailed", "OneLineArgumentParser", "run_cli", "run_absl", "report", "exit_code",
           "message", "strip_verbose", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

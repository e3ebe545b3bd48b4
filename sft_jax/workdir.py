"""The work directory of a training run: `run.json` (what is needed to rebuild the model) and
loading a trained run back (`load_run`) for export, generation or evaluation.

Layout (the trainer writes it; export/generate read it):

    WORKDIR/run.json        {"format": 1, "base_model", "tokenizer": "tokenizer", "template",
                             "peft": {"method": name, <name>: {fields}},
                             "model": {dtype, param_dtype, scan_layers}, "eos_ids", "config"}
    WORKDIR/tokenizer/      tokenizer files (with the chat_template used in training)
    WORKDIR/base_model/     only when the project made the base (tiny): an HF dir (save_hf)
    WORKDIR/checkpoints/<step>/   Orbax: item 'state' = {"trainable", "opt_state", "step", "rng"},
                                   item 'data' (grain iterator), item 'meta' (JSON)
    WORKDIR/checkpoint_best/<step>/  (checkpoint.keep_best) the best-eval checkpoint, same items,
                                   outside the keep-N rotation of checkpoints/; `--step=best` reads it

`base_model` is an absolute path, or a path relative to WORKDIR (e.g. "base_model"); when an
absolute path no longer exists but WORKDIR/base_model does (a copied work directory), the
latter is used.  Everything heavy (jax, orbax, transformers) is imported lazily so that the
argument checks of the CLIs (`check_workdir`) answer before any of it loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

RUN_FORMAT = 2  # 2: the fine-tuning method under "peft" (format 1 is not read any more)
RUN_JSON = "run.json"


class WorkdirError(ValueError):
    """A work directory (or a step in it) that cannot be used; the message is one line."""


# ------------------------------------------------------------------------------ run.json


def _to_plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return x


def _model_dict(model_policy: Any) -> dict:
    d = model_policy
    if not isinstance(d, dict):
        d = _to_plain(d) if hasattr(d, "to_dict") else {k: getattr(d, k) for k in ("dtype", "param_dtype", "scan_layers", "kernels")
                                                        if hasattr(d, k)}
    return {
        "dtype": str(d.get("dtype", "float32")),
        "param_dtype": str(d.get("param_dtype", "float32")),
        "scan_layers": bool(d.get("scan_layers", False)),
        "kernels": str(d.get("kernels", "auto")),
    }


def write_run_json(workdir, *, base_model: str, template: str, method: Any, model_policy: Any,
                   eos_ids, config: Any, tokenizer: str = "tokenizer") -> str:
    """Write WORKDIR/run.json (atomically) and return its path.

    base_model: the HF base directory (made absolute unless it lies inside `workdir`, then kept
      relative so the work directory can be moved); template: a built-in template name or "";
    method: the run's `sft_jax.peft` Method (recorded as `method.run_config()`); model_policy: `cfg.model` / a ModelConfig / a dict with dtype, param_dtype,
      scan_layers; eos_ids: the ids that end an assistant turn (end-of-turn token and EOS);
    config: the full ml_collections config (or a dict).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    base = os.path.abspath(os.fspath(base_model))
    rel = os.path.relpath(base, workdir)
    if not rel.startswith(".."):
        base = rel
    run = {
        "format": RUN_FORMAT,
        "base_model": base,
        "tokenizer": tokenizer,
        "template": template or "",
        "peft": method.run_config(),
        "model": _model_dict(model_policy),
        "eos_ids": [int(i) for i in (eos_ids or [])],
        "config": json.loads(json.dumps(_to_plain(config) or {}, default=str)),
    }
    path = os.path.join(workdir, RUN_JSON)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_run_json(workdir) -> dict:
    """The parsed run.json; WorkdirError (one line) when the directory or file is missing/bad."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        raise WorkdirError(f"work directory not found: {workdir}")
    path = os.path.join(workdir, RUN_JSON)
    if not os.path.isfile(path):
        raise WorkdirError(f"{path} not found (is {workdir} a sft_jax work directory?)")
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WorkdirError(f"cannot read {path}: {e}") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise WorkdirError(f"{path}: unsupported format {run.get('format') if isinstance(run, dict) else run!r} "
                           f"(expected {RUN_FORMAT})")
    for k in ("base_model", "peft", "model"):
        if k not in run:
            raise WorkdirError(f"{path}: missing field {k!r}")
    return run


def base_model_dir(workdir, run: dict) -> str:
    """Resolve run.json's base_model (relative to WORKDIR, or absolute; falls back to WORKDIR/base_model)."""
    workdir = os.path.abspath(os.fspath(workdir))
    p = run["base_model"]
    cand = p if os.path.isabs(p) else os.path.join(workdir, p)
    if os.path.isfile(os.path.join(cand, "config.json")):
        return cand
    local = os.path.join(workdir, "base_model")
    if os.path.isfile(os.path.join(local, "config.json")):
        return local
    raise WorkdirError(f"base model of {workdir} not found: {cand} has no config.json")


def tokenizer_dir(workdir, run: dict) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), run.get("tokenizer") or "tokenizer")


BEST_DIR = "checkpoint_best"  # checkpoint.keep_best: the best-eval checkpoint, outside the rotation


def available_steps(workdir, best: bool = False) -> list[int]:
    """Finalised checkpoint steps (Orbax renames a step's tmp dir to `<step>` when it is committed);
    `best`: those of WORKDIR/checkpoint_best (the best-eval checkpoint)."""
    d = os.path.join(os.fspath(workdir), BEST_DIR if best else "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n, "state")))


STEP_HELP = "--workdir checkpoint: N, latest (default) or best (checkpoint.keep_best)"  # every CLI's --step


def parse_step(value) -> int | str | None:
    """A `--step` value: "latest" / None -> None, "best" -> "best", "N" -> N; WorkdirError otherwise."""
    if value is None or value == "latest":
        return None
    if value == "best" or isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise WorkdirError(f"--step must be best, latest or a step number, got {value!r}")


def resolve_step(workdir, step: int | str | None = None) -> int:
    """The checkpoint step of `step` (None = the latest, "best" = the best-eval one, N)."""
    step = parse_step(step)
    if step == "best":
        best = available_steps(workdir, best=True)
        if not best:
            raise WorkdirError(f"no best checkpoint in {os.path.join(os.fspath(workdir), BEST_DIR)} (the run "
                               "keeps one with checkpoint.keep_best=True and evaluations during training)")
        return best[-1]
    steps = available_steps(workdir)
    if not steps:
        raise WorkdirError(f"no checkpoints in {os.path.join(os.fspath(workdir), 'checkpoints')}")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise WorkdirError(f"step {step} not found in {workdir} (available: {', '.join(map(str, steps))})")
    return int(step)


def state_dir(workdir, step: int | str | None = None) -> tuple[int, str]:
    """-> (step, the directory of its saved state) for a `--step` value (see `resolve_step`)."""
    n = resolve_step(workdir, step)
    root = BEST_DIR if parse_step(step) == "best" else "checkpoints"
    return n, os.path.join(os.path.abspath(os.fspath(workdir)), root, str(n), "state")


def pin_state(workdir, step: int | str | None = None, attempts: int = 3):
    """-> (step, its state directory, a held `step_pins.StepPin`) for a `--step` value: the step is pinned so
    that a trainer running in the work directory does not rotate it away while it is read (release the pin
    when done).  A step deleted between resolving and pinning: `latest`/`best` resolve again (a newer
    checkpoint replaced it); an explicit N is a WorkdirError naming it."""
    from sft_jax.step_pins import StepPin

    for _ in range(attempts):
        n, sdir = state_dir(workdir, step)
        pin = StepPin(os.path.dirname(os.path.dirname(sdir)), n)
        if os.path.isdir(sdir):
            return n, sdir, pin
        pin.release()
        if parse_step(step) not in (None, "best"):
            break
    raise WorkdirError(f"step {parse_step(step) or n} of {workdir} was deleted (rotated away by a running trainer) "
                       f"before it could be read; available: {', '.join(map(str, available_steps(workdir))) or 'none'}")


def check_workdir(workdir, step: int | str | None = None) -> tuple[dict, int, str]:
    """Cheap checks (no jax): -> (run.json dict, resolved step, base model dir)."""
    run = read_run_json(workdir)
    base = base_model_dir(workdir, run)
    s = resolve_step(workdir, step)
    from sft_jax.workdir_lock import warn_if_training

    warn_if_training(workdir, s)  # readers do not refuse a running trainer; they say so (workdir_lock.py)
    return run, s, base


# --------------------------------------------------------------------------------- load


@dataclasses.dataclass
class Run:
    config_dict: dict  # the full training config (plain dict)
    model_config: Any  # sft_jax.models.config.ModelConfig
    frozen: dict  # the method's frozen tree (`Method.frozen_base` of the base; {} for full fine-tuning)
    trainable: dict  # the method's trained tree (LoRA {..path..: {A, B}}; full: the whole params)
    method: Any  # the sft_jax.peft Method recorded in run.json
    tokenizer: Any  # transformers tokenizer (None when load_tokenizer=False)
    eos_ids: list[int]
    step: int
    workdir: str = ""
    template: str = ""  # built-in template name, or "" (the tokenizer's own chat_template)
    base_model: str = ""  # resolved base model directory
    tokenizer_path: str = ""  # WORKDIR/tokenizer
    opt_state: Any = None  # only with load_run(..., with_opt_state=True)
    rng: Any = None  # only with load_run(..., with_opt_state=True)

    def merged_params(self) -> dict:
        """Plain weights (`Method.merge`; raises `peft.NotMergeable` with the reason)."""
        return self.method.merge(self.trainable, self.frozen, self.model_config)

    def merged_config(self):
        """The ModelConfig of `merged_params` (`Method.merged_config`: e.g. BitFit's bias flags)."""
        return self.method.merged_config(self.trainable, self.model_config)

    def chat_template(self) -> str | None:
        """The jinja template training rendered with (built-in by name, else the tokenizer's)."""
        if self.template:
            from sft_jax.data.templates import get_template

            return get_template(self.template)
        t = getattr(self.tokenizer, "chat_template", None)
        return t.get("default") if isinstance(t, dict) else t


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _saved_metadata(state_dir: str) -> dict:
    """The saved state's tree of array metadata (shape, dtype), without reading arrays."""
    import logging

    import orbax.checkpoint as ocp

    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # "Metadata file does not exist" for the item dir: harmless
    try:
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(state_dir)
    finally:
        absl_log.setLevel(level)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    return getattr(tree, "tree", tree)


def _restore(state_dir: str, target: dict, with_rng: bool):
    """Partial restore (Orbax PyTreeRestore(partial_restore=True)) of the keys of `target` onto the
    default device; `rng` (when asked) is restored as saved (raw key data)."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    target = dict(target)
    if with_rng:
        tree = _saved_metadata(state_dir)
        if "rng" in tree:
            m = tree["rng"]
            target["rng"] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=dev, dtype=s.dtype), target)
    return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                                                 partial_restore=True))


def load_run(workdir, step: int | str | None = None, *, param_dtype: str | None = None, dtype: str | None = None,
             with_opt_state: bool = False, load_tokenizer: bool = True) -> Run:
    """Load a trained run: the base (load_hf), the trained tree of checkpoint `step` (latest when
    None, "best": the best-eval checkpoint of checkpoint.keep_best), the tokenizer and stop ids.

    Only `trainable` and `step` are read from the checkpoint (Orbax partial restore); with
    `with_opt_state` also `opt_state` (abstract tree: `make_optimizer(cfg.train, 1)[0].init`) and
    `rng`.  param_dtype/dtype default to run.json's model policy.  Errors: WorkdirError (one line).
    The step is pinned while it is read (`pin_state`): a trainer running in the work directory keeps it.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    run, _, base = check_workdir(workdir, step)
    step, state_dir_, pin = pin_state(workdir, step)  # held until the arrays are read (a trainer's rotation waits)
    try:
        return _load_pinned(workdir, run, base, step, state_dir_, param_dtype=param_dtype, dtype=dtype,
                            with_opt_state=with_opt_state, load_tokenizer=load_tokenizer)
    finally:
        pin.release()


def _load_pinned(workdir: str, run: dict, base: str, step: int, state_dir_: str, *, param_dtype, dtype,
                 with_opt_state: bool, load_tokenizer: bool) -> Run:
    import jax
    import numpy as np

    from sft_jax import peft
    from sft_jax.models import hf_io, llama

    pol = _model_dict(run["model"])
    pdt = param_dtype or pol["param_dtype"]
    cdt = dtype or pol["dtype"]
    try:
        method = peft.from_run_config(run["peft"])
    except (ValueError, KeyError, TypeError) as e:
        raise WorkdirError(f"{os.path.join(workdir, RUN_JSON)}: bad field 'peft': {type(e).__name__}: {e}") from None
    policy = dict(dtype=cdt, param_dtype=pdt, scan_layers=pol["scan_layers"], kernels=pol["kernels"])
    rng = method_rng(run.get("config") or {})
    if method.needs_base_weights:
        model_config, params = hf_io.load_hf(base, transform=method.load_transform(), **policy)
        frozen = method.frozen_base(params, model_config, rng)
        abstract_tr = jax.eval_shape(lambda p, f: method.init_trainable(p, f, model_config, rng), params, frozen)
    else:  # the checkpoint holds every trained weight; the base gives shapes only
        model_config = hf_io.read_config(base, **policy)
        try:  # the trainer may have resized the vocabulary (added template tokens): trust the checkpoint
            saved_vocab = int(_saved_metadata(state_dir_)["trainable"]["embed"]["embedding"].shape[0])
        except Exception:  # noqa: BLE001 - the restore below reports unreadable checkpoints
            saved_vocab = model_config.vocab_size
        if saved_vocab != model_config.vocab_size:
            model_config = model_config.replace(vocab_size=saved_vocab)
        abstract = llama.abstract_params(model_config)
        frozen = method.frozen_base(abstract, model_config, rng)
        abstract_tr = jax.eval_shape(lambda p: method.init_trainable(p, frozen, model_config, rng), abstract)
    target: dict[str, Any] = {"trainable": abstract_tr, "step": jax.ShapeDtypeStruct((), np.int32)}
    if with_opt_state:
        import ml_collections

        from sft_jax.config import default_config
        from sft_jax.optim import make_optimizer

        cfg = default_config()
        cfg.update(ml_collections.ConfigDict(run.get("config") or {}))
        opt = make_optimizer(cfg.train, total_steps=1)[0]
        target["opt_state"] = jax.eval_shape(opt.init, abstract_tr)
    try:
        state = _restore(state_dir_, target, with_rng=with_opt_state)
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the message says which step
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkdirError(f"cannot restore step {step} of {workdir}: {type(e).__name__}: {msg}") from e

    tokenizer = None
    if load_tokenizer:
        tdir = tokenizer_dir(workdir, run)
        if not os.path.isdir(tdir):
            raise WorkdirError(f"tokenizer directory not found: {tdir}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tdir)
        if len(tokenizer) > model_config.vocab_size:
            raise WorkdirError(
                f"the tokenizer in {tdir} has {len(tokenizer)} tokens but the model's vocabulary is "
                f"{model_config.vocab_size}: a run that resized the vocabulary must save its resized base "
                "(WORKDIR/base_model) and point run.json's base_model at it")
    eos = [int(i) for i in run.get("eos_ids") or []]
    if not eos:
        eos = default_stop_ids(tokenizer, run.get("template", ""), model_config)
    return Run(
        config_dict=run.get("config") or {}, model_config=model_config, frozen=frozen,
        trainable=state["trainable"], method=method, tokenizer=tokenizer, eos_ids=eos,
        step=int(np.asarray(state.get("step", step))), workdir=workdir, template=run.get("template", "") or "",
        base_model=base, tokenizer_path=tokenizer_dir(workdir, run), opt_state=state.get("opt_state"), rng=state.get("rng"),
    )


def method_rng(config: dict):
    """The key a run's method was initialised with (`train.seed`; see train.py): `frozen_base` is
    recomputed from the base with it on every load."""
    import jax

    seed = int((config.get("train") or {}).get("seed", 0))
    return jax.random.fold_in(jax.random.PRNGKey(seed), 17)


def default_stop_ids(tokenizer, template: str, model_config=None, extra=()) -> list[int]:
    """Stop ids when none were recorded: the template's end-of-turn token (a built-in's, or any
    known end-of-turn marker the tokenizer's chat_template mentions) + the tokenizer's and the
    model's EOS."""
    ids: list[int] = []

    def add(i):
        if i is not None and int(i) >= 0 and int(i) not in ids:
            ids.append(int(i))

    if tokenizer is not None:
        from sft_jax.data.templates import END_OF_TURN, stop_token_ids

        if template:
            for i in stop_token_ids(tokenizer, template):
                add(i)
        tmpl = getattr(tokenizer, "chat_template", None) or ""
        tmpl = tmpl.get("default", "") if isinstance(tmpl, dict) else tmpl
        vocab = tokenizer.get_vocab()
        for s in sorted({v for v in END_OF_TURN.values() if v}):
            if s in tmpl and s in vocab:
                add(vocab[s])
        add(tokenizer.eos_token_id)
    for i in extra:
        add(i)
    if model_config is not None:
        for i in model_config.eos_token_ids:
            add(i)
    return ids

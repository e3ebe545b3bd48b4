"""Test setup: 8 fake CPU devices for sharding tests (must happen before jax is imported)."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One fresh persistent XLA compilation cache per test session (removed at its end; no state across
# runs): the many `python -m sft_jax.train/export/generate` subprocesses of the suite compile the
# same small programs again and again; with the cache only the first compiles them.  Subprocesses
# inherit it through the environment (JAX reads JAX_COMPILATION_CACHE_DIR at import; the trainer
# reads SFT_JAX_COMPILATION_CACHE).  SFT_JAX_TEST_XLA_CACHE=off turns it off.
# Under pytest-xdist (`-n 2`) the controller's conftest runs first and makes the directory; its workers
# inherit the environment and share it (their programs overlap; JAX writes an entry only when missing and
# reads a torn one as a miss: warning + recompile), and only the controller removes it.
_XLA_CACHE = None
_OWN_XLA_CACHE = False
if os.environ.get("SFT_JAX_TEST_XLA_CACHE", "on").lower() != "off":
    import tempfile

    _XLA_CACHE = os.environ.get("_SFT_JAX_TEST_XLA_CACHE_DIR") if os.environ.get("PYTEST_XDIST_WORKER") else None
    if not (_XLA_CACHE and os.path.isdir(_XLA_CACHE)):
        _XLA_CACHE = tempfile.mkdtemp(prefix="sft_jax_test_xla_")
        _OWN_XLA_CACHE = True
        os.environ["_SFT_JAX_TEST_XLA_CACHE_DIR"] = _XLA_CACHE
    os.environ["SFT_JAX_COMPILATION_CACHE"] = _XLA_CACHE
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = os.environ.get(
        "SFT_JAX_TEST_XLA_CACHE_MIN_SECS", "0.5")
else:
    os.environ["SFT_JAX_COMPILATION_CACHE"] = "off"
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """`../shared` beside the checkout; tests that need it skip cleanly without it."""
    if not (SHARED / "README.md").exists():
        pytest.skip(f"../shared not found at {SHARED} (real model/data tests need it)")
    return SHARED


@pytest.fixture(scope="session")
def repo_dir() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def stories260k_cli(shared_dir, tmp_path_factory) -> pathlib.Path:
    """../shared's stories260K converted once per session (per xdist worker) with `python -m sft_jax.convert
    llama2c`: the HF base of the CLI tests (test_dora_pissa, test_ia3_cli, test_prompts_cli, test_qlora_cli).
    Read-only for them: a run that resizes the vocabulary writes its base into its own work directory."""
    from helpers import run_module

    out = tmp_path_factory.mktemp("stories260K_cli") / "stories260K"
    assets = shared_dir / "assets" / "stories260K"
    run_module("sft_jax.convert", "llama2c", f"--checkpoint={assets / 'stories260K.bin'}",
               f"--tokenizer={assets / 'tok512.model'}", f"--out={out}", cwd=REPO)
    return out


# pytest-xdist (`-n 2 --dist loadfile`): each file runs whole on one worker, files handed out in order as
# workers free up.  The longest files go first (longest-first keeps the two workers' ends close); xdist's
# own default order (files with the most tests first) would leave the few-test, minutes-long CLI files to
# the end.  Only the order of files changes, never the order inside a file; a run without xdist keeps
# pytest's order.  Rough wall time of each at load ~8 (the proof run in BUILD_NOTES item 7).
LONGEST_FIRST = (
    "test_dora_pissa.py", "test_train.py", "test_prompts_cli.py", "test_qlora_cli.py", "test_multihost.py",
    "test_train_data_sources.py", "test_ia3_cli.py", "test_synth.py", "test_data_quality.py",
    "test_bench_vs_trl.py", "test_gguf_export.py", "test_serve.py", "test_trainer_inprocess.py",
    "test_workdir_lock.py", "test_checkpoint_corrupt.py", "test_qlora.py", "test_qdora.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist installed: keep the order of the files below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items[:] = sorted(items, key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order kept


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE and _OWN_XLA_CACHE:
        import shutil

        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


# `python -m sft_jax.train` of configs/tiny.py (test_train.SMALL) for 4 steps with synchronous
# checkpoints of steps 2 and 4: the starting point of several checkpoint/resume tests.  Trained once
# per session and kept aside; each test gets it back, fresh, at the SAME path (the run's config records
# absolute paths of its tiny data and tokenizer, and a resume refuses a changed config).  The tests run
# one after another in a session (each pytest-xdist worker has its own session and directory).
CKPT_4_ARGS = ("--config.checkpoint.every_steps=2", "--config.checkpoint.keep=5",
               "--config.checkpoint.async_save=False")


@pytest.fixture(scope="session")
def _trained_4_steps_src(tmp_path_factory):
    import shutil

    from test_train import _train

    root = tmp_path_factory.mktemp("trained_4_steps")
    _train(root / "run", "--config.train.steps=4", *CKPT_4_ARGS)
    shutil.copytree(root / "run", root / "pristine", symlinks=True)
    return root


@pytest.fixture
def trained_4_steps(_trained_4_steps_src) -> pathlib.Path:
    """The 4-step work directory, as the session's run left it (restored before every test)."""
    import shutil

    wd = _trained_4_steps_src / "run"
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(_trained_4_steps_src / "pristine", wd, symlinks=True)
    return wd

"""Test setup: 8 fake CPU devices for sharding tests (must happen before jax is imported)."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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

"""`.ci/run` runs README.md's test command and fails when a test fails (or none ran)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _readme_command() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    return "\n".join(line for line in block.strip().splitlines() if not line.startswith("```")).strip()


def test_readme_test_command_installs_and_runs_pytest():
    cmd = _readme_command()
    assert "pip install" in cmd and "[test]" in cmd and "pytest" in cmd and "venv" in cmd


def test_readme_xdist_command_has_its_pin_and_file_order():
    """README's `pytest -n N` needs pytest-xdist pinned in the test extra; conftest's LONGEST_FIRST names
    test files that exist (a stale name would silently stop ordering that file)."""
    import tomllib

    import conftest

    cmd = _readme_command()
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    if " -n " in cmd:
        assert any(d.startswith("pytest-xdist==") for d in test_extra), test_extra
        assert "--dist loadfile" in cmd  # module fixtures are built once: a file never splits across workers
    assert len(set(conftest.LONGEST_FIRST)) == len(conftest.LONGEST_FIRST)
    for name in conftest.LONGEST_FIRST:
        assert (REPO / "tests" / name).is_file(), name


def _fake_project(tmp_path, test_body: str | None) -> pathlib.Path:
    root = tmp_path / "proj"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", root / ".ci" / "run")
    (root / "tests").mkdir()
    if test_body is not None:
        (root / "tests" / "test_x.py").write_text(test_body)
    # the same README structure, with a command that needs no install
    (root / "README.md").write_text(
        "# x\n\n<!-- test-command -->\n```bash\n"
        f"{sys.executable} -m pytest -q -p no:cacheprovider tests\n"
        "```\n<!-- /test-command -->\n"
    )
    return root


def _ci(root) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", ".ci/run"], cwd=root, capture_output=True, text=True, timeout=120)


def test_ci_run_passes_on_passing_tests(tmp_path):
    assert _ci(_fake_project(tmp_path, "def test_ok():\n    assert True\n")).returncode == 0


def test_ci_run_fails_on_a_failing_test(tmp_path):
    p = _ci(_fake_project(tmp_path, "def test_bad():\n    assert 1 == 2\n"))
    assert p.returncode != 0 and "1 failed" in p.stdout


def test_ci_run_fails_when_no_test_ran(tmp_path):
    p = _ci(_fake_project(tmp_path, None))
    assert p.returncode != 0 and "no tests" in (p.stdout + p.stderr).lower()

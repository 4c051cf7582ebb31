"""The second CI leg (`make test-compat`, issue #20) stays what it says: its pins are the default leg's but
for the release under test, the tests it names exist, and its environment recipe fails clearly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARGS_FILE = REPO / "tests" / "compat-leg.args"
MUST_DIFFER = {"megatron-core"}
"""The packages the legs exist to differ in (0.16.1 on Python 3.11, 0.19.2 on 3.12)."""


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def leg_args() -> list[str]:
    """tests/compat-leg.args without its comments (what the Makefile's sed hands to pytest)."""
    lines = (re.sub(r"\s*#.*$", "", line) for line in ARGS_FILE.read_text().splitlines())
    return [line for line in lines if line]


def test_the_legs_pin_the_same_packages_but_megatron_core():
    cpu, py312 = _pins(REPO / "constraints-cpu.txt"), _pins(REPO / "constraints-py312.txt")
    assert set(cpu) == set(py312), f"only in one file: {sorted(set(cpu) ^ set(py312))}"
    drift = {name: (cpu[name], py312[name]) for name in cpu if cpu[name] != py312[name] and name not in MUST_DIFFER}
    assert not drift, f"the legs disagree on {drift}: change both files (constraints-py312.txt: the second leg)"
    assert py312["torch"] == cpu["torch"] == "2.13.0"
    assert py312["megatron-core"] != cpu["megatron-core"]


def test_both_pinned_releases_are_in_the_supported_range():
    from dqo_megatron.compat.megatron_api import check_megatron_version

    for path in ("constraints-cpu.txt", "constraints-py312.txt"):
        check_megatron_version(_pins(REPO / path)["megatron-core"])


def test_every_test_the_leg_names_is_collected():
    args = leg_args()
    assert all(not arg.startswith("-") for arg in args), "options belong in the Makefile, not the args file"
    for arg in args:
        assert (REPO / arg.split("::")[0]).is_file(), arg
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "deselected" not in done.stdout.splitlines()[-1], "the leg names a test the markers deselect (slow/gpu)"


def test_the_env_recipe_names_the_missing_python(tmp_path):
    if any(Path(p).exists() for p in ("/usr/bin/python3.12", "/usr/local/bin/python3.12")):
        pytest.skip("this machine has a system python3.12")
    env = dict(os.environ, PATH="/usr/bin:/bin", PYENV_ROOT=str(tmp_path / "no-pyenv"), HOME=str(tmp_path))
    env["DQO_COMPAT_CACHE"] = str(tmp_path / "cache")
    env.pop("DQO_PYTHON312", None)
    done = subprocess.run(["bash", str(REPO / "tools" / "compat_env.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "no working Python 3.12 found" in done.stderr and "DQO_PYTHON312" in done.stderr
    assert not (tmp_path / "cache").exists()


def _recipe(tmp_path: Path) -> subprocess.CompletedProcess:
    """compat_env.sh with a cache under tmp_path and a pip that finds nothing (no index, no config): every
    build fails at its first install, in seconds."""
    env = dict(os.environ, DQO_COMPAT_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_FIND_LINKS", None)
    return subprocess.run(
        ["bash", str(REPO / "tools" / "compat_env.sh")], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_env_recipe_uses_only_a_complete_build(tmp_path):
    failed = _recipe(tmp_path)
    if "no working Python 3.12" in failed.stderr:
        pytest.skip("no Python 3.12 on this machine")
    (env_dir,) = (tmp_path / "cache").glob("py312-????????????")
    assert failed.returncode != 0 and failed.stdout == "", failed.stderr[-2000:]
    assert (env_dir / "bin" / "python").exists() and not (env_dir / ".dqo-compat-complete").exists()
    (env_dir / ".dqo-compat-complete").write_text("key\n")  # as a finished build leaves it
    reused = _recipe(tmp_path)
    assert reused.returncode == 0 and reused.stdout == f"{env_dir}\n" and "reusing" in reused.stderr
    (env_dir / ".dqo-compat-complete").unlink()  # a build killed before its last step
    rebuilt = _recipe(tmp_path)
    assert rebuilt.returncode != 0 and rebuilt.stdout == "" and "incomplete" in rebuilt.stderr

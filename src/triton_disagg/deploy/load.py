"""Read a deployment spec from YAML, reporting every problem with the path of its field, and write one back."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from triton_disagg.deploy.spec import DeploymentSpec


class SpecError(ValueError):
    """A deployment spec that cannot be used; the message names the file and every bad field."""


def parse_spec(data: object, source: str = "spec") -> DeploymentSpec:
    """Validate already-parsed YAML; SpecError lists every problem as `field.path: message`."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping with at least `models`")
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: invalid deployment spec\n" + "\n".join(_describe(e) for e in error.errors())) from None


def load_spec(path: str | Path) -> DeploymentSpec:
    """Read and validate a spec file. Raises SpecError naming the file and each bad field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read the deployment spec ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(data, str(path))


def dump_spec(spec: DeploymentSpec) -> str:
    """The spec as YAML with every default spelled out (what a ConfigMap carries); parses back equal."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _describe(error: dict) -> str:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (a typo?)"
    if not path:
        return message
    return "\n".join(f"{path}: {line}" for line in message.splitlines())

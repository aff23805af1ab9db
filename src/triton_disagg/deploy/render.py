"""Write rendered manifests to a directory: one YAML file per resource kind, or one multi-document file."""

from __future__ import annotations

from pathlib import Path

import yaml

from triton_disagg.deploy.kubernetes import render_manifests
from triton_disagg.deploy.spec import DeploymentSpec

#: The file of `write_manifests(..., single_file=True)`.
SINGLE_FILE = "manifests.yaml"


def write_manifests(spec: DeploymentSpec, out_dir: str | Path, single_file: bool = False) -> list[Path]:
    """Render `spec` and write it under `out_dir` (created); returns the files written, in order.

    Per kind the files are `<kind>.yaml` in lower case (`statefulset.yaml`, ...), each holding
    every manifest of that kind; with `single_file` all go to `manifests.yaml`. Files of an
    earlier render that this one does not write are left alone. Raises SpecError as render_manifests.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests = render_manifests(spec)
    groups: dict[str, list[dict]] = {}
    for manifest in manifests:
        key = SINGLE_FILE if single_file else f"{manifest['kind'].lower()}.yaml"
        groups.setdefault(key, []).append(manifest)
    written = []
    for name, documents in groups.items():
        path = out_dir / name
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        written.append(path)
    return written

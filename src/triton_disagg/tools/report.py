"""Where a benchmark's results go: OUT.json, OUT.png and a table on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(results: dict, out: Path, plot: Callable[[dict, Path], None], print_table: Callable[[dict], None]) -> None:
    """Write `results` to `out`.json (creating its folder), plot them to `out`.png, print the table and
    where both went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print_table(results)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")

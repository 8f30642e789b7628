"""The ending the table-printing benchmarks share: the table printed, then written as OUT.md beside the run's
data as OUT.json (the folder made first). Imported by the scripts as a sibling module (a script's own folder is
first on its import path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, table: str, data: dict) -> None:
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
    out.with_suffix(".md").write_text(table + "\n")

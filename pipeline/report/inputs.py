"""Read a run folder's stage outputs; a missing file raises ``FileNotFoundError`` naming it.

Paths are given relative to the run folder (``"classify/metrics.json"``), so error messages (which
become the report's one-line notes) name the file the way a user finds it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["RunFolder"]


class RunFolder:
    """A run folder ``RUN`` whose stage outputs the report reads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        """``RUN/rel``; FileNotFoundError if it does not exist."""
        path = self.root / rel
        if not path.exists():
            raise FileNotFoundError(f"no {self.root.name}/{rel}")
        return path

    def has(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def text(self, rel: str) -> str:
        return self.path(rel).read_text(encoding="utf-8")

    def json(self, rel: str) -> Any:
        """A JSON file's content; a damaged file is a ValueError naming it."""
        try:
            return json.loads(self.text(rel))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.root.name}/{rel} is not valid JSON ({exc})") from None

    def folds(self, stage: str) -> int:
        """How many fold members a stage's model holds (1: a single model)."""
        rel = f"{stage}/checkpoint.json"
        return int(self.json(rel).get("folds", 1)) if self.has(rel) else 1

    def csv(self, rel: str) -> list[dict[str, str]]:
        """The rows of a CSV file as dicts; a file with a header only gives an empty list."""
        with self.path(rel).open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def columns(self, rel: str) -> dict[str, list[str]]:
        """A CSV file as {column: values}."""
        rows = self.csv(rel)
        if not rows:
            raise ValueError(f"{self.root.name}/{rel} has no rows")
        return {key: [row[key] for row in rows] for key in rows[0]}

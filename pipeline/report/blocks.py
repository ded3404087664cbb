"""The building blocks of a report section: tables, figures, collapsed text and one-line notes.

Section builders return ``Section`` objects made of these blocks; the template renders each kind.
``guard`` runs one part of a section and turns any failure into a one-line ``Note``, so a missing
or malformed input file omits that part instead of breaking the report.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.io import atomic_path
from pipeline.report.plots import png

__all__ = ["Cell", "Details", "Figures", "Image", "Note", "Section", "Table", "cell", "fmt", "guard"]


@dataclass
class Cell:
    """A table cell: text, an optional link and a CSS class (``num``, ``muted``, ``bad`` ...)."""

    text: str
    href: str | None = None
    cls: str = ""


@dataclass
class Table:
    """A table with a header row; rows listed in ``emphasis`` are shown in bold."""

    caption: str
    header: Sequence[str]
    rows: list[list[Cell]]
    emphasis: set[int] = field(default_factory=set)
    muted: set[int] = field(default_factory=set)
    note: str = ""
    kind: str = "table"

    @property
    def numeric(self) -> list[bool]:
        """Per column: every cell in it is a number (its header is then right-aligned too)."""
        return [
            bool(self.rows) and all(i < len(r) and "num" in r[i].cls.split() for r in self.rows)
            for i in range(len(self.header))
        ]


@dataclass
class Image:
    """A PNG under ``figures/``, linked relatively from ``index.html``."""

    src: str
    caption: str
    alt: str
    kind: str = "figure"


@dataclass
class Details:
    """Collapsed preformatted text (a config file, a list of error reasons)."""

    summary: str
    text: str
    kind: str = "details"


@dataclass
class Note:
    """One line: why a part is omitted, or a short remark."""

    text: str
    kind: str = "note"


@dataclass
class Section:
    """A numbered report section."""

    id: str
    title: str
    lead: str = ""
    blocks: list = field(default_factory=list)
    definitions: list[tuple[str, str]] = field(default_factory=list)


class Figures:
    """Saves figures into the report's ``figures/`` folder and remembers what it wrote.

    A figure's file name carries a hash of its content (``<name>-<hash>.png``), so a new report
    never overwrites a figure the current page shows: an interrupted report leaves the old page
    whole, and the old figures go only once the new page is written (``remove_stale``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: set[str] = set()

    def add(self, fig: Figure, name: str, caption: str, alt: str) -> Image:
        """Save ``fig`` as ``figures/<name>-<hash>.png``; the block that shows it."""
        data = png(fig)
        file = f"{name}-{hashlib.sha256(data).hexdigest()[:12]}.png"
        if not (self.folder / file).is_file():
            with atomic_path(self.folder / file) as tmp:
                tmp.write_bytes(data)
        self.written.add(file)
        return Image(f"figures/{file}", caption, alt)

    def remove_stale(self) -> None:
        """Delete the figures of earlier reports (call once the new page is written)."""
        for stale in self.folder.glob("*.png"):
            if stale.name not in self.written:
                stale.unlink()


def guard(blocks: list, what: str, build: Callable[[], list]) -> None:
    """Append ``build()``'s blocks, or a note naming ``what`` and the reason it is omitted."""
    try:
        blocks.extend(build())
    except Exception as exc:  # a report part must never take the whole report down
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        blocks.append(Note(f"{what} omitted: {reason}"))


def _number(value: object) -> int | float | None:
    """``value`` as an int or float (numeric strings included), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return value
    for kind in (int, float):
        try:
            return kind(str(value))
        except ValueError:
            continue
    return None


def fmt(value: object, digits: int = 3) -> str:
    """A value for a table: numbers with fixed digits (ints as they are), an en dash if missing."""
    number = _number(value)
    if value is None or value == "" or (isinstance(number, float) and not math.isfinite(number)):
        return "–"
    if number is None:
        return str(value)
    return str(number) if isinstance(number, int) else f"{number:.{digits}f}"


def decimals_apart(probabilities: Sequence[float], threshold: float) -> int:
    """Decimals (3 at least) at which every probability differs from the threshold it was compared
    with, unless it equals it: so a case called positive never reads the same as the threshold."""
    for digits in range(3, 17):
        if all(p == threshold or round(p, digits) != round(threshold, digits) for p in probabilities):
            return digits
    return 17


def cell(value: object, digits: int = 3, href: str | None = None) -> Cell:
    """A cell for a value: numbers right-aligned and formatted, text as it is."""
    return Cell(fmt(value, digits), href, "num" if _number(value) is not None else "")

"""The report stage: a run folder → ``RUN/report/{index.html, metrics.json, figures/*.png}``.

Each section reads what the stages left in the run folder; a missing file or key omits that part
with a one-line note. ``metrics.json`` gathers the stage metrics files unchanged
(``{"classify": RUN/classify/metrics.json, "segment": RUN/segment/metrics.json}``) and, under
``notes``, the page's notes (the parts it left out, and why). Every link is
relative, so the report folder (with the run folder, for the mask links) can be zipped and mailed.

Example:
    >>> run_report(load_config(None, run="runs/demo"))                # doctest: +SKIP
    PosixPath('runs/demo/report/index.html')
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.config import Config
from pipeline.folder_lock import folder_lock
from pipeline.io import atomic_path, write_json
from pipeline.report.blocks import Figures, Note
from pipeline.report.classifier import classifier_section, threshold_digits
from pipeline.report.html import render
from pipeline.report.inputs import RunFolder
from pipeline.report.predictions import predictions_section
from pipeline.report.segmentation import segmentation_section
from pipeline.report.summary import STAGES, summary_section

__all__ = ["run_report", "stage_metrics"]


def stage_metrics(run: RunFolder) -> dict[str, Any]:
    """The classify and segment ``metrics.json`` contents that exist (unreadable ones are skipped)."""
    found = {}
    for stage in ("classify", "segment"):
        try:
            found[stage] = run.json(f"{stage}/metrics.json")
        except (OSError, ValueError):
            continue
    return found


def _run_name(run: RunFolder, config: Config) -> str:
    """The experiment name a stage recorded, else the config's, else the folder's."""
    for stage in STAGES:
        if run.has(f"{stage}/config.yaml"):
            name = (yaml.safe_load(run.text(f"{stage}/config.yaml")) or {}).get("name")
            if name and name != "default":
                return str(name)
    return config.name if config.name != "default" else run.root.resolve().name


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def run_report(config: Config) -> Path:
    """Write the HTML report of ``config.run_dir``; return the path of ``index.html``."""
    run = RunFolder(config.run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root}: no such run folder")
    with folder_lock(run.root / "report"):
        out = run.root / "report"
        figures = Figures(out / "figures")
        sections = [
            summary_section(run, figures),
            classifier_section(run, figures),
            segmentation_section(run, figures),
            predictions_section(run, out),
        ]
        metrics = stage_metrics(run)
        page = render(
            sections,
            metrics,
            threshold_digits(run, metrics.get("classify", {})),
            run_name=_run_name(run, config),
            generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            run_dir=str(run.root.resolve()),
            version=__version__,
        )
        notes = [b.text for section in sections for b in section.blocks if isinstance(b, Note)]
        write_json(out / "metrics.json", {"run": _run_name(run, config), **metrics, "notes": notes})
        _write(out / "index.html", page)
        figures.remove_stale()
        return out / "index.html"

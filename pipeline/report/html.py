"""Render the report page with Jinja2 (autoescaped) from sections and headline cards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pipeline.report.blocks import Section, fmt

__all__ = ["TEMPLATES", "headline_cards", "render"]

TEMPLATES = Path(__file__).parent / "templates"


def _card(label: str, metric: dict[str, Any] | None, sub: str, key: bool = False) -> dict[str, Any] | None:
    if not isinstance(metric, dict) or ("value" not in metric and "mean" not in metric):
        return None
    value = metric.get("value", metric.get("mean"))
    return {"label": label, "value": fmt(value), "sub": sub, "key": key}


def headline_cards(metrics: dict[str, Any], threshold_digits: int = 3) -> list[dict[str, Any]]:
    """Headline numbers: test AUC, sensitivity, precision, F1 (chosen threshold), Dice and HD95."""
    cards = []
    at = metrics.get("classify", {}).get("test", {}).get("at_val_threshold", {})
    if at:
        t = f"test, t = {fmt(at.get('threshold'), threshold_digits)}"
        cards += [
            _card("Sensitivity", at.get("sensitivity"), t, key=True),
            _card("Precision", at.get("precision"), t, key=True),
            _card("F1", at.get("f1"), t, key=True),
            _card("ROC AUC", at.get("auc"), "test, threshold-free"),
        ]
    seg = metrics.get("segment", {})
    cards += [
        _card("Lung Dice", seg.get("dice"), f"test mean of {seg.get('cases', '?')} cases", key=True),
        _card("Lung HD95 (mm)", seg.get("hd95_mm"), _hd95_sub(seg)),
    ]
    return [c for c in cards if c is not None]


def _hd95_sub(seg: dict[str, Any]) -> str:
    """'test mean', naming the cases left out (an empty mask has no surface distance)."""
    n, cases = (seg.get("hd95_mm") or {}).get("n"), seg.get("cases")
    if isinstance(n, int) and isinstance(cases, int) and n < cases:
        return f"test mean of {n} of {cases} cases (an empty mask has no HD95)"
    return "test mean"


def render(sections: list[Section], metrics: dict[str, Any], threshold_digits: int = 3, **page: Any) -> str:
    """The HTML page: ``page`` gives run_name, generated, run_dir and version."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    template = env.get_template("report.html.j2")
    return template.render(sections=sections, cards=headline_cards(metrics, threshold_digits), **page)

"""Section 1, run summary: dataset, class balancing, ledgers, timings, software and configs."""

from __future__ import annotations

import platform
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

from pipeline.report import plots
from pipeline.report.blocks import Cell, Details, Figures, Section, Table, cell, guard
from pipeline.report.inputs import RunFolder
from pipeline.report.predictions import predict_folders

__all__ = ["PACKAGES", "STAGES", "summary_section"]

STAGES = ("preprocess", "classify", "segment")
PACKAGES = (
    "medpipe",
    "torch",
    "monai",
    "numpy",
    "scipy",
    "scikit-learn",
    "SimpleITK",
    "nibabel",
    "matplotlib",
    "Jinja2",
)
SPLITS = ("train", "val", "test")


def _source(run: RunFolder) -> str:
    """The manifest (or input folder) named by the first stage config found."""
    import yaml

    for stage in STAGES:
        if run.has(f"{stage}/config.yaml"):
            data = (yaml.safe_load(run.text(f"{stage}/config.yaml")) or {}).get("data", {})
            for key in ("manifest", "input"):
                if data.get(key):
                    return f"{key}: {data[key]}"
    return "source not recorded"


def _split_order(splits: set[str]) -> list[str]:
    return [s for s in SPLITS if s in splits] + sorted(splits - set(SPLITS))


def _dataset(run: RunFolder) -> list:
    """Cases per split and class (preprocess ``cases.csv``, else the segmentation ``splits.csv``)."""
    if run.has("preprocess/cases.csv"):
        rows, origin = run.csv("preprocess/cases.csv"), "preprocess/cases.csv"
    else:
        rows, origin = run.csv("segment/splits.csv"), "segment/splits.csv"
    counts = Counter((r.get("split") or "unassigned", r.get("label_name") or "unlabelled") for r in rows)
    classes = sorted({c for _, c in counts})
    splits = _split_order({s for s, _ in counts})
    body = [
        [
            Cell(split),
            *(cell(counts[split, c]) for c in classes),
            cell(sum(counts[split, c] for c in classes)),
        ]
        for split in splits
    ]
    body.append([Cell("all"), *(cell(sum(counts[s, c] for s in splits)) for c in classes), cell(len(rows))])
    return [
        Table(
            "Cases per split and class",
            ["split", *classes, "total"],
            body,
            emphasis={len(body) - 1},
            note=f"{_source(run)} · from {origin}",
        )
    ]


def _balance(run: RunFolder, figures: Figures) -> list:
    report = run.json("classify/balance.json")
    fig = plots.class_balance(report["before"], report["after_per_epoch"], report["strategy"])
    caption = (
        f"Training cases per class before balancing, and the expected cases per class in each epoch after "
        f"it (strategy {report['strategy']}, loss {report.get('loss', 'n/a')})."
    )
    if (folds := run.folds("classify")) > 1:
        caption += (
            f" These are the whole training split's; each of the {folds} ensemble members trains on the "
            f"{folds - 1}/{folds} of it outside its held-out fold (classify/fold<k>/balance.json)."
        )
    return [
        figures.add(fig, "class_balance", caption, "bar chart of class counts before and after balancing")
    ]


def _ledgers(run: RunFolder) -> dict[str, str]:
    """Every per-case ledger of the run: {label: path relative to RUN}."""
    found = {"preprocess": "preprocess/ledger.csv"} if run.has("preprocess/ledger.csv") else {}
    for folder in predict_folders(run):
        rel = folder.relative_to(run.root).as_posix()
        if (folder / "ledger.csv").is_file():
            found[rel] = f"{rel}/ledger.csv"
    return found


def _ledger_totals(run: RunFolder) -> list:
    ledgers = _ledgers(run)
    if not ledgers:
        raise FileNotFoundError(f"no ledger in {run.root.name} (preprocess/ledger.csv, predict/ledger.csv)")
    body, blocks = [], []
    for label, rel in ledgers.items():
        rows = run.csv(rel)
        status = Counter(r["status"] for r in rows)
        errors = status.get("error", 0)
        body.append(
            [
                Cell(label),
                cell(status.get("ok", 0)),
                cell(status.get("skipped", 0)),
                Cell(str(errors), cls="num bad" if errors else "num"),
                cell(len(rows)),
            ]
        )
        if errors:
            reasons = "\n".join(f"{r['case_id']}: {r['reason']}" for r in rows if r["status"] == "error")
            blocks.append(Details(f"{label}: {errors} error reason(s)", reasons))
    table = Table(
        "Ledger totals (one row per input case)", ["ledger", "ok", "skipped", "error", "total"], body
    )
    return [table, *blocks]


def _seconds(rows: list[dict[str, str]]) -> float:
    return sum(float(r["seconds"]) for r in rows if r.get("seconds"))


def _timings(run: RunFolder) -> list:
    body = []
    if run.has("timings.json"):
        for step, seconds in run.json("timings.json").items():
            body.append(
                [Cell(f"{step} (wall time)"), Cell(""), cell(float(seconds), 1), Cell("timings.json")]
            )
    for label, rel in _ledgers(run).items():
        rows = [r for r in run.csv(rel) if r["status"] == "ok"]
        body.append([Cell(label), Cell(f"{len(rows)} cases"), cell(_seconds(rows), 1), Cell(f"{rel} (sum)")])
    for stage in ("classify", "segment"):
        if run.has(f"{stage}/history.csv"):
            rows = run.csv(f"{stage}/history.csv")
            body.append(
                [
                    Cell(f"train {stage}"),
                    Cell(f"{len(rows)} epoch{'s' * (len(rows) != 1)}"),
                    cell(_seconds(rows), 1),
                    Cell(f"{stage}/history.csv (sum)"),
                ]
            )
    if not body:
        raise FileNotFoundError("no ledger, history.csv or timings.json with seconds")
    note = "Ledger sums add per-case seconds (with workers in parallel, more than the wall time)."
    return [Table("Timings per stage", ["stage", "work", "seconds", "source"], body, note=note)]


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _versions(run: RunFolder) -> list:
    recorded = {
        stage: run.json(f"{stage}/checkpoint.json").get("versions", {})
        for stage in ("classify", "segment")
        if run.has(f"{stage}/checkpoint.json")
    }
    body = [[Cell("python"), Cell(platform.python_version()), *(Cell("") for _ in recorded)]]
    for package in PACKAGES:
        key = package.lower()
        body.append(
            [Cell(package), Cell(_installed(package)), *(Cell(v.get(key, "")) for v in recorded.values())]
        )
    header = ["package", "this report", *(f"{stage} checkpoint" for stage in recorded)]
    return [Table("Software versions", header, body, note=f"platform: {platform.platform()}")]


def _configs(run: RunFolder) -> list:
    found = [
        Details(f"Resolved configuration: {stage}/config.yaml", run.text(f"{stage}/config.yaml"))
        for stage in STAGES
        if run.has(f"{stage}/config.yaml")
    ]
    if not found:
        raise FileNotFoundError("no stage config.yaml")
    return found


def summary_section(run: RunFolder, figures: Figures) -> Section:
    """Section 1: what went in, how it was balanced, what succeeded and how long it took."""
    blocks: list = []
    guard(blocks, "Dataset counts", lambda: _dataset(run))
    if run.has("classify"):  # a run that trained only the lung net has no class balance to show
        guard(blocks, "Class balance chart", lambda: _balance(run, figures))
    guard(blocks, "Ledger totals", lambda: _ledger_totals(run))
    guard(blocks, "Timings", lambda: _timings(run))
    guard(blocks, "Software versions", lambda: _versions(run))
    guard(blocks, "Configuration", lambda: _configs(run))
    return Section("summary", "Run summary", blocks=blocks)

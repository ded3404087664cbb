"""The report stage: full and partial run folders, metrics.json, the montage's orientation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from report_run import SECTION_TITLES, Outline, build_run

from pipeline.config import load_config
from pipeline.preprocess.cache import VIEW_NAMES, save_entry
from pipeline.preprocess.views import extract_views
from pipeline.report import run_report
from pipeline.report.blocks import decimals_apart
from pipeline.report.classifier import montage_picks, montage_row
from pipeline.report.plots import VIEW_EDGES, view_grid
from pipeline.report.segmentation import display_views


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run folder with every stage's outputs (preprocess, classify, segment, predict)."""
    return build_run(tmp_path_factory.mktemp("report")).run_dir


@pytest.fixture(scope="module")
def full_report(full_run) -> Path:
    return run_report(load_config(None, run=str(full_run)))


def partial(full_run: Path, dest: Path, stages: tuple[str, ...]) -> Path:
    """A copy of the run with only ``stages`` (and no earlier report)."""
    for stage in stages:
        shutil.copytree(full_run / stage, dest / stage)
    return dest


def outline(index: Path) -> Outline:
    return Outline(index.read_text(encoding="utf-8"))


def figure(src: str) -> str:
    """A figure's name without the content hash in its file name: ``figures/x-<hash>.png`` → ``x.png``."""
    stem, digest = Path(src).stem.rsplit("-", 1)
    assert len(digest) == 12, src
    return f"{stem}.png"


def assert_images_resolve(index: Path, page: Outline) -> None:
    for img in page.images:
        src = img["src"]
        assert not Path(src).is_absolute() and "://" not in src, src
        assert (index.parent / src).is_file(), src


def test_full_report_has_every_section_and_part(full_report):
    page = outline(full_report)
    assert [h.split(".", 1)[1] for h in page.headings] == list(SECTION_TITLES)
    assert page.notes == [], "a part of a full run was omitted"
    names = {figure(img["src"]) for img in page.images}
    assert names == {
        "class_balance.png",
        "classify_curves.png",
        "classify_confusion.png",
        "classify_roc_pr.png",
        "classify_calibration.png",
        "classify_montage.png",
        "segment_curves.png",
        "segment_per_case.png",
        "segment_overlays.png",
    }
    assert_images_resolve(full_report, page)
    assert {figure(p.name) for p in (full_report.parent / "figures").iterdir()} == names
    html = full_report.read_text(encoding="utf-8")
    for text in (
        "Sensitivity (recall)",
        "95% CI",
        "Lung volumes, test split",
        "Ledger totals",
        "report-test",
    ):
        assert text in html


def test_mask_links_are_relative_and_resolve(full_report):
    links = [href for href in outline(full_report).links if href.endswith(".nii.gz")]
    assert len(links) == 3
    for href in links:
        assert href.startswith("../predict/segment/masks/")
        assert (full_report.parent / href).is_file()


def test_metrics_json_equals_the_stage_files(full_run, full_report):
    gathered = json.loads((full_report.parent / "metrics.json").read_text(encoding="utf-8"))
    for stage in ("classify", "segment"):
        stage_file = json.loads((full_run / stage / "metrics.json").read_text(encoding="utf-8"))
        assert json.dumps(gathered[stage], sort_keys=True) == json.dumps(stage_file, sort_keys=True)


@pytest.mark.parametrize(
    ("stages", "omitted"),
    [
        (("preprocess", "classify"), ["Segmentation omitted", "Predictions omitted"]),
        (("segment",), ["Classifier omitted", "Predictions omitted"]),
        (("preprocess",), ["Classifier omitted", "Segmentation omitted", "Predictions omitted"]),
    ],
    ids=["classifier-only", "segmentation-only", "preprocess-only"],
)
def test_partial_run_builds_with_notes(full_run, tmp_path, stages, omitted):
    run = partial(full_run, tmp_path / "run", stages)
    index = run_report(load_config(None, run=str(run)))
    page = outline(index)
    assert [h.split(".", 1)[1] for h in page.headings] == list(SECTION_TITLES)
    for prefix in omitted:
        assert any(n.startswith(prefix) for n in page.notes), (prefix, page.notes)
    if "classify" not in stages:  # no classifier, so no note about its class balance either
        assert not any(n.startswith("Class balance") for n in page.notes), page.notes
    assert_images_resolve(index, page)
    gathered = json.loads((index.parent / "metrics.json").read_text(encoding="utf-8"))
    assert set(gathered) - {"run", "notes"} == {"classify", "segment"} & set(stages)
    assert gathered["notes"] == page.notes  # what the page left out, machine-readable too


def test_a_missing_key_omits_only_that_part(full_run, tmp_path):
    run = partial(full_run, tmp_path / "run", ("preprocess", "classify"))
    metrics = json.loads((run / "classify" / "metrics.json").read_text(encoding="utf-8"))
    del metrics["test"]["at_val_threshold"]
    (run / "classify" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (run / "classify" / "history.csv").unlink()
    page = outline(run_report(load_config(None, run=str(run))))
    assert any(n.startswith("Training curves omitted: no run/classify/history.csv") for n in page.notes)
    names = {figure(img["src"]) for img in page.images}
    assert {"classify_confusion.png", "classify_roc_pr.png", "classify_montage.png"} <= names


def test_balance_comparison_table(full_run, tmp_path):
    run = partial(full_run, tmp_path / "run", ("preprocess", "classify"))
    rows = [
        ("strategy", "balanced_accuracy", "sensitivity"),
        ("none", 0.61, 0.25),
        ("weighted_sampler", 0.74, 0.7),
    ]
    with (run / "classify" / "balance_comparison.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    html = run_report(load_config(None, run=str(run))).read_text(encoding="utf-8")
    assert "Class-balancing strategies compared" in html
    assert '<tr class="em"><td>weighted_sampler</td><td class="num">0.740</td>' in html


def test_montage_picks_the_error_categories():
    rows = [
        {"case_id": c, "label": str(y), "probability": str(p), "prediction": str(int(p >= 0.5))}
        for c, y, p in [
            ("a", 1, 0.9),
            ("b", 1, 0.6),
            ("c", 0, 0.8),
            ("d", 1, 0.2),
            ("e", 0, 0.1),
            ("f", 1, 0.4),
        ]
    ]
    picks = [(k, r["case_id"]) for k, r in montage_picks(rows)]
    assert picks == [("TP", "a"), ("TP", "b"), ("FP", "c"), ("FN", "d"), ("FN", "f")]


def _quadrant(image: np.ndarray) -> tuple[str, str]:
    """Where the brightest pixel is: (top|bottom, left|right) of the displayed image."""
    row, col = np.unravel_index(int(np.argmax(image)), image.shape)
    return ("top" if row < image.shape[0] / 2 else "bottom", "left" if col < image.shape[1] / 2 else "right")


# A marker to the patient's right, posterior and superior (RAS+ index axes grow towards R, A, S)
# and where the documented radiological display puts it in each view.
MARKER = (16, 3, 16)
EXPECTED = {"axial": ("bottom", "left"), "coronal": ("top", "left"), "sagittal": ("top", "right")}


def _marked_volume() -> np.ndarray:
    volume = np.zeros((20, 20, 20), np.float32)
    volume[MARKER] = 1.0
    return volume


def test_montage_shows_three_views_in_display_orientation(tmp_path):
    views = extract_views(_marked_volume(), MARKER, "slab", 3)
    entry = save_entry(tmp_path / "case.npz", {"views": views}, {"case_id": "marker"})
    row = montage_row(entry, "marker")
    assert len(row.views) == len(VIEW_NAMES) == 3
    fig = view_grid([row])
    assert [ax.get_title() for ax in fig.axes] == list(VIEW_NAMES)
    for k, (ax, name) in enumerate(zip(fig.axes, VIEW_NAMES, strict=True)):
        (image,) = ax.get_images()
        shown = np.asarray(image.get_array())
        assert image.origin == "upper"
        np.testing.assert_array_equal(shown, views[k, 1])  # the cached view as it is: no flips
        assert _quadrant(shown) == EXPECTED[name], name
        assert [t.get_text() for t in ax.texts] == list(VIEW_EDGES[name])


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_overlay_views_follow_the_display_convention_on_any_grid(codes):
    """The segmentation overlays reorient a native-grid volume by flips and transposes only."""
    import nibabel as nib

    ornt = nib.orientations.axcodes2ornt(codes)
    to_native = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    native = nib.orientations.apply_orientation(_marked_volume(), to_native)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) @ nib.orientations.inv_ornt_aff(to_native, native.shape)
    assert "".join(nib.aff2axcodes(affine)) == codes
    views, aspect = display_views(native, affine, MARKER)
    assert aspect == [1.0, 1.0, 1.0]
    for view, name in zip(views, VIEW_NAMES, strict=True):
        assert _quadrant(view) == EXPECTED[name], (codes, name)


def test_headline_hd95_says_when_empty_masks_are_left_out():
    from pipeline.report.html import headline_cards

    def hd95_sub(n: int) -> str:
        seg = {"cases": 40, "dice": {"mean": 0.97, "n": 40}, "hd95_mm": {"mean": 4.0, "n": n}}
        return next(c["sub"] for c in headline_cards({"segment": seg}) if c["label"].startswith("Lung HD95"))

    assert hd95_sub(40) == "test mean"
    assert hd95_sub(39) == "test mean of 39 of 40 cases (an empty mask has no HD95)"


def _predict_folder(run: Path, probabilities: list[float], threshold: float, names: list[str]) -> Path:
    folder = run / "predict" / "new"
    (folder / "masks").mkdir(parents=True)
    with (folder / "predictions.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "status", "probability", "prediction", "threshold", "reason"])
        for name, p in zip(names, probabilities, strict=True):
            writer.writerow([name, f"{name}.nii.gz", "ok", repr(p), int(p >= threshold), repr(threshold), ""])
    with (folder / "volumes.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "right_ml", "left_ml", "total_ml", "status", "reason"])
        for name in names:
            writer.writerow([name, 1.0, 2.0, 3.0, "ok", ""])
            (folder / "masks" / f"{name}.nii.gz").write_bytes(b"")
    return folder


def _threshold_json(run: Path, threshold: float) -> None:
    (run / "classify").mkdir(parents=True, exist_ok=True)
    metrics = {"test": {"at_val_threshold": {"threshold": threshold}}}
    (run / "classify" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def test_predictions_table_tells_scores_from_the_threshold_and_quotes_links(tmp_path):
    from pipeline.report.inputs import RunFolder
    from pipeline.report.predictions import _table

    run, names = tmp_path / "run", ["scan#1 ü", "a%20b"]
    folder = _predict_folder(run, [0.50293, 0.7], 0.50295, names)
    report_dir = run / "report"
    _threshold_json(run, 0.50295)
    table = _table(RunFolder(run), folder, report_dir, "predict/new")
    shown = [float(row[1].text) for row in table.rows]
    assert table.note == "prediction at threshold 0.5030 (chosen on validation)"
    assert shown == [0.5029, 0.7]  # one more decimal than usual keeps 0.50293 below 0.50295
    links = [row[6].href for row in table.rows]
    assert links == ["../predict/new/masks/scan%231%20%C3%BC.nii.gz", "../predict/new/masks/a%2520b.nii.gz"]
    for href, name in zip(links, names, strict=True):  # a browser's decoding lands on the file
        assert (report_dir / unquote(href)).resolve() == (folder / "masks" / f"{name}.nii.gz").resolve()

    _threshold_json(run, 0.6)  # evaluated again after the predictions were made
    assert (
        "not the 0.6000 that the latest evaluation chose"
        in _table(RunFolder(run), folder, report_dir, "predict/new").note
    )
    (run / "classify" / "metrics.json").unlink()
    default = _predict_folder(tmp_path / "bare", [0.4], 0.5, ["c"])
    note = _table(RunFolder(tmp_path / "bare"), default, report_dir, "predict/new").note
    assert note.startswith(
        "prediction at threshold 0.500, the default: the classifier had not been evaluated"
    )


def test_report_command_reads_a_run_that_only_trained_the_lung_net(full_run, tmp_path):
    from pipeline.cli import main

    run = partial(full_run, tmp_path / "run", ("segment",))
    assert main(["report", "--run", str(run)]) == 0
    assert (run / "report" / "index.html").is_file()


def test_the_threshold_note_names_the_out_of_fold_scores_of_an_ensemble():
    from pipeline.report.classifier import chosen_on

    assert chosen_on({"threshold_cases": {"val": 98, "out_of_fold": 0}}) == "validation"
    ensemble = chosen_on({"threshold_cases": {"val": 98, "out_of_fold": 1188}})
    assert ensemble == "validation and the training cases' out-of-fold scores (98 + 1188)"


def _edit_metrics(run: Path, edit) -> None:
    path = run / "classify" / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    edit(metrics["test"])
    path.write_text(json.dumps(metrics), encoding="utf-8")


def test_an_interrupted_report_leaves_the_earlier_page_whole(full_run, tmp_path, monkeypatch):
    import pipeline.report.stage as stage

    run = partial(full_run, tmp_path / "run", ("preprocess", "classify"))
    index = run_report(load_config(None, run=str(run)))
    before = index.read_text(encoding="utf-8")
    shown = {i["src"]: (index.parent / i["src"]).read_bytes() for i in outline(index).images}
    _edit_metrics(run, lambda test: test["at_0.5"].update(threshold=0.4))  # new figures to draw

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "render", killed)  # after the figures, before the page
    with pytest.raises(KeyboardInterrupt):
        run_report(load_config(None, run=str(run)))
    assert index.read_text(encoding="utf-8") == before
    assert {src: (index.parent / src).read_bytes() for src in shown} == shown  # and its own figures
    monkeypatch.undo()
    page = outline(run_report(load_config(None, run=str(run))))
    assert {p.name for p in (index.parent / "figures").iterdir()} == {
        Path(i["src"]).name for i in page.images
    }


def test_a_clinician_reads_the_threshold_the_gaps_and_the_small_counts(full_run, tmp_path):
    run = partial(full_run, tmp_path / "run", ("preprocess", "classify", "predict"))
    rows = list(csv.DictReader((run / "classify" / "test_predictions.csv").open()))
    threshold = float(rows[0]["probability"]) + 1e-5  # a case just below the threshold
    excluded = next(r for r in csv.DictReader((run / "preprocess" / "cases.csv").open()) if r["label"] == "1")

    def edit(test):
        test["at_val_threshold"]["threshold"] = threshold
        test["excluded"] = [excluded["case_id"]]
        at = test["at_0.5"]
        at["confusion_matrix"] = [[229, 0], [3, 13]]
        at["specificity"] = {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
        at["precision"] = {"value": None, "ci_low": None, "ci_high": None}
        at["auc"] = {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}

    _edit_metrics(run, edit)
    (run / "classify" / "checkpoint.pt").touch()  # trained again after the predictions were made
    html = run_report(load_config(None, run=str(run))).read_text(encoding="utf-8")
    digits = decimals_apart([float(r["probability"]) for r in rows], threshold)
    assert digits >= 5 and f"t = {threshold:.{digits}f}" in html  # decimals enough to tell the case apart
    assert f"1 test case(s) failed preprocessing and are not scored: {excluded['case_id']} (" in html
    assert "1.000 [0.984, 1.000]†" in html and "Clopper-Pearson" in html  # 229 of 229, exact interval
    assert ">undefined<" in html and "denominator is 0" in html
    assert (
        "A CI of no width: every bootstrap resample gave the same value" in html
    )  # AUC 1.000 [1.000, 1.000]
    assert "classify/checkpoint.pt is newer than these outputs" in html


def test_case_ids_in_figures_are_not_read_as_maths():
    from matplotlib.text import Text

    fig = view_grid([montage_title_row("true positive\nscan_$x^2$_a\np = 0.9")])
    titles = [t for t in fig.findobj(Text) if "$" in t.get_text()]
    assert titles and not any(t.get_parse_math() for t in titles)


def montage_title_row(title: str):
    from pipeline.report.plots import ViewRow

    return ViewRow(title, [np.zeros((8, 8))] * 3)

"""End to end through the CLI on a tiny synthetic cohort: preprocess, train 2 epochs, evaluate, predict."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_config, save_config
from pipeline.evaluate.classification import run_evaluate_classify
from pipeline.infer.classify import run_predict_classify
from pipeline.models import Ensemble, load_classifier
from pipeline.preprocess.stage import run_preprocess
from pipeline.train.classify import load_split, run_train_classify

SIZE = 12


def _blob(radius: float, shift: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(SIZE) - SIZE / 2 + 0.5,) * 3, indexing="ij"))
    return (np.linalg.norm(grid - shift[:, None, None, None], axis=0) <= radius).astype(np.uint8) * 255


def _cohort(root: Path, n: int = 36) -> Path:
    """Class 1 is a large ball, class 0 a small one, both jittered; a stratified given split."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        label = int(i % 3 == 0)  # one third positive: imbalanced
        image = _blob(4.0 if label else 2.5, rng.uniform(-1, 1, 3))
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / f"c{i:02d}.nii.gz")
        split = ("train", "train", "train", "val", "test", "train")[(i // 3) % 6]
        rows.append(
            {"case_id": f"c{i:02d}", "image": f"images/c{i:02d}.nii.gz", "label": label, "split": split}
        )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("cohort")
    config = load_config(
        None,
        **{
            "run": str(root / "run"),
            "data.manifest": str(_cohort(root / "data")),
            "preprocess.spacing": None,
            "preprocess.shape": [SIZE] * 3,
            "preprocess.crop_foreground": False,
            "preprocess.intensity.mode": "minmax",
            "preprocess.views.mode": "slab",
            "preprocess.views.thickness": 3,
            "classify.epochs": 2,
            "classify.batch_size": 8,
            "classify.features": 4,
            "classify.depth": 2,
            "classify.hidden": 8,
            "classify.n_boot": 50,
        },
    )
    run_preprocess(config)
    assert main(["train", "classify", "--run", str(config.run_dir), "--epochs", "2"]) == 0
    return config, root, config.run_dir / "classify"


def test_train_writes_outputs(trained):
    config, _, out = trained
    for name in ("checkpoint.pt", "checkpoint.json", "history.csv", "balance.json", "last_state.pt"):
        assert (out / name).is_file(), name
    sidecar = json.loads((out / "checkpoint.json").read_text())
    assert sidecar["classes"] == ["0", "1"] and sidecar["preprocess"]["views"]["thickness"] == 3
    balance = json.loads((out / "balance.json").read_text())
    assert balance["strategy"] == "weighted_sampler"
    assert (
        balance["before"]["0"] > balance["before"]["1"]
        and balance["after_per_epoch"]["0"] == balance["after_per_epoch"]["1"]
    )
    assert len(list(csv.DictReader((out / "history.csv").open()))) == 2
    assert any((out / "tb").iterdir())
    # resuming a finished run trains no further epochs
    before = (out / "history.csv").read_text()
    run_train_classify(config, resume=True, progress=False)
    assert (out / "history.csv").read_text() == before


def test_evaluate_writes_metrics_and_predictions(trained):
    config, _, out = trained
    assert main(["evaluate", "classify", "--run", str(config.run_dir)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == 6 and test["positives"] == 2
    for block in ("at_val_threshold", "at_0.5"):
        for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1"):
            assert set(test[block][name]) == {"value", "ci_low", "ci_high"}
        assert sum(map(sum, test[block]["confusion_matrix"])) == 6
    assert test["at_0.5"]["threshold"] == 0.5
    assert metrics["positive_class"] == "1" and "[[TN, FP], [FN, TP]]" in metrics["confusion_matrix_layout"]
    rows = list(csv.DictReader((out / "test_predictions.csv").open()))
    assert [r["case_id"] for r in rows] == [f"c{i:02d}" for i in range(36) if (i // 3) % 6 == 4]
    assert set(rows[0]) == {"case_id", "label", "probability", "prediction"}


def test_written_probabilities_reproduce_the_predictions_at_the_written_threshold(
    trained, tmp_path, monkeypatch
):
    """A test score just below the threshold (both 0.500000 to six decimals) stays below it in the CSV."""
    import pipeline.train.classify as train_classify

    config, _, _ = trained
    shutil.copytree(config.run_dir, tmp_path / "run")
    copy = load_config(str(tmp_path / "run" / "classify" / "config.yaml"), run=str(tmp_path / "run"))
    val_labels = load_split(config.run_dir / "preprocess", "val", "views").labels
    scores = iter([np.where(val_labels == 1, 0.4999998, 0.1), np.full(6, 0.4999996)])

    def fake_proba(model, inputs, batch_size=64, device="cpu"):
        positive = next(scores).astype(np.float32)
        return np.stack([1 - positive, positive], axis=1)

    monkeypatch.setattr(train_classify, "predict_proba", fake_proba)
    run_evaluate_classify(copy)
    metrics = json.loads((tmp_path / "run" / "classify" / "metrics.json").read_text())
    threshold = metrics["test"]["at_val_threshold"]["threshold"]
    rows = list(csv.DictReader((tmp_path / "run" / "classify" / "test_predictions.csv").open()))
    assert [r["prediction"] for r in rows] == ["0"] * 6
    assert all(float(r["probability"]) < threshold for r in rows)


def test_evaluate_names_the_test_cases_that_failed_preprocessing(trained, tmp_path, capsys):
    config, _, _ = trained
    shutil.copytree(config.run_dir, tmp_path / "run")
    cases = tmp_path / "run" / "preprocess" / "cases.csv"
    rows = list(csv.DictReader(cases.open()))
    failed = next(r for r in rows if r["split"] == "test")
    failed["status"] = "error"
    with cases.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["evaluate", "classify", "--run", str(tmp_path / "run")]) == 0
    assert f"left out of the metrics: {failed['case_id']}" in capsys.readouterr().err
    test = json.loads((tmp_path / "run" / "classify" / "metrics.json").read_text())["test"]
    assert test["excluded"] == [failed["case_id"]] and test["n"] == 5


def test_retraining_drops_the_evaluation_of_the_model_it_replaces(trained, tmp_path):
    config, _, _ = trained
    if not (config.run_dir / "classify" / "metrics.json").is_file():
        assert main(["evaluate", "classify", "--run", str(config.run_dir)]) == 0
    shutil.copytree(config.run_dir, tmp_path / "run")
    out = tmp_path / "run" / "classify"
    assert (out / "metrics.json").is_file() and (out / "test_predictions.csv").is_file()
    assert main(["train", "classify", "--run", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert not (out / "metrics.json").exists() and not (out / "test_predictions.csv").exists()
    assert (out / "checkpoint.pt").is_file()


def _beside(config, run: Path, **classify):
    """The trained run's config on a new run folder that shares its preprocessing."""
    run.mkdir()
    (run / "preprocess").symlink_to(config.run_dir / "preprocess")
    return config.model_copy(update={"run": run, "classify": config.classify.model_copy(update=classify)})


def test_undersampling_to_less_than_a_batch_still_trains(trained, tmp_path):
    """24 train cases, 8 positive: undersampling keeps 16 per epoch, fewer than a batch of 20."""
    config = _beside(trained[0], tmp_path / "run", balance="undersample", batch_size=20, epochs=1)
    out = run_train_classify(config, progress=False)
    assert json.loads((out / "balance.json").read_text())["after_per_epoch"] == {"0": 8, "1": 8}
    assert float(next(csv.DictReader((out / "history.csv").open()))["train_loss"]) > 0


def test_a_fold_ensembles_balance_report_keeps_the_ratio(trained, tmp_path):
    config = _beside(
        trained[0], tmp_path / "run", balance="undersample", undersample_ratio=1.5, folds=2, epochs=1
    )
    out = run_train_classify(config, progress=False)
    assert json.loads((out / "balance.json").read_text())["after_per_epoch"] == {"0": 12, "1": 8}
    single = config.model_copy(update={"classify": config.classify.model_copy(update={"folds": 1})})
    run_train_classify(single, progress=False)  # afresh: nothing of the ensemble is left to mistake
    assert not list(out.glob("fold*")) and not (out / "oof_predictions.csv").exists()


def test_a_train_split_of_one_class_is_refused(trained, tmp_path):
    config = _beside(trained[0], tmp_path / "run")
    (tmp_path / "run" / "preprocess").unlink()
    shutil.copytree(trained[0].run_dir / "preprocess", tmp_path / "run" / "preprocess")
    cases = tmp_path / "run" / "preprocess" / "cases.csv"
    rows = list(csv.DictReader(cases.open()))
    for row in rows:  # the positive training cases move to test
        if row["split"] == "train" and row["label"] == "1":
            row["split"] = "test"
    with cases.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"cases\.csv: the train split holds one class only \(0, 16 cases\)"):
        run_train_classify(config, progress=False)


def test_a_volume_model_on_a_views_only_cache_is_a_usage_error(trained, tmp_path, capsys):
    config = _beside(trained[0], tmp_path / "run", model="cnn3d")
    save_config(config, tmp_path / "cnn3d.yaml")
    command = ["train", "classify", "--run", str(tmp_path / "run"), "--config", str(tmp_path / "cnn3d.yaml")]
    assert main(command) == 2
    assert "set preprocess.cache_volume: true" in capsys.readouterr().err


def test_resume_under_a_config_that_trains_another_model_is_refused(trained, tmp_path, capsys):
    shutil.copytree(trained[0].run_dir, tmp_path / "run", symlinks=True)
    out = tmp_path / "run" / "classify"
    saved = (out / "config.yaml").read_text()
    wider = trained[0].model_copy(update={"run": tmp_path / "run"})
    wider.classify.features = 6
    save_config(wider, tmp_path / "wider.yaml")
    command = ["train", "classify", "--run", str(tmp_path / "run"), "--resume"]
    (out / "metrics.json").write_text("{}")  # an evaluation of the saved model
    assert main([*command, "--config", str(tmp_path / "wider.yaml")]) == 2
    assert "classify.features 4 -> 6" in capsys.readouterr().err
    assert main([*command, "--epochs", "5"]) == 2
    assert "classify.epochs 2 -> 5" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved  # the run can still be resumed as it was
    assert (out / "metrics.json").is_file()
    params_path = tmp_path / "run" / "preprocess" / "params.json"
    params = json.loads(params_path.read_text())
    params_path.write_text(json.dumps({**params, "preprocess": {**params["preprocess"], "margin_mm": 9.0}}))
    assert main(command) == 2  # preprocessed again under other settings since training began
    assert "the preprocess settings of its input, since classify began" in capsys.readouterr().err
    params_path.write_text(json.dumps(params))
    assert main(command) == 0


def test_medpipe_run_continues_a_training_it_interrupted(trained, tmp_path, monkeypatch):
    from pipeline.train import classify as train_classify
    from pipeline.workflow import run_stages

    config = _beside(trained[0], tmp_path / "run", epochs=3, n_boot=20)
    real, calls = train_classify.split_metrics, []

    def killed_in_the_second_epoch(labels, proba):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(labels, proba)

    monkeypatch.setattr(train_classify, "split_metrics", killed_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_stages(config, ["classify"])
    history = tmp_path / "run" / "classify" / "history.csv"
    before = history.read_text().splitlines()
    monkeypatch.setattr(train_classify, "split_metrics", real)
    run_stages(config, ["classify"])
    after = history.read_text().splitlines()
    assert len(before) == 2 and len(after) == 4 and after[:2] == before  # epoch 0 kept, 1-2 added
    assert (tmp_path / "run" / "classify" / "metrics.json").is_file()


def test_predict_into_the_model_folder_itself_is_not_refused_by_its_own_lock(trained, tmp_path):
    shutil.copytree(trained[2], tmp_path / "classify")
    image = trained[1] / "data" / "images" / "c00.nii.gz"
    path = run_predict_classify(tmp_path / "classify", image, tmp_path / "classify")
    assert next(csv.DictReader(path.open()))["status"] == "ok"


def test_ctrl_c_stops_a_fold_ensemble_at_once(trained, tmp_path):
    """Two fold workers, four folds: Ctrl-C in the first round must not train the queued folds."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline.checkpoint import load_state

    config = _beside(trained[0], tmp_path / "run", folds=4, fold_workers=2, epochs=60)
    save_config(config, tmp_path / "folds.yaml")
    command = [sys.executable, "-m", "pipeline", "train", "classify", "--run", str(tmp_path / "run")]
    proc = subprocess.Popen(
        [*command, "--config", str(tmp_path / "folds.yaml")], stderr=subprocess.PIPE, text=True
    )
    out = tmp_path / "run" / "classify"
    while not (out / "fold0" / "last_state.pt").is_file() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "rerun with --resume" in err and "Traceback" not in err
    assert not (out / "fold2" / "last_state.pt").exists() and not (out / "fold3").exists()
    assert int(load_state(out / "fold0" / "last_state.pt")["epoch"]) < 59


def test_ctrl_c_in_training_says_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.cli.cmd_train", interrupted)
    assert main(["train", "classify", "--run", str(tmp_path)]) == 130
    assert "rerun with --resume to continue" in capsys.readouterr().err


def test_predict_folder_with_a_corrupt_file_resumes(trained):
    _, root, out = trained
    scans = root / "new"
    scans.mkdir()
    for name in ("c00", "c01"):
        (scans / f"{name}.nii.gz").write_bytes((root / "data" / "images" / f"{name}.nii.gz").read_bytes())
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    assert (
        main(["predict", "classify", "--model", str(out), "--input", str(scans), "--out", str(root / "pred")])
        == 0
    )
    path = root / "pred" / "predictions.csv"
    rows = {r["case_id"]: r for r in csv.DictReader(path.open())}
    assert set(rows) == {"broken", "c00", "c01"}
    assert rows["broken"]["status"] == "error" and "broken.nii.gz" in rows["broken"]["reason"]
    for cid in ("c00", "c01"):
        assert rows[cid]["status"] == "ok" and 0 <= float(rows[cid]["probability"]) <= 1
        assert rows[cid]["prediction"] in ("0", "1") and rows[cid]["reason"] == ""
    # a rerun keeps the ok rows and retries only the failed one
    (scans / "broken.nii.gz").write_bytes((root / "data" / "images" / "c02.nii.gz").read_bytes())
    ledger_before = (root / "pred" / "ledger.csv").read_text().count("c00")
    rows = {r["case_id"]: r for r in csv.DictReader(run_predict_classify(out, scans, root / "pred").open())}
    assert all(r["status"] == "ok" for r in rows.values())
    assert (root / "pred" / "ledger.csv").read_text().count("c00") == ledger_before


def test_predict_with_an_unevaluated_model_says_it_uses_threshold_half(trained, tmp_path, capsys):
    _, root, out = trained
    model = tmp_path / "classify"
    shutil.copytree(out, model, ignore=shutil.ignore_patterns("metrics.json"))
    image = root / "data" / "images" / "c00.nii.gz"
    assert (
        main(
            [
                "predict",
                "classify",
                "--model",
                str(model),
                "--input",
                str(image),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert "predictions use the default threshold 0.5" in capsys.readouterr().err
    row = next(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert row["threshold"] == "0.5"


def test_predict_refuses_inputs_it_cannot_use_up_front(trained, tmp_path, monkeypatch, capsys):
    from pipeline.infer import classify

    _, root, out = trained
    missing = tmp_path / "no_such_folder"
    assert (
        main(["predict", "classify", "--model", str(out), "--input", str(missing), "--out", str(tmp_path)])
        == 2
    )
    assert f"{missing}: no such file or folder" in capsys.readouterr().err
    model, meta, threshold = classify._classifier(out.resolve())
    views = {**meta["preprocess"]["views"], "within_mask": True}  # a model that crops its views to the mask
    needs_masks = {**meta, "preprocess": {**meta["preprocess"], "views": views}}
    monkeypatch.setattr(classify, "_classifier", lambda model_dir: (model, needs_masks, threshold))
    scans = root / "data" / "images"  # a folder: no masks
    with pytest.raises(ValueError, match=r"needs each case's mask \(views.within_mask is set\).*mask column"):
        run_predict_classify(out, scans, tmp_path / "pred")


def test_fold_ensemble_trains_evaluates_and_predicts(trained, tmp_path):
    config, root, _ = trained
    prep = config.run_dir / "preprocess"
    config = config.model_copy(
        update={
            "run": tmp_path / "run",
            "classify": config.classify.model_copy(update={"folds": 3, "epochs": 1, "n_boot": 20}),
        }
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "preprocess").symlink_to(prep)
    out = run_train_classify(config, progress=False)
    oof = list(csv.DictReader((out / "oof_predictions.csv").open()))
    train_ids = [f"c{i:02d}" for i in range(36) if (i // 3) % 6 in (0, 1, 2, 5)]
    assert sorted(r["case_id"] for r in oof) == train_ids  # every training case scored exactly once
    for k in range(3):
        held = [r for r in oof if r["fold"] == str(k)]
        assert len(held) == 8 and sum(int(r["label"]) for r in held) in (2, 3)  # stratified folds
        assert (out / f"fold{k}" / "checkpoint.pt").is_file()
    model, meta = load_classifier(out / "checkpoint.pt")
    assert isinstance(model, Ensemble) and len(model.members) == 3 and meta["folds"] == 3
    # each out-of-fold score is the prediction of the one member that did not train on that case
    train = load_split(prep, "train", "views")
    for row in oof[:4]:
        member, _ = load_classifier(out / f"fold{row['fold']}" / "checkpoint.pt")
        x = torch.from_numpy(train.inputs[train.case_ids.index(row["case_id"])][None])
        with torch.no_grad():
            expected = float(torch.softmax(member(x), 1)[0, 1])
        assert float(row["probability"]) == pytest.approx(expected, abs=1e-5)
    assert len(list(csv.DictReader((out / "history.csv").open()))) == 1
    metrics = json.loads(run_evaluate_classify(config).read_text())
    assert metrics["threshold_cases"] == {"val": 6, "out_of_fold": 24}
    path = run_predict_classify(out, root / "data" / "images" / "c00.nii.gz", tmp_path / "pred")
    assert next(csv.DictReader(path.open()))["status"] == "ok"
    # folds trained two at a time in local processes give the same members
    workers = config.classify.model_copy(update={"fold_workers": 2})
    parallel = config.model_copy(update={"run": tmp_path / "parallel", "classify": workers})
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "preprocess").symlink_to(prep)
    out = run_train_classify(parallel, progress=False)
    again = list(csv.DictReader((out / "oof_predictions.csv").open()))
    assert [r["fold"] for r in again] == [r["fold"] for r in oof]
    assert [float(r["probability"]) for r in again] == pytest.approx(
        [float(r["probability"]) for r in oof], abs=1e-3
    )


def test_mixed_fold_ensemble_averages_both_models(trained, tmp_path):
    """classify.extra_models: a 3D CNN on the same whole-volume views joins the CNN-LSTM per fold."""
    config, root, _ = trained
    extra = [{"model": "cnn3d_views", "stem_stride": 2}]
    classify = config.classify.model_copy(
        update={"folds": 2, "epochs": 1, "n_boot": 20, "extra_models": extra}
    )
    (tmp_path / "thin").mkdir()
    (tmp_path / "thin" / "preprocess").symlink_to(config.run_dir / "preprocess")  # 3 of 12 slices
    with pytest.raises(ValueError, match="cnn3d_views needs whole-volume slab views"):
        run_train_classify(config.model_copy(update={"run": tmp_path / "thin", "classify": classify}))
    views = config.preprocess.views.model_copy(update={"thickness": SIZE, "center": "volume"})
    config = config.model_copy(
        update={
            "run": tmp_path / "run",
            "preprocess": config.preprocess.model_copy(update={"views": views}),
            "classify": classify,
        }
    )
    run_preprocess(config)
    out = run_train_classify(config, progress=False)
    model, _ = load_classifier(out / "checkpoint.pt")
    assert [type(m).__name__ for m in model.members] == ["MultiViewCNNLSTM"] * 2 + ["SlabVolume3DCNN"] * 2
    # an out-of-fold score is the mean of the two models' members that did not train on the case
    train = load_split(config.run_dir / "preprocess", "train", "views")
    for row in list(csv.DictReader((out / "oof_predictions.csv").open()))[:3]:
        x = torch.from_numpy(train.inputs[train.case_ids.index(row["case_id"])][None])
        scores = []
        for member in (f"fold{row['fold']}", f"fold{row['fold']}_1_cnn3d_views"):
            net, _ = load_classifier(out / member / "checkpoint.pt")
            with torch.no_grad():
                scores.append(float(torch.softmax(net(x), 1)[0, 1]))
        assert float(row["probability"]) == pytest.approx(np.mean(scores), abs=1e-5)
    run_evaluate_classify(config)
    path = run_predict_classify(out, root / "data" / "images" / "c00.nii.gz", tmp_path / "pred")
    assert next(csv.DictReader(path.open()))["status"] == "ok"


@pytest.mark.realdata
def test_adrenalmnist3d_smoke(tmp_path):
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "adrenalmnist3d"
    if not (data / "manifest.csv").is_file():
        pytest.skip(f"AdrenalMNIST3D not found: {data}")
    torch.set_num_threads(2)
    config = load_config(  # the shipped config (native grid, smoothed masks), made small and short
        Path(__file__).resolve().parents[1] / "data_manifests" / "adrenalmnist3d.yaml",
        **{
            "run": str(tmp_path / "run"),
            "data.manifest": str(data / "manifest.csv"),
            "preprocess.cache_volume": False,
            "preprocess.views.thickness": 5,
            "classify.affine_space": "view",  # 5 of 28 slices: the volume cannot be recut from them
            "preprocess.workers": 2,
            "classify.epochs": 3,
            "classify.folds": 2,
            "classify.features": 8,
            "classify.n_boot": 50,
        },
    )
    run_preprocess(config)
    run_train_classify(config, progress=False)
    metrics = json.loads(run_evaluate_classify(config).read_text())
    assert metrics["test"]["at_val_threshold"]["auc"]["value"] > 0.75

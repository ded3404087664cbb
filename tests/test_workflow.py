"""``medpipe run CONFIG.yaml``: the stages a config names, in order, from paths relative to the file."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.synth import write_cohort


def test_run_executes_the_configured_stages_and_records_their_timings(tmp_path, capsys):
    write_cohort(tmp_path / "exp" / "cohort", 6, 0.5, size=64, depth=24, seed=2)
    config = tmp_path / "exp" / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "wf",
                "stages": ["preprocess", "report"],
                "data": {"manifest": "cohort/manifest.csv"},  # relative to the config file
                "preprocess": {"shape": [32, 32, 32], "spacing": [6.0, 6.0, 6.0]},
            }
        )
    )
    run = tmp_path / "run"
    assert main(["run", str(config), "--run", str(run)]) == 0
    assert len(list((run / "preprocess" / "cache").glob("*.npz"))) == 6
    assert (run / "report" / "index.html").is_file()
    assert set(json.loads((run / "timings.json").read_text())) == {"preprocess", "report"}
    assert "timings: preprocess" in capsys.readouterr().out


def test_run_refuses_an_unknown_stage_naming_it(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"stages": ["preprocess", "trian"]}))
    assert main(["run", str(config), "--run", str(tmp_path / "run")]) == 2
    assert "trian" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "preprocess:\n  spacng: [1, 1, 1]\nclassify:\n  epochs: 0\n",
            "cfg.yaml: preprocess.spacng: unknown key; did you mean 'spacing'?; "
            "classify.epochs: Input should be greater than or equal to 1, got 0",
        ),
        (
            "preprocess: {spacing: [2, 2\n",
            "cfg.yaml: not valid YAML at line 2, column 1: expected ',' or ']'",
        ),
        (None, "cfg.yaml: config file not found"),
        ("data: [a, b]\n", "cfg.yaml: data: should be a mapping of keys, got ['a', 'b']"),
        ("predict: {segment: 3}\n", "cfg.yaml: predict.segment: Input is not a valid path"),
    ],
    ids=["misspelt_key_and_bad_value", "yaml_syntax", "missing", "section_not_a_mapping", "path_not_text"],
)
def test_config_errors_name_the_file_and_each_problem(tmp_path, capsys, text, message):
    config = tmp_path / "cfg.yaml"
    if text is not None:
        config.write_text(text)
    argv = ["preprocess", "--input", str(tmp_path), "--config", str(config), "--run", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_prints_the_resolved_config_with_its_data_paths_from_the_file(tmp_path, capsys):
    config = tmp_path / "exp" / "cfg.yaml"
    config.parent.mkdir()
    config.write_text("data: {manifest: cases.csv}\nclassify: {epochs: 7}\n")
    assert main(["config", str(config)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["manifest"] == str(config.parent.resolve() / "cases.csv")
    assert resolved["classify"]["epochs"] == 7 and resolved["segment"]["epochs"] == 30  # a default
    config.write_text("classify: {epoch: 7}\n")
    assert main(["config", str(config)]) == 2
    assert "classify.epoch: unknown key; did you mean 'epochs'?" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["report"], ["evaluate", "classify"], ["train", "segment"]])
def test_a_missing_run_folder_is_named(tmp_path, capsys, command):
    missing = tmp_path / "no_such_run"
    assert main([*command, "--run", str(missing)]) == 2
    assert f"{missing}: run folder not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flag"),
    [(["preprocess", "--input", "."], "--run"), (["synth", "--n", "2"], "--out"), (["demo"], "--run")],
)
def test_an_output_folder_that_is_a_file_is_named_as_such(tmp_path, capsys, command, flag):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert main([*command, flag, str(afile)]) == 2
    assert f"error: {afile}: {flag} names a file, not a folder" in capsys.readouterr().err


def test_an_input_folder_that_is_a_file_says_so(tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    assert main(["preprocess", "--input", str(scan), "--run", str(tmp_path / "run")]) == 2
    assert "scan.nii.gz: a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # so a later stage says to run preprocess


def test_a_batch_where_every_case_failed_exits_1_and_one_good_case_makes_it_0(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    assert main(["preprocess", "--input", str(scans), "--run", str(tmp_path / "run")]) == 1
    assert "0 ok, 0 skipped, 1 error" in capsys.readouterr().out
    write_cohort(tmp_path / "cohort", 1, 0.0, size=48, depth=16)
    good = next((tmp_path / "cohort" / "images").glob("*.nii.gz"))
    (scans / good.name).write_bytes(good.read_bytes())
    assert main(["preprocess", "--input", str(scans), "--run", str(tmp_path / "run")]) == 0


def test_run_prints_the_preprocess_ledger_and_stops_with_1_when_every_case_failed(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"stages": ["preprocess", "report"], "data": {"input": "scans"}}))
    run = tmp_path / "run"
    assert main(["run", str(config), "--run", str(run)]) == 1
    captured = capsys.readouterr()
    assert "preprocess: 0 ok, 0 skipped, 1 error" in captured.out and "error broken" in captured.out
    assert "stopped after preprocess" in captured.err
    assert not (run / "report").exists()


def test_training_a_classifier_before_preprocess_says_to_preprocess(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("name: early\n")
    run = tmp_path / "run"
    assert main(["train", "classify", "--run", str(run), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'preprocess' / 'params.json'}: not found; run `medpipe preprocess`" in err
    assert not (run / "classify").exists()

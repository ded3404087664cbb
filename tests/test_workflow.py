"""``medpipe run CONFIG.yaml``: the stages a config names, in order, from paths relative to the file."""

from __future__ import annotations

import json

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

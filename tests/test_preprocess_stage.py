"""The preprocess stage end to end on a synthetic cohort: outputs, fingerprint, resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import load_config
from pipeline.preprocess.cache import VIEW_NAMES, load_entry
from pipeline.preprocess.stage import run_preprocess
from pipeline.synth import write_cohort

SMALL = {
    "preprocess.shape": [48, 48, 48],
    "preprocess.spacing": [4.0, 4.0, 4.0],
    "preprocess.cache_volume": True,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"), 24, 0.25, size=64, depth=40, seed=3)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_stage_writes_cache_cases_ledger_and_fingerprint(cohort, tmp_path):
    config = load_config(None, run=tmp_path / "run", **{"data.manifest": str(cohort), **SMALL})
    out = run_preprocess(config)

    ledger = _read_csv(out / "ledger.csv")
    assert [r["status"] for r in ledger] == ["ok"] * 24
    cases = _read_csv(out / "cases.csv")
    assert Counter(r["label_name"] for r in cases) == {"normal": 18, "lesion": 6}
    splits = Counter(r["split"] for r in cases)
    assert set(splits) == {"train", "val", "test"} and splits["train"] > splits["test"]
    assert all(r["split"] for r in cases)

    arrays, meta = load_entry(out / cases[0]["cache"])
    assert arrays["views"].shape == (len(VIEW_NAMES), 1, 48, 48)
    assert arrays["mask_views"].shape == (3, 1, 48, 48) and arrays["mask_views"].max() >= 1
    assert arrays["volume"].shape == (48, 48, 48) and arrays["mask"].shape == (48, 48, 48)
    assert arrays["views"].min() >= 0.0 and arrays["views"].max() <= 1.0  # CT window scaled to [0, 1]
    assert meta["case_id"] == cases[0]["case_id"] and meta["split"] == cases[0]["split"]

    # Lungs (mask) are dark in the windowed volume: -850 HU is about 0.1 in [-1024, 600].
    lung = arrays["volume"][arrays["mask"] > 0].astype(np.float32)
    assert 0.0 < np.median(lung) < 0.2

    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["status"] == {"ok": 24}
    assert sum(sum(c.values()) for c in fp["class_counts"].values()) == 24
    assert fp["native_spacing_mm"]["max"][2] > fp["native_spacing_mm"]["min"][0]  # anisotropic input
    assert -1000 < fp["foreground_intensity_percentiles"]["p50"] < 200
    params = json.loads((out / "params.json").read_text())
    assert params["classes"] == ["lesion", "normal"] or params["classes"] == ["normal", "lesion"]


def test_rerun_skips_valid_entries_and_redoes_when_parameters_change(cohort, tmp_path):
    config = load_config(None, run=tmp_path / "run", **{"data.manifest": str(cohort), **SMALL})
    out = run_preprocess(config)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.npz")}
    run_preprocess(config)
    assert [r["status"] for r in _read_csv(out / "ledger.csv")] == ["skipped"] * 24
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.npz")} == stamps

    changed = load_config(
        None,
        run=tmp_path / "run",
        **{"data.manifest": str(cohort), **SMALL, "preprocess.views.mode": "projections"},
    )
    run_preprocess(changed)
    assert [r["status"] for r in _read_csv(out / "ledger.csv")] == ["ok"] * 24
    arrays, _ = load_entry(next((out / "cache").glob("*.npz")))
    assert arrays["views"].shape[1] == 3  # slice, mean, max


def test_a_damaged_cache_entry_is_named_and_a_rerun_rebuilds_it(cohort, tmp_path):
    config = load_config(None, run=tmp_path / "run", **{"data.manifest": str(cohort), **SMALL})
    entry = next((run_preprocess(config) / "cache").glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, e.g. by a crash of the file system
    with pytest.raises(ValueError, match=rf"{entry.name}: damaged cache entry .*rerun preprocess"):
        load_entry(entry)
    run_preprocess(config)
    assert load_entry(entry)[0]["views"].ndim == 4


def test_rerun_redoes_cases_cached_by_other_medpipe_code(cohort, tmp_path, monkeypatch):
    """An upgrade (another code digest) must not reuse the cache the old code wrote."""
    from pipeline import batch

    config = load_config(None, run=tmp_path / "run", **{"data.manifest": str(cohort), **SMALL})
    out = run_preprocess(config)
    monkeypatch.setattr(batch, "code_digest", lambda: "the next release")
    run_preprocess(config)
    assert [r["status"] for r in _read_csv(out / "ledger.csv")] == ["ok"] * 24


def test_killed_run_resumes_each_case_exactly_once(tmp_path):
    """SIGKILL the whole process group mid-run, rerun: nothing lost, duplicated, redone or half-written."""
    manifest = write_cohort(tmp_path / "cohort", 40, 0.2, size=96, depth=60, seed=5)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"preprocess": {"shape": [112, 112, 112], "spacing": [2.0, 2.0, 2.0]}}))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "preprocess",
        "--manifest",
        str(manifest),
        "--run",
        str(run),
        "--config",
        str(config),
    ]
    ledger = run / "preprocess" / "ledger.csv"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.is_file() and ledger.read_text().count(",ok,") >= 8:  # a serial run adds running rows
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make the cases slower"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    finished = {r["case_id"] for r in _read_csv(ledger) if r["status"] == "ok"}
    assert 8 <= len(finished) < 40
    stamps = {cid: (run / "preprocess" / "cache" / f"{cid}.npz").stat().st_mtime_ns for cid in finished}

    subprocess.run(cmd, check=True, capture_output=True)
    rows = _read_csv(ledger)
    counts = Counter(r["case_id"] for r in rows)
    assert len(counts) == 40 and set(counts.values()) == {1}
    status = {r["case_id"]: r["status"] for r in rows}
    assert all(status[cid] == "skipped" for cid in finished)
    # A case killed after its entry was renamed into place but before its ledger row is skipped too.
    assert all(s in ("ok", "skipped") for s in status.values())
    for cid, stamp in stamps.items():
        assert (run / "preprocess" / "cache" / f"{cid}.npz").stat().st_mtime_ns == stamp
    assert not list((run / "preprocess").rglob(".*tmp*"))
    for path in (run / "preprocess" / "cache").glob("*.npz"):
        load_entry(path)  # every entry left on disk is complete

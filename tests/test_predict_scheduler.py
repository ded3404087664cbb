"""``medpipe predict segment --scheduler``: the cases run on a Dask cluster, with the serial results."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.batch import Ledger
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.synth import write_cohort
from pipeline.train.segment import run_train_segment


def test_predict_segment_on_a_dask_cluster_matches_the_serial_run(tmp_path):
    distributed = pytest.importorskip("distributed")
    manifest = write_cohort(tmp_path / "cohort", 6, 0.0, size=48, depth=16, seed=3)
    segment = {"epochs": 1, "size": 32, "channels": [4, 8], "num_res_units": 0, "slices_per_volume": 2}
    config = load_config(
        None,
        run=tmp_path / "run",
        **{"data.manifest": str(manifest), **{f"segment.{k}": v for k, v in segment.items()}},
    )
    model = run_train_segment(config)
    serial, dask_out = tmp_path / "serial", tmp_path / "dask"
    common = ["predict", "segment", "--model", str(model), "--input", str(manifest)]
    assert main([*common, "--out", str(serial)]) == 0
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as stream,
    ):
        assert main([*common, "--out", str(dask_out), "--scheduler", cluster.scheduler_address]) == 0
    assert len([t for t in stream.data if t["key"].startswith("medpipe-")]) == 6  # ran on the workers
    rows = Ledger(dask_out / "ledger.csv").rows()
    assert len(rows) == 6 and {r.status for r in rows.values()} == {"ok"}
    for cid in rows:
        masks = [np.asarray(nib.load(out / "masks" / f"{cid}.nii.gz").dataobj) for out in (serial, dask_out)]
        np.testing.assert_array_equal(*masks)
    assert (serial / "volumes.csv").read_text() == (dask_out / "volumes.csv").read_text()


def test_an_unreachable_scheduler_is_a_usage_error(tmp_path, capsys):
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    manifest = write_cohort(tmp_path / "cohort", 2, 0.0, size=48, depth=16, seed=1)
    command = ["preprocess", "--manifest", str(manifest), "--run", str(tmp_path / "run")]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main([*command, "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err

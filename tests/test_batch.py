"""The batch executor and its ledger: per-case failures, torn lines, the same results in every mode."""

from __future__ import annotations

import csv
import errno
import filecmp
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.batch import Ledger, ResultTable, Row, Task, run_cases
from pipeline.config import load_config
from pipeline.preprocess.stage import run_preprocess
from pipeline.synth import write_cohort


def square_or_fail(n: int) -> Row:
    """A case function: fails on 3, else reports n squared."""
    if n == 3:
        raise RuntimeError("three is bad")
    return Row(f"case{n}", "ok", output=str(n * n))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_failing_case_gets_an_error_row_and_the_rest_finish(tmp_path, workers):
    ledger = Ledger(tmp_path / "ledger.csv")
    tasks = [Task(f"case{n}", n) for n in range(6)]
    rows = run_cases(square_or_fail, tasks, ledger, workers=workers)
    assert len(rows) == 6
    latest = ledger.rows()
    assert latest["case3"].status == "error" and "three is bad" in latest["case3"].reason
    assert {cid: r.output for cid, r in latest.items() if r.status == "ok"} == {
        f"case{n}": str(n * n) for n in (0, 1, 2, 4, 5)
    }


def nap_then_mark(payload: tuple[str, int]) -> Row:
    """A case function: a short nap, then a marker file saying the case finished."""
    folder, n = payload
    time.sleep(0.3)
    (Path(folder) / f"case{n}.done").touch()
    return Row(f"case{n}", "ok")


def test_ctrl_c_with_workers_keeps_every_finished_case_and_drops_the_queue(tmp_path):
    """Ctrl-C reaches the parent and, from a terminal, the workers too; the pool must not deadlock,
    and every case that finished must have its ledger row."""

    def ctrl_c_after_two_cases() -> None:
        while len(list(tmp_path.glob("*.done"))) < 2:
            time.sleep(0.02)
        for pid in [p.pid for p in multiprocessing.active_children()] + [os.getpid()]:
            os.kill(pid, signal.SIGINT)

    ledger = Ledger(tmp_path / "ledger.csv")
    tasks = [Task(f"case{n}", (str(tmp_path), n)) for n in range(60)]
    interrupter = threading.Thread(target=ctrl_c_after_two_cases)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        run_cases(nap_then_mark, tasks, ledger, workers=2)
    interrupter.join()
    finished = {p.name.removesuffix(".done") for p in tmp_path.glob("*.done")}
    assert 0 < len(finished) < 60
    assert set(ledger.rows()) == finished and all(r.status == "ok" for r in ledger.rows().values())


def test_ledger_ignores_a_torn_last_line_and_compacts_to_one_row_per_case(tmp_path):
    ledger = Ledger(tmp_path / "ledger.csv")
    ledger.append(Row("a", "error", "first try failed"))
    ledger.append(Row("b", "ok", output="b.npz"))
    ledger.append(Row("a", "ok", output="a.npz"))
    with ledger.path.open("a") as fh:
        fh.write("c,ok,,0.1")  # a run killed mid-write: no output column, no newline
    assert set(ledger.rows()) == {"a", "b"}
    assert ledger.rows()["a"].status == "ok"
    ledger.compact(["b", "a", "c"])
    lines = ledger.path.read_text().splitlines()
    assert lines[0] == "case_id,status,reason,seconds,output,signature"
    assert [line.split(",")[0] for line in lines[1:]] == ["b", "a"]


def test_dask_local_cluster_gives_byte_identical_cache_entries(tmp_path):
    distributed = pytest.importorskip("distributed")
    manifest = write_cohort(tmp_path / "cohort", 8, 0.25, size=64, depth=32, seed=4)
    overrides = {
        "data.manifest": str(manifest),
        "preprocess.shape": [40, 40, 40],
        "preprocess.spacing": [4.0] * 3,
    }
    serial = run_preprocess(load_config(None, run=tmp_path / "serial", **overrides))
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        overrides["preprocess.scheduler"] = cluster.scheduler_address
        dask_out = run_preprocess(load_config(None, run=tmp_path / "dask", **overrides))
    entries = sorted(p.name for p in (serial / "cache").glob("*.npz"))
    assert len(entries) == 8
    assert entries == sorted(p.name for p in (dask_out / "cache").glob("*.npz"))
    for name in entries:
        assert filecmp.cmp(serial / "cache" / name, dask_out / "cache" / name, shallow=False), name
    statuses = {r.status for r in Ledger(dask_out / "ledger.csv").rows().values()}
    assert statuses == {"ok"}


def test_dask_workers_restarted_mid_run_then_rerun_finish_every_case_once(tmp_path):
    distributed = pytest.importorskip("distributed")
    manifest = write_cohort(tmp_path / "cohort", 16, 0.25, size=96, depth=48, seed=6)
    overrides = {"data.manifest": str(manifest), "preprocess.shape": [96, 96, 96]}
    ledger = Ledger(tmp_path / "run" / "preprocess" / "ledger.csv")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        overrides["preprocess.scheduler"] = cluster.scheduler_address
        config = load_config(None, run=tmp_path / "run", **overrides)
        worker = threading.Thread(target=run_preprocess, args=(config,))
        worker.start()
        deadline = time.monotonic() + 120
        while len(ledger.rows()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with distributed.Client(cluster.scheduler_address) as client:
            client.restart()  # kills and replaces both worker processes mid-run
        worker.join(timeout=300)
        assert not worker.is_alive()
        first = ledger.rows()
        assert len(first) == 16  # every case has a row, even those the restart lost
        done_first = {cid for cid, r in first.items() if r.status == "ok"}
        assert 2 <= len(done_first) < 16, "the restart should have cut the run short"
        run_preprocess(config)  # the rerun, on the same (restarted) cluster
    rows = list(csv.DictReader((ledger.path).open()))
    assert sorted(r["case_id"] for r in rows) == sorted(first)  # each case exactly once
    assert all(r["status"] == "skipped" for r in rows if r["case_id"] in done_first)
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    assert not list((tmp_path / "run").rglob(".*tmp*"))


def test_result_table_resumes_only_cases_finished_in_both_ledger_and_table(tmp_path):
    ledger = Ledger(tmp_path / "ledger.csv")
    for cid, status in (("a", "ok"), ("b", "ok"), ("c", "error")):
        ledger.append(Row(cid, status))
    first = ResultTable(tmp_path / "results.csv", ("case_id", "value"), ["a", "b", "c", "d"], interval=3600)
    first.put("a", {"value": "1"})  # the first put writes; "b" is lost to a kill before the next rewrite
    first.put("b", {"value": "2"})
    first.put("c", {"value": "error row"})
    again = ResultTable(tmp_path / "results.csv", ("case_id", "value"), ["a", "b", "c", "d"])
    assert again.resume(ledger) == {"a"}  # b: no row survived, so it is redone; c: failed, redone
    again.put("d", {"value": "4"})
    again.put("b", {"value": "2"})
    again.write()
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines == ["case_id,value", "a,1", "b,2", "d,4"]  # input order, one row per case


def test_a_folder_signature_follows_the_files_in_it(tmp_path):
    """A DICOM series rewritten in place leaves its folder's own mtime alone; its files' do not."""
    import os

    from pipeline.batch import case_signature

    series = tmp_path / "series"
    series.mkdir()
    for n in range(3):
        (series / f"{n}.dcm").write_bytes(b"slice %d" % n)
    first = case_signature("params", [series])
    folder_time = series.stat().st_mtime_ns
    (series / "1.dcm").write_bytes(b"slice 9")  # same name, same size
    os.utime(series / "1.dcm", ns=(folder_time + 10**9, folder_time + 10**9))
    assert series.stat().st_mtime_ns == folder_time
    assert case_signature("params", [series]) != first
    assert case_signature("other params", [series]) != case_signature("params", [series])


def test_atomic_writes_get_the_umask_mode_not_mkstemps_owner_only(tmp_path, monkeypatch):
    import os

    import pipeline.io

    umask = os.umask(0o022)
    os.umask(umask)
    assert 0o666 & ~umask == pipeline.io.FILE_MODE  # what the process's umask gives a new file
    monkeypatch.setattr(pipeline.io, "FILE_MODE", 0o644)  # a umask of 022, as on most systems
    with pipeline.io.atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("a,b\n")
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o644


def test_code_digest_covers_the_package_source_and_library_versions(tmp_path, monkeypatch):
    from pipeline import batch

    digest = batch.code_digest()
    assert len(digest) == 64 and digest == batch.code_digest()
    batch.code_digest.cache_clear()
    monkeypatch.setattr(batch, "version", lambda name: "0.0" if name == "torch" else "1.0")
    try:
        assert batch.code_digest() != digest
    finally:
        batch.code_digest.cache_clear()


def fill_the_disk_at_three(payload: tuple[str, int]) -> Row:
    """A case function: case 3 finds the output disk full."""
    folder, n = payload
    if n == 3:
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "case3.nii.gz"))
    time.sleep(0.05)
    return Row(f"case{n}", "ok")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_disk_stops_the_batch_and_keeps_the_finished_rows(tmp_path, workers):
    ledger = Ledger(tmp_path / "ledger.csv")
    tasks = [Task(f"case{n}", (str(tmp_path), n)) for n in range(40)]
    with pytest.raises(OSError) as info:
        run_cases(fill_the_disk_at_three, tasks, ledger, workers=workers)
    assert info.value.errno == errno.ENOSPC
    rows = ledger.rows()
    assert {"case0", "case1", "case2"} <= set(rows) and len(rows) < 12  # the queue was dropped
    assert all(r.status == "ok" for r in rows.values())


@pytest.mark.parametrize("lost", ["disk", "scheduler"])
def test_the_cli_names_a_stopped_batch_and_exits_3(tmp_path, capsys, monkeypatch, lost):
    from pipeline import cli
    from pipeline.batch import SchedulerLost

    def stopped(args):
        if lost == "disk":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ledger.csv"))
        raise SchedulerLost(
            "lost the Dask scheduler at tcp://h:1 (CancelledError); ... rerun the same command to go on"
        )

    monkeypatch.setattr(cli, "cmd_preprocess", stopped)
    assert cli.main(["preprocess", "--input", str(tmp_path), "--run", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert ("No space left on device" if lost == "disk" else "lost the Dask scheduler") in err
    assert "rerun the same command to go on" in err and "Traceback" not in err


def slow_square(n: int) -> Row:
    """A case function that takes a while, so a batch can be cut off in the middle."""
    time.sleep(0.3)
    return Row(f"case{n}", "ok", output=str(n * n))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lost_dask_scheduler_stops_the_batch_and_keeps_the_finished_rows(tmp_path):
    """Not 30 error rows and exit 0: the cases after the loss are the cluster's fault, not theirs."""
    pytest.importorskip("distributed")
    import subprocess
    import sys

    from pipeline.batch import SchedulerLost

    port = str(_free_port())
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # the worker unpickles slow_square
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}

    def dask(command: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", f"distributed.cli.dask_{command}", *args], **quiet)

    scheduler = dask("scheduler", "--host", "127.0.0.1", "--port", port)
    worker = dask("worker", address, "--nthreads", "1")
    ledger = Ledger(tmp_path / "ledger.csv")
    try:

        def kill_after_two(row: Row) -> None:
            if len(ledger.rows()) == 2:
                scheduler.kill()

        with pytest.raises(SchedulerLost, match=rf"lost the Dask scheduler at {address}.*rerun"):
            run_cases(
                slow_square,
                [Task(f"case{n}", n) for n in range(30)],
                ledger,
                scheduler=address,
                on_row=kill_after_two,
            )
    finally:
        for process in (scheduler, worker):
            process.kill()
            process.wait()
    rows = ledger.rows()
    assert len(rows) >= 2 and all(r.status == "ok" for r in rows.values())  # no error rows for the rest


def test_stale_temporaries_go_and_a_case_named_like_one_stays(tmp_path):
    from pipeline.io import atomic_path, remove_stale_temps

    kept = tmp_path / ".night.tmp2.nii.gz"  # a case's own output, however odd its id
    kept.write_bytes(b"mask")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "masks" / "a.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        leftover = tmp.with_name(tmp.name + ".copy")  # what a killed writer would leave behind
        leftover.write_bytes(b"half")
        raise RuntimeError
    assert remove_stale_temps(tmp_path) == 1 and not leftover.exists() and kept.is_file()


def test_a_name_near_the_length_limit_is_written_atomically(tmp_path):
    from pipeline.io import atomic_path

    path = tmp_path / ("L" * 240 + ".nii.gz")  # 247 bytes: fits, though its temporary name would not
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"mask")
    assert path.read_bytes() == b"mask" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_second_input_into_the_same_table_keeps_the_first_inputs_rows(tmp_path):
    from pipeline.batch import run_into_table

    def run(ids: list[str]) -> list[str]:
        table = ResultTable(tmp_path / "results.csv", ("case_id", "value"), ids)
        payloads = {cid: int(cid[4:]) for cid in ids}
        run_into_table(
            square_or_fail, payloads, table, lambda r: {"value": r.output}, tmp_path / "ledger.csv", desc="t"
        )
        return (tmp_path / "results.csv").read_text().splitlines()

    assert run(["case1", "case2"]) == ["case_id,value", "case1,1", "case2,4"]
    assert run(["case4"]) == ["case_id,value", "case1,1", "case2,4", "case4,16"]
    ledger = Ledger(tmp_path / "ledger.csv").rows()
    assert [(cid, r.status) for cid, r in ledger.items()] == [
        ("case1", "skipped"),
        ("case2", "skipped"),
        ("case4", "ok"),
    ]


def test_a_second_input_from_another_model_does_not_keep_the_first_models_rows(tmp_path, capsys):
    from pipeline.batch import case_signature, run_into_table

    def run(ids: list[str], model: str) -> list[str]:
        table = ResultTable(tmp_path / "results.csv", ("case_id", "value"), ids)
        payloads = {cid: int(cid[4:]) for cid in ids}
        signatures = {cid: case_signature(model, []) for cid in ids}
        run_into_table(
            square_or_fail,
            payloads,
            table,
            lambda r: {"value": r.output},
            tmp_path / "ledger.csv",
            desc="t",
            signatures=signatures,
        )
        return (tmp_path / "results.csv").read_text().splitlines()

    run(["case1", "case2"], "model A")
    assert run(["case4"], "model A") == ["case_id,value", "case1,1", "case2,4", "case4,16"]
    assert run(["case5"], "model B") == ["case_id,value", "case5,25"]
    assert "3 case(s) of an earlier run with another model" in capsys.readouterr().err


def crash_on_three(payload: tuple[str, int]) -> Row:
    """A case function: a segfault on 3 (as a broken reader would), else a marker and an ok row."""
    folder, n = payload
    if n == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    (Path(folder) / f"case{n}.done").touch()
    return Row(f"case{n}", "ok")


def test_a_worker_segfault_fails_only_its_case_and_the_pool_goes_on(tmp_path):
    ledger = Ledger(tmp_path / "ledger.csv")
    tasks = [Task(f"case{n}", (str(tmp_path), n)) for n in range(8)]
    rows = run_cases(crash_on_three, tasks, ledger, workers=2)
    assert sorted(r.case_id for r in rows) == sorted(t.case_id for t in tasks)  # one row each
    latest = ledger.rows()
    assert latest["case3"].status == "error" and "SIGSEGV" in latest["case3"].reason
    assert {cid for cid, r in latest.items() if r.status == "ok"} == {f"case{n}" for n in range(8) if n != 3}


def test_a_serial_rerun_after_a_segfault_isolates_that_case_and_finishes_the_rest(tmp_path):
    """A serial run dies with the case that segfaults; the rerun runs that case in a process of its
    own, so it gets an error row, and every other case finishes."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_batch import crash_on_three; from pipeline.batch import Ledger, Task, run_cases;"
        "run_cases(crash_on_three, [Task(f'case{n}', (sys.argv[2], n)) for n in range(6)],"
        " Ledger(sys.argv[2] + '/ledger.csv'))"
    )
    died = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)], check=False
    )
    assert died.returncode == -signal.SIGSEGV
    ledger = Ledger(tmp_path / "ledger.csv")
    assert ledger.interrupted() == {"case3"} and set(ledger.rows()) == {"case0", "case1", "case2"}
    rows = run_cases(crash_on_three, [Task(f"case{n}", (str(tmp_path), n)) for n in range(3, 6)], ledger)
    assert [r.case_id for r in rows] == ["case3", "case4", "case5"]
    latest = ledger.rows()
    assert latest["case3"].status == "error" and "SIGSEGV" in latest["case3"].reason
    assert all(latest[f"case{n}"].status == "ok" for n in (0, 1, 2, 4, 5)) and not ledger.interrupted()


def echo(case_id: str) -> Row:
    return Row(case_id, "ok")


def test_a_long_batch_on_a_pool_does_not_stall_on_the_workers_start_messages(tmp_path):
    """Each worker names the case it starts; 1,000 long ids are over 64 KiB, a pipe's buffer, so a
    parent that read them only at the end would leave the workers blocked (it once did)."""
    ids = [f"case{n:04d}-" + "x" * 150 for n in range(1000)]
    rows = run_cases(echo, [Task(cid, cid) for cid in ids], Ledger(tmp_path / "ledger.csv"), workers=2)
    assert sorted(r.case_id for r in rows) == ids and all(r.status == "ok" for r in rows)

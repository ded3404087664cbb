"""Per-case batch work with a resumable ledger.

``run_cases`` runs a function over cases serially (``workers=0``), on a pool of local processes
(``workers=N``) or on an existing Dask distributed cluster (``scheduler="tcp://host:8786"``; start
one on SLURM/PBS with dask-jobqueue, see README). The ledger semantics are the same in every mode.
Each case's outcome is one ledger row ``case_id, status, reason, seconds, output, signature``
with status ``ok``, ``skipped`` or ``error``; ``signature`` identifies the inputs and settings the
case ran with (``case_signature``), so a rerun redoes a case whose file, model or medpipe code (or
the version of a library it runs on) changed. Rows
are appended and flushed as cases finish, so a killed run loses at most the cases in flight; at the
end the ledger is rewritten with exactly one row per case. An exception in one case becomes that
case's error row; the batch goes on, except where the output storage itself fails (full, over
quota, read-only: ``STORAGE_ERRNOS``): that would fail every case after it, so the batch stops,
keeping the rows of the cases that finished, and the error goes to the caller.

The case function runs in the worker and must write its own outputs atomically; the parent process
is the only writer of the ledger.

Example:
    >>> ledger = Ledger(run / "ledger.csv")                            # doctest: +SKIP
    >>> rows = run_cases(work, tasks, ledger, workers=2, desc="preprocess")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline.io import atomic_path

__all__ = [
    "Ledger",
    "ResultTable",
    "Row",
    "SchedulerLost",
    "Task",
    "case_signature",
    "code_digest",
    "run_cases",
    "run_into_table",
    "storage_failure",
]
LIBRARIES = ("numpy", "scipy", "SimpleITK", "nibabel", "monai", "torch")
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
RUNNING = "running"  # a serial run's mark before each case, so a rerun knows the case it ended on


def storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the output storage cannot be written (not one case's fault)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


@dataclass
class Row:
    """One case's outcome. ``extra`` carries stage data (e.g. stats) and is not written."""

    case_id: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    output: str = ""
    signature: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def record(self) -> dict[str, str]:
        data = asdict(self)
        data.pop("extra")
        data["seconds"] = f"{self.seconds:.3f}"
        return data


COLUMNS = tuple(f.name for f in fields(Row) if f.name != "extra")


@dataclass(frozen=True)
class Task:
    """A unit of work: the case id and the picklable argument handed to the case function."""

    case_id: str
    payload: Any
    signature: str = ""


@functools.cache
def code_digest() -> str:
    """A hash of medpipe's own source files and of the versions of the libraries that shape its
    outputs, so an upgrade (or a local edit) invalidates cached and predicted cases."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    for name in LIBRARIES:
        digest.update(f"{name}={version(name)}".encode())
    return digest.hexdigest()


def case_signature(base: str, paths: Iterable[Path | None]) -> str:
    """``HEAD-TAIL``: a short hash of ``base`` (the run's parameters) and ``code_digest``, then one
    of the size and mtime of each input path; a folder (a DICOM series) counts by the files in it,
    which can be rewritten without touching it. Cases of one run share the head."""
    head = hashlib.sha256(f"{base}|{code_digest()}".encode()).hexdigest()[:10]
    parts = []
    for path in paths:
        if path is None or not path.exists():
            continue
        for file in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:
            st = file.stat()
            parts.append(f"{file}:{st.st_size}:{st.st_mtime_ns}")
    return f"{head}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:10]}"


def _signature_head(signature: str) -> str:
    return signature.partition("-")[0]


class Ledger:
    """An append-as-you-go CSV of case outcomes; the last row for a case wins."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> dict[str, Row]:
        """The latest row per case (a torn last line from a killed run is ignored), without the
        cases whose latest row only says they were running."""
        return {cid: row for cid, row in self._latest().items() if row.status != RUNNING}

    def interrupted(self) -> set[str]:
        """The cases whose last row says they were running: a serial run ended (crashed, killed)
        while on them."""
        return {cid for cid, row in self._latest().items() if row.status == RUNNING}

    def _latest(self) -> dict[str, Row]:
        if not self.path.is_file():
            return {}
        latest: dict[str, Row] = {}
        with self.path.open(newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                if rec.get("output") is None or rec.get("status") not in ("ok", "skipped", "error", RUNNING):
                    continue
                try:
                    seconds = float(rec["seconds"])
                except ValueError:
                    continue
                latest[rec["case_id"]] = Row(
                    rec["case_id"],
                    rec["status"],
                    rec["reason"],
                    seconds,
                    rec["output"],
                    rec.get("signature") or "",
                )
        return latest

    def append(self, row: Row) -> None:
        """Append one row and push it to disk."""
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row.record())
            fh.flush()
            os.fsync(fh.fileno())

    def compact(self, order: Sequence[str], replace: dict[str, Row] | None = None) -> None:
        """Rewrite the ledger atomically with one row per case, in the given order (``replace``:
        rows that take the place of a case's latest one)."""
        latest = {**self.rows(), **(replace or {})}
        with atomic_path(self.path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, COLUMNS)
            writer.writeheader()
            for cid in order:
                if cid in latest:
                    writer.writerow(latest[cid].record())


class ResultTable:
    """A per-case results CSV kept beside a ledger (``predictions.csv``, ``volumes.csv``).

    Rows are kept in input order and the file is rewritten atomically at most every
    ``interval`` seconds while cases finish, and once at the end (``write``). A rerun treats a case as
    done only if the ledger says ``ok`` (or ``skipped``: done by a run before) *and* its row is in the
    table, so a row lost to a kill between two rewrites just gets its case redone.
    """

    def __init__(self, path: str | Path, columns: Sequence[str], order: Sequence[str], interval: float = 2.0):
        self.path, self.columns, self.order, self.interval = Path(path), tuple(columns), list(order), interval
        self.rows: dict[str, dict[str, str]] = {}
        self._written = -math.inf  # the first put writes, however young the monotonic clock is

    def resume(self, ledger: Ledger) -> set[str]:
        """Load the rows of the cases a previous run finished; return their ids."""
        finished = {cid for cid, row in ledger.rows().items() if row.status in ("ok", "skipped")}
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as fh:
                self.rows = {r["case_id"]: r for r in csv.DictReader(fh) if r["case_id"] in finished}
        return set(self.rows)

    def put(self, case_id: str, record: dict[str, str]) -> None:
        """Add or replace a case's row; rewrite the file if the last rewrite is old enough."""
        self.rows[case_id] = {"case_id": case_id, **record}
        if time.monotonic() - self._written >= self.interval:
            self.write()

    def write(self) -> None:
        with atomic_path(self.path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows[cid] for cid in self.order if cid in self.rows)
        self._written = time.monotonic()


def _guarded(fn: Callable[[Any], Row], task: Task) -> Row:
    """Run one case; turn any exception into an error row naming the reason."""
    start = time.perf_counter()
    try:
        row = fn(task.payload)
    except Exception as exc:  # one bad case must not stop the batch; a full disk must
        if storage_failure(exc):
            raise
        reason = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        return Row(task.case_id, "error", reason, time.perf_counter() - start)
    row.seconds = row.seconds or time.perf_counter() - start
    return row


class SchedulerLost(ConnectionError):
    """The Dask scheduler went away during a batch: not a case's fault, so the batch stops."""


try:  # a Dask worker plugin, so that workers which join after the batch starts are set up too
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # without Dask there is no --scheduler
    WorkerPlugin = object


class _OneThreadPerWorker(WorkerPlugin):  # type: ignore[misc, valid-type]
    """``_limit_threads`` on every Dask worker, as it starts or joins."""

    def setup(self, worker: object) -> None:
        _limit_threads()


def _limit_threads() -> None:
    """Keep each worker process to one thread so N workers use N cores. Ctrl-C is the parent's to
    handle: a worker interrupted inside the pool's queue locks would deadlock the pool."""
    import SimpleITK as sitk

    if threading.current_thread() is threading.main_thread():  # a threaded Dask worker has no say
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def run_cases(
    fn: Callable[[Any], Row],
    tasks: Iterable[Task],
    ledger: Ledger,
    workers: int = 0,
    desc: str = "cases",
    on_row: Callable[[Row], None] | None = None,
    scheduler: str | None = None,
) -> list[Row]:
    """Run ``fn(task.payload)`` for every task and record a ledger row for each, as it finishes.

    ``fn`` must be a picklable top-level function when ``workers > 0`` or a scheduler is given,
    or when a serial rerun isolates the case an earlier run ended on. A case whose process died
    (or whose Dask task was lost) gets an error row, and the other cases go on; a rerun redoes it.
    """
    tasks = list(tasks)
    rows: list[Row] = []
    signatures = {t.case_id: t.signature for t in tasks}

    def finish(row: Row) -> None:
        row.signature = signatures.get(row.case_id, "")
        ledger.append(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        bar.update(1)

    with tqdm(total=len(tasks), desc=desc, unit="case", disable=None) as bar:
        if scheduler is not None:
            _run_on_dask(fn, tasks, scheduler, finish)
        elif workers <= 0:
            _run_serially(fn, tasks, ledger, finish)
        else:
            _run_on_pool(fn, tasks, workers, finish)
    return rows


def _run_serially(
    fn: Callable[[Any], Row], tasks: list[Task], ledger: Ledger, finish: Callable[[Row], None]
) -> None:
    """Run each case in this process, after a ``running`` ledger row. A case a previous serial run
    ended on (it may have crashed the process: a reader's segfault) runs in a process of its own."""
    suspects = ledger.interrupted()
    if ran_last := suspects & {t.case_id for t in tasks}:
        print(
            f"note: {ledger.path}: the last run ended while on {', '.join(sorted(ran_last))}; "
            "each runs in a separate process this time, so a crash there cannot end the batch",
            file=sys.stderr,
        )
    for task in tasks:
        if task.case_id in suspects:
            finish(_run_alone(fn, task))
            continue
        ledger.append(Row(task.case_id, RUNNING))
        finish(_guarded(fn, task))


def _run_on_pool(
    fn: Callable[[Any], Row], tasks: list[Task], workers: int, finish: Callable[[Row], None]
) -> None:
    """Run the cases on a pool of ``workers`` processes. When a worker dies (a segfault, the OOM
    killer), the cases that had started and not finished are rerun one by one in a process of
    their own, which tells a crashing case from its bystanders, and a fresh pool takes the rest."""
    context = multiprocessing.get_context("spawn")
    while tasks:
        left, started = _pool_round(fn, tasks, workers, finish, context)
        suspects = [t for t in left if t.case_id in started] or left[:1]  # at least one case: progress
        for task in suspects:
            finish(_run_alone(fn, task))
        tasks = [t for t in left if t not in suspects]


def _pool_round(
    fn: Callable[[Any], Row], tasks: list[Task], workers: int, finish: Callable[[Row], None], context: Any
) -> tuple[list[Task], set[str]]:
    """Run ``tasks`` on a fresh pool until all finish or a worker dies; return those left over and
    the ids of the cases the workers had started."""
    recorded: set[str] = set()
    started: set[str] = set()
    told = context.SimpleQueue()  # read after every finished case, so its pipe never fills up

    def hear() -> None:
        while not told.empty():
            started.add(told.get())

    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(told,)
    ) as pool:
        futures: dict[Future, Task] = {pool.submit(_guarded_and_told, fn, t): t for t in tasks}
        try:
            for future in as_completed(futures):
                hear()
                if not isinstance(future.exception(), BrokenProcessPool):
                    finish(_pool_row(future, futures[future]))
                    recorded.add(futures[future].case_id)
        except BaseException:  # Ctrl-C, a full disk: the queue is dropped, the cases in flight count
            pool.shutdown(wait=True, cancel_futures=True)
            for future, task in futures.items():
                if future.done() and not future.cancelled() and task.case_id not in recorded:
                    with contextlib.suppress(OSError):  # the ledger may be what cannot be written
                        finish(_pool_row(future, task))
            raise
    hear()
    told.close()
    return [t for t in tasks if t.case_id not in recorded], started


_started_queue: Any = None  # in a pool worker: where it says which case it starts


def _start_worker(started: Any) -> None:
    """A pool worker's set-up: one thread, and the queue on which it names each case it starts."""
    global _started_queue
    _started_queue = started
    _limit_threads()


def _guarded_and_told(fn: Callable[[Any], Row], task: Task) -> Row:
    """``_guarded``, after telling the parent that this worker has started the case."""
    _started_queue.put(task.case_id)
    return _guarded(fn, task)


def _run_alone(fn: Callable[[Any], Row], task: Task) -> Row:
    """Run one case in a process of its own; an error row naming the signal if that process dies."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_row, args=(fn, task, sender), daemon=True)
    start = time.perf_counter()
    process.start()
    sender.close()
    try:
        outcome = receiver.recv()
    except EOFError:  # the process died without an answer
        outcome = None
    except BaseException:  # Ctrl-C: the process ignores it, so it is ended here
        process.kill()
        raise
    finally:
        process.join()
        receiver.close()
    if isinstance(outcome, BaseException):  # a storage failure, raised in the process
        raise outcome
    if outcome is None:
        return Row(
            task.case_id,
            "error",
            f"the process running this case died ({_exit_reason(process.exitcode)}), most likely in a "
            "reader or library on this file; the other cases went on",
            time.perf_counter() - start,
        )
    return outcome


def _send_row(fn: Callable[[Any], Row], task: Task, sender: Any) -> None:
    """In a process of its own: run the case and send back its row (or a storage failure)."""
    _limit_threads()
    try:
        outcome: Row | BaseException = _guarded(fn, task)
    except OSError as exc:  # only storage failures get out of _guarded
        outcome = exc
    sender.send(outcome)


def _exit_reason(code: int | None) -> str:
    """A dead process's exit code in words: ``SIGSEGV``, ``exit code 1``."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _pool_row(future: Future, task: Task) -> Row:
    """A finished future's row; an error row if its worker process died."""
    try:
        return future.result()
    except Exception as exc:
        if storage_failure(exc):
            raise
        return Row(task.case_id, "error", f"worker failed: {type(exc).__name__}: {exc}")


def run_into_table(
    fn: Callable[[Any], Row],
    payloads: dict[str, Any],
    table: ResultTable,
    to_record: Callable[[Row], dict[str, str]],
    ledger_path: Path,
    *,
    desc: str,
    workers: int = 0,
    scheduler: str | None = None,
    finished: Callable[[str], bool] | None = None,
    signatures: dict[str, str] | None = None,
) -> None:
    """Run ``fn`` on every case (``payloads``: case id → payload) a previous run did not finish, and
    keep the ledger and ``table`` (one record per case, by ``to_record``) in input order.

    A case counts as finished if the ledger says it was done (ok, or skipped as done before), its
    row is in the table, its ledger signature equals ``signatures[case_id]`` (the same input files,
    model and options) and ``finished(case_id)`` (for example: its output file exists). Finished
    cases get a ``skipped`` ledger row; the others are run, and a changed one replaces its old row.
    The cases of an earlier run into the same table that ``payloads`` does not name keep their rows
    (``skipped`` in the ledger), first, as their outputs stay beside the new ones, if that run had
    the same model, options and code (their signatures' head); else they are left out, with a
    warning.
    """
    signatures = signatures or {}
    ledger = Ledger(ledger_path)
    before = ledger.rows()
    resumed = table.resume(ledger)
    done = {
        cid
        for cid in resumed
        if cid in payloads
        and before[cid].signature == signatures.get(cid, "")
        and (finished is None or finished(cid))
    }
    # an earlier run's cases that this input does not name keep their rows, as their outputs stay,
    # if that run had the same model, options and code (the signatures' head); else they go
    heads = {_signature_head(signatures.get(cid, "")) for cid in payloads}
    earlier = [cid for cid in dict.fromkeys([*table.rows, *before]) if cid not in payloads]
    kept = [cid for cid in earlier if cid in before and _signature_head(before[cid].signature) in heads]
    if dropped := [cid for cid in earlier if cid not in kept]:
        print(
            f"warning: {table.path}: {len(dropped)} case(s) of an earlier run with another model, "
            f"options or medpipe version left out of the table (e.g. {dropped[0]}); their outputs stay",
            file=sys.stderr,
        )
    table.order = [*kept, *table.order]
    table.rows = {cid: row for cid, row in table.rows.items() if cid in done or cid in kept}
    tasks = [
        Task(cid, payload, signatures.get(cid, "")) for cid, payload in payloads.items() if cid not in done
    ]

    def record(row: Row) -> None:
        table.put(row.case_id, to_record(row))

    try:
        run_cases(fn, tasks, ledger, workers=workers, desc=desc, on_row=record, scheduler=scheduler)
    finally:  # an interrupted run keeps every row it finished, so a rerun redoes only the rest

        def skipped(cid: str, reason: str) -> Row:
            return Row(cid, "skipped", reason, 0.0, before[cid].output, before[cid].signature)

        replace = {cid: skipped(cid, "done by an earlier run") for cid in done}
        replace |= {
            cid: skipped(cid, "not in this input: kept from an earlier one")
            for cid in kept
            if before[cid].status != "error"
        }
        ledger.compact(table.order, replace=replace)
        table.write()


def _run_on_dask(
    fn: Callable[[Any], Row], tasks: list[Task], scheduler: str, finish: Callable[[Row], None]
) -> None:
    """Submit every task to a Dask distributed scheduler; ``finish`` each row as it completes."""
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError as exc:
        raise ValueError(f"--scheduler needs Dask distributed: pip install 'medpipe[dask]' ({exc})") from None
    try:
        client = Client(scheduler)
    except OSError as exc:  # unreachable or timed out
        raise ValueError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        client.register_plugin(_OneThreadPerWorker(), name="medpipe-one-thread")  # workers joining later too
        if not client.scheduler_info().get("workers"):
            print(
                f"warning: the Dask scheduler at {scheduler} has no workers yet; the cases wait for one",
                file=sys.stderr,
            )
        futures = {
            client.submit(_guarded, fn, t, pure=False, key=f"medpipe-{t.case_id}-{uuid.uuid4().hex[:8]}"): t
            for t in tasks
        }
        for future in dask_completed(futures):
            task = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # KilledWorker, a restart's CancelledError, a lost connection
                if storage_failure(exc):
                    client.cancel(list(futures))
                    raise
                if "scheduler-connection-lost" in str(exc) or type(exc).__name__ == "CommClosedError":
                    raise SchedulerLost(
                        f"lost the Dask scheduler at {scheduler} ({type(exc).__name__}); the cases that "
                        "finished are recorded: rerun the same command to go on"
                    ) from None
                row = Row(task.case_id, "error", f"worker failed: {type(exc).__name__}: {exc}")
            finish(row)

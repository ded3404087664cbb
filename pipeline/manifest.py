"""Cases from a manifest CSV or a scan folder, validated, with a deterministic split.

Manifest columns: ``case_id`` and ``image`` (required); ``label``, ``mask``, ``split``,
``patient_id`` and ``series_uid`` (optional). Paths are relative to the manifest's folder; an
``image`` may be a DICOM series folder, and ``series_uid`` picks one series of a folder that holds
several.

Problems with the file as a whole (not UTF-8, a missing or unknown column, duplicate ids, no rows)
raise ``ManifestError``, listing every one. Problems with one row (a missing file, a path that
escapes the manifest folder, an unknown label or split) are kept on that ``Case`` as ``problem`` so
the stage can give it an ``error`` ledger row while the other cases go on.

Example:
    >>> cases = read_manifest("data/manifest.csv")                      # doctest: +SKIP
    >>> cases = assign_splits(cases, val_fraction=0.15, test_fraction=0.15, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io import IMAGE_SUFFIXES

__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "Case",
    "CaseSet",
    "ManifestError",
    "assign_splits",
    "discover_folder",
    "input_cases",
    "read_manifest",
]

REQUIRED_COLUMNS = ("case_id", "image")
OPTIONAL_COLUMNS = ("label", "mask", "split", "patient_id", "series_uid")
SPLITS = ("train", "val", "test")
# Files a scan folder may hold beside its images; they are not cases.
SIDE_FILES = (".csv", ".json", ".md", ".txt", ".raw", ".zraw", ".yaml", ".yml", ".log")


class ManifestError(ValueError):
    """A manifest that cannot be used at all; the message lists every problem found."""

    def __init__(self, source: Path, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class Case:
    """One input case. ``problem`` is set when the row cannot be processed."""

    case_id: str
    image: Path
    mask: Path | None = None
    label: int | None = None
    split: str | None = None
    patient_id: str | None = None
    series_uid: str | None = None
    problem: str | None = None

    @property
    def group(self) -> str:
        """The unit that must not cross splits: the patient if known, else the case."""
        return self.patient_id or self.case_id


@dataclass
class CaseSet:
    """Cases plus the class names their label indices refer to."""

    cases: list[Case]
    classes: list[str] = field(default_factory=list)
    source: Path | None = None

    @property
    def problems(self) -> list[str]:
        return [f"{c.case_id}: {c.problem}" for c in self.cases if c.problem]


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(path, [f"cannot read ({exc.strerror})"]) from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, [f"not UTF-8 text (bad byte at offset {exc.start})"]) from exc


def _resolve(root: Path, value: str, allow_outside: bool) -> tuple[Path, str | None]:
    """Resolve a manifest path; return it with a problem string or None."""
    path = (root / value).resolve()
    if not allow_outside and not path.is_relative_to(root):
        return path, f"path {value!r} escapes the manifest folder (set data.allow_outside_paths)"
    if not path.exists():
        return path, f"file not found: {value}"
    return path, None


# Two-class labels where one is one of these (any case) make that one class 0, the negative class,
# whatever the alphabet says: "lesion, normal" must not make "normal" the positive class.
NEGATIVE_NAMES = frozenset(
    {"normal", "negative", "healthy", "benign", "control", "absent", "no", "none", "false"}
)


def _class_names(labels: list[str], declared: list[str] | None) -> list[str]:
    """Declared class names, or the sorted distinct labels (numerically when all are integers; a
    conventional negative name such as "normal" first when there are two). Where most labels are
    integers, the classes are those integers, so a stray "x" or "0.5" is that row's error rather
    than a class of its own."""
    if declared:
        return list(declared)
    distinct = sorted(set(labels))
    integers = [s for s in distinct if s.lstrip("-").isdigit()]
    if integers and 2 * sum(label in integers for label in labels) > len(labels):
        return [str(v) for v in sorted(int(s) for s in integers)]
    negative = [name.lower() in NEGATIVE_NAMES for name in distinct]
    if negative == [False, True]:
        return distinct[::-1]
    return distinct


# Label cells that spreadsheets and data-frame libraries write for a missing value; read as empty.
MISSING_LABELS = frozenset({"nan", "na", "n/a", "#n/a", "null"})


def _label_text(value: str) -> str:
    """A label cell as a class name: a missing-value marker becomes "", an integral float such as
    "1.0" (a label column exported with missing values) becomes "1", and "+1" becomes "1"."""
    if value.lower() in MISSING_LABELS:
        return ""
    if value.startswith("+") and value[1:].isdigit():  # "+1" beside "-1"
        value = value[1:]
    whole, dot, zeros = value.partition(".")
    if dot and whole.lstrip("-").isdigit() and zeros.strip("0") == "":
        return whole
    return value


MAX_CASE_ID_BYTES = 200  # leaves room in a 255-byte file name for suffixes and temporary marks
# a spreadsheet runs a cell starting with = or @, or with + or - unless it is a plain number, as a formula
FORMULA = re.compile(r"^(?:[=@]|[+-](?!\d*\.?\d+$))")
# text-direction overrides and isolates, zero-width space, byte-order mark: they disguise a name
HIDING = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\ufeff")


def _case_id_problem(cid: str, length: bool = True) -> str | None:
    """Why a case id cannot name output files (``masks/<case_id>.nii.gz``) and table rows, or None.
    ``length``: also refuse ids too long for a file name (a manifest's, which its author chose)."""
    if not cid:
        return "empty case_id"
    if "/" in cid or "\\" in cid or cid in (".", ".."):
        return f"case_id {cid!r} is not a plain file name (it names the case's output files)"
    if any(unicodedata.category(ch) == "Cc" or ch in HIDING for ch in cid):
        return f"case_id {cid!r} holds a control character or one that hides or reorders text"
    if cid.startswith("."):
        return f"case_id {cid!r} starts with '.', which would hide its output files"
    if FORMULA.match(cid):
        return f"case_id {cid!r} starts with {cid[0]!r}, which a spreadsheet runs as a formula"
    if length and (size := len(cid.encode("utf-8"))) > MAX_CASE_ID_BYTES:
        return f"case_id of {size} bytes is too long to name files (at most {MAX_CASE_ID_BYTES})"
    return None


def _label_index(value: str, classes: list[str]) -> int | None:
    """A label given as a class name or as a class index, or None if it is neither."""
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    return None


def read_manifest(path: str | Path, classes: list[str] | None = None, allow_outside: bool = False) -> CaseSet:
    """Read and validate a manifest CSV; see the module docstring for what is fatal."""
    path = Path(path).resolve()
    root = path.parent
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    fatal = [f"missing required column {c!r}" for c in REQUIRED_COLUMNS if c not in columns]
    fatal += [f"column {c!r} appears {n} times" for c, n in Counter(columns).items() if n > 1 and c]
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        fatal.append(f"unknown columns {unknown} (allowed: {list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
    if fatal:
        raise ManifestError(path, fatal)
    rows = []
    for row in reader:
        if any(v.strip() for v in row.get(None) or []):  # DictReader's key for fields past the header's
            fatal.append(
                f"line {reader.line_num}: {len(columns) + len(row[None])} fields, the header has "
                f"{len(columns)} (quote a value that holds a comma)"
            )
        rows.append(({k.strip(): (v or "").strip() for k, v in row.items() if k}, reader.line_num))
    if not rows:
        raise ManifestError(path, ["no rows"])
    seen: dict[str, tuple[str, int]] = {}  # lower-cased: output files of "A" and "a" collide on SMB/NTFS
    for row, line in rows:
        cid = row["case_id"]
        if (problem := _case_id_problem(cid)) is not None:
            fatal.append(f"line {line}: {problem}")
        elif (first := seen.get(cid.lower())) is not None:
            alike = "" if first[0] == cid else f", {first[0]!r}, which differs only in case"
            fatal.append(f"line {line}: duplicate case_id {cid!r} (first on line {first[1]}{alike})")
        else:
            seen[cid.lower()] = (cid, line)
    if fatal:
        raise ManifestError(path, fatal)

    for row, _ in rows:
        if "label" in row:
            row["label"] = _label_text(row["label"])
    paths = [(r, line) for r, line in rows if _image_stem(Path(r.get("label") or "x")) is not None]
    if paths:  # a label map put in the label column: no class to learn, and no reason to stop
        row, line = paths[0]
        print(
            f"warning: {path}: line {line}: label {row['label']!r} is a file name ({len(paths)} such), "
            "read as no label; a mask goes in the mask column",
            file=sys.stderr,
        )
        for row, _ in paths:
            row["label"] = ""
    names = _class_names([r["label"] for r, _ in rows if r.get("label")], classes)
    cases = []
    for row, line in rows:
        problems = []
        image, problem = (
            _resolve(root, row["image"], allow_outside) if row["image"] else (root, "empty image")
        )
        problems += [problem] if problem else []
        mask = None
        if row.get("mask"):
            mask, problem = _resolve(root, row["mask"], allow_outside)
            problems += [f"mask: {problem}"] if problem else []
        label = None
        if row.get("label"):
            label = _label_index(row["label"], names)
            if label is None:
                problems.append(f"label {row['label']!r} is not one of the classes {names}")
        split = row.get("split") or None
        if "split" in columns and split not in SPLITS:
            problems.append(f"split {split!r} is not one of {list(SPLITS)}")
        problem = f"line {line}: " + "; ".join(problems) if problems else None
        cases.append(
            Case(
                row["case_id"],
                image,
                mask,
                label,
                split,
                row.get("patient_id") or None,
                row.get("series_uid") or None,
                problem=problem,
            )
        )
    return CaseSet(cases, names, path)


def _dicom_cases(folder: Path, root: Path) -> list[Case]:
    """One case per DICOM series found directly in ``folder``."""
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    stem = "__".join(folder.relative_to(root).parts) or folder.name
    if len(uids) == 1:
        return [Case(stem, folder, series_uid=uids[0])]
    return [Case(f"{stem}__{uid}", folder, series_uid=uid) for uid in uids]


def _image_stem(path: Path) -> str | None:
    """The file name without its image suffix, or None if it is not an image name."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _separate_clashes(cases: list[Case], root: Path) -> list[Case]:
    """Files whose names give one case id (``x.nii`` and ``x.nii.gz``), or ids that differ only in
    letter case (``A.nii``, ``a.nii``: their outputs would be one file on macOS or Windows), become
    error cases named by their whole relative path, each naming the others, so the rest of the
    folder goes on."""
    found: dict[str, list[Case]] = {}
    for case in cases:
        found.setdefault(case.case_id.lower(), []).append(case)
    out = []
    for case in cases:
        clash = found[case.case_id.lower()]
        if len(clash) == 1:
            out.append(case)
            continue
        others = ", ".join(str(c.image) for c in clash if c.image != case.image)
        same = all(c.case_id == case.case_id for c in clash)
        gives = "the same case id" if same else "a case id that differs only in letter case from"
        problem = f"{case.image}: {others} gives {gives} {case.case_id!r}; rename one of them"
        out.append(Case(case.image.relative_to(root).as_posix(), case.image, problem=problem))
    return out


def _separate_repeats(cases: list[Case]) -> list[Case]:
    """A file reached a second way (a symbolic link to a scan already found) becomes an error case
    naming the path kept (the file's own where the tree holds it, else the first link): as two
    cases, one scan could sit in two splits."""
    real = {c.image: c.image.resolve() for c in cases if c.problem is None and c.image.is_file()}
    kept: dict[Path, Path] = {}
    for image in sorted(real, key=lambda p: real[p] != p):  # a file's own path before links to it
        kept.setdefault(real[image], image)
    return [
        replace(c, problem=f"{c.image}: the same file as {kept[real[c.image]]}; read once, as that")
        if c.image in real and kept[real[c.image]] != c.image
        else c
        for c in cases
    ]


def _folders(root: Path) -> tuple[list[Path], list[OSError]]:
    """``root`` and the folders below it, then those behind symbolic links in it, each real folder
    once and hidden ones (``.snapshot``, ``.git``) left out: a scan reached twice would be two
    cases, perhaps in two splits. Also the errors of folders that could not be listed."""
    seen: set[str] = set()
    found: list[Path] = []
    unreadable: list[OSError] = []

    def walk(top: Path, follow: bool) -> list[Path]:
        links = []
        for directory, subdirs, _ in os.walk(top, onerror=unreadable.append, followlinks=follow):
            real = os.path.realpath(directory)
            if real in seen:  # a loop, or a second way in
                subdirs[:] = []
                continue
            seen.add(real)
            found.append(Path(directory))
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            links += [
                Path(directory, d) for d in subdirs if not follow and os.path.islink(Path(directory, d))
            ]
        return links

    for link in walk(root, follow=False):
        walk(link, follow=True)
    return sorted(found), unreadable


def _entry_mode(path: Path) -> int | str:
    """A folder entry's file mode (links followed), or why it has none: a broken or unreadable link."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        return f"{path}: a broken symbolic link (its target {os.readlink(path)} is gone)"
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"


def _file_case_id(path: Path, root: Path) -> str:
    """A file's case id: its path below ``root`` joined by ``__``, less an image suffix."""
    parts = path.relative_to(root).parts
    stem = _image_stem(path)
    return "__".join([*parts[:-1], stem] if stem is not None else parts)


def discover_folder(folder: str | Path) -> CaseSet:
    """Every NIfTI/NRRD/MHA file and every DICOM series below a folder, as unlabelled cases.

    Files that look like neither (other than side files such as .csv or .raw) become cases with a
    problem, so nothing in the folder is silently dropped.
    """
    root = Path(folder).resolve()
    if root.is_file():
        raise ManifestError(root, ["a file, not a folder: give its folder, or a manifest (--manifest)"])
    if not root.is_dir():
        raise ManifestError(root, ["input folder not found"])
    cases: list[Case] = []
    folders, unreadable = _folders(root)
    for error in unreadable:
        path = Path(error.filename)
        cases.append(
            Case(
                _file_case_id(path, root), path, problem=f"{path}: folder cannot be listed ({error.strerror})"
            )
        )
    for directory in folders:
        leftovers, special = [], False
        entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        for path in entries:
            mode = _entry_mode(path)
            if isinstance(mode, str):
                cases.append(Case(_file_case_id(path, root), path, problem=mode))
            elif stat.S_ISDIR(mode):
                continue
            elif not stat.S_ISREG(mode):  # a reader would block on a FIFO, or read a device for ever
                special = True
                problem = f"{path}: not a regular file (a FIFO, socket or device)"
                cases.append(Case(_file_case_id(path, root), path, problem=problem))
            elif _image_stem(path) is not None:
                cases.append(Case(_file_case_id(path, root), path))
            elif path.suffix.lower() not in SIDE_FILES:
                leftovers.append(path)
        if not leftovers:
            continue
        if special:  # GDCM's series scan would open the FIFO or device too
            problem = (
                "not read: its folder also holds a FIFO, socket or device, which a DICOM scan cannot pass"
            )
            cases += [Case(_file_case_id(p, root), p, problem=f"{p}: {problem}") for p in leftovers]
            continue
        series = _dicom_cases(directory, root)
        cases += series
        in_series = {
            Path(f).resolve()
            for case in series
            for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), case.series_uid)
        }
        for path in leftovers:
            if path.resolve() not in in_series:
                problem = f"{path}: not a recognised image file or DICOM series"
                cases.append(Case(_file_case_id(path, root), path, problem=problem))
    cases = [
        replace(c, problem=f"{c.image}: {problem}")
        if c.problem is None and (problem := _case_id_problem(c.case_id, length=False)) is not None
        else c
        for c in cases
    ]
    cases = _separate_clashes(_separate_repeats(cases), root)
    counts = Counter(c.case_id for c in cases)
    duplicated = sorted(cid for cid, n in counts.items() if n > 1)
    if duplicated:
        raise ManifestError(root, [f"several files give the case id {cid!r}" for cid in duplicated])
    if not cases:
        raise ManifestError(root, ["no images found"])
    return CaseSet(cases, [], root)


def _group_label(cases: list[Case]) -> int:
    """A patient's stratum: its most common label (-1 for unlabelled)."""
    return Counter(-1 if c.label is None else c.label for c in cases).most_common(1)[0][0]


def assign_splits(case_set: CaseSet, val_fraction: float, test_fraction: float, seed: int) -> CaseSet:
    """Give every usable case without a split one: stratified, patient-grouped, deterministic.

    Each label stratum's cases are shared out between the splits by the largest-remainder rule (5
    positives at 70/15/15% give 3/1/1, so a small cohort's val and test splits still hold both
    classes); its patients, shuffled by ``seed``, then go one by one to the split furthest below its
    share. Whole patients move, so none crosses splits. Cases that already have a split keep it.
    """
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(case_set.cases):
        if case.split is None and case.problem is None:
            groups.setdefault(case.group, []).append(i)
    strata: dict[int, list[str]] = {}
    for group, members in groups.items():
        strata.setdefault(_group_label([case_set.cases[i] for i in members]), []).append(group)
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for label in sorted(strata):
        names = sorted(strata[label])
        rng.shuffle(names)
        target = _largest_remainder(sum(len(groups[g]) for g in names), fractions)
        counts = dict.fromkeys(fractions, 0)
        for group in names:
            split = max(fractions, key=lambda s: (target[s] - counts[s], fractions[s]))
            counts[split] += len(groups[group])
            split_of[group] = split
    cases = [
        replace(c, split=split_of[c.group]) if c.split is None and c.problem is None else c
        for c in case_set.cases
    ]
    return CaseSet(cases, case_set.classes, case_set.source)


def _largest_remainder(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """``n`` items shared out in proportion to ``fractions``: floors, then one more each for the
    largest remainders (earlier names first on a tie)."""
    quotas = {name: n * f for name, f in fractions.items()}
    shares = {name: int(np.floor(q + 1e-9)) for name, q in quotas.items()}
    order = sorted(quotas, key=lambda name: shares[name] - quotas[name])
    for name in order[: n - sum(shares.values())]:
        shares[name] += 1
    return shares


def input_cases(inputs: Path, outputs: Path | None = None) -> list[Case]:
    """The cases of a prediction input: a manifest CSV, a folder of scans, or one scan file.

    Paths in a manifest may point anywhere (the user named them). An input that does not exist at
    all is a mistyped argument, not a case, so it raises ``FileNotFoundError`` naming it. A folder's
    scans under ``outputs`` (an output folder inside the input folder) are the run's own, not inputs.
    """
    inputs = Path(inputs)
    if not inputs.exists():
        raise FileNotFoundError(f"{inputs}: no such file or folder")
    if inputs.is_file() and inputs.suffix.lower() == ".csv":
        cases = read_manifest(inputs, allow_outside=True).cases
        return [replace(c, problem=f"{inputs}: {c.problem}") if c.problem else c for c in cases]
    if inputs.is_dir():
        own = Path(outputs).resolve() if outputs is not None else None
        cases = discover_folder(inputs).cases
        return [c for c in cases if own is None or not c.image.resolve().is_relative_to(own)]
    return [Case(_image_stem(inputs) or inputs.stem, inputs)]

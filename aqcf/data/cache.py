"""The per-cohort preprocessing cache: its folder layout, manifest, key, reuse checks and memory maps.

:func:`preprocess_cohort` runs the pipeline of :mod:`aqcf.data.preprocess` once per cohort and settings
into ``cache_dir/<name>-<key>/``; ``key`` (:func:`cohort_key`) changes with the settings, the pipeline
version or the case list, so a stale cache is never reused. :func:`check_cached_files` checks a reused
cache against its manifest; training reads the cached volumes through :func:`memmap_volume`, touching
only the bytes of a patch. Layout, manifest entries and reuse checks: docs/data.md, *The cache*.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from aqcf.data.cohorts import Case, validate_case
from aqcf.data.preprocess import DEFAULT_LABELS, PIPELINE_VERSION, PreprocessSettings, preprocess_subject
from aqcf.errors import AqcfError
from aqcf.io import nifti_image, save_nifti_atomic, write_json_atomic

__all__ = [
    "MANIFEST",
    "CACHED_FILES",
    "VERIFY_MODES",
    "Manifest",
    "file_digest",
    "file_fingerprint",
    "check_cached_files",
    "preprocess_case",
    "cohort_key",
    "preprocess_cohort",
    "memmap_volume",
]

MANIFEST = "manifest.json"
"""The file that makes a cache folder finished (written last)."""


def file_digest(path: str | Path, chunk: int = 1 << 22) -> dict:
    """``{"size": bytes, "crc32": checksum}`` of a file (what the manifest records per cached file).

    CRC-32 finds accidental damage (it is not meant against tampering) and is fast: 2.2 GB/s on this
    2-core machine, against 0.36–0.85 GB/s for BLAKE2b, MD5, SHA-1 or SHA-256.
    """
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            crc = zlib.crc32(block, crc)
    return {"size": Path(path).stat().st_size, "crc32": f"{crc:08x}"}


CACHED_FILES = ("image", "label", "locations")
"""The manifest keys of an entry's cached files (paths relative to the cache folder)."""
VERIFY_MODES = ("size", "checksum")


def check_cached_files(entry: dict, folder: str | Path, verify: str = "size") -> list[str]:
    """Problems with a case's cached files: missing, another size, or (``verify="checksum"``) other bytes.

    Args:
        entry: The case's manifest entry (paths relative to ``folder``).
        folder: The cache folder.
        verify: ``"size"`` (a stat per file: finds truncation) or ``"checksum"`` (reads every byte).

    Returns:
        One line per damaged file, naming it; empty when the case is intact.
    """
    if verify not in VERIFY_MODES:
        raise AqcfError(f"cache verification {verify!r}: expected one of {VERIFY_MODES}")
    problems = []
    for key in CACHED_FILES:
        if entry.get(key) is None:
            continue
        path = Path(folder) / entry[key]
        expected = entry.get("files", {}).get(key)
        if not path.is_file():
            problems.append(f"{path}: listed in the cache but missing")
        elif expected is None:
            problems.append(f"{path}: no size or checksum recorded (an older cache)")
        elif path.stat().st_size != expected["size"]:
            size = path.stat().st_size
            problems.append(f"{path}: {size} bytes, {expected['size']} when cached (truncated or replaced)")
        elif verify == "checksum" and file_digest(path)["crc32"] != expected.get("crc32"):
            problems.append(f"{path}: checksum differs from the one recorded when cached (damaged)")
    return problems


def preprocess_case(
    case: Case, settings: PreprocessSettings, folder: str | Path, labels: dict[int, int] | None = None
) -> dict:
    """Validate and preprocess one case into a cache folder (its label map mapped by ``labels``).

    Writes ``images/<id>.nii`` (float32), ``labels/<id>.nii`` (uint8), ``locations/<id>.npz`` (a sample
    of each label's voxel coordinates, :func:`aqcf.data.patches.class_locations`) and last
    ``records/<id>.json`` (the manifest entry), each atomically, so a record exists only for a complete
    case. The NIfTI files are uncompressed and unscaled, so training reads patches through a memory map.

    Returns:
        The manifest entry: ``id``, ``modality``, ``source_image``, ``source_label``, ``image``,
        ``label`` and ``locations`` (paths relative to ``folder``), ``files`` (size and checksum of each
        cached file), ``has_tumor``, ``voxel_counts`` (background, liver, tumor on the preprocessed
        grid) and the geometry of :func:`~aqcf.data.preprocess.preprocess_image`.
    """
    import torchio  # noqa: F401  (a fresh worker's import time is not the case's)

    # here, not above: aqcf.data.patches imports this module (and torch)
    from aqcf.data.patches import class_locations, save_locations

    folder = Path(folder)
    start = time.perf_counter()
    # Headers first (cheap, clear messages); label values are checked on the voxels loaded below.
    validate_case(case, check_values=False)
    label = None if case.label is None else Path(case.label)
    subject, record = preprocess_subject(Path(case.image), label, settings, labels=labels)
    affine = np.asarray(subject["image"].affine)
    entry = {
        "id": case.id,
        "modality": case.modality,
        "source_image": str(case.image),
        "source_label": None if case.label is None else str(case.label),
        "image": f"images/{case.id}.nii",
        "label": None if case.label is None else f"labels/{case.id}.nii",
        "locations": None if case.label is None else f"locations/{case.id}.npz",
        "has_tumor": record.pop("has_tumor", None),
    }
    image = subject["image"].data[0].numpy().astype(np.float32)
    save_nifti_atomic(nifti_image(image, affine), folder / entry["image"])
    if case.label is not None:
        label = subject["label"].data[0].numpy().astype(np.uint8)
        entry["voxel_counts"] = np.bincount(label.ravel(), minlength=3)[:3].tolist()
        save_nifti_atomic(nifti_image(label, affine), folder / entry["label"])
        save_locations(folder / entry["locations"], class_locations(label, seed=case.id))
    entry["files"] = {key: file_digest(folder / entry[key]) for key in CACHED_FILES if entry[key] is not None}
    entry.update(record)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    write_json_atomic(folder / "records" / f"{case.id}.json", entry, indent=1)
    return entry


def file_fingerprint(path: Path) -> list:
    """``[absolute path, size in bytes, modification time in ns]``: what a cache key holds of an input file."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cohort_key(cases: Sequence[Case], settings: PreprocessSettings, labels: dict[int, int] | None = None) -> str:
    """Twelve hex digits identifying the settings, the pipeline version, the exact input files and the labels.

    The case list enters with each file's absolute path, size and modification time, so replacing or
    editing a file also gives a new key. ``labels`` (the cohort's label convention) enters only when it
    is not :data:`~aqcf.data.preprocess.DEFAULT_LABELS`, so caches made before cohorts declared one keep their keys.
    """
    files = [
        [
            c.id,
            c.modality,
            file_fingerprint(Path(c.image)),
            None if c.label is None else file_fingerprint(Path(c.label)),
        ]
        for c in cases
    ]
    identity = {"settings": settings.hash(), "cases": files}
    if labels is not None and labels != DEFAULT_LABELS:
        identity["labels"] = [[int(value), int(cls)] for value, cls in sorted(labels.items())]
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Manifest:
    """A complete cohort cache.

    Attributes:
        folder: ``cache_dir/<name>-<key>``.
        key: The cohort key (:func:`cohort_key`).
        settings: The preprocessing settings.
        entries: One dict per case (see :func:`preprocess_case`) with ``image``, ``label`` and
            ``locations`` turned into absolute paths.
        skipped: Broken cases left out by ``skip_bad`` (``{"id", "image", "label", "problem"}``).
    """

    folder: Path
    key: str
    settings: PreprocessSettings
    entries: list[dict]
    skipped: list[dict] = dataclasses.field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        """The case ids, in the manifest's order."""
        return [e["id"] for e in self.entries]

    @property
    def has_tumor(self) -> list[bool]:
        """Per case, whether its label holds tumor voxels."""
        return [bool(e["has_tumor"]) for e in self.entries]

    def by_id(self) -> dict[str, dict]:
        """The entries by case id."""
        return {e["id"]: e for e in self.entries}

    @classmethod
    def load(cls, folder: str | Path, verify: str = "size") -> Manifest:
        """Read ``folder/manifest.json`` and check the cached files it lists.

        Args:
            folder: The cache folder.
            verify: ``"size"`` or ``"checksum"`` (:func:`check_cached_files`).

        Raises:
            AqcfError: The manifest is missing or unreadable, or a file it lists is missing or damaged
                (every damaged file is named).
        """
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            settings = PreprocessSettings.from_dict(data["settings"])
            entries = data["cases"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AqcfError(f"{path}: not a readable cache manifest ({err})") from err
        problems = [p for entry in entries for p in check_cached_files(entry, folder, verify)]
        if problems:
            raise AqcfError(f"{path}: damaged cache ({' | '.join(problems)}); delete {folder} to rebuild")
        for entry in entries:
            for key in CACHED_FILES:
                if entry.get(key) is not None:
                    entry[key] = str(folder / entry[key])
        return cls(
            folder=folder, key=data["key"], settings=settings, entries=entries, skipped=data.get("skipped", [])
        )


def _read_records(folder: Path, cases: Sequence[Case], verify: str) -> tuple[dict[str, dict], list[str]]:
    """The intact cached cases of a cache folder (finished or not), and a line per damaged file found."""
    records: dict[str, dict] = {}
    damaged: list[str] = []
    for case in cases:
        path = folder / "records" / f"{case.id}.json"
        if not path.is_file():
            continue
        try:
            entry = json.loads(path.read_text())
        except ValueError:
            damaged.append(f"{path}: unreadable record")
            continue
        problems = check_cached_files(entry, folder, verify)
        if problems:
            damaged += problems
        else:
            records[case.id] = entry
    return records, damaged


def preprocess_cohort(
    cases: Sequence[Case],
    settings: PreprocessSettings,
    cache_dir: str | Path,
    workers: int = 0,
    name: str | None = None,
    progress: bool = True,
    verify: str = "size",
    skip_bad: bool = False,
    labels: dict[int, int] | None = None,
) -> Manifest:
    """Preprocess a cohort once into ``cache_dir/<name>-<key>/`` and return its manifest.

    A finished cache (``manifest.json`` present) is reused after checking its files (``verify``); a
    damaged cached case (truncated, or other bytes under ``verify="checksum"``) is said, preprocessed
    again from its source and the manifest rewritten. A cache left incomplete by a killed run resumes:
    intact cached cases are kept, the others are processed, and the manifest is written last, so a
    killed run's cache is never used as finished. Each case is validated as it is processed; every
    broken case is collected, and the run stops without a manifest naming all of them, unless
    ``skip_bad`` leaves them out (listed in the manifest's ``skipped`` and said on stderr).

    Args:
        cases: The cohort (one modality).
        settings: The modality's preprocessing settings.
        cache_dir: Parent folder of the caches.
        workers: Processes to use (0: this process). They are spawned, so a script calling this
            with ``workers > 0`` must do so under ``if __name__ == "__main__":``.
        name: Prefix of the cache folder (default: the modality).
        progress: Show a progress bar over cases.
        verify: How a reused cache's files are checked: ``"size"`` (a stat per file) or
            ``"checksum"`` (reads them all).
        skip_bad: Leave broken cases out instead of stopping.
        labels: The cohort's ``{mask value: class}`` (:func:`~aqcf.data.preprocess.label_mapping`),
            applied to every label map as it is read; ``None``: :data:`~aqcf.data.preprocess.DEFAULT_LABELS`.
            Part of the key unless the default.

    Returns:
        The :class:`Manifest`, entries in the order of ``cases`` (less the skipped ones).

    Raises:
        AqcfError: No case, duplicate ids, a case of another modality, broken cases (every one named),
            or a cache folder that is not a folder.
    """
    cases = list(cases)
    _check_cohort(cases, settings, cache_dir)
    key = cohort_key(cases, settings, labels)
    folder = Path(cache_dir) / f"{name or settings.modality}-{key}"
    records, damaged = _read_records(folder, cases, verify)
    if _finished(folder, cases, records, damaged):
        return Manifest.load(folder, verify="size")
    todo = [c for c in cases if c.id not in records]
    entries, failures = _process(todo, len(cases), settings, folder, labels, workers, progress)
    records.update(entries)
    skipped = _skipped(cases, failures, skip_bad, folder)
    cached = [records[c.id] for c in cases if c.id in records]
    _write_manifest(folder, key, settings, cached, skipped, labels)
    return Manifest.load(folder)


def _check_cohort(cases: list[Case], settings: PreprocessSettings, cache_dir: str | Path) -> None:
    """Refuse an empty cohort, a case id given twice, a case of another modality, or a cache path through a file."""
    if not cases:
        raise AqcfError(f"{cache_dir}: no case to preprocess")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise AqcfError(f"case id {duplicate!r} appears twice in the cohort")
    for case in cases:
        if case.modality != settings.modality:
            raise AqcfError(
                f"{case.image}: a {case.modality} case given to {settings.modality} preprocessing"
            )
    for parent in (Path(cache_dir), *Path(cache_dir).parents):
        if parent.exists() and not parent.is_dir():
            raise AqcfError(f"{parent}: the cache folder's path holds a file, not a folder")


def _finished(folder: Path, cases: list[Case], records: dict[str, dict], damaged: list[str]) -> bool:
    """Whether ``folder`` holds a finished, intact cache of ``cases``.

    A finished cache with damaged files loses its manifest (so it is not used until rebuilt) and each
    damaged file is said on stderr; its intact cases are kept.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        previous = json.loads(manifest_path.read_text())
    except ValueError:
        previous = {}
    skipped_ids = {s["id"] for s in previous.get("skipped", [])}
    if not damaged and all(c.id in records or c.id in skipped_ids for c in cases):
        return True
    for line in damaged:
        print(f"aqcf: {line}; preprocessing the case again", file=sys.stderr)
    manifest_path.unlink()
    return False


def _process(
    todo: list[Case],
    total: int,
    settings: PreprocessSettings,
    folder: Path,
    labels: dict[int, int] | None,
    workers: int,
    progress: bool,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Preprocess the cases not cached yet, under a progress bar over all ``total`` cases.

    Returns:
        ``({id: manifest entry}, {id: problem})``: the cases done and the broken ones.
    """
    from tqdm.auto import tqdm

    with tqdm(
        total=total,
        initial=total - len(todo),
        desc=f"preprocess {folder.name}",
        unit="case",
        disable=not progress,
    ) as bar:
        if workers > 0 and len(todo) > 1:
            return _process_in_workers(todo, settings, folder, labels, workers, bar)
        return _process_here(todo, settings, folder, labels, bar)


def _process_here(
    todo: list[Case], settings: PreprocessSettings, folder: Path, labels: dict[int, int] | None, bar
) -> tuple[dict[str, dict], dict[str, str]]:
    """:func:`_process` in this process, one case after the other."""
    entries: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for case in todo:
        try:
            entries[case.id] = preprocess_case(case, settings, folder, labels)
        except AqcfError as err:
            failures[case.id] = str(err)
        bar.update(1)
    return entries, failures


def _process_in_workers(
    todo: list[Case], settings: PreprocessSettings, folder: Path, labels: dict[int, int] | None, workers: int, bar
) -> tuple[dict[str, dict], dict[str, str]]:
    """:func:`_process` in ``workers`` spawned processes, the bar advancing as cases finish."""
    entries: dict[str, dict] = {}
    failures: dict[str, str] = {}
    # spawn, not fork: forking a process that has started torch/OpenMP threads can deadlock.
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(preprocess_case, case, settings, folder, labels): case for case in todo}
            for future in as_completed(futures):
                try:
                    entry = future.result()
                    entries[entry["id"]] = entry
                except AqcfError as err:
                    failures[futures[future].id] = str(err)
                bar.update(1)
    except BrokenProcessPool as err:
        raise AqcfError(
            f"{folder}: a preprocessing worker process died (out of memory, or a script that starts "
            "workers outside `if __name__ == '__main__':`); retry with fewer workers or workers=0"
        ) from err
    return entries, failures


def _skipped(cases: list[Case], failures: dict[str, str], skip_bad: bool, folder: Path) -> list[dict]:
    """The broken cases as the manifest lists them, each said on stderr.

    Raises:
        AqcfError: Broken cases and not ``skip_bad`` (every one named), or every case broken.
    """
    skipped = [
        {"id": c.id, "image": str(c.image), "label": None if c.label is None else str(c.label),
         "problem": failures[c.id]}
        for c in cases
        if c.id in failures
    ]
    if skipped and not skip_bad:
        raise AqcfError(
            f"{len(skipped)} of {len(cases)} cases cannot be used, no cache written (fix them, or pass "
            f"--skip-bad to leave them out): " + " | ".join(s["problem"] for s in skipped)
        )
    for item in skipped:
        print(f"aqcf: skipped case {item['id']}: {item['problem']}", file=sys.stderr)
    if len(skipped) == len(cases):
        raise AqcfError(f"{folder}: every case of the cohort is broken; nothing to cache")
    return skipped


def _write_manifest(
    folder: Path,
    key: str,
    settings: PreprocessSettings,
    entries: list[dict],
    skipped: list[dict],
    labels: dict[int, int] | None,
) -> None:
    """Write ``folder/manifest.json``, the last file of a cache (atomically: a cache is finished or not)."""
    manifest = {
        "key": key,
        "settings_hash": settings.hash(),
        "pipeline_version": PIPELINE_VERSION,
        "settings": settings.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cases": entries,
        "skipped": skipped,
    }
    if labels is not None and labels != DEFAULT_LABELS:
        manifest["labels"] = {str(value): cls for value, cls in labels.items()}
    write_json_atomic(folder / MANIFEST, manifest, indent=1)


def memmap_volume(path: str | Path) -> np.ndarray:
    """The voxel array of an uncompressed, unscaled cached NIfTI file as a read-only memory map.

    Raises:
        AqcfError: The file does not hold one 3D volume.
    """
    import nibabel as nib

    image = nib.load(str(path), mmap="r")
    array = np.asanyarray(image.dataobj)
    if array.ndim != 3:
        raise AqcfError(f"{path}: cached volume of shape {array.shape}; expected 3D")
    return array

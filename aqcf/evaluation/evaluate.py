"""``aqcf evaluate``: score a folder of predicted label maps against references.

Folders in, a per-case table and a summary out (as nnU-Net's evaluation does):

* ``metrics.csv``: one row per case and class with the columns of
  :data:`aqcf.evaluation.metrics.ROW_FIELDS` (``case, modality, class, dice, hd95, msd, pred_voxels,
  ref_voxels, intersection``; distances in mm, ``nan`` where undefined);
* ``summary.json``: :func:`aqcf.evaluation.metrics.summarise` of those rows (per modality and class:
  mean, SD, median, n of each metric, pooled Dice), plus where the inputs came from, and at its top
  level nnU-Net v2's ``metric_per_case`` / ``mean`` / ``foreground_mean`` (:func:`nnunet_summary`).

A prediction is matched to a reference by its file's id (:func:`aqcf.io.nifti_stem`): the case id,
its image file's id or its label file's id. ``--ref-format`` reads the reference folder through the
dataset readers; ``plain`` is a folder of ``NAME.nii[.gz]`` label maps. Every mask, predicted or
reference, is read through the input gate (:func:`aqcf.data.gate.load_label`). Options, the matching
rules with examples and the ``summary.json`` layout: docs/evaluation.md, *`aqcf evaluate`*.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqcf.constants import REGIONS, check_name
from aqcf.data.gate import SAME_GRID_TOLERANCE_MM, Volume, load_label
from aqcf.errors import AqcfError
from aqcf.evaluation.metrics import EMPTY_DISTANCE_RULES, ROW_FIELDS, evaluate_case, summarise
from aqcf.io import check_output, is_nifti_name, nifti_stem, write_bytes_atomic, write_text_atomic

__all__ = [
    "REF_FORMATS",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "Reference",
    "list_nifti",
    "read_references",
    "match_predictions",
    "evaluate_pair",
    "evaluate_folder",
    "write_results",
    "NNUNET_METRICS",
    "nnunet_region_key",
    "nnunet_summary",
    "format_summary",
    "write_text_atomic",
    "write_bytes_atomic",
    "main",
]

REF_FORMATS = ("plain", "lits", "atlas", "nnunet", "ircadb", "liverhccseg")
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
#: the per-case metrics of nnU-Net v2's summary.json (``nnunetv2/evaluation/evaluate_predictions.py``)
NNUNET_METRICS = ("Dice", "IoU", "FN", "FP", "TN", "TP", "n_pred", "n_ref")
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's image channel suffix, e.g. CASE_0000


def list_nifti(folder: str | Path) -> dict[str, Path]:
    """Case id -> file for the NIfTI files (``*.nii`` / ``*.nii.gz``, any case) directly in ``folder``
    (hidden ones skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AqcfError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not is_nifti_name(path) or not path.is_file():
            continue
        key = nifti_stem(path)
        if key in found:
            raise AqcfError(f"{folder}: both {found[key].name} and {path.name} have case id {key!r}")
        found[key] = path
    return found


@dataclass(frozen=True)
class Reference:
    """A reference label map and the ids a prediction file may carry to be matched with it."""

    id: str
    modality: str | None
    label: Path
    aliases: tuple[str, ...]


SEGMENT_SUFFIX = "_seg"


def _aliases(case_key: str, *paths: Path | None) -> tuple[str, ...]:
    names = [case_key]
    for path in paths:
        if path is None:
            continue
        stem = nifti_stem(path)
        names += [stem, CHANNEL_SUFFIX.sub("", stem)]
    # masks written by `aqcf segment` carry its default suffix: scan.nii.gz -> scan_seg.nii.gz
    names += [f"{name}{SEGMENT_SUFFIX}" for name in names]
    return tuple(dict.fromkeys(names))


def _read_cases(ref: Path, ref_format: str, reader_options: Mapping, modality: str | None) -> list:
    """Cases of a dataset folder through its reader (imported here: readers pull in DICOM/ITK code)."""
    options = dict(reader_options)
    if modality is not None:
        options["modality"] = modality
    if ref_format in ("ircadb", "liverhccseg"):
        from aqcf.data import external

        reader = external.read_ircadb if ref_format == "ircadb" else external.read_liverhccseg
        return reader(ref, **options)
    from aqcf.data import cohorts

    if ref_format == "nnunet" and modality is None:
        raise AqcfError(f"{ref}: nnU-Net reference folders need --modality (ct, mri or a cohort name)")
    readers = {"lits": cohorts.read_lits, "atlas": cohorts.read_atlas, "nnunet": cohorts.read_nnunet}
    return readers[ref_format](ref, **options)


def read_references(
    ref: str | Path,
    ref_format: str = "plain",
    reader_options: Mapping | None = None,
    modality: str | None = None,
) -> list[Reference]:
    """The labelled cases of a reference folder.

    Args:
        ref: a folder of ``NAME.nii[.gz]`` label maps (``plain``) or a dataset root.
        ref_format: one of :data:`REF_FORMATS`.
        reader_options: keyword arguments for the dataset reader (e.g. ``cache_dir`` for ``ircadb``,
            ``phase`` / ``rater`` for ``liverhccseg``).
        modality: passed to the dataset reader (required for ``nnunet``; LiTS/IRCADb default to CT,
            ATLAS/LiverHccSeg to MRI).

    Returns:
        One :class:`Reference` per case with a label, sorted by id; ``modality`` is ``None`` for
        ``plain``.
    """
    ref = Path(ref)
    if ref_format not in REF_FORMATS:
        raise AqcfError(f"reference format {ref_format!r} is not one of {REF_FORMATS}")
    if not ref.is_dir():
        raise AqcfError(f"{ref}: reference folder not found")
    if ref_format == "plain":
        return [Reference(key, None, path, (key,)) for key, path in list_nifti(ref).items()]
    cases = _read_cases(ref, ref_format, dict(reader_options or {}), modality)
    references = [
        Reference(case.id, case.modality, Path(case.label), _aliases(case.id, case.image, case.label))
        for case in cases
        if case.label is not None
    ]
    if not references:
        raise AqcfError(f"{ref}: no labelled cases found for reference format {ref_format!r}")
    return sorted(references, key=lambda r: r.id)


def match_predictions(pred_dir: str | Path, references: Sequence[Reference]) -> list[tuple[Reference, Path]]:
    """Pair every reference with its prediction in ``pred_dir``; every prediction must have a reference.

    Raises:
        AqcfError: naming the first unmatched reference or prediction.
    """
    pred_dir = Path(pred_dir)
    predictions = list_nifti(pred_dir)
    pairs, used = [], set()
    for reference in references:
        key = next((alias for alias in reference.aliases if alias in predictions), None)
        if key is None:
            looked = ", ".join(f"{a}.nii.gz" for a in reference.aliases)
            raise AqcfError(f"{pred_dir}: no prediction for reference case {reference.id} "
                            f"({reference.label}); looked for {looked}")
        if key in used:
            raise AqcfError(f"{predictions[key]}: matches more than one reference case")
        used.add(key)
        pairs.append((reference, predictions[key]))
    extra = sorted(set(predictions) - used)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise AqcfError(f"{predictions[extra[0]]}: prediction without a reference label{more}")
    if not pairs:
        raise AqcfError(f"{pred_dir}: no predictions (*.nii, *.nii.gz) to evaluate")
    return pairs


def _load_label(path: Path) -> tuple[np.ndarray, Volume]:
    """A mask read completely through the input gate (one 3D volume, valid affine, values 0/1/2)."""
    volume = load_label(path)
    # float-stored masks would otherwise keep 4-8 bytes per voxel through the metrics
    return volume.array.astype(np.uint8, copy=False), volume


def evaluate_pair(
    pred_path: str | Path,
    ref_path: str | Path,
    *,
    case: str,
    modality: str,
    empty_distance: str = "nan",
) -> list[dict]:
    """Load one predicted and one reference label map (NIfTI) and score them.

    The spacing (mm) is the reference's; shapes must agree. A differing affine only warns, since
    references and predictions written by different tools often disagree in header round-off while
    their voxel grids agree.

    Returns:
        The rows of :func:`aqcf.evaluation.metrics.evaluate_case`.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred, pred_image = _load_label(pred_path)
    ref, ref_image = _load_label(ref_path)
    if pred.shape != ref.shape:
        raise AqcfError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} {ref.shape}")
    if not np.allclose(pred_image.affine, ref_image.affine, atol=SAME_GRID_TOLERANCE_MM):
        warnings.warn(f"{pred_path}: affine differs from the reference {ref_path}; comparing voxel by voxel",
                      stacklevel=2)
    spacing = tuple(float(s) for s in ref_image.header.get_zooms()[:3])
    return evaluate_case(pred, ref, spacing, case=case, modality=modality, empty_distance=empty_distance)


def _csv_text(rows: Iterable[Mapping]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _check_writable(out_dir: Path, overwrite: bool) -> None:
    existing = [out_dir / name for name in (METRICS_FILE, SUMMARY_FILE) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise AqcfError(f"{existing[0]}: results exist already (use --overwrite to replace them)")


def nnunet_region_key(labels: Sequence[int]) -> str:
    """nnU-Net v2's summary key of a region: ``"2"`` for one label, ``"(1, 2)"`` for several.

    nnU-Net writes ``str(label_or_region)`` and reads it back with ``key_to_label_or_region``; a region
    based data set with ``"liver": [1, 2], "tumor": 2`` in its ``dataset.json`` has exactly these keys.
    """
    labels = tuple(int(v) for v in labels)
    return str(labels[0]) if len(labels) == 1 else str(labels)


def _mean(values: Iterable) -> float | None:
    """nnU-Net's ``np.nanmean`` with undefined values as ``None`` (``null``) instead of NaN."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def nnunet_summary(rows: Sequence[Mapping], files: Mapping[str, Mapping] | None = None) -> dict:
    """The per-case rows in the structure of nnU-Net v2's ``summary.json`` (``nnUNetv2_evaluate_folder``).

    Per case and region (liver = labels {1, 2} under key ``"(1, 2)"``, tumor = label 2 under ``"2"``):
    ``Dice``, ``IoU``, ``TP``, ``FP``, ``FN``, ``TN``, ``n_pred``, ``n_ref``, computed as nnU-Net does from
    the voxel counts: Dice = 2 TP / (2 TP + FP + FN), undefined when prediction and reference are both
    empty. nnU-Net writes that case's Dice and IoU as NaN and leaves it out of its mean (``np.nanmean``);
    here it is ``null`` (strict JSON) and left out the same way, while aqcf's own tables score it 1.

    Args:
        rows: per-case rows from :func:`aqcf.evaluation.metrics.evaluate_case`.
        files: case id -> ``{"prediction_file", "reference_file", "voxels"}`` where known (``aqcf
            evaluate``); without it the file names and ``TN`` (which needs the number of voxels) are ``null``.

    Returns:
        ``{"metric_per_case": [...], "mean": {region: {metric: value}}, "foreground_mean": {metric: value}}``;
        each case entry also carries ``case`` and ``modality``, which nnU-Net's readers ignore.
    """
    files = files or {}
    regions = {name: nnunet_region_key(labels) for name, labels in REGIONS.items()}
    cases: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (str(row["modality"]), str(row["case"]))
        known = files.get(key[1], {})
        entry = cases.setdefault(key, {
            "case": key[1], "modality": key[0], "metrics": {},
            "prediction_file": known.get("prediction_file"), "reference_file": known.get("reference_file"),
        })
        tp = int(row["intersection"])
        fp, fn = int(row["pred_voxels"]) - tp, int(row["ref_voxels"]) - tp
        voxels = known.get("voxels")
        entry["metrics"][regions[row["class"]]] = {
            "Dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "IoU": tp / (tp + fp + fn) if tp + fp + fn else None,
            "FN": fn, "FP": fp, "TN": int(voxels) - tp - fp - fn if voxels is not None else None, "TP": tp,
            "n_pred": tp + fp, "n_ref": tp + fn,
        }
    per_case = list(cases.values())
    used = [key for key in regions.values() if any(key in c["metrics"] for c in per_case)]
    mean = {
        key: {m: _mean(c["metrics"][key][m] for c in per_case if key in c["metrics"]) for m in NNUNET_METRICS}
        for key in used
    }
    # nnU-Net averages the regions' means with np.mean: one undefined region mean makes it undefined
    foreground = {
        m: None if not used or any(mean[k][m] is None for k in used) else float(np.mean([mean[k][m] for k in used]))
        for m in NNUNET_METRICS
    }
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground}


def write_results(
    rows: Sequence[Mapping],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    info: Mapping | None = None,
    files: Mapping[str, Mapping] | None = None,
) -> dict:
    """Write ``metrics.csv`` and ``summary.json`` (atomically) and return the summary.

    ``summary.json`` holds aqcf's tables (:func:`aqcf.evaluation.metrics.summarise`) and, at its top
    level beside them, nnU-Net v2's ``metric_per_case``, ``mean`` and ``foreground_mean``
    (:func:`nnunet_summary`), so tools written for nnU-Net's ``summary.json`` read it too.

    Args:
        rows: per-case rows from :func:`aqcf.evaluation.metrics.evaluate_case`.
        out_dir: output folder (created).
        overwrite: replace existing results; otherwise existing ones raise :class:`AqcfError`.
        info: extra fields stored under ``"source"`` in the summary (where the inputs came from).
        files: case id -> ``{"prediction_file", "reference_file", "voxels"}`` for the nnU-Net part.

    Returns:
        The summary as written (NaN values written as ``null``).
    """
    out = Path(out_dir)
    _check_writable(out, overwrite)
    rows = sorted(rows, key=lambda r: (str(r["modality"]), str(r["case"]), str(r["class"])))
    summary = summarise(rows)
    if info:
        summary["source"] = dict(info)
    summary.update(nnunet_summary(rows, files))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / METRICS_FILE, _csv_text(rows))
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def evaluate_folder(
    pred_dir: str | Path,
    ref: str | Path,
    out_dir: str | Path,
    *,
    modality: str | None = None,
    ref_format: str = "plain",
    reader_options: Mapping | None = None,
    empty_distance: str = "nan",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score every prediction in ``pred_dir`` against its reference and write the results.

    Args:
        pred_dir: folder of predicted label maps ``ID.nii[.gz]`` (0 background, 1 liver, 2 tumor).
        ref: reference folder, read as ``ref_format``.
        out_dir: where ``metrics.csv`` and ``summary.json`` go.
        modality: ``"ct"`` / ``"mri"``; required for ``plain`` and ``nnunet`` references, else it
            overrides the reader's default.
        ref_format: one of :data:`REF_FORMATS`.
        reader_options: keyword arguments for the dataset reader.
        empty_distance: distance rule for one-sided empty masks (see
            :func:`aqcf.evaluation.metrics.binary_metrics`).
        overwrite: replace existing results.
        progress: show a progress bar over cases (stderr).

    Returns:
        The summary (see :func:`write_results`).
    """
    from tqdm import tqdm

    if empty_distance not in EMPTY_DISTANCE_RULES:
        raise AqcfError(f"empty distance rule {empty_distance!r} is not one of {EMPTY_DISTANCE_RULES}")
    modality = check_name(modality) if modality else None
    if ref_format == "plain" and modality is None:
        raise AqcfError(f"{ref}: plain reference folders need --modality (ct, mri or a cohort name)")
    _check_writable(Path(out_dir), overwrite)
    pairs = match_predictions(pred_dir, read_references(ref, ref_format, reader_options, modality))
    import nibabel as nib

    rows, files = [], {}
    bar = tqdm(pairs, desc="evaluate", unit="case", file=sys.stderr, disable=not progress)
    for reference, pred_path in bar:
        rows += evaluate_pair(pred_path, reference.label, case=reference.id,
                              modality=modality or check_name(reference.modality),
                              empty_distance=empty_distance)
        # the header alone gives the voxel count (nnU-Net's TN); the gate has read the file already
        files[reference.id] = {"prediction_file": str(pred_path), "reference_file": str(reference.label),
                               "voxels": math.prod(nib.load(reference.label).shape[:3])}
    info = {"pred": str(pred_dir), "ref": str(ref), "ref_format": ref_format,
            "empty_distance": empty_distance}
    return write_results(rows, out_dir, overwrite=overwrite, info=info, files=files)


def format_summary(summary: Mapping) -> str:
    """A short text table of a summary: per modality and class, n, Dice mean ± SD, pooled Dice, HD95, MSD."""

    def cell(stats: Mapping, scale: float = 1.0, digits: int = 2) -> str:
        mean, sd = stats["mean"], stats["std"]
        text = "–" if mean is None else f"{mean * scale:.{digits}f}"
        if sd is not None:
            text += f" ± {sd * scale:.{digits}f}"
        if stats["n_undefined"]:
            text += f" ({stats['n_undefined']} undef.)"
        return text

    header = f"{'modality':<8} {'class':<6} {'n':>4}  {'Dice % (mean ± SD)':<20} {'pooled %':>8}  " \
             f"{'HD95 mm':<24} {'MSD mm':<24}"
    lines = [header, "-" * len(header)]
    for modality, classes in summary["per_modality"].items():
        for name, entry in classes.items():
            pooled = entry["pooled_dice"]
            lines.append(
                f"{modality:<8} {name:<6} {entry['n_cases']:>4}  {cell(entry['dice'], 100, 1):<20} "
                f"{(pooled * 100 if math.isfinite(pooled) else math.nan):>8.1f}  "
                f"{cell(entry['hd95']):<24} {cell(entry['msd']):<24}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``aqcf evaluate --pred DIR --ref DIR --out DIR [--modality NAME] [--ref-format ...]``."""
    from aqcf.errors import ArgumentParser

    parser = ArgumentParser(
        prog="aqcf evaluate",
        description="Dice, HD95 (mm) and mean surface distance (mm) of liver (labels 1+2) and tumor "
        "(label 2) per case; writes metrics.csv and summary.json.",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps ID.nii[.gz]")
    parser.add_argument("--ref", required=True, type=Path, help="reference folder (see --ref-format)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder for metrics.csv and summary.json")
    parser.add_argument("--modality", default=None, metavar="NAME",
                        help="modality of the cases: ct, mri or a further cohort's name (required for "
                        "--ref-format plain and nnunet)")
    parser.add_argument("--ref-format", choices=REF_FORMATS, default="plain",
                        help="plain: NAME.nii[.gz] label maps; lits, atlas, nnunet: dataset folders; "
                        "ircadb: 3D-IRCADb-01 DICOM (converted once into --cache); liverhccseg "
                        "(see docs/evaluation.md)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for converted references (ircadb, liverhccseg)")
    parser.add_argument("--phase", default=None, help="liverhccseg: image phase name")
    parser.add_argument("--rater", default=None, help="liverhccseg: rater whose masks are the reference")
    parser.add_argument("--empty-distance", choices=EMPTY_DISTANCE_RULES, default="nan",
                        help="HD95/MSD when exactly one mask is empty: nan (excluded from means, counted) or "
                        "the image diagonal in mm")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    options: dict = {}
    if args.cache is not None:
        options["cache_dir"] = args.cache
    if args.ref_format == "liverhccseg":
        options.update({k: v for k, v in (("phase", args.phase), ("rater", args.rater)) if v is not None})
    elif args.phase or args.rater:
        parser.error("--phase and --rater apply to --ref-format liverhccseg only")
    if args.cache is not None and args.ref_format not in ("ircadb", "liverhccseg"):
        parser.error("--cache applies to --ref-format ircadb and liverhccseg only")
    check_output(args.out, inputs=[args.pred, args.ref], overwrite=args.overwrite, kind="folder",
                 names=(METRICS_FILE, SUMMARY_FILE))
    if args.cache is not None:
        check_output(args.cache, kind="cache")
    summary = evaluate_folder(
        args.pred, args.ref, args.out, modality=args.modality, ref_format=args.ref_format,
        reader_options=options, empty_distance=args.empty_distance, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(format_summary(summary))
    print(f"wrote {args.out / METRICS_FILE} and {args.out / SUMMARY_FILE}")
    return 0

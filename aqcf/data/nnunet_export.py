"""``aqcf export-nnunet``: a cohort as an nnU-Net v2 raw data set, with aqcf's folds as ``splits_final.json``.

A real nnU-Net v2 baseline (paper section 4.1.3) must train on the same patient-level folds as the
models of this package; what has to agree is the case identifiers. This verb writes the raw data set
with aqcf's case ids as nnU-Net's identifiers (``imagesTr/<id>_0000<ending>``, ``labelsTr/<id><ending>``),
its ``dataset.json``, and the fold file checked against those ids: the one given (``--splits``), or else
the folds :func:`aqcf.data.splits.make_splits` makes for this cohort, as ``aqcf fit`` does. One
modality per data set. The whole workflow, nnU-Net's commands and the scoring of its folds:
docs/baselines.md, *5. A real nnU-Net v2 on the same folds*.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from aqcf.constants import CLASS_NAMES, CT, MRI, TUMOR, check_modality
from aqcf.data.cohorts import read_cohort
from aqcf.data.gate import CaseErrors, check_cases
from aqcf.data.splits import check_splits, make_splits
from aqcf.errors import AqcfError
from aqcf.io import check_output, nifti_suffix, write_text_atomic

__all__ = ["CHANNEL_NAMES", "LABELS", "SPLITS_NAME", "dataset_folder", "export_nnunet", "main"]

#: nnU-Net normalises a channel named "CT" with its CT scheme (foreground percentiles) and others by z-score
CHANNEL_NAMES = {CT: "CT", MRI: "MRI"}
#: dataset.json's ``labels``: class name -> label value
LABELS = {name: value for value, name in enumerate(CLASS_NAMES)}
SPLITS_NAME = "splits_final.json"
_MAX_DATASET_ID = 999  # nnU-Net's data set ids have three digits


def dataset_folder(out_dir: str | Path, dataset_id: int, name: str) -> Path:
    """``out_dir/DatasetXXX_NAME``, nnU-Net v2's name for data set ``dataset_id``."""
    if not 1 <= dataset_id <= _MAX_DATASET_ID:
        raise AqcfError(f"dataset id {dataset_id}: nnU-Net needs 1..{_MAX_DATASET_ID}")
    if not name or any(c in name for c in " /\\"):
        raise AqcfError(f"dataset name {name!r}: nnU-Net needs a non-empty name without spaces or slashes")
    return Path(out_dir) / f"Dataset{dataset_id:03d}_{name}"


def _ending(path: Path) -> str:
    """The file ending nnU-Net's ``file_ending`` names: ``.nii.gz`` / ``.nii`` (as spelled), else the suffix."""
    return nifti_suffix(path) or path.suffix


def _has_tumor(label: str | Path) -> bool:
    """Whether a label map holds tumor (label 2): the stratification of the folds, as in the cache manifest."""
    import nibabel as nib

    return bool((np.asanyarray(nib.load(str(label)).dataobj) == TUMOR).any())


def _place(source: Path, target: Path, copy: bool) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    if copy:
        shutil.copyfile(source, target)
    else:
        target.symlink_to(source.resolve())


def export_nnunet(
    root: str | Path,
    fmt: str,
    modality: str,
    out_dir: str | Path,
    dataset_id: int,
    name: str,
    splits: str | Path | None = None,
    copy: bool = False,
    n_folds: int = 5,
    split_seed: int = 0,
) -> Path:
    """Write a cohort as the nnU-Net v2 raw data set ``out_dir/DatasetXXX_NAME``.

    Args:
        root: the cohort folder, as given to ``aqcf fit`` (``data.ct_root`` / ``data.mri_root``).
        fmt: its layout (``lits``, ``atlas``, ``nnunet``, ...), as ``data.ct_format`` / ``data.mri_format``.
        modality: ``"ct"`` or ``"mri"``.
        out_dir: nnU-Net's raw folder (``$nnUNet_raw``).
        dataset_id: nnU-Net data set id, 1..999.
        name: data set name (no spaces), e.g. ``LiTS``.
        splits: aqcf's fold file for this cohort (``<cache_dir>/<modality>/splits.json``, written by the
            first ``aqcf fit``); copied as ``splits_final.json`` after checking it names exactly these cases.
            ``None``: the folds are made as ``aqcf fit`` makes them, stratified by tumor presence (a label
            voxel of value 2), so they equal the ``splits.json`` a fit with the same ``n_folds`` and
            ``split_seed`` writes for this cohort.
        copy: copy the image and label files instead of linking to them.
        n_folds: folds made when ``splits`` is ``None`` (``data.n_folds``).
        split_seed: seed of those folds (``data.split_seed``).

    Returns:
        The data set folder.

    Raises:
        AqcfError: an unlabeled case, files of several endings, a fold file for other cases, a bad data
            set id or name, or cases the input gate refuses (every file is read to its end; truncated,
            non-finite, not 3D, a degenerate affine, label values outside {0, 1, 2}, a label off its
            image's grid): one :class:`~aqcf.data.gate.CaseErrors` naming every broken case, before
            anything is written.
    """
    modality = check_modality(modality)
    dataset = dataset_folder(out_dir, dataset_id, name)
    cases = read_cohort(root, fmt, modality)
    unlabeled = [c.id for c in cases if c.label is None]
    if unlabeled:
        raise AqcfError(f"{root}: case {unlabeled[0]} has no label file; nnU-Net trains on labeled cases only")
    endings = {_ending(Path(c.image)) for c in cases} | {_ending(Path(c.label)) for c in cases}
    if len(endings) != 1:
        raise AqcfError(
            f"{root}: the cases mix {', '.join(sorted(endings))} files; an nnU-Net data set has one file ending "
            "(compress or decompress them to one)"
        )
    ending = endings.pop()
    fold_file = None
    if splits is not None:
        try:
            fold_file = json.loads(Path(splits).read_text())
        except FileNotFoundError as err:
            raise AqcfError(f"{splits}: fold file not found (the first `aqcf fit` writes it)") from err
        except ValueError as err:
            raise AqcfError(f"{splits}: not valid JSON ({err})") from err
        check_splits(fold_file, [c.id for c in cases], len(fold_file) if isinstance(fold_file, list) else 0, splits)
    # last of the checks (it reads every file); nnU-Net would find a broken case only when it plans
    CaseErrors.raise_if_any(check_cases(cases), total=len(cases))
    if fold_file is None:
        fold_file = make_splits([c.id for c in cases], [_has_tumor(c.label) for c in cases], n_folds, split_seed)

    images, labels = dataset / "imagesTr", dataset / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case in cases:
        _place(Path(case.image), images / f"{case.id}_0000{ending}", copy)
        _place(Path(case.label), labels / f"{case.id}{ending}", copy)
    description = {
        "name": name,
        "description": f"{modality.upper()} cohort {Path(root).resolve()} ({fmt} layout) with aqcf's case ids",
        "channel_names": {"0": CHANNEL_NAMES[modality]},
        "labels": LABELS,
        "numTraining": len(cases),
        "file_ending": ending,
    }
    write_text_atomic(dataset / "dataset.json", json.dumps(description, indent=2) + "\n")
    write_text_atomic(dataset / SPLITS_NAME, json.dumps(fold_file, indent=1) + "\n")
    return dataset


def main(argv: list[str] | None = None) -> int:
    """``aqcf export-nnunet ROOT --format F --modality M --id N --name NAME --out DIR [--splits FILE] [--copy]``."""
    from aqcf.errors import ArgumentParser

    parser = ArgumentParser(
        prog="aqcf export-nnunet",
        description="Write a cohort as an nnU-Net v2 raw data set (aqcf's case ids as nnU-Net's identifiers) "
        "with aqcf's folds as splits_final.json, to train nnU-Net on the same folds.",
    )
    parser.add_argument("root", type=Path, help="cohort folder (as data.ct_root / data.mri_root)")
    parser.add_argument("--format", required=True, help="its layout: lits, atlas, nnunet, ...")
    parser.add_argument("--modality", required=True, choices=(CT, MRI))
    parser.add_argument("--id", type=int, required=True, dest="dataset_id", help="nnU-Net data set id (1..999)")
    parser.add_argument("--name", required=True, help="data set name, e.g. LiTS (no spaces)")
    parser.add_argument("--out", type=Path, required=True, help="nnU-Net's raw folder ($nnUNet_raw)")
    parser.add_argument("--splits", type=Path, default=None,
                        help="aqcf's fold file, <cache_dir>/<modality>/splits.json (written by the first aqcf fit "
                        "or aqcf preprocess); default: make the folds as aqcf fit does (stratified by tumor presence)")
    parser.add_argument("--n-folds", type=int, default=None,
                        help="folds made without --splits (default 5, as data.n_folds)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seed of the folds made without --splits (default 0, as data.split_seed)")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking to them")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing DatasetXXX_NAME folder")
    args = parser.parse_args(argv)
    check_output(dataset_folder(args.out, args.dataset_id, args.name), inputs=[args.root, args.splits],
                 overwrite=args.overwrite, kind="folder")
    if args.splits is not None and (args.n_folds, args.split_seed) != (None, None):
        parser.error("--n-folds and --split-seed make folds; with --splits the file's folds are used")
    n_folds = 5 if args.n_folds is None else args.n_folds
    seed = 0 if args.split_seed is None else args.split_seed
    dataset = export_nnunet(args.root, args.format, args.modality, args.out, args.dataset_id, args.name,
                            args.splits, args.copy, n_folds, seed)
    made = "" if args.splits else f" ({n_folds} folds stratified by tumor presence, seed {seed})"
    print(f"wrote {dataset} (imagesTr/, labelsTr/, dataset.json, {SPLITS_NAME}{made})")
    target = os.path.join("$nnUNet_preprocessed", dataset.name, SPLITS_NAME)
    print(f"after `nnUNetv2_plan_and_preprocess -d {args.dataset_id}`: cp {dataset / SPLITS_NAME} {target}")
    return 0

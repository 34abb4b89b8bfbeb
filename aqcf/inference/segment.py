"""``aqcf segment INPUT... --modality ct|mri --ckpt CKPT --out DIR``: masks and clinical measures.

Each INPUT is a NIfTI scan, a folder of NIfTI scans, or a DICOM series folder. For every scan this
writes, into ``--out`` (names from the scan's stem, ``volume-3.nii.gz`` -> ``volume-3``; a DICOM folder's
stem is its name):

* ``<stem><suffix>.nii.gz``: uint8 labels 0 background, 1 liver, 2 tumor, with exactly the scan's shape,
  affine and header geometry (qform/sform), so it overlays the scan in any viewer;
* ``<stem><suffix>.json``: the clinical measures (:func:`aqcf.inference.measures.scan_measures`), the
  settings used and the timings;
* with ``--png``, ``<stem><suffix>.png``: axial overlays (liver red, tumor blue).

``suffix`` defaults to ``_seg``. All files are written atomically; existing ones are kept unless
``--overwrite`` (checked for every scan before any work starts), or skipped when complete with
``--continue`` (as ``nnUNetv2_predict --continue_prediction``). One line per scan is printed.

Several ``--ckpt`` (or a run folder: every ``fold*/checkpoints/best.ckpt``) average their softmax
(:mod:`aqcf.inference.ensemble`); ``--save-probabilities`` writes ``<stem><suffix>_probabilities.npz``;
``--postprocess largest-liver`` keeps the largest liver component (:mod:`aqcf.inference.postprocess`);
``--dicom-seg`` writes a DICOM Segmentation beside the mask of a DICOM input
(:mod:`aqcf.inference.dicom_seg`).

Several ``--modality`` (``aqcf segment ct.nii.gz t2.nii.gz --modality ct --modality t2``) segment
co-registered scans of one patient together, one input per modality in the same order
(:func:`segment_patient`, :mod:`aqcf.inference.multimodal`): every given stream's mask is written as
``<first stem>_<modality><suffix>.nii.gz`` (with its ``.json``, and ``.png`` / probabilities when asked)
on that modality's own scan grid.

What is refused, what runs and every key of the ``.json``: docs/inference.md, *`aqcf segment`*.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from aqcf.constants import MODALITIES
from aqcf.errors import AqcfError, first_line
from aqcf.inference.postprocess import POSTPROCESSING
from aqcf.io import check_output, child_path, is_nifti_name, nifti_image, nifti_stem, safe_name, save_nifti_atomic

__all__ = [
    "DEFAULT_SUFFIX",
    "PROBABILITIES_SUFFIX",
    "PROBABILITIES_KEY",
    "BACKENDS",
    "MASK_GRID_TOLERANCE_MM",
    "Scan",
    "find_scans",
    "Outputs",
    "is_complete",
    "write_mask",
    "write_probabilities",
    "segment_scans",
    "segment_patient",
    "main",
]

DEFAULT_SUFFIX = "_seg"
#: appended to ``<stem><suffix>`` for the ``--save-probabilities`` file
PROBABILITIES_SUFFIX = "_probabilities.npz"
#: the array's name inside that file
PROBABILITIES_KEY = "probabilities"
DICOM, NIFTI = "dicom", "nifti"
#: ``--backend``: PyTorch checkpoints, or ONNX models written by ``aqcf export`` run by onnxruntime
BACKENDS = ("torch", "onnxruntime")
#: the grid a prediction is made on (the affine the preprocessing read) and the grid its mask is written on
#: (the scan header's) may differ this much (mm, per affine entry) before a warning says so
MASK_GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Scan:
    """One scan to segment: ``name`` (the output stem), ``source`` (file or DICOM folder), ``kind``, and for
    a DICOM folder the SeriesInstanceUID of the chosen ``series``."""

    name: str
    source: Path
    kind: str
    series: str | None = None


def _is_nifti(path: Path) -> bool:
    """A NIfTI file name (:func:`aqcf.io.is_nifti_name`), hidden files left out."""
    return is_nifti_name(path) and not path.name.startswith(".")


def find_scans(inputs: Sequence[str | Path], series: str | None = None) -> list[Scan]:
    """Expand the command line's inputs into scans.

    A NIfTI file is one scan; a folder holding NIfTI files gives each of them (sorted by name, numbers by
    value); a folder holding DICOM files and no NIfTI file is one DICOM series.

    Every NIfTI scan's header then passes the input gate (:func:`aqcf.data.gate.read_header`: one 3D
    volume, a valid affine, an uncompressed file as long as its header says); the voxels are checked
    when each scan is read for segmentation (complete file, finite values). A DICOM folder's series are
    listed (:func:`aqcf.data.dicom.choose_series`): one series, or the one ``series`` names.

    Raises:
        AqcfError: a missing input, a file that is not NIfTI, a folder with neither, two scans with
            the same stem (their outputs would collide), or headers the gate refuses (every such scan
            named in one :class:`aqcf.data.gate.CaseErrors`).
    """
    from aqcf.data.cohorts import natural_key
    from aqcf.data.dicom import choose_series, is_dicom_folder

    scans: list[Scan] = []
    for given in inputs:
        path = Path(given)
        if path.is_file():
            if not _is_nifti(path):
                raise AqcfError(f"{path}: not a NIfTI file (.nii, .nii.gz); give a DICOM series as its folder")
            scans.append(Scan(nifti_stem(path), path, NIFTI))
        elif path.is_dir():
            files = [p for p in path.iterdir() if p.is_file() and _is_nifti(p)]
            files.sort(key=lambda p: natural_key(p.name))
            if files:
                scans += [Scan(nifti_stem(p), p, NIFTI) for p in files]
            elif is_dicom_folder(path):
                scans.append(Scan(path.resolve().name, path, DICOM, choose_series(path, series).uid))
            else:
                raise AqcfError(f"{path}: holds neither NIfTI files (.nii, .nii.gz) nor DICOM files")
        else:
            raise AqcfError(f"{path}: no such file or folder")
    if series is not None and not any(scan.kind == DICOM for scan in scans):
        raise AqcfError(f"--series {series}: no input is a DICOM folder")
    seen: dict[str, Path] = {}
    for scan in scans:
        if scan.name in seen:
            raise AqcfError(
                f"{scan.source} and {seen[scan.name]} have the same name {scan.name!r}: their outputs would collide"
            )
        seen[scan.name] = scan.source
    _check_headers(scans)
    return scans


def _check_headers(scans: Sequence[Scan]) -> None:
    """Every NIfTI scan's header through the input gate before any work, all problems at once."""
    from aqcf.data.gate import CaseErrors, read_header

    problems = []
    for scan in scans:
        if scan.kind == NIFTI:
            try:
                read_header(scan.source)
            except AqcfError as err:
                problems.append(str(err))
    CaseErrors.raise_if_any(problems, total=len(scans), what="scans")


@dataclass(frozen=True)
class Outputs:
    """What ``aqcf segment`` writes for every scan, where, and whether existing files may be replaced.

    Attributes:
        folder: the output folder (``--out``); every output lies directly in it.
        suffix: appended to each scan's stem in the output names (``--suffix``).
        png: also an overlay PNG per scan (``--png``).
        probabilities: also the softmax, ``_probabilities.npz`` (``--save-probabilities``), before
            post-processing.
        dicom_seg: for a DICOM scan also a DICOM Segmentation, ``.dcm`` (``--dicom-seg``).
        overwrite: replace existing outputs; otherwise any existing one is an error before work starts.
        resume: skip scans whose outputs are complete (:func:`is_complete`), redo the others (``--continue``).
    """

    folder: Path
    suffix: str = DEFAULT_SUFFIX
    png: bool = False
    probabilities: bool = False
    dicom_seg: bool = False
    overwrite: bool = False
    resume: bool = False

    def paths(self, scan: Scan) -> dict[str, Path]:
        """Paths of one scan's outputs, all inside :attr:`folder`.

        ``{"mask": .nii.gz, "json": .json}``, plus ``"png"`` (:attr:`png`), ``"probabilities"``
        (``_probabilities.npz``, with :attr:`probabilities`) and, for a DICOM scan with :attr:`dicom_seg`,
        ``"dicom_seg"`` (``.dcm``).

        Raises:
            AqcfError: :attr:`suffix` holds a path separator (the outputs would leave the folder).
        """
        base = f"{scan.name}{safe_name(self.suffix, '--suffix')}"
        paths = {"mask": child_path(self.folder, base + ".nii.gz"), "json": child_path(self.folder, base + ".json")}
        if self.png:
            paths["png"] = child_path(self.folder, base + ".png")
        if self.probabilities:
            paths["probabilities"] = child_path(self.folder, base + PROBABILITIES_SUFFIX)
        if self.dicom_seg and scan.kind == DICOM:
            paths["dicom_seg"] = child_path(self.folder, base + ".dcm")
        return paths

    def check(self, scans: Sequence[Scan], inputs: Sequence = ()) -> list[Scan]:
        """Every output of every scan may be written (:func:`aqcf.io.check_output`), before any work starts.

        Args:
            scans: the scans to be segmented.
            inputs: further files no output may replace (the checkpoints).

        Returns:
            The scans to segment: all of them, or with :attr:`resume` those whose outputs are not
            complete (:func:`is_complete`); their incomplete outputs may be replaced.
        """
        check_output(self.folder, kind="cache")  # a folder, or one that can be made
        sources = [scan.source for scan in scans] + list(inputs)
        todo = []
        for scan in scans:
            paths = self.paths(scan)
            for path in paths.values():
                check_output(path, inputs=sources, overwrite=True)  # outputs never replace inputs
            if self.resume and is_complete(paths):
                continue
            for path in paths.values():
                check_output(path, inputs=sources, overwrite=self.overwrite or self.resume)
            todo.append(scan)
        return todo


def is_complete(paths: dict[str, Path]) -> bool:
    """Whether every output of a scan exists and reads back whole (what ``--continue`` skips).

    The mask is read to its end through the input gate (:func:`aqcf.data.gate.load_label`: complete
    file, labels 0/1/2), the JSON must parse, the probabilities file must hold its array, a DICOM
    Segmentation must parse with pydicom; a PNG only has to exist.
    """
    from aqcf.data.gate import load_label

    if not all(path.is_file() for path in paths.values()):
        return False
    try:
        load_label(paths["mask"])
        json.loads(paths["json"].read_text())
        if "probabilities" in paths:
            with np.load(paths["probabilities"]) as stored:
                if not np.isfinite(stored[PROBABILITIES_KEY]).all():
                    return False
        if "dicom_seg" in paths:
            import pydicom

            if "PixelData" not in pydicom.dcmread(paths["dicom_seg"]):
                return False
    except Exception:  # any unreadable output means: redo the scan
        return False
    return True


def write_mask(path: str | Path, labels: np.ndarray, reference: nib.spatialimages.SpatialImage) -> Path:
    """Write uint8 ``labels`` atomically with the geometry (affine, qform/sform codes) of ``reference``.

    The mask gets the scan's exact shape: a scan stored as one volume of a 4D image, (X, Y, Z, 1), gets a
    (X, Y, Z, 1) mask.

    Args:
        path: destination ``.nii.gz`` (or ``.nii``).
        labels: (X, Y, Z) labels with the reference's spatial shape.
        reference: the scan the labels belong to (its header is copied, data type and scaling reset).
    """
    path = Path(path)
    shape = tuple(int(n) for n in reference.shape)
    if tuple(labels.shape) != shape[:3] or any(n != 1 for n in shape[3:]):
        raise AqcfError(f"{path}: labels of shape {labels.shape} do not match the scan's {shape}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(reference)(np.asarray(labels, dtype=np.uint8).reshape(shape), reference.affine, header=header)
    # labels are stored as they are: no intensity scaling inherited from the scan
    image.header.set_slope_inter(1.0, 0.0)
    return save_nifti_atomic(image, path)


@contextlib.contextmanager
def _opened(scan: Scan) -> Iterator[tuple[Path, nib.spatialimages.SpatialImage, list | None]]:
    """The scan as ``(NIfTI path, nibabel image, DICOM slices in volume order or None)``; a DICOM series is
    converted in a temporary folder."""
    if scan.kind == NIFTI:
        try:
            image = nib.load(os.fspath(scan.source))
        except Exception as err:  # nibabel raises many types for a damaged file
            raise AqcfError(f"{scan.source}: unreadable NIfTI file ({first_line(err)})") from err
        yield scan.source, image, None
        return
    from aqcf.data.dicom import read_series_slices

    volume, affine, slices = read_series_slices(scan.source, scan.series)
    with tempfile.TemporaryDirectory(prefix="aqcf-dicom-") as tmp:
        # the NIfTI input path then reads it as it reads any scan; the mask is written on its grid
        path = Path(tmp) / f"{scan.name}.nii.gz"
        nib.save(nifti_image(volume, affine), os.fspath(path))
        yield path, nib.load(os.fspath(path)), slices


def write_probabilities(path: str | Path, probabilities: np.ndarray) -> Path:
    """Write (C, X, Y, Z) float16 probabilities atomically as a compressed ``.npz`` (key ``probabilities``).

    Read back with ``np.load(path)["probabilities"]``: channel i is label i's probability, on the
    scan's voxel grid in its stored axis order (the mask's grid).
    """
    from aqcf.io import atomic_path

    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **{PROBABILITIES_KEY: np.asarray(probabilities, dtype=np.float16)})
    return Path(path)


def _overlay(path: Path, reference, labels: np.ndarray, title: str) -> None:
    from aqcf.visualize.overlays import save_overlay_png

    # closest canonical (RAS) axes: what the radiological display convention expects
    image = nib.as_closest_canonical(reference)
    mask = nib.as_closest_canonical(nib.Nifti1Image(labels, reference.affine))
    save_overlay_png(
        path,
        np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3]),  # (X, Y, Z, 1) -> (X, Y, Z)
        {"prediction": np.asarray(mask.dataobj)},
        title=title,
        orientation="RAS",
        spacing=image.header.get_zooms()[:3],
    )


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def _warn_if_regridded(scan: Scan, result, reference) -> None:
    """Warn when the grid the prediction was made on is not the grid the mask is written on."""
    if not np.allclose(result.record["original_affine"], reference.affine, atol=MASK_GRID_TOLERANCE_MM):
        warnings.warn(
            f"{scan.source}: the affine read for preprocessing differs from the NIfTI header's "
            "(sform with shear?); the mask is written with the header's",
            stacklevel=4,  # the caller of segment_scans / segment_patient
        )


def _write_outputs(paths: dict[str, Path], title: str, labels: np.ndarray, result, reference, slices) -> dict:
    """Write one scan's probabilities, DICOM Segmentation, mask and overlay (as ``paths`` names them);
    returns its clinical measures (:func:`aqcf.inference.measures.scan_measures`)."""
    from aqcf.inference.measures import scan_measures

    if "probabilities" in paths:
        write_probabilities(paths["probabilities"], result.probabilities)
    if "dicom_seg" in paths:
        from aqcf.inference.dicom_seg import write_dicom_seg

        write_dicom_seg(paths["dicom_seg"], labels, slices)
    # the mask last: --continue takes a scan whose mask reads back whole as done
    write_mask(paths["mask"], labels, reference)
    measures = scan_measures(labels, reference.affine)
    if "png" in paths:
        _overlay(paths["png"], reference, labels, title)
    return measures


def _write_result(
    scan: Scan,
    modality: str,
    result,
    reference,
    outputs: Outputs,
    *,
    settings: dict,
    postprocessing: str,
    start: float,
    slices: Sequence | None = None,
    patient: dict | None = None,
) -> dict:
    """Post-process one scan's segmentation, write its outputs and its JSON record; returns the record.

    Args:
        scan: the scan (its ``name`` is the output stem).
        modality: the stream it was segmented as.
        result: the :class:`aqcf.inference.predictor.Segmentation` on the scan's grid.
        reference: the scan's nibabel image (the mask takes its geometry).
        outputs: what to write, where.
        settings: the predictor's settings, recorded under ``inference``.
        postprocessing: one of :data:`aqcf.inference.postprocess.POSTPROCESSING`.
        start: :func:`time.perf_counter` when the scan's work began (for ``seconds.total``).
        slices: the DICOM source slices in volume order, for a DICOM Segmentation.
        patient: for scans segmented together, ``{"inputs", "grid"}`` recorded after ``modality``.
    """
    from aqcf.inference.postprocess import postprocess
    from aqcf.io import write_text_atomic

    labels = postprocess(result.labels, postprocessing)
    _warn_if_regridded(scan, result, reference)
    paths = outputs.paths(scan)
    measures = _write_outputs(paths, f"{scan.name} ({modality.upper()})", labels, result, reference, slices)
    record = {
        "input": str(scan.source),
        "input_kind": scan.kind,
        "mask": str(paths["mask"]),
        "modality": modality,
        **(patient or {}),
        "shape": [int(n) for n in labels.shape],
        "spacing_mm": [float(s) for s in np.linalg.norm(np.asarray(reference.affine)[:3, :3], axis=0)],
        **measures,
        "inference": {**settings, "postprocessing": postprocessing},
        **{key: str(paths[key]) for key in ("probabilities", "dicom_seg") if key in paths},
        "seconds": {k: round(v, 3) for k, v in {**result.seconds, "total": time.perf_counter() - start}.items()},
    }
    write_text_atomic(paths["json"], _json_text(record))
    return record


def _written(scan: Scan, record: dict) -> str:
    """The line printed for a segmented scan: its measures and its mask."""
    from aqcf.inference.measures import format_measures

    return f"{scan.name}: {format_measures(record)} -> {record['mask']}"


def _skipped(scans: Sequence[Scan], todo: Sequence[Scan]) -> None:
    """Print one line per scan ``--continue`` skips."""
    for scan in scans:
        if scan not in todo:
            print(f"{scan.name}: complete, skipped (--continue)", file=sys.stdout)


def segment_scans(
    scans: Sequence[Scan],
    predictor,
    modality: str,
    outputs: Outputs,
    progress: bool = True,
    postprocessing: str = "none",
) -> list[dict]:
    """Segment each scan, write its mask, measures JSON and (optionally) overlay, print one line each.

    Args:
        scans: from :func:`find_scans`.
        predictor: an :class:`aqcf.inference.predictor.Predictor` or
            :class:`aqcf.inference.ensemble.EnsemblePredictor`.
        modality: ``"ct"`` or ``"mri"`` (one for all scans).
        outputs: what to write for each scan, where (:class:`Outputs`; the folder is created).
        progress: show a progress bar over scans.
        postprocessing: one of :data:`aqcf.inference.postprocess.POSTPROCESSING`, applied to the mask.

    Returns:
        The JSON records written, one per scan segmented.
    """
    from tqdm.auto import tqdm

    modality = predictor.check_modality(modality)
    todo = outputs.check(scans)
    _skipped(scans, todo)
    records = []
    for scan in tqdm(todo, desc="aqcf segment", unit="scan", disable=not progress, file=sys.stderr):
        start = time.perf_counter()
        with _opened(scan) as (nifti, reference, slices):
            result = predictor.segment_file(nifti, modality, probabilities=outputs.probabilities)
            record = _write_result(scan, modality, result, reference, outputs, settings=predictor.settings(),
                                   postprocessing=postprocessing, start=start, slices=slices)
        tqdm.write(_written(scan, record), file=sys.stdout)
        records.append(record)
    return records


def segment_patient(
    scans: Sequence[Scan],
    modalities: Sequence[str],
    predictor,
    outputs: Outputs,
    postprocessing: str = "none",
) -> list[dict]:
    """Segment co-registered scans of one patient together and write every given stream's outputs.

    The first scan's preprocessed grid is the common grid, the other scans are resampled onto it and one
    sliding window runs over all of them (:func:`aqcf.inference.multimodal.segment_present`). Each
    modality's outputs are named ``<first scan's stem>_<modality><suffix>`` and lie on that modality's
    own scan grid, as :func:`segment_scans` writes them.

    Args:
        scans: one scan per modality (:func:`find_scans`), in the order of ``modalities``.
        modalities: distinct modalities the model was trained on; the first one's grid is used.
        predictor: a single :class:`aqcf.inference.predictor.Predictor` (no ensemble, no TTA).
        outputs: as in :func:`segment_scans`, without DICOM Segmentations; with ``resume`` and every
            mask of the patient complete (:func:`is_complete`) nothing is done, otherwise the patient
            is redone.
        postprocessing: as in :func:`segment_scans`.

    Returns:
        The JSON records written, one per modality.
    """
    from aqcf.inference.multimodal import segment_present

    modalities = [predictor.check_modality(m) for m in modalities]
    if len(scans) != len(modalities):
        raise AqcfError(f"{len(modalities)} modalities need one scan each, got {len(scans)} scans")
    named = [replace(scan, name=f"{scans[0].name}_{m}") for scan, m in zip(scans, modalities, strict=True)]
    outputs = replace(outputs, dicom_seg=False)
    if not outputs.check(named):
        _skipped(named, ())
        return []
    # the patient's scans, in the order given; the first one's preprocessed grid was the common grid
    patient = {"inputs": {m: str(s.source) for m, s in zip(modalities, scans, strict=True)}, "grid": modalities[0]}
    start = time.perf_counter()
    records = []
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(_opened(scan)) for scan in scans]
        niftis = {m: nifti for m, (nifti, _, _) in zip(modalities, opened, strict=True)}
        results = segment_present(niftis, predictor, outputs.probabilities)
        for scan, modality, (_, reference, _) in zip(named, modalities, opened, strict=True):
            record = _write_result(scan, modality, results[modality], reference, outputs,
                                   settings=predictor.settings(), postprocessing=postprocessing, start=start,
                                   patient=patient)
            print(_written(scan, record), file=sys.stdout)
            records.append(record)
    return records


def _parser() -> argparse.ArgumentParser:  # a flag list: one add_argument per flag, no logic to split
    from aqcf.errors import ArgumentParser

    p = ArgumentParser(
        prog="aqcf segment",
        description="Segment liver and liver tumors in CT or MRI scans with a trained checkpoint. Applies the "
        "checkpoint's own preprocessing and sliding-window settings, runs the unimodal path (the other stream "
        "zero-filled), writes <stem>_seg.nii.gz (uint8: 0 background, 1 liver, 2 tumor) in each scan's exact "
        "geometry and <stem>_seg.json with liver/tumor volumes (mL), tumor count (26-connected components) and "
        "largest tumor diameter (mm). See docs/inference.md.",
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="NIfTI file, folder of NIfTI files, or DICOM series folder"
    )
    p.add_argument("-i", dest="more_inputs", nargs="+", action="extend", default=[], metavar="INPUT",
                   help="inputs, as nnUNetv2_predict takes them (added to the positional ones)")
    p.add_argument("--modality", required=True, action="append", help="modality of every input: a stream the "
                   f"checkpoint was trained on ({', '.join(MODALITIES)} for the pair; a cohort's name, e.g. t2, for a "
                   "model of named cohorts). Given several times (--modality ct --modality t2), the inputs are "
                   "co-registered scans of ONE patient, one per modality in the same order, segmented together "
                   "on the first one's grid: writes <first stem>_<modality>_seg.nii.gz per modality on its own "
                   "scan's grid; one --ckpt only, no --backend onnxruntime, --tta or --dicom-seg")
    p.add_argument(
        "--ckpt", nargs="+", help="checkpoint written by `aqcf fit` (e.g. runs/NAME/fold0/checkpoints/best.ckpt); "
        "several, or a run folder (every fold*/checkpoints/best.ckpt in it), make an ensemble: the mean of their "
        "softmax, each model on its own sliding window; they must agree on preprocessing, classes and modalities"
    )
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="torch (default) runs the checkpoints; "
                   "onnxruntime runs the --onnx models written by `aqcf export` with the settings file beside each")
    p.add_argument("--onnx", nargs="+", metavar="MODEL", help="with --backend onnxruntime: model.onnx file(s) "
                   "written by `aqcf export` (preprocessing and window from model.onnx.json; several average)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--suffix", default=DEFAULT_SUFFIX, help="appended to each scan's stem in the output names "
                   f"(default {DEFAULT_SUFFIX!r}; '' gives <stem>.nii.gz, the names `aqcf evaluate` matches)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: the checkpoint's, 0.8 "
                   "in the paper config)")
    p.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="sliding window in voxels of the preprocessed grid (default: the training patch)")
    p.add_argument("--blend", choices=("gaussian", "constant"), help="blending of overlapping windows "
                   "(default: the checkpoint's, gaussian)")
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass (default: the checkpoint's)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation: average over the 8 flips of "
                   "the three axes (8x slower)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: CUDA if available")
    p.add_argument("--absent-context", default=None, choices=("zero-filled", "off"), help="context from the absent "
                   "modality's stream: zero-filled (eq. 17, default: the checkpoint's setting) or off (the A-QCF "
                   "gates from the absent stream set to 0 at every stage, eq. 10)")
    p.add_argument("--stitch-on-cpu", action="store_true", help="keep the stitched volume in CPU memory (windows "
                   "still run on the GPU): large volumes then need GPU memory for one window batch only")
    p.add_argument("--precision", default="32", choices=("32", "bf16", "16"), help="network precision (autocast; "
                   "16 needs CUDA); default 32")
    p.add_argument("--png", action="store_true", help="also write <stem>_seg.png: axial overlays")
    p.add_argument("--save-probabilities", action="store_true", help="also write <stem>_seg_probabilities.npz: "
                   "the softmax as float16 (C, X, Y, Z) on the scan's grid, key 'probabilities', before --postprocess")
    p.add_argument("--postprocess", default="none", choices=POSTPROCESSING, help="largest-liver: keep the largest "
                   "26-connected liver component (labels 1 and 2) and drop everything outside it; default none")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID of the series to segment in a DICOM folder "
                   "holding several (without it such a folder is an error that lists them)")
    p.add_argument("--dicom-seg", action="store_true", help="for a DICOM input also write <stem>_seg.dcm: a DICOM "
                   "Segmentation (binary; segments liver = labels 1+2 and tumor = label 2) referencing the source "
                   "slices (needs pip install 'aqcf[dicom]')")
    p.add_argument("--continue", dest="resume", action="store_true", help="skip scans whose outputs exist and "
                   "read back whole; redo (replace) the incomplete ones")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _outputs(args: argparse.Namespace) -> Outputs:
    """The :class:`Outputs` the command line asks for."""
    return Outputs(Path(args.out), args.suffix, png=args.png, probabilities=args.save_probabilities,
                   dicom_seg=args.dicom_seg, overwrite=args.overwrite, resume=args.resume)


def _window(args: argparse.Namespace) -> dict:
    """The sliding-window flags as predictor keywords (``None``: the model's own setting)."""
    return dict(roi_size=args.window, overlap=args.overlap, batch_size=args.sw_batch_size, mode=args.blend,
                stitch_on_cpu=args.stitch_on_cpu)


def _set_absent_context(parser: argparse.ArgumentParser, predictor, context: str | None) -> None:
    """Apply ``--absent-context`` to a checkpoint predictor's network (``None`` keeps the checkpoint's)."""
    if context is None:
        return
    if not hasattr(predictor.network, "absent_context"):
        parser.error(f"--absent-context: the network of {predictor.source} has no A-QCF blocks")
    predictor.network.absent_context = context


def _models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Path]:
    """The checkpoints (``--backend torch``, each checked before any input is read) or ONNX models."""
    from aqcf.inference.ensemble import checkpoint_paths
    from aqcf.inference.predictor import load_checkpoint_info

    if args.backend != "torch":
        if not args.onnx or args.ckpt:
            parser.error("--backend onnxruntime needs --onnx (and no --ckpt: the settings come from model.onnx.json)")
        return [Path(path) for path in args.onnx]
    if not args.ckpt or args.onnx:
        parser.error("--backend torch needs --ckpt (and no --onnx)")
    models = checkpoint_paths(args.ckpt)
    for path in models:
        load_checkpoint_info(path)  # a missing, damaged or foreign checkpoint fails before the inputs are read
    return models


def _predictor(parser: argparse.ArgumentParser, args: argparse.Namespace, models: Sequence[Path]):
    """One predictor per model, averaged by an ensemble when there are several."""
    from aqcf.inference.ensemble import EnsemblePredictor
    from aqcf.inference.predictor import Predictor

    if args.backend == "torch":
        predictors = [
            Predictor.from_checkpoint(path, device=args.device, precision=args.precision, tta=args.tta, **_window(args))
            for path in models
        ]
        for one in predictors:
            _set_absent_context(parser, one, args.absent_context)
    else:
        if args.absent_context is not None:
            parser.error("--absent-context needs --backend torch (an exported graph has its setting built in)")
        from aqcf.inference.onnx_backend import onnx_predictor

        predictors = [onnx_predictor(path, tta=args.tta, **_window(args)) for path in models]
    return predictors[0] if len(predictors) == 1 else EnsemblePredictor(predictors)


def _check_trained(parser: argparse.ArgumentParser, modality: str, predictor) -> None:
    """``--modality`` must name a stream the model knows; ct / mri it was not trained on are refused by
    the predictor itself, with its own message."""
    if modality.lower() not in (*predictor.modalities, *MODALITIES):
        parser.error(f"--modality {modality!r}: {predictor.source} was trained on {', '.join(predictor.modalities)}")


def main(argv: list[str] | None = None) -> int:
    """``aqcf segment``: returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    inputs = [*args.inputs, *args.more_inputs]
    if not inputs:
        parser.error("give at least one INPUT (positional or -i)")
    if len(args.modality) > 1:
        return _main_patient(parser, args, inputs)
    modality = args.modality[0]
    models = _models(parser, args)
    if args.dicom_seg:
        from aqcf.inference.dicom_seg import require_highdicom

        require_highdicom()
    scans = find_scans(inputs, series=args.series)
    outputs = _outputs(args)
    outputs.check(scans, inputs=models)
    predictor = _predictor(parser, args, models)
    _check_trained(parser, modality, predictor)
    segment_scans(scans, predictor, modality, outputs, progress=not args.no_progress, postprocessing=args.postprocess)
    return 0


def _main_patient(parser: argparse.ArgumentParser, args: argparse.Namespace, inputs: list[str]) -> int:
    """``aqcf segment`` with several ``--modality``: co-registered scans of one patient (:func:`segment_patient`)."""
    from aqcf.inference.ensemble import checkpoint_paths
    from aqcf.inference.predictor import Predictor, load_checkpoint_info

    names = [m.lower() for m in args.modality]
    refused = {"--backend onnxruntime": args.backend != "torch", "--onnx": bool(args.onnx), "--tta": args.tta,
               "--dicom-seg": args.dicom_seg}
    for flag, given in refused.items():
        if given:
            parser.error(f"{flag} is not supported with several --modality (one patient's co-registered scans)")
    for name in names:
        if names.count(name) > 1:
            parser.error(f"--modality {name} is given twice: give each modality once, with its own input")
    if len(inputs) != len(names):
        parser.error(f"{len(names)} --modality need exactly one input each, in the same order; got {len(inputs)}")
    if not args.ckpt:
        parser.error("several --modality need --ckpt")
    models = checkpoint_paths(args.ckpt)
    if len(models) > 1:
        parser.error(f"several --modality take one checkpoint, not an ensemble of {len(models)}")
    load_checkpoint_info(models[0])  # a missing, damaged or foreign checkpoint fails before the inputs are read
    scans = find_scans(inputs, series=args.series)
    if len(scans) != len(names):
        parser.error(f"several --modality need one scan per input (a NIfTI file or a DICOM series folder); "
                     f"the {len(inputs)} inputs hold {len(scans)} scans")
    predictor = Predictor.from_checkpoint(models[0], device=args.device, precision=args.precision, **_window(args))
    _set_absent_context(parser, predictor, args.absent_context)
    for name in names:
        _check_trained(parser, name, predictor)
    segment_patient(scans, names, predictor, _outputs(args), postprocessing=args.postprocess)
    return 0

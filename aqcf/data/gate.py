"""The input gate: the checks every scan and label map passes before any verb uses it.

One place decides what aqcf accepts; the cohort readers, preprocessing, ``aqcf segment``, ``aqcf
evaluate``, ``aqcf explain``, ``aqcf export-nnunet``, the external-cohort readers and the DICOM reader
all call these functions. A refused input raises one :class:`~aqcf.errors.AqcfError` line naming the
file: unreadable or truncated files, anything but one 3D volume, non-finite voxels, a degenerate affine,
inconsistent DICOM slices, label values outside {0, 1, 2} or a label on another grid than its image.
The full table of refusals and their messages: docs/data.md, *What is refused: the input gate*.

Reading costs one pass over each file: :func:`load_volume` and :func:`load_label` read and check;
:func:`check_array` checks what a caller has already loaded; :func:`read_header` checks what the
header alone tells. :func:`check_cases` checks a whole cohort and returns every problem found, and
:class:`CaseErrors` carries several problems as one error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqcf.constants import check_label_values
from aqcf.errors import AqcfError, first_line
from aqcf.io import is_nifti_name

__all__ = [
    "SAME_GRID_TOLERANCE_MM",
    "MONOCHROME",
    "Volume",
    "CaseErrors",
    "spatial_shape",
    "check_affine",
    "count_nonfinite",
    "check_array",
    "read_header",
    "load_volume",
    "load_label",
    "check_same_grid",
    "check_case",
    "check_cases",
    "dicom_slice_name",
    "check_dicom_slices",
    "check_slice_spacing",
]

SAME_GRID_TOLERANCE_MM = 1e-2
"""Largest difference (mm, per affine entry) at which two files still lie on one voxel grid: an image
and its label map, a prediction and its reference, a mask and its scan."""


MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
"""DICOM PhotometricInterpretation values of a grey-scale scan."""

# |det| of the voxel axes relative to the product of their lengths: 1 for orthogonal axes, 0 for
# dependent ones (a singular affine)
MIN_AXIS_INDEPENDENCE = 1e-6
# slabs of this many slices bound the memory of the finiteness test
_SLAB = 32
_READ_ERRORS = (EOFError, OSError, ValueError, zlib.error)


@dataclass(frozen=True)
class Volume:
    """A scan or label map read completely and checked.

    Attributes:
        path: The file.
        array: Its voxels (X, Y, Z) in the stored data type (float32 where the header scales them); a
            singleton fourth axis is dropped.
        affine: 4×4 voxel-to-world matrix (RAS, mm).
        shape: The stored shape, (X, Y, Z) or (X, Y, Z, 1).
        header: The nibabel header (zooms, units, qform/sform codes); ``None`` for other formats.
    """

    path: Path
    array: np.ndarray
    affine: np.ndarray
    shape: tuple[int, ...]
    header: object


class CaseErrors(AqcfError):
    """Several input problems at once (every broken case of a cohort), as one error.

    The message stays one line: a single problem as it is, several as ``"3 of 131 cases refused: <first>
    | <second> | <third>"``.

    Args:
        problems: One line per problem, each naming its file (the messages of :class:`AqcfError`).
        total: How many were checked, for the message.
        what: What was checked, plural (``"cases"``, ``"scans"``).

    Attributes:
        problems: The lines given.
    """

    def __init__(self, problems: Sequence[str], total: int | None = None, what: str = "cases"):
        self.problems, self.total, self.what = [str(p) for p in problems], total, what
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            of = f" of {total}" if total is not None else ""
            message = f"{len(self.problems)}{of} {what} refused: " + " | ".join(self.problems)
        super().__init__(message)

    def __reduce__(self):  # rebuilt from its parts when it crosses a process boundary
        return type(self), (self.problems, self.total, self.what)

    @classmethod
    def raise_if_any(cls, problems: Sequence[str], total: int | None = None, what: str = "cases") -> None:
        """Raise ``CaseErrors(problems, total, what)`` unless ``problems`` is empty."""
        if problems:
            raise cls(problems, total, what)


def spatial_shape(path: str | Path, shape: Sequence[int]) -> tuple[int, int, int]:
    """The (X, Y, Z) of an image that is one 3D volume.

    Args:
        path: The file, for the message.
        shape: The stored shape; axes after the third must be 1 (one volume).

    Returns:
        The three spatial sizes.

    Raises:
        AqcfError: A 2D image (fewer than three axes, or an axis of one voxel) or several
            volumes or channels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        volumes = int(np.prod(shape[3:]))
        raise AqcfError(
            f"{path}: {len(shape)}D image of shape {shape} ({volumes} volumes or channels); expected a 3D scan"
        )
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise AqcfError(f"{path}: 2D image of shape {shape}; expected a 3D scan")
    return shape[0], shape[1], shape[2]


def check_affine(path: str | Path, affine: np.ndarray) -> np.ndarray:
    """Check that an affine maps voxels to world coordinates one to one.

    Args:
        path: The file, for the message.
        affine: 4×4 voxel-to-world matrix (mm).

    Returns:
        The affine as a float array.

    Raises:
        AqcfError: Non-finite entries, a voxel size of zero, or voxel axes that are not independent
            (a singular matrix).
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise AqcfError(f"{path}: the affine (voxel-to-world matrix) holds NaN or Inf")
    axes = affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise AqcfError(f"{path}: voxel size ({shown}) mm; every size must be positive")
    independence = abs(float(np.linalg.det(axes))) / float(np.prod(spacing))
    if independence < MIN_AXIS_INDEPENDENCE:
        raise AqcfError(f"{path}: the affine is singular (its voxel axes are not independent directions)")
    return affine


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN or Inf entries (0 for integer arrays), computed a slab of slices at a time."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return 0
    if array.ndim < 3:
        return int(np.count_nonzero(~np.isfinite(array)))
    return sum(
        int(np.count_nonzero(~np.isfinite(array[..., start : start + _SLAB])))
        for start in range(0, array.shape[-1], _SLAB)
    )


def check_array(path: str | Path, array: np.ndarray, affine: np.ndarray, finite: bool = True) -> np.ndarray:
    """Check an image a caller has already loaded: one 3D volume, a valid affine, finite voxels.

    Args:
        path: The file it came from, for the message.
        array: The voxels, (X, Y, Z) or (X, Y, Z, 1) (channels last; TorchIO's (C, X, Y, Z) must be
            moved to (X, Y, Z, C) first).
        affine: Its 4×4 voxel-to-world matrix (mm).
        finite: Also refuse NaN and Inf voxels (label maps are checked by their values instead).

    Returns:
        The voxels as (X, Y, Z) (a view: a singleton fourth axis removed).

    Raises:
        AqcfError: See :func:`spatial_shape` and :func:`check_affine`; or non-finite voxels.
    """
    shape = spatial_shape(path, array.shape)
    check_affine(path, affine)
    array = array.reshape(shape) if array.ndim != 3 else array
    if finite:
        bad = count_nonfinite(array)
        if bad:
            raise AqcfError(f"{path}: {bad} non-finite voxels (NaN or Inf) of {array.size}")
    return array


def _nibabel_image(path: Path):
    """The nibabel image of a NIfTI file, header read, voxels not yet."""
    import nibabel as nib

    if not path.is_file():
        raise AqcfError(f"{path}: no such file")
    try:
        return nib.load(os.fspath(path))
    except Exception as err:  # nibabel raises many types for a file that is not NIfTI
        raise AqcfError(f"{path}: unreadable image ({type(err).__name__}: {first_line(err)})") from err


def _other_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (components last when several) and RAS affine of a non-NIfTI file, from SimpleITK's header."""
    import SimpleITK as sitk
    from torchio.data.io import get_ras_affine_from_sitk

    if not path.exists():
        raise AqcfError(f"{path}: no such file")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(os.fspath(path))
        reader.ReadImageInformation()
        shape = tuple(int(n) for n in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
        if len(shape) < 3 or components > 1:
            return shape + ((components,) if components > 1 else ()), np.eye(4)
        return shape, get_ras_affine_from_sitk(reader)
    except Exception as err:  # ITK raises RuntimeError, TorchIO others, for a file it cannot read
        raise AqcfError(f"{path}: unreadable image ({type(err).__name__}: {first_line(err)})") from err


def read_header(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Check what an image's header tells without reading the voxels: shape, affine, file length.

    An uncompressed ``.nii`` shorter than its header promises is refused here; a truncated
    ``.nii.gz`` only shows when it is read (:func:`load_volume`). Files other than NIfTI are read
    with SimpleITK.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file, or another image file SimpleITK reads (``.nrrd``, ``.mha``).

    Returns:
        ``(shape, affine)``: the spatial shape (X, Y, Z) and the 4×4 voxel-to-world matrix (RAS, mm).

    Raises:
        AqcfError: Missing or unreadable, a short ``.nii``, not one 3D volume, a degenerate affine.
    """
    path = Path(path)
    if not is_nifti_name(path):
        shape, affine = _other_header(path)
        return spatial_shape(path, shape), check_affine(path, affine)
    image = _nibabel_image(path)
    header = image.header
    if not path.name.lower().endswith(".gz"):
        needed = int(header.get_data_offset()) + int(np.prod(image.shape)) * header.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            raise AqcfError(f"{path}: truncated file ({size} bytes; its header describes {needed})")
    return spatial_shape(path, image.shape), check_affine(path, image.affine)


def _read_nifti(path: Path):
    """``(image, voxels)`` of a NIfTI file read to its end (a ``.nii.gz``'s checksum verified)."""
    klass = type(_nibabel_image(path))
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            image = klass.from_file_map(klass.make_file_map({"image": stream}), mmap=False)
            proxy = image.dataobj
            scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
            # scaled values in float32, not the float64 nibabel would choose (half the memory)
            voxels = np.asarray(proxy, dtype=np.float32) if scaled else np.asarray(proxy)
            if compressed:  # the gzip checksum and length are checked at the end of the stream
                while stream.read(1 << 20):
                    pass
    except _READ_ERRORS as err:
        raise AqcfError(f"{path}: truncated or damaged file, not readable to its end ({first_line(err)})") from err
    return image, voxels


def _read_other(path: Path):
    """``(affine, voxels (X, Y, Z, C))`` of a non-NIfTI file read by TorchIO (SimpleITK)."""
    import torchio as tio

    try:
        image = tio.ScalarImage(path)
        image.load()
    except Exception as err:  # ITK raises RuntimeError, TorchIO others, for a file it cannot read
        raise AqcfError(f"{path}: unreadable image ({type(err).__name__}: {first_line(err)})") from err
    return np.asarray(image.affine, dtype=float), np.moveaxis(image.numpy(), 0, -1)


def load_volume(path: str | Path, finite: bool = True) -> Volume:
    """Read an image completely and check it (:func:`check_array`).

    NIfTI files are read with nibabel, to their end; other formats with TorchIO (SimpleITK), which
    cannot tell a truncated file from a complete one.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file, or another image file SimpleITK reads.
        finite: Refuse NaN and Inf voxels (for scans; label maps are checked by :func:`load_label`).

    Returns:
        The :class:`Volume` (``header`` is ``None`` for files other than NIfTI).

    Raises:
        AqcfError: Missing or unreadable, truncated or damaged, not one 3D volume, a degenerate
            affine, non-finite voxels.
    """
    path = Path(path)
    read_header(path)  # a wrong shape or affine fails before the voxels are read
    if is_nifti_name(path):
        image, voxels = _read_nifti(path)
        affine, header = np.asarray(image.affine, dtype=float), image.header
    else:
        (affine, voxels), header = _read_other(path), None
    array = check_array(path, voxels, affine, finite=finite)
    return Volume(path, array, affine, tuple(int(n) for n in voxels.shape), header)


def load_label(
    path: str | Path,
    grid: tuple[Sequence[int], np.ndarray] | None = None,
    image: str | Path | None = None,
    tolerance_mm: float = SAME_GRID_TOLERANCE_MM,
) -> Volume:
    """Read a label map completely and check its values and, given its image's grid, its geometry.

    Args:
        path: A ``.nii`` or ``.nii.gz`` label map.
        grid: ``(shape, affine)`` of its image (:func:`read_header`); ``None`` skips the grid check.
        image: The image file, for the message.
        tolerance_mm: See :func:`check_same_grid`.

    Returns:
        The :class:`Volume`.

    Raises:
        AqcfError: As :func:`load_volume`; values outside {0, 1, 2}; another grid than the image's.
    """
    volume = load_volume(path, finite=False)
    if grid is not None:
        check_same_grid(image or "its image", grid, volume.path, (volume.array.shape, volume.affine), tolerance_mm)
    check_label_values(volume.path, volume.array)
    return volume


def check_same_grid(
    image: str | Path,
    image_geometry: tuple[Sequence[int], np.ndarray],
    label: str | Path,
    label_geometry: tuple[Sequence[int], np.ndarray],
    tolerance_mm: float = SAME_GRID_TOLERANCE_MM,
) -> None:
    """Check that an image and its label map share one voxel grid.

    Args:
        image, label: The two files, for the message.
        image_geometry, label_geometry: ``(shape, affine)`` of each, as :func:`read_header` returns.
        tolerance_mm: Largest accepted difference of any affine entry (mm).

    Raises:
        AqcfError: The image is not 3D single-channel, or shapes or affines differ.
    """
    (image_shape, image_affine), (label_shape, label_affine) = image_geometry, label_geometry
    image_shape, label_shape = tuple(int(n) for n in image_shape), tuple(int(n) for n in label_shape)
    if len(image_shape) != 3:
        raise AqcfError(f"{image}: shape {image_shape}; expected a single-channel 3D volume")
    if label_shape != image_shape:
        raise AqcfError(f"{label}: shape {label_shape} differs from its image's {image_shape} ({image})")
    difference = float(np.max(np.abs(np.asarray(label_affine) - np.asarray(image_affine))))
    if not difference <= tolerance_mm:
        raise AqcfError(
            f"{label}: affine differs from its image's ({image}) by up to {difference:.3g} mm "
            f"(tolerance {tolerance_mm:g} mm)"
        )


def check_case(case, read_data: bool = True, tolerance_mm: float = SAME_GRID_TOLERANCE_MM) -> None:
    """Check one case (an object with ``image`` and ``label`` paths, such as a cohort ``Case``).

    Args:
        case: The case; ``label`` may be ``None``.
        read_data: Read the voxels too (complete files, finite scan, label values); otherwise only
            the headers (shape, affine, grid, length of an uncompressed file).
        tolerance_mm: Largest accepted difference between the image's and the label's affine (mm).

    Raises:
        AqcfError: The first problem, naming its file.
    """
    grid = read_header(case.image)
    if read_data:
        load_volume(case.image)
    if case.label is None:
        return
    if read_data:
        load_label(case.label, grid, case.image, tolerance_mm)
    else:
        check_same_grid(case.image, grid, case.label, read_header(case.label), tolerance_mm)


def check_cases(
    cases: Iterable, read_data: bool = True, tolerance_mm: float = SAME_GRID_TOLERANCE_MM
) -> list[str]:
    """Check every case of a cohort and return every problem found, not only the first.

    Args:
        cases: Objects with ``image`` and ``label`` paths (cohort ``Case`` records).
        read_data: See :func:`check_case`.
        tolerance_mm: See :func:`check_case`.

    Returns:
        One line per broken case, naming its file (empty when all pass). Raise them together with
        ``CaseErrors.raise_if_any(problems, total=len(cases))``.
    """
    problems = []
    for case in cases:
        try:
            check_case(case, read_data, tolerance_mm)
        except AqcfError as err:
            problems.append(str(err))
    return problems


# ------------------------------------------------------------------------------------------ DICOM


def dicom_slice_name(dataset, name: str) -> str:
    """The file a DICOM slice was read from, else ``name`` (a slice read from a zip member)."""
    filename = getattr(dataset, "filename", None)
    return str(filename) if isinstance(filename, (str, os.PathLike)) and str(filename) else name


def _all_equal(values: list, tolerance: float) -> bool:
    first = np.asarray(values[0], dtype=float)
    return all(np.asarray(v, dtype=float).shape == first.shape and np.allclose(v, first, atol=tolerance)
               for v in values[1:])


def check_dicom_slices(
    datasets: Sequence,
    name: str,
    orientation_tolerance: float = 1e-4,
    spacing_tolerance_mm: float = 1e-4,
) -> None:
    """Check that DICOM slices form one grey-scale series on one in-plane grid (headers only).

    Args:
        datasets: The slices (pydicom datasets), in any order.
        name: How messages name the series (its folder); a slice read from a file is named by it.
        orientation_tolerance: Largest difference of ImageOrientationPatient direction cosines.
        spacing_tolerance_mm: Largest difference of PixelSpacing between slices (mm).

    Raises:
        AqcfError: A slice that is not monochrome (PhotometricInterpretation MONOCHROME1/2,
            SamplesPerPixel 1: an RGB secondary capture is refused) or has several frames; slices
            that differ in Rows/Columns, PixelSpacing or ImageOrientationPatient.
    """
    for ds in datasets:
        photometric = str(getattr(ds, "PhotometricInterpretation", "") or "").strip().upper()
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        if photometric not in MONOCHROME or samples != 1:
            shown = photometric or "no PhotometricInterpretation"
            raise AqcfError(
                f"{dicom_slice_name(ds, name)}: {shown} image with {samples} sample(s) per pixel; expected a "
                "monochrome scan (MONOCHROME1 or MONOCHROME2, one sample per pixel)"
            )
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames != 1:
            raise AqcfError(f"{dicom_slice_name(ds, name)}: {frames} frames in one file; expected single-frame slices")
    sizes = {(int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise AqcfError(f"{name}: slices differ in size (rows, columns): {sorted(sizes)}")
    for keyword, tolerance in (("PixelSpacing", spacing_tolerance_mm),
                               ("ImageOrientationPatient", orientation_tolerance)):
        values = [getattr(ds, keyword, None) for ds in datasets]
        present = [v for v in values if v is not None]
        if present and (len(present) != len(values) or not _all_equal(present, tolerance)):
            raise AqcfError(f"{name}: slices have different {keyword}")


def check_slice_spacing(
    positions: np.ndarray, name: str, position_tolerance_mm: float = 1e-2, relative_tolerance: float = 1e-2
) -> float:
    """Check that sorted slice positions along the slice normal are evenly spaced.

    Args:
        positions: Increasing positions (mm), one per slice.
        name: How messages name the series.
        position_tolerance_mm: Absolute part of the accepted spread of the steps (mm).
        relative_tolerance: Relative part of the accepted spread, as a fraction of the mean step.

    Returns:
        The mean step (mm); 0 for a single slice.

    Raises:
        AqcfError: The steps spread more than ``position_tolerance_mm + relative_tolerance × mean``.
    """
    steps = np.diff(np.asarray(positions, dtype=float))
    if not steps.size:
        return 0.0
    if np.ptp(steps) > position_tolerance_mm + relative_tolerance * steps.mean():
        raise AqcfError(f"{name}: slice spacing is not uniform ({steps.min():.3f} to {steps.max():.3f} mm)")
    return float(steps.mean())

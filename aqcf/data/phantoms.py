"""Synthetic abdominal CT and MRI cohorts in the LiTS, ATLAS and nnU-Net layouts (``aqcf synth``).

The real cohorts cannot be downloaded here, so every reader and the whole pipeline run on phantoms
written in exactly the real layouts. A phantom is hand-written (no library draws abdomens): a
tissue map is built from smooth random shapes, then rendered with a modality's intensity table.

Modalities: CT (LiTS-like, int16 HU), contrast-enhanced fat-suppressed T1 MRI (ATLAS-like) and,
with ``--n-t2``, T2 MRI (:func:`t2_config`, nnU-Net layout in ``T2/``). Paired patients
(``--paired``, :func:`make_paired_case`, ``Paired/``) are one anatomy drawn once in world space and
rendered as CT and as T1 MRI, each on its own grid with its own label map, both affines mapping an
anatomical point to the same scanner coordinates. The anatomy, every intensity range, spacing and
orientation, and the ``Paired/`` layout are documented in docs/data.md, *Phantom cohorts* and
*More phantom cohorts*.

:func:`read_paired` lists the cases. Every cohort (CT, MRI, T2, paired) draws from its own random
stream, so adding T2 or paired cases leaves the CT and MRI phantoms of a seed unchanged.

Every difficulty knob (tumor count, radius, contrast, noise, bias field) is a field of
:class:`PhantomConfig`. Anatomy is laid out relative to the field of view (as a radiographer sizes
the field of view to the patient), tumor radii are in mm.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from aqcf.constants import CT, MRI, check_modality
from aqcf.errors import AqcfError
from aqcf.io import nifti_image

__all__ = [
    "PhantomConfig",
    "ct_config",
    "mri_config",
    "t2_config",
    "make_case",
    "make_paired_case",
    "read_paired",
    "synthesize",
    "main",
]

# Tissue codes of the intermediate tissue map; tumors use TUMOR + 3k (+1 necrotic core, +2 capsule).
AIR, FAT, MUSCLE, BONE, CORTEX, LUNG, LIVER, HEPATIC_VEIN, PORTAL_VEIN, SPLEEN = range(10)
KIDNEY_CORTEX, KIDNEY_MEDULLA, AORTA, IVC, BOWEL_WALL, BOWEL_LUMEN, GAS, GALLBLADDER = range(10, 18)
STOMACH, SPINAL_CANAL = 18, 19
TUMOR = 32
LIVER_TISSUES = (LIVER, HEPATIC_VEIN, PORTAL_VEIN)

# Appearance keys: CT, MRI (contrast-enhanced T1) and T2-weighted MRI; cohort keys of synthesize().
T2 = "t2"
PAIRED = "paired"
WEIGHTINGS = ("T1", "T2")
# The paired anatomy is drawn at this fraction of the finer scan's spacing (per axis) and resampled
# by nearest neighbour onto both scans: an outline moves by at most half a reference voxel.
PAIRED_REFERENCE_FRACTION = 0.5

# (low, high, texture amplitude): a subject's tissue mean is drawn uniformly in [low, high]; the
# texture amplitude scales a smooth unit-variance field (same units). Liver and tumors come from
# PhantomConfig. Values overlap the tumors' on purpose: muscle, kidney medulla, bowel content,
# gallbladder and hepatic veins look like hypodense tumors; portal veins, IVC and bowel wall like
# hyperdense ones, so a single intensity window cannot find the tumors.
CT_TISSUES: dict[int, tuple[float, float, float]] = {
    AIR: (-1000, -990, 2),
    FAT: (-115, -85, 6),
    MUSCLE: (35, 55, 4),
    BONE: (200, 350, 30),
    CORTEX: (600, 900, 40),
    LUNG: (-870, -820, 15),
    HEPATIC_VEIN: (30, 50, 2),
    PORTAL_VEIN: (90, 130, 3),
    SPLEEN: (45, 60, 3),
    KIDNEY_CORTEX: (140, 190, 5),
    KIDNEY_MEDULLA: (20, 40, 3),
    AORTA: (150, 250, 3),
    IVC: (90, 130, 3),
    BOWEL_WALL: (70, 100, 5),
    BOWEL_LUMEN: (10, 40, 5),
    GAS: (-950, -850, 20),
    GALLBLADDER: (0, 20, 2),
    STOMACH: (5, 30, 3),
    SPINAL_CANAL: (10, 30, 2),
}
# Fat-suppressed contrast-enhanced T1 in the portal-venous phase, arbitrary units.
MRI_TISSUES: dict[int, tuple[float, float, float]] = {
    AIR: (0, 8, 1),
    FAT: (110, 160, 8),
    MUSCLE: (150, 200, 8),
    BONE: (180, 250, 15),
    CORTEX: (20, 50, 5),
    LUNG: (10, 30, 4),
    HEPATIC_VEIN: (430, 520, 10),
    PORTAL_VEIN: (450, 540, 10),
    SPLEEN: (320, 400, 10),
    KIDNEY_CORTEX: (450, 530, 10),
    KIDNEY_MEDULLA: (300, 380, 10),
    AORTA: (480, 580, 10),
    IVC: (420, 500, 10),
    BOWEL_WALL: (300, 380, 12),
    BOWEL_LUMEN: (60, 120, 10),
    GAS: (0, 15, 3),
    GALLBLADDER: (50, 90, 5),
    STOMACH: (60, 110, 8),
    SPINAL_CANAL: (50, 80, 5),
}
# T2-weighted turbo spin echo without fat suppression, arbitrary units: fluid very bright, fat
# intermediate-bright, flowing blood dark (flow voids), spleen and kidneys brighter than the liver.
# Spleen, kidney cortex, marrow, bowel wall and the edge of fat overlap the (mostly bright) tumors.
T2_TISSUES: dict[int, tuple[float, float, float]] = {
    AIR: (0, 8, 1),
    FAT: (260, 330, 10),
    MUSCLE: (70, 100, 6),
    BONE: (200, 270, 12),
    CORTEX: (10, 30, 3),
    LUNG: (5, 20, 3),
    HEPATIC_VEIN: (20, 60, 5),
    PORTAL_VEIN: (20, 60, 5),
    SPLEEN: (200, 260, 10),
    KIDNEY_CORTEX: (200, 250, 10),
    KIDNEY_MEDULLA: (260, 320, 10),
    AORTA: (20, 50, 5),
    IVC: (60, 110, 8),
    BOWEL_WALL: (120, 170, 10),
    BOWEL_LUMEN: (550, 700, 20),
    GAS: (0, 15, 3),
    GALLBLADDER: (650, 800, 15),
    STOMACH: (500, 650, 15),
    SPINAL_CANAL: (650, 800, 15),
}
TISSUES = {CT: CT_TISSUES, MRI: MRI_TISSUES, T2: T2_TISSUES}
LIVER_TEXTURE = {CT: 3.0, MRI: 10.0, T2: 8.0}
TUMOR_TEXTURE = {CT: 5.0, MRI: 15.0, T2: 15.0}
NECROSIS = {CT: (10.0, 25.0), MRI: (80.0, 120.0), T2: (350.0, 500.0)}
CAPSULE = {CT: None, MRI: (380.0, 440.0), T2: None}
STORED_RANGE = {CT: (-1024, 3071), MRI: (0, 32767)}


@dataclass(frozen=True)
class PhantomConfig:
    """How one cohort's phantoms are drawn. Intensities are HU for CT, arbitrary units for MRI.

    Attributes:
        modality: ``"ct"`` or ``"mri"``.
        weighting: MRI only: ``"T1"`` (contrast-enhanced fat-suppressed, the default for MRI) or
            ``"T2"``; ``None`` for CT.
        shape: Voxels along the canonical (R, A, S) axes; the stored array is reoriented.
        spacing: Voxel size along (R, A, S) in mm.
        orientation: Axis codes of the stored array (nibabel ``aff2axcodes``), e.g. ``"LPS"``.
        obliquity_deg: Largest rotation of the voxel grid about a random axis (0: axis-aligned).
        spacing_jitter: Relative per-case, per-axis change of the spacing (0.1 = ±10%).
        n_tumors: Inclusive range of the number of tumors per case.
        tumor_radius_mm: Range of a tumor's mean radius (mm).
        hyper_fraction: Probability that a tumor is brighter than the liver.
        liver: Range of the liver's mean intensity.
        hypo_tumor, hyper_tumor: Ranges of a darker / brighter tumor's mean intensity.
        contrast: Scales every tumor's difference from the liver (1 = the ranges above; larger is
            easier).
        necrosis_fraction: Probability that a tumor over 10 mm radius has a necrotic core.
        capsule_fraction: Probability that a darker tumor has an enhancing rim (MRI only).
        noise: Range of the noise standard deviation (Gaussian on CT, Rician on MRI).
        bias_field: Standard deviation of the log of a smooth multiplicative field (0: none).
        gain: Range of a global intensity factor per case (MRI scanners are not calibrated).
        psf_mm: Standard deviation of the Gaussian point spread function (mm).
    """

    modality: str
    weighting: str | None = None
    shape: tuple[int, int, int] = (128, 128, 48)
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0)
    orientation: str = "LPS"
    obliquity_deg: float = 0.0
    spacing_jitter: float = 0.0
    n_tumors: tuple[int, int] = (0, 4)
    tumor_radius_mm: tuple[float, float] = (3.0, 15.0)
    hyper_fraction: float = 0.15
    liver: tuple[float, float] = (55.0, 70.0)
    hypo_tumor: tuple[float, float] = (20.0, 45.0)
    hyper_tumor: tuple[float, float] = (80.0, 100.0)
    contrast: float = 1.0
    necrosis_fraction: float = 0.3
    capsule_fraction: float = 0.0
    noise: tuple[float, float] = (10.0, 15.0)
    bias_field: float = 0.0
    gain: tuple[float, float] = (1.0, 1.0)
    psf_mm: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", check_modality(self.modality))
        if self.modality == CT and self.weighting is not None:
            raise AqcfError(f"phantom weighting {self.weighting!r}: only an MRI phantom has a weighting")
        if self.modality == MRI:
            weighting = str(self.weighting or "T1").upper()
            if weighting not in WEIGHTINGS:
                raise AqcfError(f"phantom weighting {self.weighting!r}: need one of {', '.join(WEIGHTINGS)}")
            object.__setattr__(self, "weighting", weighting)
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise AqcfError(f"phantom shape {tuple(self.shape)}: need three sizes of at least 8 voxels")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise AqcfError(f"phantom spacing {tuple(self.spacing)}: need three positive sizes in mm")
        lo, hi = self.n_tumors
        if not 0 <= lo <= hi:
            raise AqcfError(f"phantom tumor count range {self.n_tumors}: need 0 <= low <= high")
        lo, hi = self.tumor_radius_mm
        if not 0 < lo <= hi:
            raise AqcfError(f"phantom tumor radius range {self.tumor_radius_mm}: need 0 < low <= high (mm)")
        codes = "".join(sorted(self.orientation.upper()))
        if len(self.orientation) != 3 or not all(
            any(c in codes for c in pair) for pair in ("LR", "AP", "IS")
        ):
            raise AqcfError(f"phantom orientation {self.orientation!r}: need one of R/L, A/P, I/S each")


def ct_config(**overrides) -> PhantomConfig:
    """The LiTS-like CT phantom (realistic calibration, docs/data.md), with any field replaced by ``overrides``."""
    return PhantomConfig(modality=CT, **overrides)


def mri_config(**overrides) -> PhantomConfig:
    """The ATLAS-like contrast-enhanced T1 MRI phantom, with any field replaced by ``overrides``."""
    defaults = dict(
        modality=MRI,
        spacing=(1.8, 1.8, 3.6),
        orientation="RAS",
        n_tumors=(1, 3),
        tumor_radius_mm=(5.0, 20.0),
        liver=(280.0, 360.0),
        hypo_tumor=(150.0, 230.0),
        hyper_tumor=(400.0, 470.0),
        capsule_fraction=0.5,
        noise=(12.0, 20.0),
        bias_field=0.2,
        gain=(0.85, 1.15),
        psf_mm=1.2,
    )
    defaults.update(overrides)
    return PhantomConfig(**defaults)


def t2_config(**overrides) -> PhantomConfig:
    """The T2-weighted MRI phantom (bright tumors and fluid), with any field replaced by ``overrides``."""
    defaults = dict(
        modality=MRI,
        weighting="T2",
        spacing=(1.5, 1.5, 5.0),
        orientation="LPI",
        n_tumors=(1, 4),
        tumor_radius_mm=(4.0, 18.0),
        hyper_fraction=0.85,
        liver=(100.0, 140.0),
        hypo_tumor=(70.0, 95.0),
        hyper_tumor=(170.0, 260.0),
        noise=(8.0, 14.0),
        bias_field=0.15,
        gain=(0.8, 1.2),
        psf_mm=1.5,
    )
    defaults.update(overrides)
    return PhantomConfig(**defaults)


def _appearance(cfg: PhantomConfig) -> str:
    """The key of ``cfg``'s intensity tables: ``"ct"``, ``"mri"`` (T1) or ``"t2"``."""
    return T2 if cfg.weighting == "T2" else cfg.modality


def _smooth_field(shape, spacing, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth Gaussian random field of unit variance, correlation length ``sigma_mm``.

    Drawn on a coarse grid (two samples per sigma) and upsampled linearly, which costs a fraction of
    filtering full-resolution noise.
    """
    shape = np.asarray(shape)
    step = sigma_mm / 2.0
    coarse = np.maximum(np.ceil(shape * np.asarray(spacing) / step).astype(int) + 1, 2)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma=2.0, mode="wrap")
    fine = ndimage.zoom(noise, shape / coarse, order=1, grid_mode=False)
    fine = fine[: shape[0], : shape[1], : shape[2]]
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _radius(grids, centre, semi) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside) on broadcast coordinate grids."""
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, semi, strict=True)))


@dataclass
class _Tumor:
    index: int
    hyper: bool
    necrotic: bool
    capsule: bool


@dataclass
class _Anatomy:
    tissue: np.ndarray
    label: np.ndarray
    tumors: list[_Tumor] = field(default_factory=list)


@dataclass
class _Canvas:
    """What the painters of :func:`_anatomy` share: the tissue map being painted and the landmarks the
    earlier painters placed for the later ones.

    ``u``, ``v``, ``w`` are the normalised coordinates in [-1, 1] along R, A, S, shaped to broadcast
    against each other; every painter draws from the one ``rng`` in a fixed order, so the phantom of a
    seed does not change.
    """

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    tissue: np.ndarray
    spacing: np.ndarray
    rng: np.random.Generator
    body: np.ndarray | None = None
    cavity: np.ndarray | None = None
    lungs: np.ndarray | None = None
    centre_v: float = 0.0
    semi_u: float = 1.0
    semi_v: float = 1.0
    spine_v: float = 0.0

    @classmethod
    def blank(cls, shape, spacing: np.ndarray, rng: np.random.Generator) -> _Canvas:
        """Air on a ``shape`` grid."""
        shape = tuple(shape)
        u, v, w = (
            np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
            for k, n in enumerate(shape)
        )
        return cls(u, v, w, np.full(shape, AIR, dtype=np.uint8), spacing, rng)

    def smooth(self, sigma_mm: float) -> np.ndarray:
        """A smooth random field of unit variance (:func:`_smooth_field`) on the canvas."""
        return _smooth_field(self.tissue.shape, self.spacing, sigma_mm, self.rng)


def _paint_body(c: _Canvas) -> None:
    """Body wall: subcutaneous fat, then muscle, then the visceral cavity."""
    u, v, w, tissue, rng = c.u, c.v, c.w, c.tissue, c.rng
    c.centre_v = centre_v = rng.uniform(-0.05, 0.03)
    c.semi_u, c.semi_v = semi_u, semi_v = rng.uniform(0.78, 0.9), rng.uniform(0.58, 0.72)
    taper = 1 + rng.uniform(-0.06, 0.06) * w
    rho = np.sqrt((u / (semi_u * taper)) ** 2 + ((v - centre_v) / (semi_v * taper)) ** 2) * (
        1 + 0.03 * c.smooth(40)
    )
    fat, wall = rng.uniform(0.06, 0.16), rng.uniform(0.03, 0.06)
    c.body = rho < 1
    tissue[c.body] = FAT
    tissue[rho < 1 - fat] = MUSCLE
    c.cavity = rho < 1 - fat - wall
    tissue[c.cavity] = FAT
    c.spine_v = centre_v - 0.62 * semi_v


def _paint_lungs(c: _Canvas) -> None:
    """Lung bases above a domed diaphragm (lower at the periphery)."""
    periphery = (c.u / c.semi_u) ** 2 + ((c.v - c.centre_v) / c.semi_v) ** 2
    c.lungs = c.cavity & (c.w > c.rng.uniform(0.45, 0.7) + 0.3 * (1 - periphery))
    c.tissue[c.lungs] = LUNG


def _paint_bowel(c: _Canvas) -> None:
    """Bowel loops in the lower anterior abdomen: tubes where two smooth fields are both near zero."""
    tissue = c.tissue
    tube = c.smooth(10) ** 2 + c.smooth(10) ** 2
    bowel = c.cavity & ~c.lungs & (c.w < c.rng.uniform(-0.1, 0.2)) & (c.v > c.spine_v + 0.15)
    tissue[bowel & (tube < 0.9)] = BOWEL_WALL
    lumen = bowel & (tube < 0.5)
    tissue[lumen] = BOWEL_LUMEN
    tissue[lumen & (c.smooth(15) > 1.0)] = GAS


def _paint_stomach(c: _Canvas) -> None:
    """Stomach in the left upper quadrant, gas rising to its anterior part."""
    u, v, w, tissue, rng = c.u, c.v, c.w, c.tissue, c.rng
    centre = (rng.uniform(-0.4, -0.25), c.centre_v + 0.2, rng.uniform(0.2, 0.35))
    semi = np.array([0.2, 0.17, 0.22]) * rng.uniform(0.8, 1.2)
    r = _radius((u, v, w), centre, semi) * (1 + 0.08 * c.smooth(30))
    tissue[c.cavity & ~c.lungs & (r < 1)] = BOWEL_WALL
    contents = c.cavity & ~c.lungs & (r < 0.85)
    tissue[contents] = STOMACH
    tissue[contents & (v > centre[1] + 0.5 * semi[1])] = GAS


def _paint_kidneys(c: _Canvas) -> None:
    """Kidneys beside the spine, the right one lower."""
    rng = c.rng
    for side, height in ((1, rng.uniform(-0.45, -0.3)), (-1, rng.uniform(-0.35, -0.2))):
        r = _radius((c.u, c.v, c.w), (side * 0.34, c.spine_v + 0.12, height), (0.11, 0.09, 0.33))
        kidney = c.cavity & (r < 1)
        c.tissue[kidney] = KIDNEY_CORTEX
        c.tissue[kidney & (r < 0.6)] = KIDNEY_MEDULLA


def _paint_spleen(c: _Canvas) -> None:
    """Spleen, posterior left: an intensity close to the liver's."""
    r = _radius((c.u, c.v, c.w), (-0.55, c.spine_v + 0.3, c.rng.uniform(0.2, 0.4)), (0.14, 0.22, 0.3)) * (
        1 + 0.1 * c.smooth(25)
    )
    c.tissue[c.cavity & ~c.lungs & (r < 1)] = SPLEEN


def _paint_liver(c: _Canvas) -> None:
    """Liver, right upper quadrant, with hepatic and portal veins and (in 70% of cases) a gallbladder.

    The left lobe reaches across the midline anteriorly and the liver thins towards its inferior tip;
    a smooth field makes the outline irregular.
    """
    u, v, w, tissue, rng = c.u, c.v, c.w, c.tissue, c.rng
    centre = (rng.uniform(0.3, 0.4), c.centre_v + rng.uniform(0.03, 0.12), rng.uniform(0.0, 0.15))
    semi = np.array([0.45, 0.5, 0.7]) * rng.uniform(0.9, 1.1, size=3)
    across = 1 + 0.5 * np.clip((v - centre[1]) / semi[1], 0, 1)
    thin = 1 - 0.4 * np.clip((centre[2] - w) / semi[2], 0, 1)
    r = np.sqrt(
        ((u - centre[0]) / (semi[0] * across * thin)) ** 2
        + ((v - centre[1]) / (semi[1] * thin)) ** 2
        + ((w - centre[2]) / semi[2]) ** 2
    ) + 0.12 * c.smooth(25)
    liver = c.cavity & ~c.lungs & (r < 1)
    tissue[liver] = LIVER
    tissue[liver & (c.smooth(12) ** 2 + c.smooth(12) ** 2 < 0.06)] = HEPATIC_VEIN
    tissue[liver & (c.smooth(12) ** 2 + c.smooth(12) ** 2 < 0.06)] = PORTAL_VEIN
    if rng.random() < 0.7:
        gall_centre = (centre[0] - 0.35 * semi[0], centre[1] + 0.5 * semi[1], centre[2] - 0.45 * semi[2])
        tissue[c.cavity & (_radius((u, v, w), gall_centre, (0.07, 0.09, 0.15)) < 1)] = GALLBLADDER


def _paint_great_vessels(c: _Canvas) -> None:
    """Aorta and inferior vena cava in front of the spine, painted over the organs."""
    c.tissue[c.cavity & (_radius((c.u, c.v), (-0.07, c.spine_v + 0.18), (0.045, 0.045)) < 1)] = AORTA
    c.tissue[c.cavity & (_radius((c.u, c.v), (0.13, c.spine_v + 0.2), (0.055, 0.045)) < 1)] = IVC


def _paint_spine(c: _Canvas) -> None:
    """Paraspinal muscles, the vertebral body (cortex around bone) and the spinal canal, painted last."""
    u, v, tissue, body = c.u, c.v, c.tissue, c.body
    for side in (1, -1):
        tissue[body & (_radius((u, v), (side * 0.14, c.spine_v - 0.17), (0.11, 0.09)) < 1)] = MUSCLE
    r = _radius((u, v), (0.0, c.spine_v), (0.12, 0.10))
    tissue[body & (r < 1)] = CORTEX
    tissue[body & (r < 0.8)] = BONE
    r = _radius((u, v), (0.0, c.spine_v - 0.15), (0.075, 0.075))
    tissue[body & (r < 1)] = CORTEX
    tissue[body & (r < 0.6)] = SPINAL_CANAL


# The order is part of the phantom: later organs overwrite earlier ones, and each painter draws from
# the random generator in turn.
_PAINTERS = (
    _paint_body,
    _paint_lungs,
    _paint_bowel,
    _paint_stomach,
    _paint_kidneys,
    _paint_spleen,
    _paint_liver,
    _paint_great_vessels,
    _paint_spine,
)


def _anatomy(cfg: PhantomConfig, spacing: np.ndarray, rng: np.random.Generator) -> _Anatomy:
    """Tissue map (uint8 codes) and label map (0/1/2) on the canonical (R, A, S) grid: the organs of
    :data:`_PAINTERS` in turn, then the tumors (:func:`_add_tumors`)."""
    canvas = _Canvas.blank(cfg.shape, spacing, rng)
    for paint in _PAINTERS:
        paint(canvas)
    label = np.isin(canvas.tissue, LIVER_TISSUES).astype(np.uint8)
    anatomy = _Anatomy(tissue=canvas.tissue, label=label)
    _add_tumors(anatomy, cfg, spacing, rng)
    return anatomy


def _add_tumors(anatomy: _Anatomy, cfg: PhantomConfig, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """Paint lobulated tumors into the liver; each is clipped to the liver, so label 2 ⊂ liver."""
    liver = anatomy.label == 1
    if not liver.any():
        return
    depth = ndimage.distance_transform_edt(liver, sampling=spacing)
    shape = np.array(liver.shape)
    count = int(rng.integers(cfg.n_tumors[0], cfg.n_tumors[1] + 1))
    for k in range(count):
        radius = rng.uniform(*cfg.tumor_radius_mm)
        # Centres at least half a radius deep, so most of a tumor lies in the liver.
        candidates = np.flatnonzero(depth >= 0.5 * radius)
        if candidates.size == 0:
            candidates = np.flatnonzero(liver)
        centre = np.array(np.unravel_index(rng.choice(candidates), liver.shape))
        semi = radius * rng.uniform(0.8, 1.2, size=3)
        half = np.ceil(1.4 * semi.max() / spacing).astype(int)
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = [
            ((np.arange(a, b) - c) * s).reshape([-1 if i == axis else 1 for i in range(3)])
            for axis, (a, b, c, s) in enumerate(zip(lo, hi, centre, spacing, strict=True))
        ]
        r = _radius(grids, (0, 0, 0), semi) + 0.15 * _smooth_field(
            hi - lo, spacing, max(radius / 2, 2.0), rng
        )
        inside = (r < 1) & liver[box]
        inside[tuple(centre - lo)] = True
        tumor = _Tumor(
            index=k,
            hyper=bool(rng.random() < cfg.hyper_fraction),
            necrotic=bool(radius > 10 and rng.random() < cfg.necrosis_fraction),
            capsule=False,
        )
        tumor.capsule = bool(not tumor.hyper and rng.random() < cfg.capsule_fraction)
        codes = np.where(inside, TUMOR + 3 * k, anatomy.tissue[box])
        if tumor.necrotic:
            codes[inside & (r < 0.45)] = TUMOR + 3 * k + 1
        if tumor.capsule:
            codes[inside & (r > 0.85)] = TUMOR + 3 * k + 2
        anatomy.tissue[box] = codes
        anatomy.label[box][inside] = 2
        anatomy.tumors.append(tumor)


def _render(
    anatomy: _Anatomy, cfg: PhantomConfig, spacing: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Intensities (float32, HU or a.u.) from the tissue map: means, texture, blur, bias, noise."""
    kind = _appearance(cfg)
    table = TISSUES[kind]
    mean = np.zeros(256, dtype=np.float32)
    texture = np.zeros(256, dtype=np.float32)
    for code, (lo, hi, amplitude) in table.items():
        mean[code], texture[code] = rng.uniform(lo, hi), amplitude
    liver = rng.uniform(*cfg.liver)
    mean[LIVER], texture[LIVER] = liver, LIVER_TEXTURE[kind]
    for tumor in anatomy.tumors:
        drawn = rng.uniform(*(cfg.hyper_tumor if tumor.hyper else cfg.hypo_tumor))
        code = TUMOR + 3 * tumor.index
        mean[code] = liver + cfg.contrast * (drawn - liver)
        mean[code + 1] = liver + cfg.contrast * (rng.uniform(*NECROSIS[kind]) - liver)
        capsule = CAPSULE[kind]
        mean[code + 2] = liver + cfg.contrast * (rng.uniform(*capsule) - liver) if capsule else mean[code]
        texture[code : code + 3] = TUMOR_TEXTURE[kind]

    shape = anatomy.tissue.shape
    image = mean[anatomy.tissue] + texture[anatomy.tissue] * _smooth_field(shape, spacing, 6.0, rng)
    image = ndimage.gaussian_filter(image, sigma=cfg.psf_mm / spacing)
    if cfg.modality == MRI:
        image *= rng.uniform(*cfg.gain) * np.exp(cfg.bias_field * _smooth_field(shape, spacing, 80.0, rng))
    sigma = rng.uniform(*cfg.noise)
    if cfg.modality == MRI:
        # Magnitude images carry Rician noise: the modulus of complex Gaussian noise.
        real = image + rng.normal(0, sigma, shape).astype(np.float32)
        image = np.sqrt(real**2 + rng.normal(0, sigma, shape).astype(np.float32) ** 2)
    else:
        image += rng.normal(0, sigma, shape).astype(np.float32)
    return image


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def make_case(cfg: PhantomConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one subject.

    Args:
        cfg: The cohort's settings.
        rng: The subject's random generator (one per subject makes subjects independent of each other
            and of the cohort size).

    Returns:
        ``(image, label, affine)``: the image as stored (int16, HU for CT), the label map (uint8,
        0 background, 1 liver, 2 tumor) on the same grid, both in ``cfg.orientation`` axis order,
        and the 4×4 voxel-to-world (RAS, mm) matrix.
    """
    spacing = _jittered_spacing(cfg, rng)
    anatomy = _anatomy(cfg, spacing, rng)
    image = _stored(_render(anatomy, cfg, spacing, rng), cfg)

    shape = np.array(cfg.shape)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = -(shape - 1) / 2 * spacing + rng.uniform(-20, 20, 3)
    if cfg.obliquity_deg > 0:
        rotation = _rotation(rng.standard_normal(3), np.deg2rad(rng.uniform(0, cfg.obliquity_deg)))
        affine[:3] = rotation @ affine[:3]
    return _reorient(image, anatomy.label, affine, cfg.orientation)


def _jittered_spacing(cfg: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """The case's voxel size along (R, A, S) in mm."""
    return np.asarray(cfg.spacing, dtype=float) * (1 + rng.uniform(-cfg.spacing_jitter, cfg.spacing_jitter, 3))


def _stored(image: np.ndarray, cfg: PhantomConfig) -> np.ndarray:
    """Rendered intensities rounded and clipped to the modality's int16 range."""
    lo, hi = STORED_RANGE[cfg.modality]
    return np.clip(np.rint(image), lo, hi).astype(np.int16)


def _reorient(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, orientation: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label and affine of the canonical (R, A, S) grid, stored in ``orientation`` axis order."""
    import nibabel.orientations as orient

    transform = orient.ornt_transform(
        orient.axcodes2ornt(("R", "A", "S")), orient.axcodes2ornt(tuple(orientation))
    )
    stored_affine = affine @ orient.inv_ornt_aff(transform, image.shape)
    image = np.ascontiguousarray(orient.apply_orientation(image, transform))
    label = np.ascontiguousarray(orient.apply_orientation(label, transform))
    return image, label, stored_affine


def _centred_affine(shape, spacing: np.ndarray, centre: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Voxel-to-world matrix of a grid of ``shape`` voxels whose centre lies at ``centre`` (mm)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def make_paired_case(
    ct: PhantomConfig, mri: PhantomConfig, rng: np.random.Generator
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Draw one patient scanned twice: CT and MRI of the same anatomy, aligned in world space.

    The anatomy (tissue and label maps) is drawn once on a reference grid that covers the smaller
    of the two fields of view at :data:`PAIRED_REFERENCE_FRACTION` of the finer spacing, then
    resampled by nearest neighbour onto each scan's grid; both grids and the reference grid share
    one world centre, so there is no offset between the scans. Tumor count, size, necrosis, capsule
    and darker/brighter come from ``mri``; each scan is rendered with its own config.

    Args:
        ct: The CT scan's settings (shape, spacing, orientation, intensities, noise).
        mri: The MRI scan's settings; also the anatomy's tumor settings.
        rng: The patient's random generator (anatomy, CT and MRI each get a child stream, so one
            scan's settings do not change the other's noise).

    Returns:
        ``{"ct": (image, label, affine), "mri": (image, label, affine)}``, each as :func:`make_case`
        returns it.
    """
    if ct.modality != CT or mri.modality != MRI:
        raise AqcfError("make_paired_case: ct= needs a CT PhantomConfig and mri= an MRI one")
    anatomy_rng, *scan_rngs = rng.spawn(3)
    scans = list(zip((ct, mri), scan_rngs, strict=True))
    spacings = [_jittered_spacing(cfg, scan_rng) for cfg, scan_rng in scans]
    fov = np.minimum(*(np.array(cfg.shape) * spacing for (cfg, _), spacing in zip(scans, spacings, strict=True)))
    ref_spacing = np.minimum(*spacings) * PAIRED_REFERENCE_FRACTION
    # An odd count puts the reference's voxel centres on the finer scan's (twice the spacing, same
    # centre), so nearest-neighbour sampling never meets a tie that would shift it by half a voxel.
    ref_shape = np.maximum(np.ceil(fov / ref_spacing).astype(int), 8) // 2 * 2 + 1
    reference = dataclasses.replace(mri, shape=tuple(int(n) for n in ref_shape), spacing=tuple(ref_spacing))
    anatomy = _anatomy(reference, ref_spacing, anatomy_rng)
    centre = anatomy_rng.uniform(-20, 20, 3)
    ref_affine = _centred_affine(ref_shape, ref_spacing, centre, np.eye(3))

    out = {}
    for (cfg, scan_rng), spacing in zip(scans, spacings, strict=True):
        rotation = np.eye(3)
        if cfg.obliquity_deg > 0:
            rotation = _rotation(scan_rng.standard_normal(3), np.deg2rad(scan_rng.uniform(0, cfg.obliquity_deg)))
        affine = _centred_affine(cfg.shape, spacing, centre, rotation)
        grid = _resample_anatomy(anatomy, np.linalg.inv(ref_affine) @ affine, tuple(cfg.shape))
        image = _stored(_render(grid, cfg, spacing, scan_rng), cfg)
        out[cfg.modality] = _reorient(image, grid.label, affine, cfg.orientation)
    return out


def _resample_anatomy(anatomy: _Anatomy, voxel_to_reference: np.ndarray, shape) -> _Anatomy:
    """The tissue and label maps sampled (nearest neighbour) at a grid's voxels; outside is air."""
    matrix, offset = voxel_to_reference[:3, :3], voxel_to_reference[:3, 3]

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(volume, matrix, offset, output_shape=shape, order=0, cval=0)

    return _Anatomy(tissue=sample(anatomy.tissue), label=sample(anatomy.label), tumors=anatomy.tumors)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write one volume (not atomically: a cohort is written into a temporary folder renamed when complete)."""
    import nibabel as nib

    nib.save(nifti_image(array, affine), str(path))


def _write_cohort(kind: str, folder: Path, n: int, cfg: PhantomConfig, seed: int, stream: int, bar) -> None:
    """Write one cohort into ``folder`` (a fresh temporary folder) in the LiTS or ATLAS layout."""
    if kind == "atlas":
        (folder / "imagesTr").mkdir()
        (folder / "labelsTr").mkdir()
    for index in range(n):
        image, label, affine = make_case(cfg, np.random.default_rng([seed, stream, index]))
        if kind == "lits":
            _save_nifti(image, affine, folder / f"volume-{index}.nii")
            _save_nifti(label, affine, folder / f"segmentation-{index}.nii")
        else:
            _save_nifti(image, affine, folder / "imagesTr" / f"im{index}.nii.gz")
            _save_nifti(label, affine, folder / "labelsTr" / f"lb{index}.nii.gz")
        bar.update(1)
    if kind == "atlas":
        dataset = {
            "name": "ATLAS phantom",
            "description": "synthetic contrast-enhanced T1 MRI written by aqcf synth",
            "channel_names": {"0": "T1"},
            "labels": {"background": 0, "liver": 1, "tumor": 2},
            "numTraining": n,
            "file_ending": ".nii.gz",
            "training": [
                {"image": f"./imagesTr/im{i}.nii.gz", "label": f"./labelsTr/lb{i}.nii.gz"} for i in range(n)
            ],
        }
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _write_t2_cohort(folder: Path, n: int, cfg: PhantomConfig, seed: int, stream: int, bar) -> None:
    """Write the T2 cohort into ``folder`` in the nnU-Net v2 raw layout (cases ``t2_N``)."""
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    for index in range(n):
        image, label, affine = make_case(cfg, np.random.default_rng([seed, stream, index]))
        _save_nifti(image, affine, folder / "imagesTr" / f"t2_{index}_0000.nii.gz")
        _save_nifti(label, affine, folder / "labelsTr" / f"t2_{index}.nii.gz")
        bar.update(1)
    dataset = {
        "name": "T2 phantom",
        "description": "synthetic T2-weighted MRI written by aqcf synth",
        "channel_names": {"0": "T2"},
        "labels": LABELS,
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _write_paired(
    folder: Path, n: int, ct: PhantomConfig, mri: PhantomConfig, seed: int, stream: int, bar
) -> None:
    """Write the paired cases into ``folder``: per case a CT and an MRI channel, each with its label."""
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    training = []
    for index in range(n):
        case = f"pair_{index}"
        scans = make_paired_case(ct, mri, np.random.default_rng([seed, stream, index]))
        files = {}
        for channel, modality in enumerate((CT, MRI)):
            image, label, affine = scans[modality]
            files[modality] = (f"imagesTr/{case}_{channel:04d}.nii.gz", f"labelsTr/{case}_{modality}.nii.gz")
            _save_nifti(image, affine, folder / files[modality][0])
            _save_nifti(label, affine, folder / files[modality][1])
        training.append(
            {"case": case, "image": [files[CT][0], files[MRI][0]], "label": {m: files[m][1] for m in (CT, MRI)}}
        )
        bar.update(1)
    dataset = {
        "name": "Paired CT/MRI phantom",
        "description": "synthetic patients scanned with CT and T1 MRI, written by aqcf synth; the "
        "channels lie on different grids (own spacing and orientation) aligned in world coordinates, "
        "so every channel has its own label file labelsTr/CASE_ct.nii.gz, labelsTr/CASE_mri.nii.gz",
        "channel_names": {"0": "CT", "1": "MRI"},
        "labels": LABELS,
        "numTraining": n,
        "file_ending": ".nii.gz",
        "world_offset_mm": [0.0, 0.0, 0.0],
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def read_paired(root: str | Path) -> list[dict]:
    """List the cases of a paired cohort written by ``aqcf synth --paired`` (the ``Paired/`` folder).

    Args:
        root: The folder holding ``imagesTr/`` and ``labelsTr/``.

    Returns:
        Per case, sorted naturally: ``{"id", "ct_image", "mri_image", "ct_label", "mri_label"}``
        (``id`` a string such as ``"pair_0"``, the others paths).

    Raises:
        AqcfError: No ``imagesTr/``, no case, or a case missing one of its four files.
    """
    from aqcf.data.cohorts import natural_key

    root = Path(root)
    images = root / "imagesTr"
    if not images.is_dir():
        raise AqcfError(f"{root}: no imagesTr/ folder; expected a paired cohort written by aqcf synth --paired")
    suffix = "_0000.nii.gz"
    ids = [
        p.name[: -len(suffix)]
        for p in images.iterdir()
        if p.name.endswith(suffix) and not p.name.startswith(".")
    ]
    if not ids:
        raise AqcfError(f"{images}: no CASE{suffix} found")
    for p in images.iterdir():
        if p.name.endswith("_0001.nii.gz") and p.name[: -len(suffix)] not in ids:
            raise AqcfError(f"{p}: no CT channel imagesTr/{p.name[: -len(suffix)]}{suffix} for this MRI channel")
    cases = []
    for case in sorted(ids, key=natural_key):
        entry = {
            "id": case,
            "ct_image": images / f"{case}_0000.nii.gz",
            "mri_image": images / f"{case}_0001.nii.gz",
            "ct_label": root / "labelsTr" / f"{case}_ct.nii.gz",
            "mri_label": root / "labelsTr" / f"{case}_mri.nii.gz",
        }
        for key, path in entry.items():
            if key != "id" and not path.is_file():
                raise AqcfError(f"{path}: missing; case {case} needs its CT and MRI images and labels")
        cases.append(entry)
    return cases


def synthesize(
    out: str | Path,
    n_ct: int = 10,
    n_mri: int = 10,
    ct: PhantomConfig | None = None,
    mri: PhantomConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    n_t2: int = 0,
    n_paired: int = 0,
    t2: PhantomConfig | None = None,
) -> dict[str, Path]:
    """Write a CT cohort in the LiTS layout and an MRI cohort in the ATLAS layout (and, if asked,
    a T2 cohort and paired CT/MRI patients in the nnU-Net layout).

    Args:
        out: Output folder; receives ``LiTS/`` (``volume-N.nii``, ``segmentation-N.nii``),
            ``ATLAS/`` (``imagesTr/imN.nii.gz``, ``labelsTr/lbN.nii.gz``, ``dataset.json``),
            ``T2/`` (``imagesTr/t2_N_0000.nii.gz``, ``labelsTr/t2_N.nii.gz``, ``dataset.json``) when
            ``n_t2 > 0``, ``Paired/`` (see :func:`read_paired`) when ``n_paired > 0``, and
            ``synth.json`` (the settings).
        n_ct, n_mri, n_t2: Number of subjects per cohort (independent subjects: no shared anatomy).
        ct, mri, t2: Phantom settings (default :func:`ct_config`, :func:`mri_config`,
            :func:`t2_config`); the paired patients use ``ct`` and ``mri``.
        seed: Seed; subject ``i`` of a cohort depends only on ``(seed, cohort, i)``.
        overwrite: Replace ``LiTS/``, ``ATLAS/``, ``T2/`` and ``Paired/`` in an existing, non-empty
            ``out`` (a cohort of 0 cases other than CT and MRI removes its old folder).
        progress: Show a progress bar over cases.
        n_paired: Number of patients scanned with both CT and MRI (independent of all other cohorts).

    Returns:
        ``{"ct": out/LiTS, "mri": out/ATLAS}``, plus ``"t2": out/T2`` and ``"paired": out/Paired``
        when written.

    Raises:
        AqcfError: ``out`` exists, is not empty and ``overwrite`` is false; or a count is negative.
    """
    ct = ct or ct_config()
    mri = mri or mri_config()
    t2 = t2 or t2_config()
    counts = (n_ct, n_mri, n_t2, n_paired)
    out = Path(out)
    _check_synthesis(out, ct, mri, t2, counts, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    # (key, folder, cases, writer); the stream numbers keep every cohort's subjects independent.
    plan = (
        (CT, out / "LiTS", n_ct, lambda f, bar: _write_cohort("lits", f, n_ct, ct, seed, 0, bar)),
        (MRI, out / "ATLAS", n_mri, lambda f, bar: _write_cohort("atlas", f, n_mri, mri, seed, 1, bar)),
        (T2, out / "T2", n_t2, lambda f, bar: _write_t2_cohort(f, n_t2, t2, seed, 2, bar)),
        (PAIRED, out / "Paired", n_paired, lambda f, bar: _write_paired(f, n_paired, ct, mri, seed, 3, bar)),
    )
    targets = _write_plan(out, plan, sum(counts), progress)
    settings = {
        "seed": seed,
        "n_ct": n_ct,
        "n_mri": n_mri,
        "n_t2": n_t2,
        "n_paired": n_paired,
        "ct": dataclasses.asdict(ct),
        "mri": dataclasses.asdict(mri),
        "t2": dataclasses.asdict(t2),
    }
    tmp = out / ".synth.json.tmp"
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, out / "synth.json")
    return targets


def _check_synthesis(
    out: Path, ct: PhantomConfig, mri: PhantomConfig, t2: PhantomConfig, counts: tuple[int, ...], overwrite: bool
) -> None:
    """Refuse configs of the wrong modality or weighting, a negative count, or an ``out`` not to write into.

    Raises:
        AqcfError: As :func:`synthesize` says.
    """
    if ct.modality != CT or mri.modality != MRI or t2.modality != MRI:
        raise AqcfError("synthesize: ct= needs a CT PhantomConfig and mri= and t2= MRI ones")
    if mri.weighting != "T1" or t2.weighting != "T2":
        raise AqcfError("synthesize: mri= needs a T1-weighted PhantomConfig and t2= a T2-weighted one")
    if min(counts) < 0:
        raise AqcfError(f"synthesize: case counts must not be negative (got {', '.join(map(str, counts))})")
    if out.exists() and not out.is_dir():
        raise AqcfError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AqcfError(
            f"{out}: exists and is not empty; pass --overwrite to replace its LiTS/, ATLAS/, T2/ and Paired/"
        )


def _write_plan(out: Path, plan, total: int, progress: bool) -> dict[str, Path]:
    """Write each cohort of ``plan`` (``(key, folder, cases, writer)``) in place; returns ``{key: folder}``.

    A T2 or paired cohort of 0 cases writes nothing and removes its old folder.
    """
    from tqdm.auto import tqdm

    targets = {}
    with tqdm(total=total, desc="synth", unit="case", disable=not progress) as bar:
        for key, target, n, write in plan:
            if n == 0 and key in (T2, PAIRED):
                if target.exists():
                    shutil.rmtree(target)  # a stale cohort would contradict synth.json
                continue
            # Each cohort is written into a hidden sibling and renamed into place when complete, so a
            # killed run never leaves a half-written cohort behind.
            partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=out))
            try:
                write(partial, bar)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(partial, target)
            finally:
                if partial.exists():
                    shutil.rmtree(partial)
            targets[key] = target
    return targets


@dataclass(frozen=True)
class _Flag:
    """How a :class:`PhantomConfig` field appears on the ``aqcf synth`` command line, as
    ``--<cohort>-<name>``: ``help`` (``{default}`` and ``{unit}`` filled in per cohort), the metavars of a
    tuple field, and ``name`` where the flag's name is not the field's."""

    help: str
    metavar: tuple[str, ...] | None = None
    name: str | None = None

    def flag(self, prefix: str, field_name: str) -> str:
        return f"--{prefix}-{self.name or field_name.replace('_', '-')}"


# The fields each cohort's flags set, in --help order; type, nargs and default come from the cohort's
# config. Four flags are older than this table and keep their names as explicit aliases of their fields:
# --*-tumors (n_tumors), --*-tumor-radius (tumor_radius_mm), --*-obliquity (obliquity_deg) and
# --*-bias (bias_field). The shape is set by --shape, --mri-shape and --t2-shape (see _parser).
COHORT_FLAGS = {
    "spacing": _Flag("voxel size in mm (default {default})", ("SX", "SY", "SZ")),
    "orientation": _Flag("stored axis codes (default {default})"),
    "n_tumors": _Flag("tumors per case (default {default})", ("MIN", "MAX"), name="tumors"),
    "tumor_radius_mm": _Flag("tumor radius in mm (default {default})", ("MIN", "MAX"), name="tumor-radius"),
    "contrast": _Flag("scale of the tumor-liver intensity difference (default {default}; larger is easier)"),
    "noise": _Flag("noise standard deviation in {unit} (default {default})", ("MIN", "MAX")),
    "obliquity_deg": _Flag("largest grid rotation in degrees (default {default})", name="obliquity"),
}
MRI_FLAGS = {"bias_field": _Flag("std of the log bias field (default {default})", name="bias")}  # MRI cohorts only
COHORTS = (("ct", ct_config), ("mri", mri_config), ("t2", t2_config))


def _add_field_flag(p, prefix: str, cfg: PhantomConfig, field_name: str, flag: _Flag) -> None:
    """``--<prefix>-<name>`` for ``cfg``'s field ``field_name``, into ``args.<prefix>_<field_name>``."""
    default = getattr(cfg, field_name)
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    kwargs = {"dest": f"{prefix}_{field_name}", "help": flag.help.format(
        default=shown, unit="HU" if prefix == "ct" else "a.u.")}
    if isinstance(default, tuple):
        kwargs.update(type=type(default[0]), nargs=len(default), metavar=flag.metavar, default=list(default))
    else:
        # the metavar argparse would derive from the flag's own name
        kwargs.update(type=type(default), metavar=f"{prefix}_{flag.name or field_name}".upper().replace("-", "_"),
                      default=default)
    p.add_argument(flag.flag(prefix, field_name), **kwargs)


def _parser():
    from aqcf.errors import ArgumentParser

    configs = {prefix: make() for prefix, make in COHORTS}
    p = ArgumentParser(
        prog="aqcf synth",
        description="Write phantom cohorts: CT in the LiTS layout (OUT/LiTS) and MRI in the ATLAS layout "
        "(OUT/ATLAS); optionally T2 MRI (OUT/T2) and paired CT/MRI patients (OUT/Paired) in the nnU-Net "
        "layout. Defaults are the realistic calibration; the flags set the difficulty.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-ct", type=int, default=10, help="number of CT subjects (default 10)")
    p.add_argument("--n-mri", type=int, default=10, help="number of MRI subjects (default 10)")
    p.add_argument("--n-t2", type=int, default=0, help="number of T2 MRI subjects in OUT/T2 (default 0)")
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="number of patients scanned with both CT and MRI (--ct-*/--mri-* settings) in OUT/Paired (default 0)",
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=list(configs["ct"].shape),
        help=f"voxels along R, A, S (default {configs['ct'].shape})",
    )
    p.add_argument(
        "--mri-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="MRI voxels (default --shape)"
    )
    p.add_argument(
        "--t2-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="T2 voxels (default --shape)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT/LiTS, OUT/ATLAS, OUT/T2 and OUT/Paired if OUT is not empty",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for prefix, cfg in configs.items():
        for field_name, flag in COHORT_FLAGS.items():
            _add_field_flag(p, prefix, cfg, field_name, flag)
    for prefix, cfg in configs.items():
        if prefix != "ct":
            for field_name, flag in MRI_FLAGS.items():
                _add_field_flag(p, prefix, cfg, field_name, flag)
    return p


def _cohort_configs(args) -> dict[str, PhantomConfig]:
    """Each cohort's :class:`PhantomConfig` from its flags (lists become the fields' tuples)."""
    configs = {}
    for prefix, make in COHORTS:
        names = [*COHORT_FLAGS, *(MRI_FLAGS if prefix != "ct" else ())]
        values = {name: getattr(args, f"{prefix}_{name}") for name in names}
        shape = getattr(args, f"{prefix}_shape", None) or args.shape
        configs[prefix] = make(
            shape=tuple(shape), **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        )
    return configs


def main(argv: list[str] | None = None) -> int:
    """``aqcf synth``: write phantom cohorts; returns the exit code."""
    from aqcf.io import check_output

    args = _parser().parse_args(argv)
    # OUT/LiTS, OUT/ATLAS, OUT/T2, OUT/Paired and OUT/synth.json are replaced; other files in OUT
    # only make it "not empty"
    check_output(args.out, overwrite=args.overwrite, kind="folder")
    configs = _cohort_configs(args)
    targets = synthesize(
        args.out,
        n_ct=args.n_ct,
        n_mri=args.n_mri,
        ct=configs["ct"],
        mri=configs["mri"],
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        n_t2=args.n_t2,
        n_paired=args.paired,
        t2=configs["t2"],
    )
    print(f"wrote {args.n_ct} CT cases to {targets[CT]} and {args.n_mri} MRI cases to {targets[MRI]}")
    if T2 in targets:
        print(f"wrote {args.n_t2} T2 cases to {targets[T2]}")
    if PAIRED in targets:
        print(f"wrote {args.paired} paired CT/MRI patients to {targets[PAIRED]}")
    return 0

"""Phantom cohorts: real layouts, stated intensities and geometry, determinism, difficulty knobs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from aqcf.cli import main as aqcf_main
from aqcf.data.cohorts import read_atlas, read_lits
from aqcf.data.phantoms import ct_config, make_case, mri_config, synthesize
from aqcf.errors import AqcfError

TINY = dict(shape=(32, 32, 16), spacing=(4.0, 4.0, 6.0))


def _rng(index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([0, stream, index])


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    synthesize(out, n_ct=6, n_mri=4, ct=ct_config(**TINY), mri=mri_config(**TINY), seed=5, progress=False)
    return out


def test_layouts_match_the_real_releases(cohorts):
    lits = sorted(p.name for p in (cohorts / "LiTS").iterdir())
    assert lits == sorted([f"volume-{i}.nii" for i in range(6)] + [f"segmentation-{i}.nii" for i in range(6)])
    assert sorted(p.name for p in (cohorts / "ATLAS" / "imagesTr").iterdir()) == [
        f"im{i}.nii.gz" for i in range(4)
    ]
    assert sorted(p.name for p in (cohorts / "ATLAS" / "labelsTr").iterdir()) == [
        f"lb{i}.nii.gz" for i in range(4)
    ]
    meta = json.loads((cohorts / "ATLAS" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2} and meta["numTraining"] == 4
    assert [c.id for c in read_lits(cohorts / "LiTS")] == [f"lits-{i}" for i in range(6)]
    assert [c.id for c in read_atlas(cohorts / "ATLAS")] == [f"atlas-{i}" for i in range(4)]
    assert not [p for p in cohorts.iterdir() if p.name.startswith(".")]  # no partial folders left


def test_ct_is_int16_hu_in_lps_with_anisotropic_spacing(cohorts):
    for case in read_lits(cohorts / "LiTS"):
        image, label = nib.load(case.image), nib.load(case.label)
        assert image.get_data_dtype() == np.int16
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        assert np.allclose(image.header.get_zooms(), (4.0, 4.0, 6.0))
        assert np.allclose(image.affine, label.affine)
        hu, labels = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert hu.min() <= -990  # air outside the body
        # liver 55-70 HU with darker and brighter vessels, blurred and noisy: the median stays close
        assert 45 <= np.median(hu[labels == 1]) <= 75


def test_mri_in_another_orientation_every_case_with_tumor_and_inside_the_window(cohorts):
    for case in read_atlas(cohorts / "ATLAS"):
        image, label = nib.load(case.image), nib.load(case.label)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        values, labels = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert (labels == 2).any()
        assert 74 < np.median(values[labels == 1]) < 511  # the paper's MRI window
        assert np.median(values[labels == 2]) != pytest.approx(np.median(values[labels == 1]), abs=20)


def test_deterministic_and_subjects_independent():
    cfg = ct_config(**TINY)
    first, again = make_case(cfg, _rng(0)), make_case(cfg, _rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = make_case(cfg, _rng(1))
    assert not np.array_equal(first[1], other[1])
    # The MRI cohort draws from its own stream: no subject shares the CT subject's anatomy.
    mri = make_case(mri_config(**TINY, orientation="LPS"), _rng(0, stream=1))
    assert not np.array_equal(first[1] > 0, mri[1] > 0)


def test_some_ct_cases_have_no_tumor_by_default():
    flags = [bool((make_case(ct_config(**TINY), _rng(i))[1] == 2).any()) for i in range(12)]
    assert any(flags) and not all(flags)
    assert not (make_case(ct_config(**TINY, n_tumors=(0, 0)), _rng(0))[1] == 2).any()


def test_difficulty_knobs_change_the_phantom():
    base = dict(**TINY, n_tumors=(1, 1), tumor_radius_mm=(10.0, 10.0))
    small = make_case(ct_config(**{**base, "tumor_radius_mm": (4.0, 4.0)}), _rng(2))[1]
    large = make_case(ct_config(**{**base, "tumor_radius_mm": (14.0, 14.0)}), _rng(2))[1]
    assert (large == 2).sum() > 4 * (small == 2).sum()

    def tumor_minus_liver(contrast: float) -> float:
        image, label, _ = make_case(ct_config(**base, contrast=contrast, noise=(1.0, 1.0)), _rng(3))
        return float(np.median(image[label == 2]) - np.median(image[label == 1]))

    assert abs(tumor_minus_liver(2.0)) > 1.6 * abs(tumor_minus_liver(1.0))

    def air_noise(sigma: float) -> float:
        image, _, _ = make_case(ct_config(**base, noise=(sigma, sigma)), _rng(4))
        return float(image[:3, :3, :].std())  # a corner of air, outside the body

    assert air_noise(20.0) > 3 * air_noise(5.0)


def test_best_single_window_finds_tumors_poorly():
    """At the realistic calibration no intensity window segments the tumors (pooled Dice over cases)."""
    bins = np.arange(-1024, 3073)
    all_hist = np.zeros(len(bins) - 1)
    tumor_hist = np.zeros(len(bins) - 1)
    tumor_hu, liver_hu = [], []
    for i in range(10):
        image, label, _ = make_case(ct_config(), _rng(i))
        all_hist += np.histogram(image, bins)[0]
        tumor_hist += np.histogram(image[label == 2], bins)[0]
        if (label == 2).any():
            tumor_hu.append(np.median(image[label == 2]))
            liver_hu.append(np.median(image[label == 1]))
    assert tumor_hist.sum() > 0
    # Dice of "lo <= HU < hi" against the tumor label for every window, from cumulative histograms.
    all_cum = np.concatenate([[0], np.cumsum(all_hist)])
    tumor_cum = np.concatenate([[0], np.cumsum(tumor_hist)])
    lo = np.arange(len(bins) - 1)[:, None]
    hi = lo + np.arange(1, 401)[None, :]
    hi = np.minimum(hi, len(bins) - 1)
    dice = 2 * (tumor_cum[hi] - tumor_cum[lo]) / (all_cum[hi] - all_cum[lo] + tumor_hist.sum())
    assert dice.max() < 0.2
    # ... yet the tumors differ visibly from their liver (the task is learnable with context).
    assert np.median(np.abs(np.subtract(tumor_hu, liver_hu))) > 15


def test_realistic_case_is_made():
    # its time is benchmarks/bench_data.py's ("phantom case" row)
    config = ct_config()
    image, label, affine = make_case(config, _rng(1))
    assert image.shape == label.shape == tuple(config.shape)
    assert affine.shape == (4, 4)
    assert set(np.unique(label).tolist()) <= {0, 1, 2} and (label == 1).any()


def test_refuses_to_overwrite_unless_asked(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(AqcfError, match="exists and is not empty; pass --overwrite"):
        synthesize(tmp_path, n_ct=1, n_mri=1, ct=ct_config(**TINY), mri=mri_config(**TINY), progress=False)
    synthesize(
        tmp_path,
        n_ct=2,
        n_mri=1,
        ct=ct_config(**TINY),
        mri=mri_config(**TINY),
        overwrite=True,
        progress=False,
    )
    synthesize(
        tmp_path,
        n_ct=1,
        n_mri=1,
        ct=ct_config(**TINY),
        mri=mri_config(**TINY),
        overwrite=True,
        progress=False,
    )
    assert sorted(p.name for p in (tmp_path / "LiTS").iterdir()) == ["segmentation-0.nii", "volume-0.nii"]
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_command_line(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "synth",
        "--out",
        str(out),
        "--n-ct",
        "2",
        "--n-mri",
        "1",
        "--shape",
        "24",
        "24",
        "12",
        "--ct-spacing",
        "5",
        "5",
        "8",
        "--mri-spacing",
        "5",
        "5",
        "8",
        "--ct-tumors",
        "2",
        "2",
        "--ct-tumor-radius",
        "8",
        "12",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert aqcf_main(argv) == 0
    image = nib.load(out / "LiTS" / "volume-1.nii")
    assert image.shape == (24, 24, 12) and np.allclose(image.header.get_zooms(), (5, 5, 8))
    assert (np.asarray(nib.load(out / "LiTS" / "segmentation-1.nii").dataobj) == 2).any()
    settings = json.loads((out / "synth.json").read_text())
    assert settings["seed"] == 3 and settings["ct"]["n_tumors"] == [2, 2]
    assert aqcf_main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err

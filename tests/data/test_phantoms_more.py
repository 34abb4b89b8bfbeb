"""Phantom cohorts beyond LiTS/ATLAS: the T2 MRI cohort and paired CT/MRI patients (``aqcf synth``)."""

from __future__ import annotations

import json

import nibabel as nib
import nibabel.orientations as orient
import numpy as np
import pytest

from aqcf.cli import main as aqcf_main
from aqcf.data import phantoms
from aqcf.data.cohorts import read_nnunet
from aqcf.data.phantoms import (
    ct_config,
    make_case,
    make_paired_case,
    mri_config,
    read_paired,
    synthesize,
    t2_config,
)
from aqcf.errors import AqcfError

SHAPE = (48, 48, 24)  # tiny grids at each modality's default spacing, so the paired grids differ
T2_STREAM = 2


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms_more")
    synthesize(
        out,
        n_ct=1,
        n_mri=1,
        n_t2=2,
        n_paired=2,
        ct=ct_config(shape=SHAPE),
        mri=mri_config(shape=SHAPE),
        t2=t2_config(shape=SHAPE),
        seed=5,
        progress=False,
    )
    return out


def _load(path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _world_centroid(label: np.ndarray, affine: np.ndarray, values) -> np.ndarray:
    """Centroid (mm, world) of the voxels whose label is in ``values``."""
    index = np.argwhere(np.isin(label, values)).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]


def _volume_ml(label: np.ndarray, affine: np.ndarray, values) -> float:
    return float(np.isin(label, values).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000)


# --- T2 -------------------------------------------------------------------------------------------


def test_t2_cohort_in_the_nnunet_layout(cohorts):
    root = cohorts / "T2"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["t2_0_0000.nii.gz", "t2_1_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["t2_0.nii.gz", "t2_1.nii.gz"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2"}
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert [c.id for c in read_nnunet(root, "mri")] == ["t2_0", "t2_1"]
    settings = json.loads((cohorts / "synth.json").read_text())
    assert settings["n_t2"] == 2 and settings["t2"]["weighting"] == "T2"
    assert not [p for p in cohorts.iterdir() if p.name.startswith(".")]  # no partial folders left


def test_t2_orientation_and_spacing_differ_from_ct_and_t1(cohorts):
    for case in read_nnunet(cohorts / "T2", "mri"):
        image, label = nib.load(case.image), nib.load(case.label)
        assert image.get_data_dtype() == np.int16
        assert nib.aff2axcodes(image.affine) == ("L", "P", "I")
        assert np.allclose(image.header.get_zooms(), (1.5, 1.5, 5.0))
        assert np.allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
    assert len({cfg.orientation for cfg in (ct_config(), mri_config(), t2_config())}) == 3
    assert len({cfg.spacing for cfg in (ct_config(), mri_config(), t2_config())}) == 3


def _t2_case_with_tissues(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A T2 case's rendered image and tissue map on the canonical grid (the spleen has no label).

    Replays make_case's steps with its private helpers; the written image checks the replay. A
    64-voxel field of view keeps the muscle wall and fat thicker than the blur.
    """
    cfg = t2_config(shape=(64, 64, 24))
    rng = np.random.default_rng([0, T2_STREAM, index])
    spacing = np.asarray(cfg.spacing, dtype=float) * (1 + rng.uniform(-cfg.spacing_jitter, cfg.spacing_jitter, 3))
    anatomy = phantoms._anatomy(cfg, spacing, rng)
    image = phantoms._render(anatomy, cfg, spacing, rng)
    stored, _, affine = make_case(cfg, np.random.default_rng([0, T2_STREAM, index]))
    to_canonical = orient.ornt_transform(orient.io_orientation(affine), orient.axcodes2ornt(("R", "A", "S")))
    assert np.array_equal(orient.apply_orientation(stored, to_canonical), np.clip(np.rint(image), 0, 32767))
    return image, anatomy.tissue


def test_t2_appearance_liver_darker_than_spleen_tumors_and_fluid_bright():
    sums: dict[str, list[np.ndarray]] = {k: [] for k in ("liver", "spleen", "tumor", "fluid", "fat")}
    for index in range(3):
        image, tissue = _t2_case_with_tissues(index)
        masks = {
            "liver": tissue == phantoms.LIVER,
            "spleen": tissue == phantoms.SPLEEN,
            "tumor": tissue >= phantoms.TUMOR,
            "fluid": np.isin(tissue, (phantoms.GALLBLADDER, phantoms.BOWEL_LUMEN, phantoms.STOMACH)),
            "fat": tissue == phantoms.FAT,
        }
        for name, mask in masks.items():
            sums[name].append(image[mask])
        assert image[masks["liver"]].mean() < image[masks["spleen"]].mean()
    mean = {name: float(np.concatenate(values).mean()) for name, values in sums.items()}
    assert mean["liver"] < mean["spleen"] and mean["liver"] < mean["fat"] < mean["fluid"]
    assert mean["tumor"] > 1.3 * mean["liver"]  # mostly hyperintense
    assert mean["fluid"] > 3 * mean["liver"]


def _best_window_dice(cases: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Pooled tumor Dice of the best window ``lo <= value < hi`` over all integer windows."""
    lo_value = min(int(image.min()) for image, _ in cases)
    hi_value = max(int(image.max()) for image, _ in cases)
    bins = np.arange(lo_value, hi_value + 2)
    all_hist = sum(np.histogram(image, bins)[0] for image, _ in cases)
    tumor_hist = sum(np.histogram(image[label == 2], bins)[0] for image, label in cases)
    all_cum = np.concatenate([[0], np.cumsum(all_hist)])
    tumor_cum = np.concatenate([[0], np.cumsum(tumor_hist)])
    lo, hi = np.triu_indices(len(bins), k=1)  # every window [bins[lo], bins[hi])
    dice = 2 * (tumor_cum[hi] - tumor_cum[lo]) / (all_cum[hi] - all_cum[lo] + tumor_hist.sum())
    return float(dice.max())


@pytest.mark.parametrize(("make", "stream", "limit"), [(t2_config, T2_STREAM, 0.1), (mri_config, 1, 0.2)])
def test_best_single_window_finds_tumors_poorly(make, stream, limit):
    """As for CT (tests/data/test_phantoms.py): no intensity window segments the tumors, context does."""
    cases, differences = [], []
    for index in range(5):
        image, label, _ = make_case(make(), np.random.default_rng([0, stream, index]))
        cases.append((image, label))
        if (label == 2).any():
            differences.append(np.median(image[label == 2]) - np.median(image[label == 1]))
    assert sum(int((label == 2).sum()) for _, label in cases) > 0
    assert _best_window_dice(cases) < limit
    assert np.median(np.abs(differences)) > 30  # yet tumors differ visibly from their own liver


def test_window_dice_of_a_trivial_cohort_is_one():
    # The scan over windows finds a separable tumor: the test above could fail.
    image = np.zeros((4, 4, 4), dtype=np.int16)
    label = np.zeros_like(image, dtype=np.uint8)
    image[1:3, 1:3, 1:3], label[1:3, 1:3, 1:3] = 7, 2
    assert _best_window_dice([(image, label)]) == pytest.approx(1.0)


# --- paired ---------------------------------------------------------------------------------------


def test_paired_layout_and_reader(cohorts):
    root = cohorts / "Paired"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        "pair_0_0000.nii.gz",
        "pair_0_0001.nii.gz",
        "pair_1_0000.nii.gz",
        "pair_1_0001.nii.gz",
    ]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [
        "pair_0_ct.nii.gz",
        "pair_0_mri.nii.gz",
        "pair_1_ct.nii.gz",
        "pair_1_mri.nii.gz",
    ]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "MRI"} and meta["numTraining"] == 2
    assert meta["world_offset_mm"] == [0.0, 0.0, 0.0]
    cases = read_paired(root)
    assert [c["id"] for c in cases] == ["pair_0", "pair_1"]
    assert cases[1] == {
        "id": "pair_1",
        "ct_image": root / "imagesTr" / "pair_1_0000.nii.gz",
        "mri_image": root / "imagesTr" / "pair_1_0001.nii.gz",
        "ct_label": root / "labelsTr" / "pair_1_ct.nii.gz",
        "mri_label": root / "labelsTr" / "pair_1_mri.nii.gz",
    }


def test_paired_scans_differ_in_grid_and_each_label_matches_its_image(cohorts):
    for case in read_paired(cohorts / "Paired"):
        ct, mri = nib.load(case["ct_image"]), nib.load(case["mri_image"])
        assert nib.aff2axcodes(ct.affine) == ("L", "P", "S") and nib.aff2axcodes(mri.affine) == ("R", "A", "S")
        assert np.allclose(ct.header.get_zooms(), (2.0, 2.0, 3.0))
        assert np.allclose(mri.header.get_zooms(), (1.8, 1.8, 3.6))
        for image, key in ((ct, "ct_label"), (mri, "mri_label")):
            label = nib.load(case[key])
            assert label.shape == image.shape and np.allclose(label.affine, image.affine)
            assert (np.asarray(label.dataobj) == 2).any()  # tumors from the MRI config: every case
        hu, ct_label = np.asarray(ct.dataobj), np.asarray(nib.load(case["ct_label"]).dataobj)
        assert ct.get_data_dtype() == np.int16 and 45 <= np.median(hu[ct_label == 1]) <= 75
        values, mri_label = np.asarray(mri.dataobj), np.asarray(nib.load(case["mri_label"]).dataobj)
        assert 74 < np.median(values[mri_label == 1]) < 511


def test_paired_scans_agree_in_world_coordinates_and_volume(cohorts):
    for case in read_paired(cohorts / "Paired"):
        ct_label, ct_affine = _load(case["ct_label"])
        mri_label, mri_affine = _load(case["mri_label"])
        # A landmark (the liver's and the tumors' centroid) lies at the same scanner position in
        # both scans, far closer than a voxel (1.8 mm and more).
        for values, tolerance_mm in (((1, 2), 0.5), ((2,), 1.0)):
            gap = _world_centroid(ct_label, ct_affine, values) - _world_centroid(mri_label, mri_affine, values)
            assert np.linalg.norm(gap) < tolerance_mm, (case["id"], values, gap)
        liver = _volume_ml(ct_label, ct_affine, (1, 2)), _volume_ml(mri_label, mri_affine, (1, 2))
        tumor = _volume_ml(ct_label, ct_affine, (2,)), _volume_ml(mri_label, mri_affine, (2,))
        assert liver[0] == pytest.approx(liver[1], rel=0.03)
        assert tumor[0] == pytest.approx(tumor[1], rel=0.1)


def test_paired_patient_is_one_anatomy_not_two():
    # Deterministic, and another patient's tumors lie elsewhere: the agreement above is no accident.
    shape = (48, 48, 24)
    scans = make_paired_case(ct_config(shape=shape), mri_config(shape=shape), np.random.default_rng(11))
    again = make_paired_case(ct_config(shape=shape), mri_config(shape=shape), np.random.default_rng(11))
    assert all(np.array_equal(a, b) for m in scans for a, b in zip(scans[m], again[m], strict=True))
    other = make_paired_case(ct_config(shape=shape), mri_config(shape=shape), np.random.default_rng(12))
    gap = _world_centroid(scans["ct"][1], scans["ct"][2], (2,)) - _world_centroid(
        other["mri"][1], other["mri"][2], (2,)
    )
    assert np.linalg.norm(gap) > 2.0
    # Another CT setting changes the CT scan only: each scan has its own random stream.
    noisier = make_paired_case(
        ct_config(shape=shape, noise=(30.0, 30.0)), mri_config(shape=shape), np.random.default_rng(11)
    )
    assert np.array_equal(noisier["mri"][0], scans["mri"][0])
    assert np.array_equal(noisier["ct"][1], scans["ct"][1]) and not np.array_equal(noisier["ct"][0], scans["ct"][0])


def test_read_paired_refuses_incomplete_cohorts(cohorts, tmp_path):
    with pytest.raises(AqcfError, match="no imagesTr/ folder"):
        read_paired(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(AqcfError, match="no CASE_0000.nii.gz found"):
        read_paired(tmp_path)
    (tmp_path / "labelsTr").mkdir()
    for name in ("imagesTr/p_0000.nii.gz", "imagesTr/p_0001.nii.gz", "labelsTr/p_ct.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(AqcfError, match=r"p_mri.nii.gz: missing"):
        read_paired(tmp_path)


# --- the existing cohorts are untouched -----------------------------------------------------------


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_new_cohorts_leave_lits_and_atlas_byte_identical(cohorts, tmp_path):
    kwargs = dict(ct=ct_config(shape=SHAPE), mri=mri_config(shape=SHAPE), seed=5, progress=False)
    synthesize(tmp_path / "plain", n_ct=1, n_mri=1, **kwargs)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["ATLAS", "LiTS", "synth.json"]
    for cohort in ("LiTS", "ATLAS"):
        plain, extended = _files(tmp_path / "plain" / cohort), _files(cohorts / cohort)
        assert plain.keys() == extended.keys() and len(plain) > 1
        assert all(plain[name] == extended[name] for name in plain), cohort
    # ... and the paired and T2 subjects are other people.
    lits_label, _ = _load(cohorts / "LiTS" / "segmentation-0.nii")
    paired_label, _ = _load(read_paired(cohorts / "Paired")[0]["ct_label"])
    assert not np.array_equal(lits_label > 0, paired_label > 0)


def test_config_checks(tmp_path):
    with pytest.raises(AqcfError, match="only an MRI phantom has a weighting"):
        ct_config(weighting="T2")
    with pytest.raises(AqcfError, match="need one of T1, T2"):
        mri_config(weighting="PD")
    assert mri_config().weighting == "T1" and t2_config().weighting == "T2"
    with pytest.raises(AqcfError, match="t2= a T2-weighted one"):
        synthesize(tmp_path, n_t2=1, t2=mri_config(), progress=False)


def test_command_line_t2_and_paired(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "synth",
        "--out",
        str(out),
        "--n-ct",
        "1",
        "--n-mri",
        "0",
        "--n-t2",
        "1",
        "--paired",
        "1",
        "--shape",
        "24",
        "24",
        "12",
        "--t2-shape",
        "20",
        "20",
        "10",
        "--t2-spacing",
        "4",
        "4",
        "8",
        "--t2-orientation",
        "RAS",
        "--t2-tumors",
        "2",
        "2",
        "--t2-bias",
        "0.1",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert aqcf_main(argv) == 0
    assert "1 T2 cases" in capsys.readouterr().out
    image = nib.load(out / "T2" / "imagesTr" / "t2_0_0000.nii.gz")
    assert image.shape == (20, 20, 10) and np.allclose(image.header.get_zooms(), (4, 4, 8))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    settings = json.loads((out / "synth.json").read_text())
    assert settings["n_paired"] == 1 and settings["t2"]["n_tumors"] == [2, 2]
    assert settings["t2"]["bias_field"] == 0.1
    assert [c["id"] for c in read_paired(out / "Paired")] == ["pair_0"]
    # Rewritten without them, the old T2/ and Paired/ go: synth.json describes the folder.
    argv[argv.index("--n-t2") + 1] = argv[argv.index("--paired") + 1] = "0"
    assert aqcf_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ATLAS", "LiTS", "synth.json"]

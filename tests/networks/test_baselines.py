"""Baselines: the wrappers' contracts, the one-stream quaternion U-Net, nnU-Net's planning rule, and every
``configs/baselines/*.yaml`` trained for a step on phantoms through the shared pipeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from aqcf.cli import main
from aqcf.errors import AqcfError
from aqcf.networks.aqcfnet import AQCFNet, count_parameters
from aqcf.networks.baselines import (
    NNUNetStyleUNet,
    QuaternionUNet,
    SharedStream,
    SingleModality,
    UnimodalNet,
    nnunet_topology,
)
from tests.conftest import REPO, tiny_fit_args

TINY_WIDTHS = (2, 2, 4, 4, 8, 8)
BASELINES = REPO / "configs" / "baselines"
TINY_SIZES = REPO / "tests" / "configs" / "baselines"
# one training step and one validation volume, no sanity check: the configs are what is under test
ONE_STEP = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0"]


# ------------------------------------------------------------------------------------------ wrappers


class _Affine(nn.Module):
    """logits = [x, 2x, -x]: a network whose output is known by hand."""

    def forward(self, x):
        return torch.cat([x, 2 * x, -x], dim=1)


def test_shared_stream_runs_one_network_on_each_modality():
    wrapper = SharedStream(_Affine())
    ct, mri = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4)
    logits_ct, logits_mri = wrapper(ct, mri)
    assert wrapper.modalities == ("ct", "mri")
    assert torch.equal(logits_ct[:, 1:2], 2 * ct) and torch.equal(logits_mri[:, 2:3], -mri)
    assert torch.equal(wrapper.forward_single(mri, "mri"), logits_mri)
    assert torch.equal(wrapper.forward_single(ct, "CT"), logits_ct)
    with pytest.raises(AqcfError, match="neither"):
        wrapper.forward_single(ct, "pet")


def test_shared_stream_keeps_modalities_apart_under_batch_norm():
    # batch norm in training mode normalises over the batch: CT logits must not depend on the MRI batch
    wrapper = SharedStream(nn.Sequential(nn.Conv3d(1, 3, 1), nn.BatchNorm3d(3))).train()
    ct = torch.rand(1, 1, 4, 4, 4)
    first, _ = wrapper(ct, torch.rand(1, 1, 4, 4, 4))
    second, _ = wrapper(ct, 100 * torch.rand(1, 1, 4, 4, 4))
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_single_modality_serves_its_modality_only(modality):
    other = "mri" if modality == "ct" else "ct"
    wrapper = SingleModality(_Affine(), modality)
    x = torch.rand(1, 1, 4, 4, 4)
    assert wrapper.modalities == (modality,)
    assert torch.equal(wrapper.forward_single(x, modality), torch.cat([x, 2 * x, -x], dim=1))
    joint = wrapper(**{modality: x})
    index = 0 if modality == "ct" else 1
    assert joint[1 - index] is None and joint[index].shape == (1, 3, 4, 4, 4)
    with pytest.raises(AqcfError, match=f"trained on {modality} only"):
        wrapper.forward_single(x, other)
    with pytest.raises(AqcfError, match=f"no {modality} input"):
        wrapper(**{other: x})
    with pytest.raises(AqcfError, match="neither"):
        SingleModality(_Affine(), "pet")


def test_wrappers_pass_on_the_divisor():
    assert SharedStream(QuaternionUNet(widths=TINY_WIDTHS)).divisor == 16  # four halvings
    assert SingleModality(_Affine(), "ct").divisor == 1


# ------------------------------------------------------------------------- one-stream quaternion U-Net


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_quaternion_unet_is_one_stream_of_aqcfnet(modality):
    """With A-QCF-Net's weights loaded, the one-stream net gives that network's unimodal output (eq. 17)."""
    net = AQCFNet(widths=TINY_WIDTHS, cross_fusion=False).eval()
    stream = QuaternionUNet(widths=TINY_WIDTHS).eval()
    stream.stem.load_state_dict(net.stems[modality].state_dict())
    stream.encoder.load_state_dict(net.encoders[modality].state_dict())
    stream.bottleneck.load_state_dict(net.bottleneck.state_dict())
    stream.decoder.load_state_dict(net.decoders[modality].state_dict())
    stream.head.load_state_dict(net.heads[modality].state_dict())
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(stream(x), net.forward_single(x, modality))
    per_stream = sum(count_parameters(part[modality]) for part in (net.stems, net.encoders, net.decoders, net.heads))
    assert count_parameters(stream) == per_stream + count_parameters(net.bottleneck)


def test_quaternion_unet_starts_from_aqcfnet_ct_initialisation():
    torch.manual_seed(7)
    net = AQCFNet(widths=TINY_WIDTHS, cross_fusion=False).eval()
    torch.manual_seed(7)
    stream = QuaternionUNet(widths=TINY_WIDTHS).eval()
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(stream(x), net.forward_single(x, "ct"))


def test_unimodal_net_shapes_and_errors():
    net = UnimodalNet("mri", widths=TINY_WIDTHS, algebra="real", attention_gates=False)
    assert net.modalities == ("mri",) and net.divisor == 16
    assert net.forward_single(torch.rand(2, 1, 16, 32, 16), "mri").shape == (2, 3, 16, 32, 16)
    with pytest.raises(AqcfError, match="divisible by 16"):
        net.forward_single(torch.rand(1, 1, 16, 16, 8), "mri")
    with pytest.raises(AqcfError, match="expected"):
        net.forward_single(torch.rand(1, 2, 16, 16, 16), "mri")


# ------------------------------------------------------------------------------- nnU-Net-style U-Net


def test_nnunet_topology_paper_patch():
    # 256x256x16 at 1 mm: all axes pool twice; then z (4 voxels) stops and x, y pool four more times
    kernels, strides = nnunet_topology((256, 256, 16), (1.0, 1.0, 1.0))
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1], [2, 2, 1], [2, 2, 1]]
    assert kernels == [[3, 3, 3]] * 7


def test_nnunet_topology_anisotropic_spacing():
    # z at 2.5 mm: not pooled and 1-wide kernels until x, y reach 2 mm (within a factor 2 of 2.5 mm)
    kernels, strides = nnunet_topology((64, 64, 16), (1.0, 1.0, 2.5))
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert kernels == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]


def test_nnunet_topology_lone_axis_needs_three_times_the_minimum():
    # after two pools: 16x4x4; x alone (16 >= 3*4) pools once more to 8, then 8 < 12 stops
    _, strides = nnunet_topology((64, 16, 16), (1.0, 1.0, 1.0))
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 1, 1]]


def test_nnunet_style_unet():
    net = NNUNetStyleUNet((32, 32, 16), (2.0, 2.0, 3.0), base_filters=2, max_filters=8)
    assert net.filters == [2, 4, 8, 8]
    assert net.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert any(isinstance(m, nn.LeakyReLU) for m in net.modules())
    assert net(torch.rand(2, 1, 32, 32, 16)).shape == (2, 3, 32, 32, 16)
    with pytest.raises(AqcfError, match="not divisible by its total stride 8"):
        NNUNetStyleUNet((36, 36, 16))  # 36 pools three times (36, 18, 9 >= 8)


# ------------------------------------------------------------------------ configs through the pipeline


def _columns(run: Path) -> set[str]:
    with open(next(run.glob("csv/version_*/metrics.csv"))) as handle:
        return set(next(csv.reader(handle)))


def _fit_baseline(phantoms: Path, root: Path, name: str) -> list[str]:
    """Arguments of a one-step fit of configs/baselines/<name>.yaml, with the tests' tiny sizes."""
    extra = ["--config", str(BASELINES / f"{name}.yaml")]
    sizes = TINY_SIZES / f"{name.rsplit('_', 1)[0]}.yaml"
    if sizes.is_file():
        extra += ["--config", str(sizes)]
    # the baseline config comes after tiny_cpu.yaml: it replaces the network (and tiny_cpu.yaml's widths)
    return tiny_fit_args(phantoms, root, *extra, *ONE_STEP)


NETWORKS = {
    "unimodal": QuaternionUNet,
    "nnunet": NNUNetStyleUNet,
    "attention_unet": "AttentionUnet",
    "unetr": "UNETR",
    "swin_unetr": "SwinUNETR",
}


def test_every_baseline_config_has_a_test():
    shipped = {p.stem for p in BASELINES.glob("*.yaml")}  # configs/baselines/<base>/ hold sizes only
    assert shipped == {f"{family}_{variant}" for family in NETWORKS for variant in ("ct", "mri", "joint")} - {
        "unimodal_joint"
    }


@pytest.mark.parametrize("name", sorted(p.stem for p in BASELINES.glob("*.yaml")))
def test_baseline_config_trains(name, tiny_phantoms, tmp_path):
    from aqcf.models.segmentation import SegmentationModule

    root = tmp_path / name
    args = _fit_baseline(tiny_phantoms, root, name)
    assert main(["fit", *args]) == 0
    family, variant = name.rsplit("_", 1)
    expected = ("ct", "mri") if variant == "joint" else (variant,)

    # the loss covered exactly the expected cohorts
    columns = _columns(root)
    trained = tuple(m for m in ("ct", "mri") if f"train/loss_{m}_step" in columns)
    assert trained == expected
    assert f"val/dice_{expected[0]}_liver" in columns  # the first validation volume is of a served modality

    # the checkpoint rebuilds the baseline by itself
    module = SegmentationModule.load_from_checkpoint(root / "checkpoints" / "last.ckpt", map_location="cpu")
    wrapper = module.network
    assert tuple(wrapper.modalities) == expected
    assert isinstance(wrapper, SharedStream if variant == "joint" else SingleModality)
    inner = NETWORKS[family]
    if isinstance(inner, str):
        assert type(wrapper.network).__name__ == inner and type(wrapper.network).__module__.startswith("monai.")
    else:
        assert isinstance(wrapper.network, inner)

    if variant != "joint" and family == "unimodal":  # `aqcf test` scores the served modality alone
        assert main(["test", *args, "--ckpt_path", str(root / "checkpoints" / "last.ckpt")]) == 0
        summary = json.loads((root / "test" / "summary.json").read_text())
        assert list(summary["per_modality"]) == [variant]


def _merged_config(capsys, *configs: Path) -> dict:
    import yaml

    args = [arg for config in configs for arg in ("--config", str(config))]
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("base", ["lits_atlas", "demo"])
@pytest.mark.parametrize("family", ["nnunet", "unetr", "swin_unetr"])
def test_patch_dependent_sizes_match_the_base_config(base, family, capsys):
    """What `make baselines CONFIG=configs/<base>.yaml` trains: sizes consistent with the patch and spacing."""
    configs = [REPO / "configs" / f"{base}.yaml", BASELINES / f"{family}_joint.yaml"]
    sizes = BASELINES / base / f"{family}.yaml"
    if sizes.is_file():
        configs.append(sizes)
    config = _merged_config(capsys, *configs)
    patch = config["data"]["patch_size"]
    network = config["model"]["network"]["init_args"]["network"]["init_args"]
    if family == "nnunet":
        assert network["patch_size"] == patch and network["spacing"] == config["data"]["ct_spacing"]
    elif family == "unetr":
        assert network["img_size"] == patch
    else:
        assert all(size % 32 == 0 for size in patch)
        # more than one voxel at 1/32 scale, or its instance norm fails in training
        assert patch[0] * patch[1] * patch[2] > 32**3
    if family != "swin_unetr":  # only Swin UNETR trains on its own patch
        base_config = _merged_config(capsys, REPO / "configs" / f"{base}.yaml")
        assert patch == base_config["data"]["patch_size"]


# ------------------------------------------------------------------- real nnU-Net on the same folds


def test_export_nnunet_writes_nnunet_raw_layout_with_the_folds(tiny_phantoms, tmp_path, capsys):
    lits = sorted((tiny_phantoms / "LiTS").rglob("volume-*.nii*"))
    ids = [f"lits-{p.name.split('-')[1].split('.')[0]}" for p in lits]
    ending = ".nii.gz" if lits[0].name.endswith(".nii.gz") else ".nii"
    folds = [{"train": [i for i in ids if i != held_out], "val": [held_out]} for held_out in ids]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps(folds))

    code = main(["export-nnunet", str(tiny_phantoms / "LiTS"), "--format", "lits", "--modality", "ct",
                 "--id", "101", "--name", "LiTS", "--out", str(tmp_path / "raw"), "--splits", str(splits)])
    assert code == 0
    dataset = tmp_path / "raw" / "Dataset101_LiTS"
    assert "nnUNet_preprocessed/Dataset101_LiTS/splits_final.json" in capsys.readouterr().out
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == sorted(f"{i}_0000{ending}" for i in ids)
    for volume, case in zip(lits, ids, strict=True):
        assert (dataset / "imagesTr" / f"{case}_0000{ending}").resolve() == volume.resolve()
        label = volume.parent / volume.name.replace("volume", "segmentation")
        assert (dataset / "labelsTr" / f"{case}{ending}").resolve() == label.resolve()
    description = json.loads((dataset / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "CT"}  # nnU-Net's CT normalisation
    assert description["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert description["numTraining"] == len(ids) and description["file_ending"] == ending
    assert json.loads((dataset / "splits_final.json").read_text()) == folds

    # the exported folder reads back as an nnU-Net raw data set with the same case ids
    from aqcf.data.cohorts import read_cohort

    assert sorted(c.id for c in read_cohort(dataset, "nnunet", "ct")) == sorted(ids)


def test_export_nnunet_rejects_folds_of_other_cases(tiny_phantoms, tmp_path):
    splits = tmp_path / "splits.json"
    other_cohort = [{"train": ["atlas-1"], "val": ["atlas-2"]}, {"train": ["atlas-2"], "val": ["atlas-1"]}]
    splits.write_text(json.dumps(other_cohort))
    code = main(["export-nnunet", str(tiny_phantoms / "LiTS"), "--format", "lits", "--modality", "ct",
                 "--id", "101", "--name", "LiTS", "--out", str(tmp_path / "raw"), "--splits", str(splits)])
    assert code == 2
    assert not (tmp_path / "raw" / "Dataset101_LiTS").exists()
    assert main(["export-nnunet", str(tiny_phantoms / "ATLAS"), "--format", "atlas", "--modality", "mri",
                 "--id", "1000", "--name", "ATLAS", "--out", str(tmp_path / "raw")]) == 2

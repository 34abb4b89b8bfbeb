"""``aqcf export``: ONNX and TorchScript files of the unimodal network, their settings, the onnxruntime predictor."""

from __future__ import annotations

import json
from importlib.metadata import version

import numpy as np
import pytest
import torch

from aqcf.cli import main

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# batch and spatial sizes differ from the export's example window (2 x 32^3) and from each other
SHAPES = [(1, 1, 32, 32, 16), (2, 1, 48, 16, 32)]
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(format, modality) -> the exported model file, written by the verb."""
    out = tmp_path_factory.mktemp("export")
    files = {}
    for fmt, suffix in FORMATS.items():
        for modality in ("ct", "mri"):
            path = out / f"{modality}{suffix}"
            assert main(["export", "--ckpt", str(checkpoint), "--format", fmt, "--modality", modality,
                         "--out", str(path)]) == 0
            files[fmt, modality] = path
    return files


@pytest.fixture(scope="module")
def network(checkpoint):
    from aqcf.inference.predictor import Predictor

    return Predictor.from_checkpoint(checkpoint, device="cpu").network.eval()


def _run(fmt, path):
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))

        def run(x):
            with torch.no_grad():
                return loaded(x).numpy()

        return run
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"image": x.numpy()})[0]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_exported_model_equals_the_pytorch_unimodal_path_at_two_sizes(exported, network, fmt, modality):
    from aqcf.inference.export import TOLERANCE

    # TorchScript runs PyTorch's kernels: within 1e-4. onnxruntime's float32 rounding is amplified by
    # the network (docs/inference.md): within TOLERANCE["onnx"], and the labels agree
    assert TOLERANCE["torchscript"] == 1e-4
    run = _run(fmt, exported[fmt, modality])
    generator = torch.Generator().manual_seed(3)
    for shape in SHAPES:
        image = torch.rand(shape, generator=generator)
        with torch.no_grad():
            # eq. 17 as PyTorch runs it: the absent stream zero-filled in the full dual-stream graph
            zeros = torch.zeros_like(image)
            pair = network(image, zeros) if modality == "ct" else network(zeros, image)
            expected = pair[0 if modality == "ct" else 1].numpy()
        got = run(image)
        assert got.shape == (shape[0], 3, *shape[2:])
        assert np.abs(got - expected).max() <= TOLERANCE[fmt]
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_the_two_modalities_export_different_graphs(exported):
    # the modality is baked in: the CT file must not serve the MRI path
    image = torch.rand(SHAPES[0], generator=torch.Generator().manual_seed(4))
    ct, mri = (_run("onnx", exported["onnx", m])(image) for m in ("ct", "mri"))
    assert np.abs(ct - mri).max() > 1e-3


def test_settings_json_holds_the_checkpoints_settings(exported, checkpoint):
    from aqcf.inference.export import TOLERANCE

    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    data, model = stored["datamodule_hyper_parameters"], stored["hyper_parameters"]
    for (fmt, modality), path in exported.items():
        settings = json.loads(path.with_name(path.name + ".json").read_text())
        assert settings["format"] == fmt and settings["modality"] == modality
        assert settings["model_file"] == path.name
        pre = settings["preprocessing"]
        # tests/configs/tiny_cpu.yaml sets the spacing; lits_atlas.yaml the windows and orientations
        assert pre["spacing"] == list(data[f"{modality}_spacing"]) == [2.0, 2.0, 3.0]
        assert pre["window"] == list(data[f"{modality}_window"])
        assert pre["orientation"] == data[f"{modality}_orientation"] == {"ct": "RAS", "mri": "LAS"}[modality]
        assert pre["pad_multiple"] == data["pad_multiple"]
        window = settings["sliding_window"]
        assert window["roi_size"] == list(model["patch_size"]) == [32, 32, 16]
        assert window["overlap"] == model["sw_overlap"] == 0.25
        assert window["mode"] == model["sw_mode"]
        assert window["batch_size"] == model["sw_batch_size"] == 2
        assert settings["classes"] == {"0": "background", "1": "liver", "2": "tumor"}
        assert settings["input"]["name"] == "image" and settings["output"]["name"] == "logits"
        assert settings["input"]["shape"] == ["batch", 1, "x", "y", "z"]
        assert settings["output"]["shape"] == ["batch", 3, "x", "y", "z"]
        assert settings["input"]["spatial_multiple"] == 16
        assert settings["aqcf_version"] == version("aqcf")
        assert settings["check"]["max_abs_difference"] <= TOLERANCE[fmt]
        assert settings["check"]["label_agreement"] >= 0.999
        assert settings["check"]["window"] == [1, 1, 32, 32, 16]


def test_onnxruntime_predictor_runs_a_whole_volume_through_monai(exported, network):
    from monai.inferers import sliding_window_inference

    from aqcf.inference.export import TOLERANCE, onnx_window_predictor
    from aqcf.inference.predictor import WindowSettings, sliding_window_logits

    window = WindowSettings(roi_size=(32, 32, 16), overlap=0.25, batch_size=2, mode="gaussian")
    volume = torch.rand(1, 1, 50, 40, 37, generator=torch.Generator().manual_seed(5))
    predictor = onnx_window_predictor(exported["onnx", "mri"])
    got = sliding_window_inference(volume, window.roi_size, window.batch_size, predictor,
                                   overlap=window.overlap, mode=window.mode)
    with torch.no_grad():
        expected = sliding_window_logits(network, volume, "mri", window)
    assert got.shape == (1, 3, 50, 40, 37)
    assert (got - expected).abs().max() <= TOLERANCE["onnx"]
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.999


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aqcf: error:"), err
    return err[0]


def test_bad_arguments_end_with_one_error_line(checkpoint, tmp_path, capsys):
    args = ["export", "--ckpt", str(checkpoint), "--modality", "ct"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exit_.value.code == 2
    assert "tflite" in _one_error_line(capsys)

    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep")
    assert main([*args, "--format", "onnx", "--out", str(existing)]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert existing.read_bytes() == b"keep"

    before = checkpoint.read_bytes()
    assert main([*args, "--format", "torchscript", "--out", str(checkpoint), "--overwrite"]) == 2
    assert "input" in _one_error_line(capsys)
    assert checkpoint.read_bytes() == before


def test_a_modality_the_checkpoint_was_not_trained_on_is_refused(checkpoint, tmp_path, capsys):
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    stored["datamodule_hyper_parameters"]["mri_root"] = None  # what a CT-only run records
    ct_only = tmp_path / "ct_only.ckpt"
    torch.save(stored, ct_only)
    out = tmp_path / "mri.pt"
    assert main(["export", "--ckpt", str(ct_only), "--format", "torchscript", "--modality", "mri",
                 "--out", str(out)]) == 2
    assert "trained on CT only" in _one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "mri.pt.json").exists()

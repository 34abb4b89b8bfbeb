"""``aqcf export``: the unimodal network (eq. 17) of a checkpoint as an ONNX or TorchScript file.

The exported graph is :meth:`AQCFNet.forward_single <aqcf.networks.aqcfnet.AQCFNet.forward_single>` for
one modality: the absent stream is zero-filled *inside* the graph, so a consumer feeds one preprocessed
window ``image (B, 1, X, Y, Z)`` and gets ``logits (B, 3, X, Y, Z)``. Batch and spatial sizes are
dynamic; every spatial size must be a multiple of the network's downsampling factor (16 for four
halvings), which is what the preprocessing's padding and the sliding window guarantee.

Beside the model goes ``<model file>.json`` (``model.onnx`` -> ``model.onnx.json``): the checkpoint's
preprocessing for that modality, its sliding-window settings, the class names, the input and output
names and shapes, and the aqcf version, so another tool can run the model without aqcf
(:func:`export_settings`).

* ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export`` based exporter; the
  TorchScript-based one is deprecated) with symbolic batch and ``16·k`` spatial sizes. It needs the
  ``onnx`` extra (``pip install 'aqcf[onnx]'``: onnx, onnxscript, onnxruntime).
* TorchScript is a trace (``torch.jit.trace``): sizes are not baked in (checked at two sizes in the
  tests), but torch marks ``torch.jit`` as deprecated, so ONNX is the format to prefer.
* Quaternion convolutions are exported on their dense path (one real convolution with the eq. 2 kernel,
  :func:`~aqcf.nn.quaternion.set_quaternion_product`): the ``"auto"`` choice depends on the device the
  graph later runs on, which an exported file cannot know, and one plain convolution per layer is what
  every runtime optimises best. Both paths give the same logits.
* Instance norms are exported as :class:`PreciseInstanceNorm` (their statistics in float64):
  onnxruntime's float32 reductions on the zero-filled stream's nearly constant feature maps otherwise
  put its logits measurably far from PyTorch's (docs/inference.md gives the figures); with it they agree
  within ``TOLERANCE["onnx"]``.

:func:`onnx_window_predictor` wraps an exported ONNX file in an onnxruntime session as a window
predictor ``Tensor (B, 1, X, Y, Z) -> Tensor (B, 3, X, Y, Z)`` for MONAI's ``sliding_window_inference``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from aqcf.constants import CLASS_NAMES, check_stream
from aqcf.errors import AqcfError, first_line
from aqcf.io import atomic_path, check_output, write_text_atomic

__all__ = [
    "FORMATS",
    "ONNX",
    "TORCHSCRIPT",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TOLERANCE",
    "UnimodalNetwork",
    "settings_path",
    "export_network",
    "export_settings",
    "export_checkpoint",
    "onnx_window_predictor",
    "main",
]

ONNX = "onnx"
TORCHSCRIPT = "torchscript"
FORMATS = (ONNX, TORCHSCRIPT)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: max abs difference of exported and PyTorch float32 logits the tests accept on 32×32×16 and 48×16×32
#: windows, per format. The TorchScript trace runs PyTorch's own kernels. onnxruntime rounds
#: differently, and the zero-filled stream's instance norms (nearly constant fields) amplify float32
#: rounding, which the float64 norm statistics of PreciseInstanceNorm contain. The measured differences:
#: docs/inference.md, *`aqcf export`: ONNX and TorchScript*, its *Equality* paragraph.
TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-4}
#: MONAI's Gaussian blending sigma as a fraction of the window (``sliding_window_inference``'s default)
GAUSSIAN_SIGMA_SCALE = 0.125
_ONNX_MODULES = ("onnx", "onnxscript")
_EXTRA_HINT = "pip install 'aqcf[onnx]'"
# the example window is two blocks of the downsampling factor per axis and a batch of two: torch.export
# specialises a size of 1 (of a block count or the batch) to a constant
_EXAMPLE_BLOCKS = 2
_EXAMPLE_BATCH = 2


class UnimodalNetwork(nn.Module):
    """One modality's deployed path as a module with a single tensor input (what exporters need).

    Args:
        network: a module with ``forward_single(x, modality)`` (:class:`~aqcf.networks.aqcfnet.AQCFNet`).
        modality: ``"ct"`` or ``"mri"``.

    Shapes:
        ``image (B, in_channels, X, Y, Z)`` -> ``logits (B, num_classes, X, Y, Z)``; each spatial size a
        multiple of ``network.divisor``.
    """

    def __init__(self, network: nn.Module, modality: str) -> None:
        super().__init__()
        self.network = network
        self.modality = check_stream(modality, network)

    def forward(self, image: Tensor) -> Tensor:
        return self.network.forward_single(image, self.modality)


def settings_path(model_path: str | Path) -> Path:
    """The settings file beside an exported model: ``model.onnx`` -> ``model.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


class PreciseInstanceNorm(nn.Module):
    """An affine ``nn.InstanceNorm3d`` (no running statistics) whose statistics are taken in float64.

    The zero-filled absent stream's feature maps are nearly constant (one value inside, others only
    near the faces), and standardising them divides by a small deviation. onnxruntime's float32
    reductions are less exact than PyTorch's, and that difference, amplified, put its logits up to
    7e-3 from PyTorch's. Mean and variance (two passes) in float64, the result back in float32, give
    the same values as PyTorch's norm in any runtime; the norms are a small part of the work.
    """

    def __init__(self, norm: nn.InstanceNorm3d) -> None:
        super().__init__()
        if norm.track_running_stats or not norm.affine:
            raise AqcfError("PreciseInstanceNorm stands in for an affine instance norm without running statistics")
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.double()
        centred = x - x.mean(dim=(2, 3, 4), keepdim=True)
        variance = (centred * centred).mean(dim=(2, 3, 4), keepdim=True)
        normed = (centred * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)
        shape = (1, -1, 1, 1, 1)
        return normed * self.weight.view(shape) + self.bias.view(shape)


def _precise_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d):
            setattr(module, name, PreciseInstanceNorm(child))
        else:
            _precise_norms(child)


def _export_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` for export: quaternion layers dense, instance norms precise; same logits."""
    from aqcf.nn.quaternion import DENSE, set_quaternion_product

    network = copy.deepcopy(network)
    _precise_norms(network)
    return set_quaternion_product(network, DENSE)


def _example(network: nn.Module) -> Tensor:
    divisor = int(getattr(network, "divisor", 1))
    channels = int(getattr(network, "in_channels", 1))
    generator = torch.Generator().manual_seed(0)
    return torch.rand(_EXAMPLE_BATCH, channels, *(3 * [_EXAMPLE_BLOCKS * divisor]), generator=generator)


def _require_onnx() -> None:
    missing = [m for m in _ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise AqcfError(f"ONNX export needs {' and '.join(missing)}, which are not installed ({_EXTRA_HINT})")


def export_network(network: nn.Module, modality: str, out: str | Path, fmt: str = ONNX) -> dict:
    """Export one modality's unimodal path of ``network`` to ``out`` (written atomically).

    Args:
        network: an :class:`~aqcf.networks.aqcfnet.AQCFNet` (or any module with ``forward_single``),
            left unchanged: a copy is exported in eval mode, its quaternion layers on the dense path and
            its instance norms as :class:`PreciseInstanceNorm`.
        modality: ``"ct"`` or ``"mri"``.
        out: the model file.
        fmt: ``"onnx"`` or ``"torchscript"``.

    Returns:
        What the file holds: ``{"format", "input", "output"}`` plus ``"opset"`` for ONNX.

    Raises:
        AqcfError: an unknown format, or ONNX without the ``onnx`` extra installed.
    """
    if fmt not in FORMATS:
        raise AqcfError(f"export format {fmt!r}: need one of {FORMATS}")
    if fmt == ONNX:
        _require_onnx()
    module = UnimodalNetwork(_export_copy(network).eval(), modality).eval()
    example = _example(network)
    divisor = int(getattr(network, "divisor", 1))
    info: dict = {"format": fmt}
    with warnings.catch_warnings():
        # the network records its gates in a Python attribute, and its input checks read sizes as
        # Python numbers; both are side issues for an inference graph, and exporters warn about each
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        if fmt == ONNX:
            batch = torch.export.Dim("batch", min=1)
            blocks = [torch.export.Dim(f"{axis}_blocks", min=1) for axis in "xyz"]
            dynamic = {"image": {0: batch, **{2 + i: divisor * b for i, b in enumerate(blocks)}}}
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic, verbose=False,
            )
            with atomic_path(out, suffix=".onnx") as tmp:
                # weights inside the one file (the paper network is 0.25 GB, ONNX's limit 2 GB)
                program.save(tmp, external_data=False)
            info["opset"] = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
        else:
            with torch.no_grad():
                traced = torch.jit.trace(module, (example,), check_trace=False)
            with atomic_path(out, suffix=".pt") as tmp:
                torch.jit.save(traced, str(tmp))
    info["input"] = {"name": INPUT_NAME, "shape": ["batch", int(example.shape[1]), "x", "y", "z"],
                     "dtype": "float32", "spatial_multiple": divisor}
    info["output"] = {"name": OUTPUT_NAME, "shape": ["batch", int(getattr(network, "num_classes", len(CLASS_NAMES))),
                                                     "x", "y", "z"], "dtype": "float32"}
    return info


def _aqcf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aqcf")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from aqcf import __version__

        return __version__


def export_settings(predictor, modality: str, model_info: dict, model_file: str | Path) -> dict:
    """The JSON written beside an exported model: everything needed to run it without aqcf.

    Args:
        predictor: the :class:`~aqcf.inference.predictor.Predictor` the model came from.
        modality: the exported modality.
        model_info: what :func:`export_network` returned.
        model_file: the exported file (its name is recorded).
    """
    preprocessing = dataclasses.asdict(predictor.preprocessing[modality])
    window = predictor.window
    network = predictor.network
    return {
        "model_file": Path(model_file).name,
        **model_info,
        "modality": modality,
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "class_convention": "output channel i is the logit of label i; the label map is the argmax over "
        "channels; liver (evaluation) = labels 1 and 2, tumor = label 2",
        "preprocessing": {
            **preprocessing,
            "steps": [
                f"reorient to {preprocessing['orientation']} (axis permutation and flips only)",
                "crop to the body: along each axis keep the slices with at least foreground_min_fraction of "
                "their voxels above foreground_threshold (null: the window's low end)",
                "resample to spacing (mm), linear",
                "clip to window and rescale linearly to [0, 1]",
                "zero-pad every axis symmetrically to a multiple of pad_multiple",
            ],
        },
        "sliding_window": {
            "roi_size": list(window.roi_size),
            "overlap": window.overlap,
            "mode": window.mode,
            "sigma_scale": GAUSSIAN_SIGMA_SCALE,
            "batch_size": window.batch_size,
            "note": "MONAI sliding_window_inference over the preprocessed volume (B, 1, X, Y, Z); "
            "windows smaller than the volume are zero-padded; logits are blended, then argmax",
        },
        "postprocessing": "labels are mapped back onto the scan's voxel grid by nearest neighbour in world "
        "coordinates (undoing pad, resampling, crop and reorientation); voxels outside the crop are 0",
        "network": {
            "class": f"{type(network).__module__}.{type(network).__qualname__}",
            "widths": list(getattr(network, "widths", ())),
            "quaternion_product": "dense",
            "parameters": sum(p.numel() for p in network.parameters()),
        },
        "checkpoint": predictor.source,
        "aqcf_version": _aqcf_version(),
        "torch_version": torch.__version__,
    }


def _exported_runner(path: Path, fmt: str) -> Callable[[Tensor], Tensor] | None:
    if fmt == TORCHSCRIPT:
        loaded = torch.jit.load(str(path), map_location="cpu")
        return lambda x: loaded(x)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    return onnx_window_predictor(path)


def _check_export(module: nn.Module, path: Path, fmt: str, window: Sequence[int]) -> dict | None:
    """Exported against PyTorch on a random window of the sliding-window size: largest logit difference
    and the fraction of voxels with the same label (argmax)."""
    run = _exported_runner(path, fmt)
    if run is None:
        return None
    image = torch.rand(1, 1, *window, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(image)
        got = run(image)
    return {
        "window": [1, 1, *map(int, window)],
        "max_abs_difference": float((got - expected).abs().max()),
        "label_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean()),
    }


def export_checkpoint(
    checkpoint: str | Path, fmt: str, modality: str, out: str | Path, check: bool = True
) -> tuple[Path, dict]:
    """Export a checkpoint's network for one modality and write the settings JSON beside it.

    Args:
        checkpoint: a checkpoint written by ``aqcf fit`` (loaded with
            :meth:`~aqcf.inference.predictor.Predictor.from_checkpoint`).
        fmt: ``"onnx"`` or ``"torchscript"``.
        modality: a modality the checkpoint was trained on.
        out: the model file; the settings go to :func:`settings_path` of it.
        check: run the exported model once against PyTorch on a random window of the sliding-window
            size and record the largest logit difference and the label agreement (``"check"``; skipped
            for ONNX without onnxruntime).

    Returns:
        The settings file and the settings.

    Raises:
        AqcfError: an unreadable checkpoint, a modality it was not trained on, a missing ONNX extra.
    """
    from aqcf.inference.predictor import Predictor

    if fmt not in FORMATS:
        raise AqcfError(f"export format {fmt!r}: need one of {FORMATS}")
    if fmt == ONNX:
        _require_onnx()
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    modality = predictor.check_modality(modality)
    out = Path(out)
    info = export_network(predictor.network, modality, out, fmt)
    settings = export_settings(predictor, modality, info, out)
    if check:
        report = _check_export(UnimodalNetwork(predictor.network, modality).eval(), out, fmt,
                               predictor.window.roi_size)
        if report is not None:
            settings["check"] = report
    target = settings_path(out)
    write_text_atomic(target, json.dumps(settings, indent=2, allow_nan=False) + "\n")
    return target, settings


def onnx_window_predictor(
    path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None
) -> Callable[[Tensor], Tensor]:
    """A window predictor backed by an onnxruntime session over a model written by ``aqcf export``.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers in order of preference (default the CPU).
        threads: onnxruntime's intra-op threads (``None``: its default, one per core).

    Returns:
        ``predict(image) -> logits``: float32 ``(B, 1, X, Y, Z)`` -> float32 ``(B, 3, X, Y, Z)`` on the
        image's device (computed by onnxruntime on its providers), for MONAI's ``sliding_window_inference``.

    Raises:
        AqcfError: onnxruntime not installed, or ``path`` missing or not an ONNX model.
    """
    path = Path(path)
    if importlib.util.find_spec("onnxruntime") is None:
        raise AqcfError(f"{path}: running an ONNX model needs onnxruntime ({_EXTRA_HINT})")
    import onnxruntime

    if not path.is_file():
        raise AqcfError(f"{path}: ONNX model not found")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise AqcfError(f"{path}: not a loadable ONNX model ({first_line(err)})") from err
    input_name = session.get_inputs()[0].name

    def predict(image: Tensor) -> Tensor:
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run(None, {input_name: array})
        return torch.from_numpy(logits).to(image.device)

    return predict


def _parser():
    from aqcf.errors import ArgumentParser

    p = ArgumentParser(
        prog="aqcf export",
        description="Export a checkpoint's unimodal network (eq. 17: the absent stream zero-filled inside the "
        "graph) as ONNX or TorchScript: input image (B, 1, X, Y, Z), output logits (B, 3, X, Y, Z), dynamic batch "
        "and spatial sizes (each a multiple of 16). Writes <out>.json beside it with the preprocessing, "
        "sliding-window settings, class names and shapes.",
    )
    p.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by aqcf fit (best.ckpt)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                   help="onnx (needs pip install 'aqcf[onnx]') or torchscript")
    p.add_argument("--modality", required=True, type=str.lower,
                   help="the modality the exported model segments: one the checkpoint was trained on (ct, mri, "
                   "or a named cohort such as t2)")
    p.add_argument("--out", required=True, type=Path, help="model file, e.g. model.onnx (settings: model.onnx.json)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the exported model once against PyTorch on a random window")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model and settings file")
    return p


def main(argv: list[str] | None = None) -> int:
    """``aqcf export --ckpt CKPT --format onnx|torchscript --modality ct|mri --out FILE``."""
    args = _parser().parse_args(argv)
    for target in (args.out, settings_path(args.out)):
        check_output(target, inputs=[args.ckpt], overwrite=args.overwrite)
    target, settings = export_checkpoint(args.ckpt, args.fmt, args.modality, args.out, check=not args.no_check)
    check = settings.get("check")
    verdict = (f"; against PyTorch on a {'x'.join(map(str, check['window'][2:]))} window: logits within "
               f"{check['max_abs_difference']:.1e}, labels {100 * check['label_agreement']:.3f}% equal"
               if check else "")
    print(f"wrote {args.out} ({args.fmt}, {settings['modality'].upper()}) and {target}{verdict}")
    return 0

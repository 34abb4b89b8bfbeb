"""Class-discriminative saliency for the tumor class (paper section 4.3, Figure 7): Grad-CAM and Grad-CAM++.

The CAM methods themselves are MONAI's (:class:`monai.visualize.GradCAM`, :class:`~monai.visualize.GradCAMpp`).
They explain a classifier: one scalar score per class. :class:`ClassScore` turns the segmentation network
into such a classifier: on the unimodal path (eq. 17, the absent stream zero-filled) it returns, for every
class, the mean logit over a region, by default the voxels the network itself labels tumor. Grad-CAM of
the tumor class then answers "which features make the network call these voxels tumor".

Why the mean and not the sum: MONAI's Grad-CAM++ multiplies its weights by ``exp(score)`` (the
exponential-score derivation of Chattopadhyay et al.). A sum over thousands of voxels overflows
``exp`` in float32; the mean is a logit-sized number. (For Grad-CAM the two differ by a positive factor,
which the normalisation removes.)

Where the region is empty (no voxel predicted tumor) the whole input is used instead, and
:attr:`ClassScore.last_fallback` says so.

Layers (:func:`available_layers`): the stem, the four encoder stages and the four decoder stages of the
explained stream, and the (shared) bottleneck. The default (:func:`default_layer`) is the last decoder
stage of the stream, the layer that feeds the 1×1×1 head: it is the stream's last convolutional layer
(the layer Selvaraju et al. recommend, the best compromise of semantics and spatial detail) and it has
the input's resolution, so nothing is lost to upsampling. Because the head is linear, Grad-CAM at this
layer equals the positive part of the tumor logit minus the head's bias, normalised: the network's own
tumor evidence. The bottleneck (``--layer bottleneck``) shows what the shared, modality-agnostic
representation uses, at 1/16 of the resolution.

The analysed window is cut by :mod:`aqcf.explain.windows`. The drawing (:func:`plot_saliency`,
:func:`case_map_grid`) is grouped at the end of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.visualize import GradCAM, GradCAMpp, ModelWithHooks
from torch import Tensor, nn

from aqcf.constants import FOREGROUND_CLASSES, check_modality
from aqcf.errors import AqcfError

__all__ = [
    "GRADCAM",
    "GRADCAMPP",
    "METHODS",
    "METHOD_LABELS",
    "TUMOR_CLASS",
    "PREDICTED",
    "VOLUME",
    "SCORE_REGIONS",
    "available_layers",
    "default_layer",
    "check_layer",
    "normalise_maps",
    "ClassScore",
    "TumorSaliency",
    "display_slice",
    "plot_saliency",
]

GRADCAM = "gradcam"
GRADCAMPP = "gradcampp"
METHODS = (GRADCAM, GRADCAMPP)
METHOD_LABELS = {GRADCAM: "Grad-CAM", GRADCAMPP: "Grad-CAM++"}
TUMOR_CLASS = FOREGROUND_CLASSES["tumor"]
PREDICTED = "predicted"
VOLUME = "volume"
SCORE_REGIONS = (PREDICTED, VOLUME)

# ClassScore holds the network under this attribute, so MONAI sees its layers as "network.<name>"
_PREFIX = "network."


# ------------------------------------------------------------------------------------------------ layers
def available_layers(network: nn.Module, modality: str) -> list[str]:
    """Names of the layers whose output can be explained for ``modality``, shallow to deep to output.

    Args:
        network: an :class:`~aqcf.networks.aqcfnet.AQCFNet` (``stems``, ``encoders``, ``bottleneck``,
            ``decoders`` per modality).
        modality: ``"ct"`` or ``"mri"``: only that stream's layers (and the bottleneck) lie on its
            unimodal path.

    Returns:
        ``stems.M``, ``encoders.M.0`` .. ``encoders.M.{n-1}``, ``bottleneck`` (``bottleneck.M`` when the
        bottleneck is not shared), ``decoders.M.stages.0`` .. ``decoders.M.stages.{n-1}`` (deepest first;
        the last one feeds the head).
    """
    m = check_modality(modality)
    try:
        stages = len(network.encoders[m])
        decoder_stages = len(network.decoders[m].stages)
    except (AttributeError, KeyError, TypeError) as err:
        raise AqcfError(f"{type(network).__name__}: not a two-stream A-QCF-Net (no {m} encoder/decoder)") from err
    bottleneck = "bottleneck" if isinstance(network.bottleneck, nn.Sequential) else f"bottleneck.{m}"
    return [
        f"stems.{m}",
        *(f"encoders.{m}.{s}" for s in range(stages)),
        bottleneck,
        *(f"decoders.{m}.stages.{s}" for s in range(decoder_stages)),
    ]


def default_layer(network: nn.Module, modality: str) -> str:
    """The last decoder stage of ``modality``'s stream, the input of its 1×1×1 head (see the module docstring)."""
    return available_layers(network, modality)[-1]


def check_layer(network: nn.Module, modality: str, layer: str | None) -> str:
    """Return ``layer`` (or the default when None) if it lies on ``modality``'s unimodal path.

    A layer is one of :func:`available_layers` or a submodule of one (``decoders.ct.stages.3.convs.0``).

    Raises:
        AqcfError: one line naming the available layers.
    """
    names = available_layers(network, modality)
    if layer is None:
        return names[-1]
    layer = str(layer)
    modules = dict(network.named_modules())
    if layer in modules and any(layer == n or layer.startswith(n + ".") for n in names):
        return layer
    raise AqcfError(
        f"layer {layer!r} is not on the {modality} stream's path; available layers: {', '.join(names)} "
        f"(or a submodule of one)"
    )


# ----------------------------------------------------------------------------------------------- scores
def normalise_maps(maps: Tensor) -> Tensor:
    """Scale each map of a batch linearly to [0, 1] (its minimum to 0, its maximum to 1).

    A constant map (e.g. all zero: no positive evidence) becomes all zero. MONAI's default
    post-processing maps the maximum to 0 instead, which would invert the heat maps.

    Args:
        maps: (B, 1, X, Y, Z) saliency after the ReLU.

    Returns:
        Tensor of the same shape with values in [0, 1].
    """
    flat = maps.detach().flatten(1)
    low = flat.min(dim=1).values
    span = flat.max(dim=1).values - low
    shape = (-1,) + (1,) * (maps.ndim - 1)
    scale = torch.where(span > 0, 1.0 / span.clamp_min(torch.finfo(span.dtype).tiny), torch.zeros_like(span))
    return ((maps.detach() - low.view(shape)) * scale.view(shape)).clamp(0.0, 1.0)


class ClassScore(nn.Module):
    """A segmentation network seen as a classifier: one score per class, as MONAI's CAM methods need.

    The network runs its unimodal path (``forward_single``, eq. 17: the absent stream zero-filled). The
    score of class ``c`` is the mean of the class-``c`` logits over a region: the voxels predicted
    ``region_class`` (``region="predicted"``), or every voxel (``region="volume"``). A sample whose
    predicted region is empty is averaged over every voxel.

    Args:
        network: a network with ``forward_single(x, modality) -> (B, C, X, Y, Z)`` logits.
        modality: ``"ct"`` or ``"mri"``.
        region: ``"predicted"`` or ``"volume"``.
        region_class: the class whose predicted voxels form the region (tumor, 2).

    Attributes:
        last_region_voxels: after a forward, the (B,) number of voxels averaged.
        last_fallback: after a forward, (B,) bool: the predicted region was empty, every voxel was used.
    """

    def __init__(
        self, network: nn.Module, modality: str, region: str = PREDICTED, region_class: int = TUMOR_CLASS
    ) -> None:
        super().__init__()
        if region not in SCORE_REGIONS:
            raise AqcfError(f"score region {region!r}: expected one of {SCORE_REGIONS}")
        self.network = network
        self.modality = check_modality(modality)
        self.region = region
        self.region_class = int(region_class)
        self.last_region_voxels = torch.zeros(0, dtype=torch.long)
        self.last_fallback = torch.zeros(0, dtype=torch.bool)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, 1, X, Y, Z) -> (B, C) per-class mean logits over the region."""
        logits = self.network.forward_single(x, self.modality)
        with torch.no_grad():
            if self.region == PREDICTED:
                region = logits.argmax(dim=1, keepdim=True) == self.region_class
            else:
                region = torch.ones_like(logits[:, :1], dtype=torch.bool)
            empty = ~region.flatten(1).any(dim=1)
            region[empty] = True
            weights = region.to(logits.dtype)
            count = weights.flatten(1).sum(dim=1)
        self.last_region_voxels = count.long().cpu()
        self.last_fallback = empty.cpu()
        return (logits * weights).flatten(2).sum(dim=2) / count[:, None]


class _LayerHooks(ModelWithHooks):
    """MONAI's hook wrapper for one layer, keeping the hook handles so that :meth:`remove` can undo them.

    (MONAI's own constructor registers hooks it never removes; a network explained many times, with
    several layers, would collect them.)
    """

    def __init__(self, module: nn.Module, layer: str) -> None:
        super().__init__(module, (), register_forward=True, register_backward=True)
        self.target_layers = (layer,)
        target = self.get_layer(layer)
        self.handles = [
            target.register_forward_hook(self.forward_hook(layer)),
            target.register_full_backward_hook(self.backward_hook(layer)),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.activations.clear()
        self.gradients.clear()


class TumorSaliency:
    """Grad-CAM / Grad-CAM++ maps of one class for one modality at one layer.

    Registers two hooks on ``layer`` for its lifetime; use it as a context manager, or call
    :meth:`close`, to remove them.

    Args:
        network: an :class:`~aqcf.networks.aqcfnet.AQCFNet`.
        modality: the input's modality; the other stream gets zeros (eq. 17).
        layer: the explained layer (:func:`available_layers`); None: :func:`default_layer`.
        region: where the class score is averaged: ``"predicted"`` tumor voxels or the whole ``"volume"``.
        target_class: the explained class (tumor, 2).

    Example::

        with TumorSaliency(net, "ct") as explain:
            maps = explain(window, "gradcampp")   # (B, X, Y, Z) in [0, 1]
    """

    def __init__(
        self,
        network: nn.Module,
        modality: str,
        layer: str | None = None,
        region: str = PREDICTED,
        target_class: int = TUMOR_CLASS,
    ) -> None:
        self.modality = check_modality(modality)
        self.layer = check_layer(network, self.modality, layer)
        self.target_class = int(target_class)
        self.score = ClassScore(network, self.modality, region, self.target_class)
        self._hooks = _LayerHooks(self.score, _PREFIX + self.layer)
        target = _PREFIX + self.layer
        self._cams = {
            GRADCAM: GradCAM(self._hooks, target, postprocessing=normalise_maps),
            GRADCAMPP: GradCAMpp(self._hooks, target, postprocessing=normalise_maps),
        }

    def __call__(self, x: Tensor, method: str = GRADCAMPP) -> Tensor:
        """Saliency of ``target_class`` for a batch of windows.

        Args:
            x: (B, 1, X, Y, Z) preprocessed input, each axis divisible by the network's ``divisor``.
            method: ``"gradcam"`` or ``"gradcampp"``.

        Returns:
            (B, X, Y, Z) float32 in [0, 1] on ``x``'s grid (maps of coarser layers are trilinearly
            upsampled by MONAI), each map scaled so that its maximum is 1 (all zero when the layer holds
            no positive evidence).
        """
        if method not in self._cams:
            raise AqcfError(f"saliency method {method!r}: expected one of {METHODS}")
        if not self._hooks.handles:
            raise AqcfError("this TumorSaliency was closed")
        with torch.enable_grad():
            if method == GRADCAMPP and x.shape[0] > 1:
                # MONAI's Grad-CAM++ broadcasts the (B,) score against the trailing axis of the
                # gradient, which is right only for B = 1: explain one sample at a time
                parts, voxels, fallback = [], [], []
                for sample in x:
                    parts.append(self._cams[method](sample[None], class_idx=self.target_class))
                    voxels.append(self.score.last_region_voxels)
                    fallback.append(self.score.last_fallback)
                maps = torch.cat(parts)
                self.score.last_region_voxels, self.score.last_fallback = torch.cat(voxels), torch.cat(fallback)
            else:
                maps = self._cams[method](x, class_idx=self.target_class)
        # the backward pass filled the parameters' .grad: free it, nothing will step on it
        self.score.zero_grad(set_to_none=True)
        return maps[:, 0].float()

    @property
    def activation(self) -> Tensor | None:
        """The explained layer's output in the last call, (B, C, ...)."""
        return self._hooks.activations.get(_PREFIX + self.layer)

    @property
    def gradient(self) -> Tensor | None:
        """The gradient of the class score with respect to the layer's output in the last call."""
        return self._hooks.gradients.get(_PREFIX + self.layer)

    def close(self) -> None:
        """Remove the hooks from the network."""
        self._hooks.remove()

    def __enter__(self) -> TumorSaliency:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- figures
HEAT_CMAP = "jet"  # the colour map of the Grad-CAM papers
HEAT_ALPHA = 0.45
PANEL_INCHES = 2.0
DPI = 100


def display_slice(slice_xy: np.ndarray, orientation: str) -> np.ndarray:
    """An (X, Y) slice in radiological view (:func:`aqcf.visualize.to_display`), or plainly transposed
    when the volume's first two axis codes are not R/L and A/P."""
    from aqcf.visualize import to_display

    try:
        return to_display(slice_xy, orientation)
    except AqcfError:
        return np.asarray(slice_xy).T


def case_map_grid(
    rows: Sequence[Mapping[str, object]],
    draw_map: Callable[..., None],
    what: str,
    title: str | None = None,
) -> Figure:
    """A figure with one row per case: the image, the ground truth, then one panel per map.

    Args:
        rows: one mapping per case with ``"name"`` (row label), ``"image"`` (X, Y) slice in [0, 1],
            ``"label"`` (X, Y) labels, ``"maps"`` ``{title: (X, Y) in [0, 1]}`` (the same titles in every
            row), ``"orientation"`` (axis codes, e.g. ``"RAS"``) and ``"spacing"`` (mm, for the pixel
            aspect).
        draw_map: ``draw_map(ax, heat, grey, label, orientation, aspect)`` draws one map panel, with
            ``heat`` and ``grey`` already in display orientation.
        what: the figure's name in the error for an empty ``rows``.
        title: optional figure title.

    Returns:
        A matplotlib figure on an Agg canvas (save it with :func:`aqcf.visualize.save_figure`).
    """
    from aqcf.visualize import overlay

    if not rows:
        raise AqcfError(f"{what}: no case to draw")
    map_titles = list(rows[0]["maps"])
    columns = ["image", "ground truth", *map_titles]
    first = np.asarray(rows[0]["image"])
    fig = Figure(
        figsize=(PANEL_INCHES * len(columns), PANEL_INCHES * len(rows) * first.shape[1] / first.shape[0] + 0.6),
        dpi=DPI,
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        orientation = str(row["orientation"])
        spacing = row.get("spacing")
        aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
        image = np.asarray(row["image"], dtype=np.float64)
        label = np.asarray(row["label"])
        grey = display_slice(image, orientation)
        for c, column in enumerate(columns):
            ax = axes[r, c]
            if column == "image":
                ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
            elif column == "ground truth":
                shown = overlay(image, label, window=(0.0, 1.0), orientation=orientation)
                ax.imshow(shown, aspect=aspect, interpolation="nearest")
            else:
                heat = display_slice(np.asarray(row["maps"][column]), orientation)
                draw_map(ax, heat, grey, label, orientation, aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column, fontsize=8)
            if c == 0:
                ax.set_ylabel(str(row["name"]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))
    return fig


def plot_saliency(rows: Sequence[Mapping[str, object]], title: str | None = None) -> Figure:
    """Figure 7: per row the image, the ground truth and the saliency heat maps of one case, one axial slice.

    Heat maps are drawn with the ``jet`` colour map over the grey image, the ground-truth tumor outlined
    in white. ``rows`` as in :func:`case_map_grid`.
    """

    def draw(ax, heat, grey, label, orientation, aspect) -> None:
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        ax.imshow(heat, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, alpha=HEAT_ALPHA, aspect=aspect)
        tumor = display_slice((label == TUMOR_CLASS).astype(float), orientation)
        if tumor.any():
            ax.contour(tumor, levels=[0.5], colors="white", linewidths=0.8)

    return case_map_grid(rows, draw, "saliency figure", title)

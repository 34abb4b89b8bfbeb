"""Class-discriminative saliency for the tumor class (paper section 4.3, Figure 7): Grad-CAM and Grad-CAM++.

The CAM methods themselves are MONAI's (:class:`monai.visualize.GradCAM`, :class:`~monai.visualize.GradCAMpp`);
they explain the per-class score of :class:`~aqcf.explain.scores.ClassScore` (the mean logit over the
predicted tumor) at a layer of :func:`~aqcf.explain.layers.available_layers`. :class:`TumorSaliency` holds
the hooks on that layer and gives maps on the input grid scaled to [0, 1].

The analysed window is cut by :mod:`aqcf.explain.windows`; the figures are drawn by
:mod:`aqcf.visualize.maps`.
"""

from __future__ import annotations

import torch
from monai.visualize import GradCAM, GradCAMpp, ModelWithHooks
from torch import Tensor, nn

from aqcf.constants import check_stream
from aqcf.errors import AqcfError
from aqcf.explain.layers import check_layer
from aqcf.explain.scores import PREDICTED, TUMOR_CLASS, ClassScore, normalise_maps

__all__ = ["GRADCAM", "GRADCAMPP", "METHODS", "METHOD_LABELS", "TumorSaliency"]

GRADCAM = "gradcam"
GRADCAMPP = "gradcampp"
METHODS = (GRADCAM, GRADCAMPP)
METHOD_LABELS = {GRADCAM: "Grad-CAM", GRADCAMPP: "Grad-CAM++"}

# ClassScore holds the network under this attribute, so MONAI sees its layers as "network.<name>"
_PREFIX = "network."


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
        layer: the explained layer (:func:`~aqcf.explain.layers.available_layers`); None: the default
            (:func:`~aqcf.explain.layers.default_layer`).
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
        self.modality = check_stream(modality, network)
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

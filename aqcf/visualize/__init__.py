"""Every picture of aqcf: label overlays, training curves, saliency and feature-map grids, charts.

A leaf of the package: it draws plain numpy arrays and rows with matplotlib's object API on an Agg
canvas (never ``pyplot``) and imports nothing of aqcf beyond :mod:`aqcf.errors`, :mod:`aqcf.constants`
and :mod:`aqcf.io`; callers turn tensors and their own records into arrays first.

* :mod:`~aqcf.visualize.canvas`: figures on an Agg canvas, PNG output, rendering to RGB.
* :mod:`~aqcf.visualize.overlays`: liver red, tumor blue over grey axial slices (Figures 5/6).
* :mod:`~aqcf.visualize.curves`: training curves from Lightning ``metrics.csv`` files (Figure 4).
* :mod:`~aqcf.visualize.maps`: image, ground truth and heat maps per case (Figures 7/8).
* :mod:`~aqcf.visualize.charts`: grouped bar and box charts (the report's Dice chart, the gate plot).
* :mod:`~aqcf.visualize.figures`: the ``aqcf figures curves|qualitative`` verb.
"""

from __future__ import annotations

__all__: list[str] = []  # import from the modules: aqcf.visualize.overlays, .canvas, ...

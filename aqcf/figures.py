"""The former home of the ``aqcf figures`` verb, now :mod:`aqcf.visualize.figures`."""

from __future__ import annotations

import sys

from aqcf.visualize import figures as _figures

# The very module under the old name, not a copy of its names: patching ``aqcf.figures.X``
# (as the error-contract tests do) must reach the verb's own globals.
sys.modules[__name__] = _figures

"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["AqcfError"]


class AqcfError(ValueError):
    """A problem with the user's input (a file, a flag, a config value).

    The message is a single line that names the offending file or value and what is wrong with it,
    e.g. ``"data/LiTS/segmentation-3.nii: label values {3} outside {0, 1, 2}"``. ``aqcf`` prints it
    as ``aqcf: error: <message>`` and exits with status 2; library callers can catch it as a
    ``ValueError``.
    """

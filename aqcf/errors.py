"""The error contract of every verb: one exception type, one argument parser, one line per problem.

A bad flag or value, a missing or unreadable input, an output that may not be written end with a single
line ``aqcf: error: <file or flag>: <what is wrong>`` on stderr and exit status 2, never a traceback.
The pieces every module shares live here, below everything else, so no verb imports the program's entry:

* :class:`AqcfError`: the user's input is wrong; its message is the line.
* :class:`ArgumentParser`: the verbs' parser; a bad argument prints the line and exits with status 2.
* :func:`first_line`: an exception's first line, for a message that quotes a library's reason.
* :func:`os_error_line`: the line of an ``OSError`` (the file it names and the system's reason).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["AqcfError", "ArgumentParser", "first_line", "one_line", "os_error_line"]


class AqcfError(ValueError):
    """A problem with the user's input (a file, a flag, a config value).

    The message is a single line that names the offending file or value and what is wrong with it,
    e.g. ``"data/LiTS/segmentation-3.nii: label values {3} outside {0, 1, 2}"``. ``aqcf`` prints it
    as ``aqcf: error: <message>`` and exits with status 2; library callers can catch it as a
    ``ValueError``.
    """


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (libraries put their reason there), else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def one_line(text: object) -> str:
    """``text`` with every run of whitespace, line breaks included, made one space."""
    return " ".join(str(text).split())


def os_error_line(err: OSError) -> str:
    """The one-line message of an ``OSError``: the file it names and the system's reason."""
    reason = err.strerror or str(err) or type(err).__name__
    if isinstance(err, FileNotFoundError):
        reason = "no such file or directory"
    elif isinstance(err, NotADirectoryError | FileExistsError) and err.filename is not None:
        # mkdir where a file is, or a path through a file
        reason = f"{reason} (a file stands where a folder is needed)"
    if err.filename is None:
        return reason
    names = [os.fsdecode(err.filename)] + ([os.fsdecode(err.filename2)] if err.filename2 is not None else [])
    return f"{' -> '.join(names)}: {reason}"


class ArgumentParser(argparse.ArgumentParser):
    """The verbs' argument parser: a bad argument ends with one line, ``aqcf: error: ...``, and exit code 2.

    Sub-parsers (``aqcf figures curves``) are of this class too (argparse makes them of the parent's).
    """

    def error(self, message: str):  # noqa: D401 - argparse's signature
        print(f"aqcf: error: {one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)

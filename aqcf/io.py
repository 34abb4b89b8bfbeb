"""Output files: atomic writes, NIfTI names and headers, and the one output policy of every verb that writes.

Atomic writes go to a temporary file in the destination's folder, renamed into place when complete: a
killed process therefore leaves either the previous file or the new one, never half of one (plus, after
a hard kill, a ``.<name>.*.tmp`` file that :func:`remove_stale_temporaries` clears). A failed write
(a full disk, ``OSError``) names the destination in the exception, not the temporary file.

The output policy (:func:`check_output`), checked before a verb does any work: an output that exists
is replaced only with ``--overwrite``; a path whose parent is a file, or an output that is or would
replace one of the verb's inputs, is refused even then; a file name made from user text
(:func:`safe_name`, :func:`child_path`) stays inside its output folder.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aqcf.errors import AqcfError

__all__ = [
    "atomic_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "save_nifti_atomic",
    "NIFTI_SUFFIXES",
    "is_nifti_name",
    "nifti_stem",
    "nifti_suffix",
    "nifti_image",
    "OUTPUT_KINDS",
    "check_output",
    "safe_name",
    "child_path",
    "remove_stale_temporaries",
]

TEMPORARY_SUFFIX = ".tmp"
#: ``file``: one file; ``folder``: a folder the verb writes named files into (or replaces as a whole);
#: ``cache``: a folder reused between runs, only checked for being a folder that can be made
OUTPUT_KINDS = ("file", "folder", "cache")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds, else delete it.

    Missing parent folders are created. The file gets the usual permissions (0666 less the umask), not
    the 0600 of a bare temporary file. ``suffix`` lets writers that infer a format from the name
    (nibabel: ``.nii.gz``) see the right one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        # a full disk surfaces in a write() call, whose error names no file: name the destination
        raise _naming(err, path) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` where it named nothing or the temporary file beside it."""
    named = err.filename
    if named is None or (isinstance(named, str | bytes) and Path(os.fsdecode(named)).name.startswith(f".{path.name}.")):
        err.filename = os.fspath(path)
        err.filename2 = None
    return err


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


#: the file endings of NIfTI-1 images, longest first so ``.nii.gz`` is matched before ``.nii``
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_name(path: str | os.PathLike) -> bool:
    """True when ``path``'s name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_suffix(path: str | os.PathLike) -> str:
    """``".nii.gz"`` or ``".nii"`` as ``path``'s name ends (in its own case), else ``""``."""
    name = Path(path).name
    return next((name[len(name) - len(s) :] for s in NIFTI_SUFFIXES if name.lower().endswith(s)), "")


def nifti_stem(path: str | os.PathLike) -> str:
    """``path``'s name less ``.nii.gz`` / ``.nii`` (``a/volume-3.nii.gz`` -> ``volume-3``); other names whole."""
    name = Path(path).name
    return name[: len(name) - len(nifti_suffix(name))]


def nifti_image(array, affine):
    """A NIfTI-1 image of ``array`` on ``affine`` as every writer here stores it.

    The qform and sform both hold ``affine`` with code 1 (scanner coordinates) and the units are mm,
    so nibabel, ITK and 3D Slicer all read the same geometry back.
    """
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def save_nifti_atomic(image, path: str | os.PathLike) -> Path:
    """Save a nibabel image to ``path`` (``.nii`` or ``.nii.gz``) atomically; returns the path."""
    import nibabel as nib

    # the temporary name tells nibabel whether to compress (it reads .gz in any case, as here)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, os.fspath(tmp))
    return Path(path)


# ----------------------------------------------------------------------------------------- output policy
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or ".")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    kind: str = "file",
    names: Sequence[str] | None = None,
    flag: str = "--overwrite",
) -> Path:
    """Refuse an output before any work starts; returns ``path``.

    Args:
        path: the output file or folder.
        inputs: the verb's input files and folders (``None`` entries are skipped).
        overwrite: the verb's ``--overwrite``: an existing output may be replaced.
        kind: one of :data:`OUTPUT_KINDS`.
        names: ``kind="folder"``: the files or sub-folders the verb writes into ``path`` (glob patterns
            allowed, e.g. ``table_*.csv``); ``None``: the folder is one output as a whole, and a
            non-empty folder counts as existing.
        flag: how the message spells the overwrite option (``--overwrite true`` for LightningCLI verbs).

    Raises:
        AqcfError: one line naming the path: a parent is a file; the path is a file where a folder is
            needed or the other way round; an output is, or would replace, an input (even with
            ``overwrite``); an output exists and ``overwrite`` is false; the folder is not writable.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {OUTPUT_KINDS}")
    path = Path(path)
    existing = _nearest_existing(path.absolute())
    if existing != path.absolute() and not existing.is_dir():
        raise AqcfError(f"{path}: {existing} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise AqcfError(f"{path}: is a folder; give a file name")
    if kind != "file" and path.exists() and not path.is_dir():
        raise AqcfError(f"{path}: exists and is not a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise AqcfError(f"{path}: cannot write into {existing} (permission denied)")
    if kind == "cache":
        return path

    resolved = path.resolve()
    for source in inputs:
        if source is None:
            continue
        source_resolved = Path(source).resolve()
        if kind == "file" or names is None:
            clash = _within(source_resolved, resolved)
        else:  # an input replaced if it is, or lies in, one of the named outputs
            clash = _within(source_resolved, resolved) and source_resolved != resolved and any(
                fnmatch.fnmatch(source_resolved.relative_to(resolved).parts[0], name) for name in names
            )
        if clash:
            raise AqcfError(f"{path}: would replace the input {source}; choose another output")

    if overwrite:
        return path
    if kind == "file":
        if path.exists() or path.is_symlink():
            raise AqcfError(f"{path}: exists; pass {flag} to replace it")
    elif names is None:
        if path.is_dir() and any(path.iterdir()):
            raise AqcfError(f"{path}: exists and is not empty; pass {flag} to replace it")
    elif path.is_dir():
        found = [p for name in names for p in sorted(path.glob(name))]
        if found:
            raise AqcfError(f"{path}: holds {found[0].name} already; pass {flag} to replace it")
    return path


def safe_name(text: str, what: str = "name") -> str:
    """``text`` if it can be (part of) a file name inside a folder, else :class:`AqcfError`.

    Refused: a path separator, a NUL byte, ``.`` and ``..``. An empty string is allowed (a suffix
    may be empty); :func:`child_path` refuses an empty name.
    """
    separators = {os.sep, "/", *([os.altsep] if os.altsep else [])}
    if any(sep in text for sep in separators) or "\0" in text or text in (".", ".."):
        raise AqcfError(f"{what} {text!r}: must be a plain file name (no path separators, not . or ..)")
    return text


def child_path(folder: str | os.PathLike, name: str, what: str = "name") -> Path:
    """``folder / name`` for a ``name`` built from user text; refuses one that would leave ``folder``."""
    if not name:
        raise AqcfError(f"{what} {name!r}: empty file name")
    return Path(folder) / safe_name(name, what)


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a killed :func:`atomic_path` left in ``folder``; returns them.

    Args:
        folder: where the writes went.
        pattern: which destination names to clear (e.g. ``"*.ckpt"``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in sorted(folder.glob(f".{pattern}.*{TEMPORARY_SUFFIX}")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed

"""Atomic writes: a failed write leaves the previous file, a finished one has ordinary permissions."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from aqcf.io import atomic_path, save_nifti_atomic, write_json_atomic, write_text_atomic


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_permissions_follow_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == '{\n  "x": 1\n}\n'


@pytest.mark.parametrize("name, gzipped", [("mask.nii.gz", True), ("MASK.NII.GZ", True), ("mask.nii", False),
                                           ("MASK.NII", False)])
def test_nifti_keeps_compression_suffix(tmp_path, name, gzipped):
    image = nib.Nifti1Image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.diag([2.0, 2.0, 3.0, 1.0]))
    path = save_nifti_atomic(image, tmp_path / name)
    assert path.name == name and (path.read_bytes()[:2] == b"\x1f\x8b") == gzipped  # gzip magic, as named
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.arange(24).reshape(2, 3, 4))

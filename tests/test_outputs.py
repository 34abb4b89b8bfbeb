"""The output policy of every verb that writes: existing outputs need --overwrite, inputs are never replaced,
paths through a file and names leaving their folder are refused, a full disk is one line naming the file."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from aqcf.cli import main
from aqcf.errors import AqcfError
from aqcf.io import check_output, child_path, safe_name, write_text_atomic
from tests.conftest import tiny_fit_args


def sha256(*paths: Path) -> dict[str, str]:
    """Checksums of files (every file below a folder)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``aqcf ARGV`` in this process: (exit code, stderr lines)."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argument errors exit from the parser
        code = exit_.code
    return code, capsys.readouterr().err.splitlines()


def one_error(code: int, err: list[str], *fragments: str) -> str:
    """The refusal contract: exit 2, exactly one stderr line ``aqcf: error: ...`` holding ``fragments``."""
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("aqcf: error: "), err
    assert "Traceback" not in err[0]
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


# ------------------------------------------------------------------------------------------ the policy
def test_check_output_kinds(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(AqcfError, match="blocker is a file, not a folder"):
        check_output(blocker / "sub" / "out.png")
    with pytest.raises(AqcfError, match="exists and is not a folder"):
        check_output(blocker, kind="folder")
    with pytest.raises(AqcfError, match="is a folder; give a file name"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(AqcfError, match="exists; pass --overwrite"):
        check_output(blocker)
    assert check_output(blocker, overwrite=True) == blocker
    # named outputs: only those count as existing, and only inputs inside them clash
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert check_output(folder, inputs=[folder / "notes.txt"], kind="folder", names=("report.md", "table_*.csv"))
    (folder / "table_ct.csv").write_text("old")
    with pytest.raises(AqcfError, match="holds table_ct.csv already; pass --overwrite true"):
        check_output(folder, kind="folder", names=("report.md", "table_*.csv"), flag="--overwrite true")
    with pytest.raises(AqcfError, match="would replace the input"):
        check_output(folder, inputs=[folder / "table_ct.csv"], overwrite=True, kind="folder", names=("table_*.csv",))
    with pytest.raises(AqcfError, match="exists and is not empty"):
        check_output(folder, kind="folder")
    # a cache folder may exist and hold anything; it must only be a folder
    assert check_output(folder, kind="cache") == folder
    with pytest.raises(AqcfError, match="exists and is not a folder"):
        check_output(blocker, kind="cache")


def test_input_clash_sees_through_links(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"scan")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scan)
    with pytest.raises(AqcfError, match="would replace the input"):
        check_output(link, inputs=[scan], overwrite=True)


@pytest.mark.parametrize("text", ["a/b", "../up", "..", ".", "x\0y"])
def test_names_from_user_text_stay_in_their_folder(tmp_path, text):
    with pytest.raises(AqcfError, match="plain file name"):
        safe_name(text, "--suffix")
    with pytest.raises(AqcfError):
        child_path(tmp_path, text)
    assert safe_name("") == "" and child_path(tmp_path, "_seg.nii.gz") == tmp_path / "_seg.nii.gz"


# ----------------------------------------------------------------------- every writing verb, parametrised
def _metrics_run(folder: Path) -> Path:
    path = folder / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text("epoch,step,train/loss,val/dice_mean\n0,1,0.9,\n0,1,,0.5\n1,2,0.7,\n1,2,,0.6\n")
    return path


def _summary_run(folder: Path) -> Path:
    summary = {"per_modality": {"ct": {"liver": {"dice": {"mean": 0.9, "std": None, "n": 2, "n_undefined": 0}}}}}
    path = folder / "fold0" / "test" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    return path


def _scores(path: Path) -> Path:
    path.write_text("case,reader1_score,reader2_score,reader1_acceptable,reader2_acceptable\n"
                    "c1,9,8,yes,yes\nc2,10,9,1,1\nc3,7,7,no,yes\n")
    return path


def _existing(path: Path, text: str = "an earlier result") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _case(verb: str, tmp: Path, phantoms: Path, run_dir: Path) -> tuple[list[str], Path, Path]:
    """(argv writing OUT, the output argument OUT, the file an earlier run left there)."""
    best = str(run_dir / "checkpoints" / "best.ckpt")
    scan, label = phantoms / "LiTS" / "volume-0.nii", phantoms / "LiTS" / "segmentation-0.nii"
    if verb == "synth":
        out = tmp / "cohorts"
        return ["synth", "--out", str(out), "--n-ct", "1", "--n-mri", "1", "--no-progress"], out, out / "notes.txt"
    if verb == "figures-curves":
        runs, out = tmp / "runs", tmp / "curves.png"
        _metrics_run(runs)
        return ["figures", "curves", str(runs), "--out", str(out)], out, out
    if verb == "figures-qualitative":
        out = tmp / "case.png"
        return ["figures", "qualitative", "--image", str(scan), "--gt", str(label), "--out", str(out)], out, out
    if verb == "reader-stats":
        out = tmp / "reader"
        return ["reader-stats", str(_scores(tmp / "scores.csv")), "--out", str(out)], out, out / "reader_study.md"
    if verb == "evaluate":
        out = tmp / "eval"
        argv = ["evaluate", "--pred", str(tmp), "--ref", str(phantoms / "LiTS"), "--ref-format", "lits",
                "--out", str(out), "--no-progress"]
        return argv, out, out / "summary.json"
    if verb == "report":
        runs, out = tmp / "full", tmp / "report"
        _summary_run(runs)
        return ["report", str(runs), "--out", str(out)], out, out / "report.md"
    if verb == "export-nnunet":
        out = tmp / "raw"
        argv = ["export-nnunet", str(phantoms / "LiTS"), "--format", "lits", "--modality", "ct", "--id", "7",
                "--name", "LiTS", "--out", str(out)]
        return argv, out, out / "Dataset007_LiTS" / "dataset.json"
    if verb == "segment":
        out = tmp / "masks"
        argv = ["segment", str(scan), "--modality", "ct", "--ckpt", best, "--out", str(out), "--no-progress"]
        return argv, out, out / "volume-0_seg.nii.gz"
    if verb == "explain":
        out = tmp / "explained"
        return ["explain", "--ckpt", best, "--out", str(out), "--no-progress"], out, out / "summary.json"
    if verb == "export":
        out = tmp / "model.pt"
        argv = ["export", "--ckpt", best, "--format", "torchscript", "--modality", "ct", "--out", str(out)]
        return argv, out, out
    if verb == "demo":
        out = tmp / "demo"
        return ["demo", "--out", str(out)], out, out / "notes.txt"
    root = tmp / "run"  # LightningCLI verbs
    if verb == "fit":
        return ["fit", *tiny_fit_args(phantoms, root)], root, root / "checkpoints" / "last.ckpt"
    if verb == "test":
        return ["test", *tiny_fit_args(phantoms, root, "--ckpt_path", best)], root, root / "test" / "metrics.csv"
    if verb == "predict":
        argv = ["predict", *tiny_fit_args(phantoms, root, "--ckpt_path", best)]
        return argv, root, root / "predictions" / "lits-0.nii.gz"
    raise AssertionError(verb)


WRITING_VERBS = ["synth", "figures-curves", "figures-qualitative", "reader-stats", "evaluate", "report",
                 "export-nnunet", "segment", "explain", "export", "demo", "fit", "test", "predict"]
LIGHTNING = {"fit", "test", "predict"}


def _with_out(argv: list[str], verb: str, out: Path) -> list[str]:
    """``argv`` with its output argument replaced by ``out``."""
    flag = "--trainer.default_root_dir" if verb in LIGHTNING else "--out"
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(out)
    return argv


@pytest.mark.parametrize("verb", WRITING_VERBS)
def test_existing_output_needs_overwrite(verb, tmp_path, tiny_phantoms, tiny_run, capsys):
    argv, out, earlier = _case(verb, tmp_path, tiny_phantoms, tiny_run)
    _existing(earlier)
    before = sha256(tmp_path)
    code, err = run(argv, capsys)
    line = one_error(code, err, "--overwrite true" if verb in LIGHTNING else "--overwrite")
    assert str(out) in line
    assert sha256(tmp_path) == before  # nothing written, nothing replaced


@pytest.mark.parametrize("verb", WRITING_VERBS)
def test_output_below_a_file_is_refused(verb, tmp_path, tiny_phantoms, tiny_run, capsys):
    argv, _, _ = _case(verb, tmp_path, tiny_phantoms, tiny_run)
    blocker = _existing(tmp_path / "blocker", "a user's file")
    before = sha256(tmp_path)
    code, err = run(_with_out(argv, verb, blocker / "out"), capsys)
    one_error(code, err, f"{blocker} is a file, not a folder")
    assert sha256(tmp_path) == before


@pytest.mark.parametrize("verb", ["synth", "reader-stats", "evaluate", "report", "segment", "explain", "demo",
                                  "fit", "test"])
def test_output_folder_that_is_a_file_is_refused(verb, tmp_path, tiny_phantoms, tiny_run, capsys):
    argv, _, _ = _case(verb, tmp_path, tiny_phantoms, tiny_run)
    blocker = _existing(tmp_path / "blocker", "a user's file")
    before = sha256(tmp_path)
    code, err = run(_with_out(argv, verb, blocker), capsys)
    one_error(code, err, f"{blocker}: exists and is not a folder")
    assert sha256(tmp_path) == before


def test_cache_folder_that_is_a_file_is_refused(tmp_path, tiny_phantoms, tiny_run, capsys):
    blocker = _existing(tmp_path / "cache", "a user's file")
    before = sha256(tmp_path)
    code, err = run(["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "run", "--data.cache_dir", str(blocker))],
                    capsys)
    one_error(code, err, f"{blocker}: exists and is not a folder")
    best = str(tiny_run / "checkpoints" / "best.ckpt")
    code, err = run(["explain", "--ckpt", best, "--out", str(tmp_path / "x"), "--ct-data",
                     str(tiny_phantoms / "LiTS"), "--cache", str(blocker), "--no-progress"], capsys)
    one_error(code, err, f"{blocker}: exists and is not a folder")
    assert sha256(tmp_path) == before


# ----------------------------------------------------------------------------- outputs that are inputs
def test_figure_never_replaces_its_scan(tmp_path, tiny_phantoms, capsys):
    scan = tmp_path / "volume-0.nii"
    shutil.copyfile(tiny_phantoms / "LiTS" / "volume-0.nii", scan)
    label = tiny_phantoms / "LiTS" / "segmentation-0.nii"
    before = sha256(tmp_path)
    argv = ["figures", "qualitative", "--image", str(scan), "--gt", str(label), "--out", str(scan), "--overwrite"]
    one_error(*run(argv, capsys), f"{scan}: would replace the input {scan}")
    metrics = _metrics_run(tmp_path / "runs")
    one_error(*run(["figures", "curves", str(tmp_path / "runs"), "--out", str(metrics), "--overwrite"], capsys),
              "would replace the input")
    assert sha256(scan) == before and metrics.read_text().startswith("epoch,step")


def test_segment_never_replaces_its_scan(tmp_path, tiny_phantoms, tiny_run, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copyfile(tiny_phantoms / "LiTS" / "volume-0.nii", scans / "case.nii")
    import nibabel as nib

    nib.save(nib.load(scans / "case.nii"), scans / "case.nii.gz")  # the mask name with --suffix ''
    (scans / "case.nii").unlink()
    before = sha256(tmp_path)
    best = str(tiny_run / "checkpoints" / "best.ckpt")
    argv = ["segment", str(scans / "case.nii.gz"), "--modality", "ct", "--ckpt", best, "--out", str(scans),
            "--suffix", "", "--overwrite", "--no-progress"]
    one_error(*run(argv, capsys), "would replace the input")
    assert sha256(tmp_path) == before


@pytest.mark.parametrize("suffix", ["/../../escaped", "_seg/x", ".."])
def test_segment_suffix_stays_in_the_output_folder(suffix, tmp_path, tiny_phantoms, tiny_run, capsys):
    best = str(tiny_run / "checkpoints" / "best.ckpt")
    out = tmp_path / "a" / "b" / "masks"
    argv = ["segment", str(tiny_phantoms / "LiTS" / "volume-0.nii"), "--modality", "ct", "--ckpt", best,
            "--out", str(out), "--suffix", suffix, "--no-progress"]
    one_error(*run(argv, capsys), "--suffix", "plain file name")
    assert list(tmp_path.rglob("*")) == []  # nothing written, in the folder or outside it


def test_export_never_writes_into_its_cohort(tmp_path, tiny_phantoms, capsys):
    dataset = tmp_path / "raw" / "Dataset007_LiTS"
    cohort = dataset / "LiTS"
    shutil.copytree(tiny_phantoms / "LiTS", cohort)
    before = sha256(tmp_path)
    argv = ["export-nnunet", str(cohort), "--format", "lits", "--modality", "ct", "--id", "7", "--name", "LiTS",
            "--out", str(tmp_path / "raw"), "--overwrite"]
    one_error(*run(argv, capsys), "would replace the input")
    assert sha256(tmp_path) == before


# --------------------------------------------------------------------------------- overwrite and disks
def test_overwrite_replaces_a_figure(tmp_path, capsys):
    _metrics_run(tmp_path / "runs")
    out = _existing(tmp_path / "curves.png")
    assert run(["figures", "curves", str(tmp_path / "runs"), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    runs, out = tmp_path / "full", tmp_path / "report"
    _summary_run(runs)
    write_text_atomic(out / "report.md", "the earlier report\n")
    before = sha256(tmp_path)

    def full_disk(self, data):  # what write() does on a full disk: an OSError naming no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    code, err = run(["report", str(runs), "--out", str(out), "--overwrite"], capsys)
    line = one_error(code, err, "No space left on device", str(out))
    assert ".tmp" not in line  # the destination is named, not the temporary file
    monkeypatch.undo()
    assert sha256(tmp_path) == before  # the earlier report is intact, no temporary file is left

"""Five patient-level folds, stratified by tumor presence, stored in nnU-Net's splits_final.json format."""

from __future__ import annotations

import json
import os

import pytest

from aqcf.data.splits import load_or_create_splits, make_splits
from aqcf.errors import AqcfError

IDS = [f"lits-{i}" for i in range(50)]
# Every fifth case is tumor-free: 10 of 50.
TUMOR = [i % 5 != 0 for i in range(50)]


def test_every_case_validates_exactly_once_and_never_trains_on_itself():
    splits = make_splits(IDS, TUMOR, n_folds=5, seed=0)
    assert len(splits) == 5
    val_sets = [set(f["val"]) for f in splits]
    assert sorted(i for v in val_sets for i in v) == sorted(IDS)  # each id in exactly one val fold
    for fold in splits:
        assert not set(fold["train"]) & set(fold["val"])
        assert set(fold["train"]) | set(fold["val"]) == set(IDS)
        assert len(fold["val"]) == 10


def test_tumor_free_cases_spread_over_folds():
    splits = make_splits(IDS, TUMOR, n_folds=5, seed=3)
    free = {i for i, t in zip(IDS, TUMOR, strict=True) if not t}
    assert [len(free & set(f["val"])) for f in splits] == [2, 2, 2, 2, 2]
    # 7 tumor-free among 23: each fold gets 1 or 2 of them, and sizes differ by at most one
    ids, tumor = IDS[:23], [i >= 7 for i in range(23)]
    splits = make_splits(ids, tumor, n_folds=5, seed=1)
    counts = [len({ids[i] for i in range(7)} & set(f["val"])) for f in splits]
    assert sorted(counts) == [1, 1, 1, 2, 2]
    assert max(len(f["val"]) for f in splits) - min(len(f["val"]) for f in splits) <= 1


def test_deterministic_by_seed_and_independent_of_input_order():
    a = make_splits(IDS, TUMOR, seed=7)
    assert make_splits(IDS, TUMOR, seed=7) == a
    order = list(reversed(range(50)))
    assert make_splits([IDS[i] for i in order], [TUMOR[i] for i in order], seed=7) == a
    assert make_splits(IDS, TUMOR, seed=8) != a


def test_too_few_cases_and_bad_input():
    with pytest.raises(AqcfError, match="4 cases cannot fill 5 folds"):
        make_splits(IDS[:4], TUMOR[:4], n_folds=5)
    with pytest.raises(AqcfError, match="appears twice"):
        make_splits(["a", "a", "b"], [True, True, False], n_folds=2)
    with pytest.raises(AqcfError, match="at least 2"):
        make_splits(IDS, TUMOR, n_folds=1)


def test_splits_file_written_once_in_nnunet_format_and_reused(tmp_path):
    path = tmp_path / "ct" / "splits.json"
    splits = load_or_create_splits(path, IDS, TUMOR, n_folds=5, seed=0)
    on_disk = json.loads(path.read_text())
    assert isinstance(on_disk, list) and all(set(f) == {"train", "val"} for f in on_disk)
    assert on_disk == splits
    stamp = os.stat(path).st_mtime_ns
    # The file is the source of truth: another seed reads the same folds and leaves the file alone.
    assert load_or_create_splits(path, IDS, TUMOR, n_folds=5, seed=99) == splits
    assert os.stat(path).st_mtime_ns == stamp


def test_splits_file_for_another_cohort_is_a_clear_error(tmp_path):
    path = tmp_path / "splits.json"
    load_or_create_splits(path, IDS, TUMOR, n_folds=5)
    with pytest.raises(
        AqcfError, match=r"splits\.json: fold 0 lacks 1 of this cohort's cases .*another case list"
    ):
        load_or_create_splits(path, IDS + ["lits-50"], TUMOR + [True], n_folds=5)
    with pytest.raises(AqcfError, match="5 folds, but 3 were asked for"):
        load_or_create_splits(path, IDS, TUMOR, n_folds=3)
    path.write_text("[{")
    with pytest.raises(AqcfError, match="not valid JSON"):
        load_or_create_splits(path, IDS, TUMOR)
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["b"]}]))
    with pytest.raises(AqcfError, match="'b' is in both train and val of fold 1"):
        load_or_create_splits(path, ["a", "b"], [True, False], n_folds=2)


def test_inner_validation_is_a_stratified_part_of_each_training_fold(tmp_path):
    ids = [f"c{i}" for i in range(20)]
    tumor = [i % 2 == 0 for i in range(20)]
    flags = dict(zip(ids, tumor, strict=True))
    path = tmp_path / "splits.json"
    plain = load_or_create_splits(path, ids, tumor, n_folds=5)
    assert all("inner_val" not in f for f in json.loads(path.read_text()))
    folds = load_or_create_splits(path, ids, tumor, n_folds=5, inner_folds=4)
    stored = json.loads(path.read_text())
    for fold, before, saved in zip(folds, plain, stored, strict=True):
        assert (fold["train"], fold["val"]) == (before["train"], before["val"])  # the folds are unchanged
        inner = fold["inner_val"]
        assert set(inner) <= set(fold["train"]) and len(inner) == 16 // 4
        assert sum(flags[i] for i in inner) == 2  # half the training cases have a tumor: half of these
        assert saved["inner_val"] == inner and saved["inner_folds"] == 4
    assert [f["inner_val"] for f in load_or_create_splits(path, ids, tumor, n_folds=5, inner_folds=4)] == [
        f["inner_val"] for f in folds
    ]
    with pytest.raises(AqcfError, match="inner_folds"):
        load_or_create_splits(path, ids, tumor, n_folds=5, inner_folds=3)

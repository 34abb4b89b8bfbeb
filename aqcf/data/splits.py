"""Patient-level cross-validation folds, stratified by tumor presence (paper §3.1.1, §4.1.1).

Folds are stored in nnU-Net's ``splits_final.json`` format, a list with one ``{"train": [...],
"val": [...]}`` per fold, so the same file can be handed to nnU-Net to train a baseline on identical
folds. Fold ``k`` validates (and tests) on its ``val`` cases and trains on the others. Each case is
taken to be one patient (true of LiTS and ATLAS).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aqcf.errors import AqcfError
from aqcf.io import write_json_atomic

__all__ = ["make_splits", "load_or_create_splits", "check_splits"]


def make_splits(
    case_ids: Sequence[str], has_tumor: Sequence[bool], n_folds: int = 5, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Split cases into ``n_folds`` folds, stratified by tumor presence.

    Within each stratum (with tumor, without) the cases are shuffled by ``seed`` and dealt to the
    folds in turn; the dealing continues across strata, so fold sizes differ by at most one and each
    stratum is spread as evenly as its size allows. The result does not depend on the input order.

    Args:
        case_ids: Unique case (patient) ids.
        has_tumor: Whether each case has a tumor voxel.
        n_folds: Number of folds (at least 2, at most the number of cases).
        seed: Seed of the shuffle.

    Returns:
        ``n_folds`` dicts ``{"train": sorted ids, "val": sorted ids}``.

    Raises:
        AqcfError: Fewer cases than folds, fewer than 2 folds, duplicate ids or mismatched lengths.
    """
    ids = [str(i) for i in case_ids]
    if len(ids) != len(has_tumor):
        raise AqcfError(f"splits: {len(ids)} case ids but {len(has_tumor)} tumor flags")
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise AqcfError(f"splits: case id {duplicate!r} appears twice")
    if n_folds < 2:
        raise AqcfError(f"splits: {n_folds} folds; need at least 2")
    if len(ids) < n_folds:
        raise AqcfError(
            f"splits: {len(ids)} cases cannot fill {n_folds} folds; need at least one case per fold"
        )

    rng = np.random.default_rng(seed)
    flags = dict(zip(ids, (bool(t) for t in has_tumor), strict=True))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    position = 0
    for stratum in (True, False):
        members = sorted(i for i in ids if flags[i] is stratum)
        for index in rng.permutation(len(members)):
            folds[position % n_folds].append(members[index])
            position += 1
    return [{"train": sorted(i for i in ids if i not in set(val)), "val": sorted(val)} for val in folds]


def check_splits(splits, case_ids: Sequence[str], n_folds: int, source: str | Path = "splits") -> None:
    """Check that ``splits`` are ``n_folds`` folds over exactly ``case_ids``.

    Raises:
        AqcfError: Not a list of ``{"train", "val"}`` dicts, a different number of folds, a case in
            two validation folds, or validation sets that do not cover exactly ``case_ids``.
    """
    if not isinstance(splits, list) or not all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list)
        for f in splits
    ):
        raise AqcfError(f'{source}: not a list of {{"train": [...], "val": [...]}} folds')
    if len(splits) != n_folds:
        raise AqcfError(f"{source}: {len(splits)} folds, but {n_folds} were asked for")
    expected = {str(i) for i in case_ids}
    seen: set[str] = set()
    for k, fold in enumerate(splits):
        val, train = set(map(str, fold["val"])), set(map(str, fold["train"]))
        if train & val:
            raise AqcfError(f"{source}: case {sorted(train & val)[0]!r} is in both train and val of fold {k}")
        if seen & val:
            raise AqcfError(f"{source}: case {sorted(seen & val)[0]!r} is in more than one validation fold")
        seen |= val
        if train | val != expected:
            missing, unknown = sorted(expected - (train | val)), sorted((train | val) - expected)
            example = ", ".join((missing + unknown)[:3])
            raise AqcfError(
                f"{source}: fold {k} lacks {len(missing)} of this cohort's cases and has {len(unknown)} "
                f"unknown ids (e.g. {example}); it was made for another case list: delete it or choose "
                "another splits folder"
            )
    if seen != expected:
        raise AqcfError(f"{source}: cases {', '.join(sorted(expected - seen)[:3])} are in no validation fold")


def load_or_create_splits(
    path: str | Path, case_ids: Sequence[str], has_tumor: Sequence[bool], n_folds: int = 5, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Read the folds from ``path`` (``splits.json``), creating it with :func:`make_splits` if absent.

    Once written, the file is the source of truth: later runs read it (a changed ``seed`` does not
    redraw folds), and it can be copied to nnU-Net as ``splits_final.json``.

    Raises:
        AqcfError: The file exists but is unreadable or does not match ``case_ids`` / ``n_folds``.
    """
    path = Path(path)
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except ValueError as err:
            raise AqcfError(f"{path}: not valid JSON ({err})") from err
        check_splits(splits, case_ids, n_folds, path)
        return [{"train": list(map(str, f["train"])), "val": list(map(str, f["val"]))} for f in splits]
    splits = make_splits(case_ids, has_tumor, n_folds, seed)
    write_json_atomic(path, splits, indent=1)
    return splits

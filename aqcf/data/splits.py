"""Patient-level cross-validation folds, stratified by tumor presence (paper §3.1.1, §4.1.1).

Folds are stored in nnU-Net's ``splits_final.json`` format, a list with one ``{"train": [...],
"val": [...]}`` per fold, so the same file can be handed to nnU-Net to train a baseline on identical
folds. Fold ``k`` tests on its ``val`` cases (nnU-Net's name for the held-out fold) and trains on the
others. Each case is taken to be one patient (true of LiTS and ATLAS).

Model selection needs validation cases too. Under the default protocol they are an *inner* validation
set carved from each fold's training cases (:func:`add_inner_validation`: fold 0 of a stratified split
of the training cases into ``inner_folds`` parts), stored in the same file as ``"inner_val"`` with
``"inner_folds"`` beside it; nnU-Net ignores both keys. The test fold is then read by ``aqcf test``
alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aqcf.errors import AqcfError
from aqcf.io import write_json_atomic

__all__ = ["make_splits", "add_inner_validation", "load_or_create_splits", "check_splits", "PROTOCOLS"]

PROTOCOLS = ("inner", "heldout")
"""``inner``: select on an inner validation set from the training folds (the test fold stays untouched);
``heldout``: the paper's reading, the held-out fold both selects the model and tests it."""


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


def add_inner_validation(
    splits: Sequence[dict], has_tumor: dict[str, bool], inner_folds: int = 5, seed: int = 0
) -> list[dict]:
    """Give each fold an inner validation set carved from its training cases.

    Args:
        splits: Folds ``{"train", "val"}``.
        has_tumor: Tumor presence per case id (the stratification).
        inner_folds: The inner set is fold 0 of a stratified split of the fold's training cases into
            this many parts (5: a fifth of them, at least one case).
        seed: Seed of the split (fold ``k`` uses ``seed + k``).

    Returns:
        Copies of the folds with ``"inner_val"`` (sorted ids, a subset of ``"train"``) and
        ``"inner_folds"``.

    Raises:
        AqcfError: A fold has fewer training cases than ``inner_folds`` allows (at least 2 per part).
    """
    out = []
    for k, fold in enumerate(splits):
        train = list(fold["train"])
        parts = min(int(inner_folds), len(train))
        if parts < 2:
            raise AqcfError(
                f"splits: fold {k} has {len(train)} training cases; an inner validation set needs at least 2"
            )
        inner = make_splits(train, [has_tumor[i] for i in train], parts, seed + k)[0]["val"]
        out.append({**fold, "inner_val": sorted(inner), "inner_folds": int(inner_folds)})
    return out


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
    path: str | Path,
    case_ids: Sequence[str],
    has_tumor: Sequence[bool],
    n_folds: int = 5,
    seed: int = 0,
    inner_folds: int | None = None,
) -> list[dict[str, list[str]]]:
    """Read the folds from ``path`` (``splits.json``), creating it with :func:`make_splits` if absent.

    Once written, the file is the source of truth: later runs read it (a changed ``seed`` does not
    redraw folds), and it can be copied to nnU-Net as ``splits_final.json``. With ``inner_folds``, each
    fold also carries its inner validation set (:func:`add_inner_validation`); a file without them gets
    them added (the folds unchanged) and is rewritten.

    Raises:
        AqcfError: The file exists but is unreadable, does not match ``case_ids`` / ``n_folds``, or holds
            inner validation sets made with another ``inner_folds``.
    """
    path = Path(path)
    flags = dict(zip(map(str, case_ids), (bool(t) for t in has_tumor), strict=True))
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError as err:
            raise AqcfError(f"{path}: not valid JSON ({err})") from err
        check_splits(stored, case_ids, n_folds, path)
        splits = [
            {"train": list(map(str, f["train"])), "val": list(map(str, f["val"]))}
            | ({"inner_val": list(map(str, f["inner_val"])), "inner_folds": f.get("inner_folds")}
               if "inner_val" in f else {})
            for f in stored
        ]
    else:
        splits = make_splits(case_ids, has_tumor, n_folds, seed)
        write_json_atomic(path, splits, indent=1)
    if inner_folds is None:
        return splits
    if all("inner_val" in f for f in splits):
        recorded = {f.get("inner_folds") for f in splits}
        if recorded != {int(inner_folds)}:
            raise AqcfError(
                f"{path}: inner validation sets made with inner_folds {sorted(map(str, recorded))}, not "
                f"{inner_folds}; delete the file's inner_val entries, or set data.inner_folds to match"
            )
        for k, f in enumerate(splits):
            if not set(f["inner_val"]) <= set(f["train"]):
                raise AqcfError(f"{path}: fold {k}'s inner_val holds cases outside its train list")
        return splits
    splits = add_inner_validation([{"train": f["train"], "val": f["val"]} for f in splits], flags, inner_folds, seed)
    write_json_atomic(path, splits, indent=1)
    return splits

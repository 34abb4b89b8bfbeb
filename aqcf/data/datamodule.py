"""``UnpairedDataModule``: two cohorts, two TorchIO queues, one unpaired batch per step (paper §3.1).

Each training batch is ``{"ct": {"image", "label", "id"}, "mri": {"image", "label", "id"}}`` with
``image`` (B, 1, X, Y, Z) float32 in [0, 1], ``label`` (B, 1, X, Y, Z) uint8 in {0, 1, 2} (an eighth of
int64's bytes to collate and copy to the GPU; the module casts it for the loss) and ``id`` the
B source case ids; B is ``batch_pairs``. The CT and MRI patches come from two independent queues, so
which CT subject meets which MRI subject is random (eq. 1). With ``paired_root`` and ``paired_ratio > 0``
a share of the batches comes from paired patients instead (:mod:`aqcf.data.paired`): same structure,
but the CT and MRI of each pair are one patient's, on its CT grid, at one location. Validation, test
and prediction yield whole preprocessed volumes, one at a time, CT cases first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from aqcf.constants import CT, IMAGE, LABEL, MODALITIES, MRI, check_modality, check_name
from aqcf.data.augment import build_augmentation
from aqcf.data.cache import Manifest, preprocess_cohort
from aqcf.data.cohorts import read_cohort
from aqcf.data.patches import CachedPatchSampler, DrawPatches
from aqcf.data.preprocess import DEFAULT_LABELS, PreprocessSettings, label_mapping
from aqcf.data.splits import PROTOCOLS, load_or_create_splits
from aqcf.errors import AqcfError

__all__ = [
    "UnpairedDataModule",
    "Cohort",
    "DEFAULT_LABEL_PROBABILITIES",
    "cohorts_from_hparams",
    "preprocess_settings_from_hparams",
]

DEFAULT_LABEL_PROBABILITIES = {0: 0.2, 1: 0.4, 2: 0.4}
"""Probability that a training patch is centred on background, liver, tumor. Labels absent from a
volume are skipped and the rest renormalised (a tumor-free case: 1/3 background, 2/3 liver)."""


DEFAULT_FORMATS = {CT: "lits", MRI: "atlas"}
"""Layout of a cohort named ``ct`` / ``mri`` when neither ``format`` nor ``<name>_format`` says (others: nnunet)."""


@dataclass(frozen=True)
class Cohort:
    """One training cohort: its stream name, where it lies, how it is read and preprocessed.

    ``spacing``, ``window`` and ``orientation`` left ``None`` take the data module's ``<name>_*`` field
    for a cohort named ``ct`` or ``mri``, and the ``mri_*`` field for any other name (a further MRI
    cohort such as T2), then :meth:`PreprocessSettings.default`. ``labels`` is the cohort's label
    convention, ``(mask value, class)`` pairs (:func:`aqcf.data.preprocess.label_mapping`), applied to
    the label maps of ``root`` and ``test_root`` alike.
    """

    name: str
    root: str
    format: str = "nnunet"
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    orientation: str | None = None
    test_root: str | None = None
    test_format: str = "nnunet"
    labels: tuple[tuple[int, int], ...] = tuple(DEFAULT_LABELS.items())


COHORT_KEYS = tuple(f.name for f in dataclasses.fields(Cohort))


def _legacy_cohort(hparams, name: str) -> dict:
    """The ``ct_*`` / ``mri_*`` fields of cohort ``name`` (``mri_*`` for a name other than ct / mri)."""
    style = name if name in MODALITIES else MRI
    return {
        "spacing": hparams.get(f"{style}_spacing"),
        "window": hparams.get(f"{style}_window"),
        "orientation": hparams.get(f"{style}_orientation"),
        "format": hparams.get(f"{name}_format", DEFAULT_FORMATS.get(name, "nnunet")),
        "test_root": hparams.get(f"test_{name}_root"),
        "test_format": hparams.get(f"test_{name}_format", "nnunet"),
    }


def cohorts_from_hparams(hparams) -> tuple[Cohort, ...]:
    """The training cohorts a data module's hyper-parameters declare, in stream order.

    ``cohorts`` when given (a list of mappings with the keys of :class:`Cohort`); otherwise the CT and
    MRI cohorts of the ``ct_*`` / ``mri_*`` fields (a ``None`` root: no such cohort), which is what
    every config and checkpoint written before ``cohorts`` existed holds.

    Args:
        hparams: ``UnpairedDataModule.hparams``, or a checkpoint's ``"datamodule_hyper_parameters"``.
    """
    given = hparams.get("cohorts")
    if given is None:
        return tuple(
            Cohort(name=m, root=hparams[f"{m}_root"], **_legacy_cohort(hparams, m))
            for m in MODALITIES
            if hparams.get(f"{m}_root") is not None
        )
    cohorts = []
    for i, entry in enumerate(given):
        entry = dict(entry) if isinstance(entry, dict) else dataclasses.asdict(entry)
        unknown = sorted(set(entry) - set(COHORT_KEYS))
        if unknown or entry.get("name") is None or entry.get("root") is None:
            problem = f"unknown key {unknown[0]!r}" if unknown else "needs a name and a root"
            raise AqcfError(f"data.cohorts[{i}]: {problem}; keys: {', '.join(COHORT_KEYS)}")
        name = check_name(entry["name"])
        values = _legacy_cohort(hparams, name) | {k: v for k, v in entry.items() if v is not None}
        values["labels"] = tuple(label_mapping(entry.get("labels"), f"data.cohorts[{i}].labels").items())
        cohorts.append(Cohort(**{**values, "name": name, "root": str(entry["root"])}))
    names = [c.name for c in cohorts]
    if not names or len(set(names)) != len(names):
        raise AqcfError(f"data.cohorts names {names}: need at least one cohort, each name once")
    return tuple(cohorts)


def preprocess_settings_from_hparams(hparams, modality: str) -> PreprocessSettings:
    """A modality's preprocessing from the data module's hyper-parameters.

    Args:
        hparams: ``UnpairedDataModule.hparams``, or the ``"datamodule_hyper_parameters"`` dict of a
            Lightning checkpoint (what ``aqcf segment`` reads).
        modality: ``"ct"``, ``"mri"`` or the name of one of ``cohorts``.
    """
    cohorts = {c.name: c for c in cohorts_from_hparams(hparams)}
    modality = check_modality(modality, tuple(dict.fromkeys([*MODALITIES, *cohorts])))
    knobs = cohorts[modality] if modality in cohorts else Cohort(modality, "", **_legacy_cohort(hparams, modality))
    return PreprocessSettings.default(
        modality,
        orientation=knobs.orientation,
        window=tuple(knobs.window) if knobs.window is not None else None,
        spacing=tuple(knobs.spacing) if knobs.spacing is not None else None,
        pad_multiple=hparams.get("pad_multiple"),
    )


@contextlib.contextmanager
def _numpy_state_kept():
    """Restore NumPy's and Python's global random states on exit."""
    state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(state)
        random.setstate(py_state)


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` unless torch.distributed runs with several processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _PatchStream(Dataset):
    """Patches popped from a TorchIO queue, augmented and turned into plain tensors."""

    def __init__(self, queue, augment):
        self.queue = queue
        self.augment = augment

    def __len__(self) -> int:
        return len(self.queue)

    def __getitem__(self, index: int) -> dict:
        import torchio as tio

        patch = self.queue[index]
        sample = {
            IMAGE: patch[IMAGE][tio.DATA].float(),
            LABEL: patch[LABEL][tio.DATA],
            "id": patch["id"],
        }
        if self.augment is not None:
            return self.augment(sample)
        return {**sample, LABEL: sample[LABEL].to(torch.uint8)}


class _EpochSampler(Sampler):
    """Sequential indices over the patch stream; forwards ``set_epoch`` to the queue's subject sampler.

    Lightning calls ``set_epoch`` on a train loader's sampler at each epoch start, which is how the
    per-rank subject order changes between epochs under DDP.
    """

    def __init__(self, stream: _PatchStream, subject_sampler=None):
        self.stream = stream
        self.subject_sampler = subject_sampler

    def __iter__(self):
        return iter(range(len(self.stream)))

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int) -> None:
        if self.subject_sampler is not None:
            self.subject_sampler.set_epoch(epoch)


class _Volumes(Dataset):
    """Whole preprocessed volumes: ``{"image", "label"?, "modality", "id", "spacing", "record"?}``."""

    def __init__(self, entries: Sequence[dict], with_record: bool = False):
        self.entries = list(entries)
        self.with_record = with_record

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        import nibabel as nib

        entry = self.entries[index]
        image = nib.load(entry[IMAGE])
        item = {
            IMAGE: torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32).copy())[None],
            "modality": entry["modality"],
            "id": entry["id"],
            # voxel size in mm of the preprocessed grid: surface distances are reported in mm
            "spacing": tuple(float(s) for s in image.header.get_zooms()[:3]),
        }
        if entry.get(LABEL):
            label = np.asarray(nib.load(entry[LABEL]).dataobj, dtype=np.int64)
            item[LABEL] = torch.from_numpy(label)[None]
        if self.with_record:
            item["record"] = entry
        return item


def _collate_volumes(items: list[dict]) -> dict:
    """Stack tensors; keep strings and records as lists (default_collate would mangle the records)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def _subject_sampler(dataset, rank: int, world: int, seed: int):
    """Under DDP (``world > 1``) a ``DistributedSampler`` giving each rank its own subjects; else ``None``."""
    from torch.utils.data.distributed import DistributedSampler

    if world <= 1:
        return None
    return DistributedSampler(
        dataset,
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=len(dataset) >= world,
    )


def _check_settings(hp) -> None:
    """Refuse data-module settings that cannot work together (before any cohort is read).

    Args:
        hp: ``UnpairedDataModule.hparams``.

    Raises:
        AqcfError: ``cohorts`` beside ``ct_root`` / ``mri_root``, no cohort, an unknown protocol, a fold
            outside ``n_folds``, a bad patch size or count, or a paired share without a paired cohort.
    """
    if hp.cohorts is not None and (hp.ct_root is not None or hp.mri_root is not None):
        raise AqcfError("data.cohorts names every cohort: set data.ct_root and data.mri_root to null")
    if hp.cohorts is None and hp.ct_root is None and hp.mri_root is None:
        raise AqcfError("data: set ct_root, mri_root or both")
    if hp.protocol not in PROTOCOLS:
        raise AqcfError(f"data.protocol {hp.protocol!r}: expected one of {PROTOCOLS}")
    if not 0 <= hp.fold < hp.n_folds:
        raise AqcfError(f"data.fold {hp.fold}: need 0 <= fold < n_folds ({hp.n_folds})")
    if len(hp.patch_size) != 3 or min(hp.patch_size) < 1:
        raise AqcfError(f"data.patch_size {hp.patch_size}: need three positive sizes")
    if hp.batch_pairs < 1 or hp.samples_per_volume < 1 or hp.queue_length < 1:
        raise AqcfError("data: batch_pairs, samples_per_volume and queue_length must be positive")
    if not 0.0 <= hp.paired_ratio <= 1.0:
        raise AqcfError(f"data.paired_ratio {hp.paired_ratio}: need a share in [0, 1]")
    if hp.paired_ratio > 0 and hp.paired_root is None:
        raise AqcfError(f"data.paired_ratio {hp.paired_ratio}: set data.paired_root, the paired cohort's folder")


class UnpairedDataModule(L.LightningDataModule):
    """Unpaired CT and MRI cohorts: preprocessing cache, folds, patch queues and volume loaders.

    Under DDP (``torch.distributed`` initialised with several processes) each queue draws its subjects
    through a ``DistributedSampler``, so ranks train on different subjects, and the validation / test /
    prediction volumes are sharded ``indices[rank::world]``. The Trainer must therefore run with
    ``use_distributed_sampler=False``; otherwise Lightning would wrap the patch loaders in a second
    sampler.

    One of ``ct_root`` / ``mri_root`` may be ``None`` for a unimodal run; batches then hold one key.
    ``cohorts`` names any number of cohorts instead (one queue and one batch key each, e.g. ct, mri, t2).

    Args:
        cohorts: The training cohorts by name, in stream order: mappings with ``name`` (the stream),
            ``root``, ``format`` and optionally ``spacing``, ``window``, ``orientation``, ``test_root``,
            ``test_format``, ``labels`` (:class:`Cohort`; a knob left out takes the ``<name>_*`` field,
            ``mri_*`` for a new name; ``labels`` maps the cohort's mask values to 0 background, 1 liver,
            2 tumor, default the identity). ``None`` (default): the CT and MRI cohorts of the ``ct_*`` /
            ``mri_*`` fields, which must then stay ``None`` when ``cohorts`` is given.
        ct_root: CT cohort folder (LiTS layout by default).
        mri_root: MRI cohort folder (ATLAS layout by default).
        ct_format: Layout of ``ct_root``: ``lits``, ``atlas``, ``nnunet`` (or a registered format).
        mri_format: Layout of ``mri_root``.
        cache_dir: Folder of the preprocessing caches (``<modality>-<format>-<key>/`` per cohort).
        fold: Fold held out for testing (0-based).
        protocol: ``"inner"`` (default): model selection and the schedule use an inner validation set
            carved from the training folds (``inner_folds``; fixed in the splits file), so the test fold
            is read only by ``aqcf test``. ``"heldout"``: the paper's reading, the held-out fold both
            validates and tests.
        inner_folds: The inner validation set is one of this many stratified parts of the training
            cases (5: a fifth).
        n_folds: Number of folds.
        split_seed: Seed of the fold assignment (used only when the splits file is created).
        splits_dir: Folder of ``<modality>/splits.json`` (default ``cache_dir``).
        patch_size: Training patch (X, Y, Z) in voxels; volumes smaller than it are zero-padded.
        samples_per_volume: Patches drawn from a subject each time the queue loads it.
        queue_length: Patches each queue holds.
        label_probabilities: Probability of centring a patch on background / liver / tumor (default
            :data:`DEFAULT_LABEL_PROBABILITIES`).
        batch_pairs: CT-MRI pairs per batch (B).
        num_workers: Processes loading subjects into each queue.
        preprocess_workers: Processes preprocessing the cohorts in ``prepare_data``.
        verify_cache: How ``prepare_data`` checks a reused cache: ``"checksum"`` (reads every cached
            file once per run) or ``"size"`` (a stat per file; finds truncation only). A damaged case
            is preprocessed again from its source.
        skip_bad: Leave broken cases (unreadable, truncated, non-finite, bad labels) out of the cohorts
            instead of stopping; they are listed in the cache manifest and on stderr.
        ct_spacing, mri_spacing: Target voxel size in mm.
        ct_window, mri_window: Intensity window mapped to [0, 1] (HU for CT).
        ct_orientation, mri_orientation: Target axis codes.
        pad_multiple: Volumes are zero-padded to a multiple of this along every axis.
        augment: Augment training patches (:func:`aqcf.data.augment.build_augmentation`).
        flip_prob, rot90_prob, intensity_shift, intensity_scale, intensity_prob: Augmentation settings.
        test_ct_root, test_mri_root: External test cohorts; a modality without one is tested on the
            fold's validation cases.
        test_ct_format, test_mri_format: Their layouts.
        progress: Show progress bars while preprocessing.
        paired_root: A paired CT/MRI cohort (``aqcf synth --paired`` layout,
            :func:`aqcf.data.phantoms.read_paired`) for fine-tuning; ``None``: none.
        paired_ratio: Share of training batches that are paired, drawn per step (seeded); 0 keeps the
            unpaired batches exactly, 1 trains on paired batches only. Needs ``paired_root`` and both cohorts.
        paired_cases: The ids in ``paired_root`` used for training (``None``: all of them). Patients held
            out for testing are kept in another folder or left out of this list.
    """

    def __init__(  # long: the signature lists every data setting (LightningCLI's `data:` keys)
        self,
        ct_root: str | None = None,
        mri_root: str | None = None,
        ct_format: str = "lits",
        mri_format: str = "atlas",
        cache_dir: str = "cache",
        fold: int = 0,
        protocol: str = "inner",
        inner_folds: int = 5,
        n_folds: int = 5,
        split_seed: int = 0,
        splits_dir: str | None = None,
        patch_size: tuple[int, int, int] = (256, 256, 16),
        samples_per_volume: int = 4,
        queue_length: int = 32,
        label_probabilities: dict[int, float] | None = None,
        batch_pairs: int = 1,
        num_workers: int = 2,
        preprocess_workers: int = 0,
        verify_cache: str = "checksum",
        skip_bad: bool = False,
        ct_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        mri_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        ct_window: tuple[float, float] = (-16.0, 176.0),
        mri_window: tuple[float, float] = (74.0, 511.0),
        ct_orientation: str = "RAS",
        mri_orientation: str = "LAS",
        pad_multiple: int = 16,
        augment: bool = True,
        flip_prob: float = 0.1,
        rot90_prob: float = 0.1,
        intensity_shift: float = 0.1,
        intensity_scale: float = 0.1,
        intensity_prob: float = 0.5,
        test_ct_root: str | None = None,
        test_ct_format: str = "nnunet",
        test_mri_root: str | None = None,
        test_mri_format: str = "nnunet",
        progress: bool = True,
        paired_root: str | None = None,
        paired_ratio: float = 0.0,
        paired_cases: list[str] | None = None,
        cohorts: list[dict] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_settings(self.hparams)
        self.cohorts = cohorts_from_hparams(self.hparams)
        if paired_root is not None and not {CT, MRI} <= {c.name for c in self.cohorts}:
            raise AqcfError("data.paired_root: paired fine-tuning trains both streams; set ct_root and mri_root")
        self.roots = {c.name: c.root for c in self.cohorts}
        self.formats = {c.name: c.format for c in self.cohorts}
        self.test_roots = {c.name: c.test_root for c in self.cohorts}
        self.test_formats = {c.name: c.test_format for c in self.cohorts}
        self.labels = {c.name: dict(c.labels) for c in self.cohorts}
        self.patch_size = tuple(int(n) for n in patch_size)
        self.label_probabilities = dict(label_probabilities or DEFAULT_LABEL_PROBABILITIES)
        self.manifests: dict[str, Manifest] = {}
        self.splits: dict[str, list[dict]] = {}
        self.train_entries: dict[str, list[dict]] = {}
        self.val_entries: dict[str, list[dict]] = {}
        self.test_entries: dict[str, list[dict]] = {}
        self.paired_entries: list[dict] = []

    @property
    def modalities(self) -> tuple[str, ...]:
        """The names of the training cohorts, in stream order (CT first for the pair)."""
        return tuple(c.name for c in self.cohorts)

    def preprocess_settings(self, modality: str) -> PreprocessSettings:
        """The preprocessing of ``modality`` (inference rebuilds it from a checkpoint's hyper-parameters)."""
        return preprocess_settings_from_hparams(self.hparams, modality)

    def _manifest(self, modality: str, root: str, fmt: str, verify: str = "size") -> Manifest:
        cases = read_cohort(root, fmt, modality, self.modalities)
        # Preprocessing a new cache must not consume the seeded random state: a run that builds the cache
        # and one that reuses it then draw the same patches.
        with torch.random.fork_rng(devices=[]), _numpy_state_kept():
            return preprocess_cohort(
                cases,
                self.preprocess_settings(modality),
                self.hparams.cache_dir,
                workers=self.hparams.preprocess_workers,
                name=f"{modality}-{fmt.lower()}",
                progress=self.hparams.progress,
                verify=verify,
                skip_bad=self.hparams.skip_bad,
                labels=self.labels[modality],
            )

    def _splits_path(self, modality: str) -> Path:
        return Path(self.hparams.splits_dir or self.hparams.cache_dir) / modality / "splits.json"

    def _splits(self, modality: str, manifest: Manifest) -> list[dict]:
        return load_or_create_splits(
            self._splits_path(modality),
            manifest.ids,
            manifest.has_tumor,
            n_folds=self.hparams.n_folds,
            seed=self.hparams.split_seed,
            inner_folds=self.hparams.inner_folds if self.hparams.protocol == "inner" else None,
        )

    def prepare_data(self) -> None:
        """Preprocess every cohort into the cache and write the splits files (once per node)."""
        verify = self.hparams.verify_cache
        for modality in self.modalities:
            manifest = self._manifest(modality, self.roots[modality], self.formats[modality], verify)
            self._splits(modality, manifest)
            if self.test_roots[modality] is not None:
                self._manifest(modality, self.test_roots[modality], self.test_formats[modality], verify)
        if self.hparams.get("paired_root") is not None:
            self._paired(verify)

    def _paired(self, verify: str = "size") -> list[dict]:
        """The paired training patients, preprocessed (:func:`aqcf.data.paired.preprocess_paired`)."""
        from aqcf.data.paired import preprocess_paired
        from aqcf.data.phantoms import read_paired

        root = self.hparams.paired_root
        cases = read_paired(root)
        wanted = self.hparams.get("paired_cases")
        if wanted is not None:
            unknown = sorted(set(wanted) - {c["id"] for c in cases})
            if unknown:
                raise AqcfError(f"{root}: data.paired_cases names {', '.join(unknown)}, not in this paired cohort")
            cases = [c for c in cases if c["id"] in set(wanted)]
        with torch.random.fork_rng(devices=[]), _numpy_state_kept():
            return preprocess_paired(
                cases, self.preprocess_settings(CT), self.preprocess_settings(MRI), self.hparams.cache_dir,
                progress=self.hparams.progress, verify=verify,
            )

    def setup(self, stage: str | None = None) -> None:
        """Read the manifests and the folds; fill the train / val / test case lists."""
        fold = self.hparams.fold
        for modality in self.modalities:
            manifest = self._manifest(modality, self.roots[modality], self.formats[modality])
            splits = self._splits(modality, manifest)
            by_id = manifest.by_id()
            self.manifests[modality] = manifest
            self.splits[modality] = splits
            held_out = [by_id[i] for i in splits[fold]["val"]]
            if self.hparams.protocol == "inner":
                inner = set(splits[fold]["inner_val"])
                self.train_entries[modality] = [by_id[i] for i in splits[fold]["train"] if i not in inner]
                self.val_entries[modality] = [by_id[i] for i in splits[fold]["inner_val"]]
            else:
                self.train_entries[modality] = [by_id[i] for i in splits[fold]["train"]]
                self.val_entries[modality] = held_out
            if self.test_roots[modality] is not None:
                test = self._manifest(modality, self.test_roots[modality], self.test_formats[modality])
                self.test_entries[modality] = test.entries
            else:
                self.test_entries[modality] = held_out
        if self.hparams.get("paired_root") is not None:
            self.paired_entries = self._paired()

    def _queue_loader(self, modality: str, index: int) -> DataLoader:
        """The training loader of cohort ``modality`` (stream ``index``): its patch queue, augmented."""
        hp = self.hparams
        dataset = self._subjects(modality)
        rank, world = _distributed()
        subject_sampler = _subject_sampler(dataset, rank, world, hp.split_seed)
        queue = self._queue(dataset, subject_sampler)
        augment = None
        if hp.augment:
            # Distinct seeds per modality and rank keep the two streams' augmentations independent.
            augment = self._augmentation((torch.initial_seed() + 7919 * (2 * rank + index)) % 2**32)
        stream = _PatchStream(queue, augment)
        # The queue hands out patches from its own worker processes: this loader must use none.
        return DataLoader(
            stream,
            batch_size=hp.batch_pairs,
            sampler=_EpochSampler(stream, subject_sampler),
            num_workers=0,
            drop_last=False,
        )

    def _subjects(self, modality: str):
        """A TorchIO ``SubjectsDataset`` of the cohort's training cases whose transform draws their patches."""
        import torchio as tio

        # Lazy subjects: DrawPatches reads only the patches from the cached files (aqcf.data.patches).
        subjects = [
            tio.Subject(
                image=tio.ScalarImage(e[IMAGE]),
                label=tio.LabelMap(e[LABEL]),
                locations=e["locations"],
                id=e["id"],
                modality=modality,
            )
            for e in self.train_entries[modality]
        ]
        draw = DrawPatches(self.patch_size, self.label_probabilities, self.hparams.samples_per_volume)
        return tio.SubjectsDataset(subjects, transform=draw, load_getitem=False)

    def _queue(self, dataset, subject_sampler):
        """A TorchIO ``Queue`` over ``dataset`` serving the patches :class:`DrawPatches` read."""
        import torchio as tio

        hp = self.hparams
        return tio.Queue(
            dataset,
            max_length=hp.queue_length,
            samples_per_volume=hp.samples_per_volume,
            sampler=CachedPatchSampler(self.patch_size),
            subject_sampler=subject_sampler,
            num_workers=hp.num_workers,
            shuffle_subjects=subject_sampler is None,
            shuffle_patches=True,
            start_background=False,
        )

    def _augmentation(self, seed: int):
        """The training augmentation of the data settings (:func:`aqcf.data.augment.build_augmentation`)."""
        hp = self.hparams
        return build_augmentation(
            self.patch_size,
            hp.flip_prob,
            hp.rot90_prob,
            hp.intensity_shift,
            hp.intensity_scale,
            hp.intensity_prob,
            seed=seed,
        )

    def train_dataloader(self):
        """``CombinedLoader({name: ...}, mode="max_size_cycle")``: one patch queue per cohort.

        Each step takes one batch from every queue (``{"ct": ..., "mri": ..., "t2": ...}``); a queue
        that runs out before the longest is cycled.
        """
        from lightning.pytorch.utilities import CombinedLoader

        self._require_setup()
        loaders = {m: self._queue_loader(m, i) for i, m in enumerate(self.modalities)}
        if not self.hparams.get("paired_ratio"):
            return CombinedLoader(loaders, mode="max_size_cycle")
        return self._mixed_loader(loaders)

    def _mixed_loader(self, loaders: dict[str, DataLoader]):
        """Unpaired and paired batches mixed by ``paired_ratio`` (:class:`aqcf.data.paired.MixedBatches`)."""
        from aqcf.data.paired import MixedBatches, PairedPatches

        hp = self.hparams
        rank, world = _distributed()
        # own seeds, apart from the unpaired streams' (7919 * (2 * rank + index)), repeatable under seed_everything
        seed = (torch.initial_seed() + 1_000_003 * (rank + 1)) % 2**32
        augment = None
        if hp.augment:
            spatial = build_augmentation(self.patch_size, hp.flip_prob, hp.rot90_prob, 0.0, 0.0, 0.0, seed=seed)
            intensity = {
                m: build_augmentation(self.patch_size, 0.0, 0.0, hp.intensity_shift, hp.intensity_scale,
                                      hp.intensity_prob, seed=seed + 1 + i)
                for i, m in enumerate((CT, MRI))
            }
            augment = (spatial, intensity)
        entries = self.paired_entries[rank::world] or self.paired_entries
        patches = PairedPatches(entries, self.patch_size, self.label_probabilities, hp.samples_per_volume,
                                seed=seed + 3, augment=augment)
        paired = DataLoader(patches, batch_size=hp.batch_pairs, shuffle=False, num_workers=0)
        return MixedBatches(loaders, paired, hp.paired_ratio, seed=seed + 4,
                            length=max(len(loader) for loader in loaders.values()))

    def _volume_loader(
        self, entries_by_modality: dict[str, list[dict]], with_record: bool = False
    ) -> DataLoader:
        self._require_setup()
        entries = [e for m in self.modalities for e in entries_by_modality.get(m, [])]
        rank, world = _distributed()
        dataset = _Volumes(entries[rank::world], with_record=with_record)
        return DataLoader(
            dataset,
            batch_size=1,
            shuffle=False,
            num_workers=min(self.hparams.num_workers, 2),
            collate_fn=_collate_volumes,
        )

    def val_dataloader(self) -> DataLoader:
        """The validation volumes, CT then MRI: ``{"image", "label", "modality", "id"}``.

        The inner validation set under ``protocol: inner``, fold ``fold``'s held-out cases under
        ``heldout``.
        """
        return self._volume_loader(self.val_entries)

    def test_dataloader(self) -> DataLoader:
        """Test volumes (external cohorts where given, else fold ``fold``'s held-out cases)."""
        return self._volume_loader(self.test_entries)

    def predict_dataloader(self) -> DataLoader:
        """The test volumes with ``"record"``: their manifest entry, for :func:`restore_to_original`."""
        return self._volume_loader(self.test_entries, with_record=True)

    def _require_setup(self) -> None:
        if not self.train_entries:
            raise RuntimeError("UnpairedDataModule: call prepare_data() and setup() first")

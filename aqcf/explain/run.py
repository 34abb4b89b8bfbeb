"""``aqcf explain``: the model-dependent explainability analysis (paper sections 4.3 and 4.4.2).

For a trained checkpoint and held-out cases of CT, MRI or both, it writes into ``--out``:

* ``saliency.csv``: per case and method (Grad-CAM, Grad-CAM++) the Saliency-IoU, the boundary-band
  coverage and the pointing game of the tumor-class saliency against the ground-truth tumor
  (:mod:`aqcf.explain.metrics`; NaN for a case without tumor);
* ``summary.json`` and ``summary.md``: mean ± SD over the cases with tumor, per modality and method;
* ``saliency.png`` (Figure 7): image, ground truth and heat maps for a few cases of each modality;
* ``feature_maps.png`` (Figure 8): image, ground truth and channel-summarised feature maps of an early
  and a middle encoder stage and the shared bottleneck, for a few cases of each modality;
* ``gates.md``, ``gates.csv``, ``gates.png`` (Table 6): λ per encoder stage and direction, from joint
  passes on real CT-MRI window pairs (only when both modalities are analysed).

Which cases: without ``--ct-data`` / ``--mri-data`` (or ``--data``), the checkpoint's own run: the
data module's test cases (the external test cohorts of the run's config, else its fold's validation
cases), preprocessed into the run's cache. With them, every case of the given cohorts, preprocessed
with the checkpoint's settings.

Each case is analysed on one window of the training patch size centred on its largest tumor
(:func:`aqcf.explain.windows.extract_window`), or with ``--whole-volume`` on the whole preprocessed
volume. Every column of the outputs, the window rule and the cost: docs/explain.md, *Analysis of a
trained network*.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aqcf.constants import CT, LABEL, MODALITIES, MRI
from aqcf.errors import AqcfError
from aqcf.explain.metrics import METRIC_NAMES
from aqcf.explain.windows import extract_window

__all__ = [
    "SALIENCY_CSV",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "SALIENCY_PNG",
    "FEATURES_PNG",
    "GATE_FILES",
    "OUTPUT_FILES",
    "DEFAULT_FORMATS",
    "CaseData",
    "load_model",
    "checkpoint_cases",
    "cohort_cases",
    "resolve_layers",
    "pair_cases",
    "main",
]

SALIENCY_CSV = "saliency.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SALIENCY_PNG = "saliency.png"
FEATURES_PNG = "feature_maps.png"
GATE_FILES = ("gates.md", "gates.csv", "gates.png")
OUTPUT_FILES = (SALIENCY_CSV, SUMMARY_JSON, SUMMARY_MD, SALIENCY_PNG, FEATURES_PNG, *GATE_FILES)
DEFAULT_FORMATS = {CT: "lits", MRI: "atlas"}
FIGURE_ORDER = (MRI, CT)  # the paper's figures show MRI rows above CT rows
METRIC_LABELS = {
    "saliency_iou": "Saliency-IoU",
    "band_coverage": "Boundary band ({band} mm)",
    "pointing_game": "Pointing game",
}
CSV_FIELDS = (
    "case",
    "modality",
    "method",
    "layer",
    "has_tumor",
    "tumor_voxels",
    *METRIC_NAMES,
    "score_region",
    "region_voxels",
    "window_centred_on",
    "window_start",
    "window_size",
)


# ------------------------------------------------------------------------------------------------ inputs
def load_model(ckpt: str | Path, device: str = "auto"):
    """Rebuild a checkpoint written by ``aqcf fit`` (through :class:`aqcf.inference.predictor.Predictor`).

    Args:
        ckpt: the ``.ckpt`` file.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(predictor, datamodule_hparams)``: the predictor holds the network (eval mode, on its device),
        each trained modality's preprocessing and, as ``window.roi_size``, the training patch (X, Y, Z).
    """
    from aqcf.inference.predictor import Predictor, load_checkpoint_info

    predictor = Predictor.from_checkpoint(ckpt, device=device)
    return predictor, dict(load_checkpoint_info(ckpt)["datamodule_hyper_parameters"] or {})


@dataclass(frozen=True)
class CaseData:
    """A preprocessed case: ``id``, ``modality``, ``image`` and ``label`` NIfTI paths, voxel size in mm,
    axis codes and whether it has tumor (None: unknown until loaded)."""

    id: str
    modality: str
    image: str
    label: str
    spacing: tuple[float, float, float]
    orientation: str
    has_tumor: bool | None

    @classmethod
    def from_entry(cls, entry: Mapping) -> CaseData:
        """From a preprocessing-cache manifest entry (:func:`aqcf.data.cache.preprocess_case`)."""
        if not entry.get(LABEL):
            raise AqcfError(f"{entry.get('source_image', entry['id'])}: no label; saliency scores need the tumor mask")
        return cls(
            id=str(entry["id"]),
            modality=str(entry["modality"]),
            image=str(entry["image"]),
            label=str(entry[LABEL]),
            spacing=tuple(float(s) for s in entry["preprocessed_spacing"]),
            orientation=str(entry.get("preprocessed_orientation", "RAS")),
            has_tumor=entry.get("has_tumor"),
        )

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image float32 (X, Y, Z) in [0, 1], label uint8 (X, Y, Z))``."""
        import nibabel as nib

        image = np.asarray(nib.load(self.image).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(self.label).dataobj).astype(np.uint8)
        return image, label


def checkpoint_cases(hparams: Mapping, progress: bool = True) -> dict[str, list[CaseData]]:
    """The test cases of the checkpoint's own run: its data module's ``test_entries`` per modality.

    Those are the external test cohorts where the run's config names them, else the fold's validation
    cases; the run's preprocessing cache is reused (or rebuilt with the same settings).
    """
    from aqcf.data.datamodule import UnpairedDataModule

    if not hparams:
        raise AqcfError("the checkpoint holds no data settings: give the cohorts with --ct-data / --mri-data")
    accepted = inspect.signature(UnpairedDataModule.__init__).parameters
    kwargs = {key: value for key, value in hparams.items() if key in accepted}
    kwargs["progress"] = progress
    datamodule = UnpairedDataModule(**kwargs)
    datamodule.setup("test")
    return {m: [CaseData.from_entry(e) for e in datamodule.test_entries[m]] for m in datamodule.modalities}


def cohort_cases(
    root: str | Path, data_format: str, settings, cache: str | Path, progress: bool = True
) -> list[CaseData]:
    """Every case of a cohort folder, preprocessed with ``settings`` (the checkpoint's
    :class:`~aqcf.data.preprocess.PreprocessSettings` of the cohort's modality) into ``cache``."""
    from aqcf.data.cache import preprocess_cohort
    from aqcf.data.cohorts import read_cohort

    cases = read_cohort(root, data_format, settings.modality)
    manifest = preprocess_cohort(
        cases, settings, cache, name=f"{settings.modality}-{data_format.lower()}", progress=progress
    )
    return [CaseData.from_entry(e) for e in manifest.entries]


def resolve_layers(network, modalities: Sequence[str], layers: Sequence[str]) -> dict[str, str]:
    """The explained layer of each modality: a ``--layer`` on its path, else the default.

    A name that lies on one stream's path (``decoders.ct.stages.2``) sets that stream's layer; a shared
    one (``bottleneck``) sets both.

    Raises:
        AqcfError: a name on no analysed stream's path, or two names for one stream (one line naming the
            available layers).
    """
    from aqcf.explain.layers import available_layers, check_layer

    chosen: dict[str, str] = {}
    for layer in layers:
        matched = []
        for m in modalities:
            try:
                matched.append((m, check_layer(network, m, layer)))
            except AqcfError:
                continue
        if not matched:
            listing = "; ".join(f"{m}: {', '.join(available_layers(network, m))}" for m in modalities)
            raise AqcfError(f"layer {layer!r} is not on an analysed stream's path; available layers: {listing}")
        for m, name in matched:
            if m in chosen and chosen[m] != name:
                raise AqcfError(f"two layers for the {m} stream: {chosen[m]!r} and {name!r}; give one per stream")
            chosen[m] = name
    return {m: chosen.get(m) or check_layer(network, m, None) for m in modalities}


def pair_cases(*cohorts: Sequence) -> list[tuple]:
    """Case tuples for the gate statistics, one case per stream: the i-th CT case with the i-th MRI
    case (and the i-th of any further stream), shorter lists cycled, so every case of every cohort
    enters at least once (as many tuples as the longest list); empty if a cohort has no case."""
    if not cohorts or not all(cohorts):
        return []
    return [tuple(c[i % len(c)] for c in cohorts) for i in range(max(len(c) for c in cohorts))]


def _figure_ids(cases: Sequence[CaseData], count: int) -> list[str]:
    """The first ``count`` cases with tumor, topped up with tumor-free ones."""
    with_tumor = [c.id for c in cases if c.has_tumor is not False]
    without = [c.id for c in cases if c.has_tumor is False]
    return (with_tumor + without)[:count]


# ----------------------------------------------------------------------------------------------- outputs
def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _csv_text(rows: Sequence[Mapping]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _no_nan(value):
    """JSON-safe copy: NaN becomes null (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def _summary_markdown(summary: Mapping, band_mm: float) -> str:
    from aqcf.explain.saliency import METHOD_LABELS

    lines = [
        "# Saliency localisation of the tumor class (mean ± SD over cases with tumor)",
        "",
        f"Layers: {', '.join(f'{m.upper()} `{layer}`' for m, layer in summary['layers'].items())}. "
        f"Window: {summary['window']}. Score: {summary['score']}.",
        "",
        "| Modality | Method | " + " | ".join(METRIC_LABELS[k].format(band=f"{band_mm:g}") for k in METRIC_NAMES)
        + " | n |",
        "|---|---|" + "---|" * (len(METRIC_NAMES) + 1),
    ]
    for method, groups in summary["saliency"].items():
        for group, metrics in groups.items():
            cells = []
            for key in METRIC_NAMES:
                stats = metrics[key]
                if not stats["n"]:
                    cells.append("—")
                elif stats["n"] < 2:  # one case: no SD
                    cells.append(_fmt(stats["mean"]))
                else:
                    cells.append(f"{_fmt(stats['mean'])} ± {_fmt(stats['sd'])}")
            n = max(metrics[key]["n"] for key in METRIC_NAMES)
            lines.append(f"| {group.upper() if group != 'all' else 'all'} | {METHOD_LABELS[method]} | "
                         + " | ".join(cells) + f" | {n} |")
    gates = summary.get("gates")
    lines += ["", f"Gates (Table 6): {'see gates.md' if gates and gates.get('pairs') else gates.get('skipped')}", ""]
    context = gates.get("absent_context_rms") if gates else None
    if context:
        lines.append("Context from the zero-filled absent stream (RMS of λ · C_raw, median over cases): "
                     + ", ".join(f"stage {r['stage']} {r['direction']} {r['median']:.3g}" for r in context))
        lines.append("")
    return "\n".join(lines)


def _check_out(out: Path, overwrite: bool, inputs=()) -> None:
    from aqcf.io import check_output

    check_output(out, inputs=inputs, overwrite=overwrite, kind="folder", names=OUTPUT_FILES)


# -------------------------------------------------------------------------------------------------- run
def _parser():
    from aqcf.errors import ArgumentParser
    from aqcf.explain.features import SUMMARIES
    from aqcf.explain.saliency import METHODS
    from aqcf.explain.scores import SCORE_REGIONS
    from aqcf.inference.predictor import DEVICES

    p = ArgumentParser(
        prog="aqcf explain",
        description="Grad-CAM / Grad-CAM++ saliency of the tumor class with localisation scores (Saliency-IoU, "
        "boundary band, pointing game), feature maps, and the adaptive gate statistics of a trained checkpoint. "
        "Without --ct-data/--mri-data/--data it analyses the checkpoint's own test (held-out) cases.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by `aqcf fit` (runs/.../best.ckpt)")
    p.add_argument("--out", required=True, help="output folder")
    for m in MODALITIES:
        p.add_argument(f"--{m}-data", metavar="ROOT", help=f"{m.upper()} cohort folder (every case is analysed)")
        p.add_argument(f"--{m}-format", metavar="FMT", help=f"layout of --{m}-data (default {DEFAULT_FORMATS[m]})")
    p.add_argument("--data", metavar="ROOT", help="one cohort folder; with --format and --modality")
    p.add_argument("--format", dest="data_format", metavar="FMT", help="layout of --data: lits, atlas, nnunet, ...")
    p.add_argument("--modality", type=str.lower,
                   help="modality of --data: one the checkpoint was trained on (ct, mri or a named cohort)")
    p.add_argument("--cache", help="preprocessing cache for --*-data (default: the run's cache folder, else ./cache)")
    p.add_argument("--cases", type=int, metavar="N", help="analyse the first N cases of each modality (default all)")
    p.add_argument("--method", choices=[*METHODS, "both"], default="both", help="saliency method (default both)")
    p.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="NAME",
        help="explained layer (repeat once per stream, e.g. decoders.mri.stages.2; `bottleneck` sets both); "
        "default: the last decoder stage of each stream",
    )
    p.add_argument(
        "--region",
        choices=SCORE_REGIONS,
        default=SCORE_REGIONS[0],
        help="tumor score = mean tumor logit over the predicted tumor voxels (default) or the whole window",
    )
    p.add_argument("--whole-volume", action="store_true", help="saliency on the whole preprocessed volume")
    p.add_argument("--band-mm", type=float, default=3.0, help="boundary band: mm from the tumor boundary (default 3)")
    p.add_argument("--figure-cases", type=int, default=2, metavar="K", help="cases per modality in the figures")
    p.add_argument("--feature-summary", choices=SUMMARIES, default=SUMMARIES[0], help="channel summary of feature maps")
    p.add_argument("--no-gates", action="store_true", help="skip the gate statistics")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto (default: cuda when available), cpu, cuda")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _cohort_requests(args) -> dict[str, tuple[str, str]]:
    requests = {}
    for m in MODALITIES:
        root = getattr(args, f"{m}_data")
        if root:
            requests[m] = (root, getattr(args, f"{m}_format") or DEFAULT_FORMATS[m])
        elif getattr(args, f"{m}_format"):
            raise AqcfError(f"--{m}-format without --{m}-data")
    if args.data or args.data_format or args.modality:
        if not (args.data and args.modality):
            raise AqcfError("--data needs --modality (and --format unless it is the modality's default)")
        if args.modality in requests:
            raise AqcfError(f"--data --modality {args.modality} and --{args.modality}-data both given")
        # a named cohort beyond ct and mri is in the nnU-Net layout unless --format says otherwise
        requests[args.modality] = (args.data, args.data_format or DEFAULT_FORMATS.get(args.modality, "nnunet"))
    return requests


def main(argv: list[str] | None = None) -> int:
    """``aqcf explain``: returns the exit code."""
    args, requests = _parse_args(argv)
    methods = _methods(args.method)
    predictor, hparams = load_model(args.ckpt, args.device)
    layers, cases = _select_cases(args, requests, predictor, hparams)
    window_size = None if args.whole_volume else predictor.window.roi_size
    explained = _explain_cases(args, predictor, cases, layers, methods, window_size)
    gates = _gate_statistics(args, predictor, cases, explained.context_rows)
    summary = _summary(args, layers, methods, window_size, cases, explained.rows, gates)
    _write_outputs(Path(args.out), args.band_mm, summary, cases, explained, gates)
    return 0


def _parse_args(argv: list[str] | None):
    """Parse and check the arguments before anything is loaded.

    Returns:
        ``(args, requests)``: the parsed namespace and the cohorts to analyse,
        ``{modality: (root, format)}`` (empty: the checkpoint's own test cases).

    Raises:
        AqcfError: ``--out`` holds results (without ``--overwrite``), an unusable ``--cache``, a bad
            ``--cases``, ``--figure-cases`` or ``--band-mm``, or inconsistent cohort flags.
    """
    from aqcf.io import check_output

    args = _parser().parse_args(argv)
    inputs = [args.ckpt, args.data, *(getattr(args, f"{m}_data") for m in MODALITIES)]
    _check_out(Path(args.out), args.overwrite, inputs)
    if args.cache:
        check_output(args.cache, kind="cache")
    if args.cases is not None and args.cases < 1:
        raise AqcfError(f"--cases {args.cases}: need a positive number")
    if args.figure_cases < 0 or args.band_mm <= 0:
        raise AqcfError("--figure-cases must be >= 0 and --band-mm > 0")
    return args, _cohort_requests(args)


def _methods(method: str) -> tuple[str, ...]:
    """The saliency methods of ``--method`` (``"both"``: Grad-CAM and Grad-CAM++)."""
    from aqcf.explain.saliency import METHODS

    return METHODS if method == "both" else (method,)


def _select_cases(args, requests: Mapping, predictor, hparams: Mapping):
    """The explained layer of each modality and the cases to analyse.

    The layers are resolved before any preprocessing, so a bad ``--layer`` fails fast. The cases are
    the requested cohorts preprocessed with the checkpoint's settings, else the checkpoint's own test
    cases, cut to the first ``--cases`` of each modality.

    Returns:
        ``(layers, cases)``: ``{modality: layer name}`` and ``{modality: [CaseData, ...]}`` (CT before
        MRI; only modalities with cases).

    Raises:
        AqcfError: no case to analyse.
    """
    progress = not args.no_progress
    planned = [predictor.check_modality(m) for m in requests] if requests else list(predictor.modalities)
    layers = resolve_layers(predictor.network, planned, args.layer)  # before any preprocessing: fail fast
    if requests:
        cache = args.cache or hparams.get("cache_dir") or "cache"
        cases = {
            m: cohort_cases(root, fmt, predictor.preprocessing[m], cache, progress)
            for m, (root, fmt) in requests.items()
        }
    else:
        cases = checkpoint_cases(hparams, progress)
    order = [*MODALITIES, *(m for m in predictor.modalities if m not in MODALITIES)]
    cases = {m: cases[m][: args.cases] for m in order if cases.get(m)}
    if not cases:
        raise AqcfError("no case to analyse")
    return layers, cases


@dataclass
class _Explained:
    """What :func:`_explain_cases` found: one table row per case and method, the figure panels per
    modality, and the absent-stream context rows (empty without cross fusion)."""

    rows: list[dict]
    saliency_panels: dict[str, list[dict]]
    feature_panels: dict[str, list[dict]]
    context_rows: list


def _explain_cases(args, predictor, cases: Mapping, layers: Mapping, methods: Sequence[str], window_size):
    """Saliency of every case: per method a table row with the localisation scores, and for the first
    ``--figure-cases`` of each modality the saliency and feature-map panels of one axial slice.

    On the unimodal path it also records what the present stream receives from the zero-filled absent
    stream (eq. 17), when the network has cross-fusion blocks.

    Args:
        window_size: the analysed window (X, Y, Z) in voxels (the training patch), or None for the whole
            volume.

    Returns:
        An :class:`_Explained`.
    """
    import torch
    from tqdm.auto import tqdm

    from aqcf.explain.gates import GateRecorder, absent_context_key
    from aqcf.explain.saliency import TumorSaliency

    network, device = predictor.network, predictor.device
    explained = _Explained([], {m: [] for m in cases}, {m: [] for m in cases}, [])
    bar = tqdm(total=sum(len(c) for c in cases.values()), desc="explain", unit="case", disable=args.no_progress)
    # what the present stream receives from the zero-filled absent stream on the unimodal path (eq. 17)
    context_recorder = GateRecorder()
    measure_context = getattr(network, "cross_fusion", False) and hasattr(network, "last_context_rms")
    for m, modality_cases in cases.items():
        shown = set(_figure_ids(modality_cases, args.figure_cases))
        with TumorSaliency(network, m, layers[m], region=args.region) as explain:
            for case in modality_cases:
                image, label = case.load()
                image_w, label_w, window = extract_window(image, label, window_size, network.divisor)
                x = torch.from_numpy(np.ascontiguousarray(image_w))[None, None].to(device)
                if measure_context:
                    with torch.no_grad():
                        network.forward_single(x, m, absent_context="zero-filled")
                    context_recorder.update(
                        {k: v for k, v in network.last_context_rms.items() if absent_context_key(k, m)}
                    )
                maps = _explain_case(args, explain, m, case, x, label_w, window, methods, explained.rows)
                if case.id in shown:
                    _add_panels(args, explained, network, m, case, x, image_w, label_w, maps)
                bar.update(1)
    bar.close()
    explained.context_rows = context_recorder.table()
    return explained


def _explain_case(args, explain, m: str, case: CaseData, x, label_w, window, methods, rows: list[dict]) -> dict:
    """Saliency maps of one case's window ``x`` (1, 1, X, Y, Z) per method; appends a table row per method.

    Returns:
        ``{method label: (X, Y, Z) map in [0, 1]}``.
    """
    from aqcf.explain.metrics import saliency_metrics
    from aqcf.explain.saliency import METHOD_LABELS
    from aqcf.explain.scores import TUMOR_CLASS

    tumor = label_w == TUMOR_CLASS
    maps = {}
    for method in methods:
        saliency = explain(x, method)[0].cpu().numpy()
        maps[METHOD_LABELS[method]] = saliency
        fallback = bool(explain.score.last_fallback[0])
        rows.append(
            {
                "case": case.id,
                "modality": m,
                "method": method,
                "layer": explain.layer,
                "has_tumor": int(bool(tumor.any())),
                "tumor_voxels": int(tumor.sum()),
                **saliency_metrics(saliency, tumor, case.spacing, band_mm=args.band_mm),
                "score_region": "volume (no predicted tumor)" if fallback else args.region,
                "region_voxels": int(explain.score.last_region_voxels[0]),
                "window_centred_on": window.centred_on,
                "window_start": " ".join(map(str, window.start)),
                "window_size": " ".join(map(str, window.size)),
            }
        )
    return maps


def _add_panels(args, explained: _Explained, network, m: str, case: CaseData, x, image_w, label_w, maps) -> None:
    """The figure panels of one shown case: one axial slice through its tumor, with the saliency maps
    (Figure 7) and the channel-summarised feature maps (Figure 8)."""
    from aqcf.explain.features import feature_maps
    from aqcf.visualize.overlays import pick_slices

    z = pick_slices(label_w, 1)[0]
    panel = {
        "name": f"{m.upper()} {case.id}",
        "image": image_w[:, :, z],
        "label": label_w[:, :, z],
        "orientation": case.orientation,
        "spacing": case.spacing,
    }
    explained.saliency_panels[m].append({**panel, "maps": {k: v[:, :, z] for k, v in maps.items()}})
    features = feature_maps(network, x, m, method=args.feature_summary)
    explained.feature_panels[m].append(
        {**panel, "maps": {k: v[0, :, :, z].cpu().numpy() for k, v in features.items()}}
    )


@dataclass
class _Gates:
    """The gate statistics: ``summary`` (the ``gates`` entry of ``summary.json``), and where joint passes
    ran, the ``recorder`` of λ and its ``rows`` (else None and empty)."""

    summary: dict
    recorder: object | None = None
    rows: list = field(default_factory=list)


def _gate_statistics(args, predictor, cases: Mapping, context_rows: Sequence = ()) -> _Gates:
    """Table 6: λ per encoder stage and direction from joint passes on real CT and MRI windows (the
    gates need both streams), skipped with ``--no-gates``, without both modalities, or without
    cross-fusion blocks."""
    import torch
    from tqdm.auto import tqdm

    from aqcf.explain.gates import GateRecorder

    network, patch_size, device = predictor.network, predictor.window.roi_size, predictor.device
    gates = _Gates({"pairs": 0})
    if context_rows:
        gates.summary["absent_context_rms"] = [row._asdict() for row in context_rows]
    streams = tuple(getattr(network, "modalities", MODALITIES))
    pairs = pair_cases(*(cases.get(m, []) for m in streams))
    if args.no_gates:
        gates.summary["skipped"] = "--no-gates"
    elif not pairs:
        needed = "both CT and MRI" if streams == MODALITIES else "every stream's (" + ", ".join(streams) + ")"
        gates.summary["skipped"] = f"the gates need {needed} cases"
    elif not getattr(network, "cross_fusion", True):
        gates.summary["skipped"] = "the network has no cross-fusion blocks"
    else:
        gates.recorder = GateRecorder()
        with torch.no_grad():
            for group in tqdm(pairs, desc="gates", unit="pair", disable=args.no_progress):
                windows = [extract_window(*c.load(), patch_size, network.divisor)[0] for c in group]
                network(*(torch.from_numpy(np.ascontiguousarray(w))[None, None].to(device) for w in windows))
                gates.recorder.update(network.last_gates)
        gates.rows = gates.recorder.table()
        gates.summary.update(pairs=len(pairs), pairing="i-th CT case with i-th MRI case, shorter list cycled",
                             rows=[row._asdict() for row in gates.rows])
    return gates


def _summary(args, layers: Mapping, methods: Sequence[str], window_size, cases: Mapping, rows, gates: _Gates) -> dict:
    """The content of ``summary.json``: the settings, :func:`~aqcf.explain.metrics.summarise_saliency`
    per method, and the gate statistics."""
    from aqcf.explain.metrics import summarise_saliency

    return {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "layers": {m: layers[m] for m in cases},
        "methods": list(methods),
        "window": "whole preprocessed volume" if window_size is None
        else f"{'×'.join(map(str, window_size))} voxels centred on the largest tumor",
        "score": f"mean tumor logit over the {'predicted tumor voxels' if args.region == 'predicted' else 'window'}",
        "band_mm": args.band_mm,
        "cases": {m: len(c) for m, c in cases.items()},
        "saliency": {
            method: summarise_saliency([r for r in rows if r["method"] == method]) for method in methods
        },
        "gates": gates.summary,
    }


def _write_outputs(
    out: Path, band_mm: float, summary: Mapping, cases: Mapping, explained: _Explained, gates: _Gates
) -> None:
    """Write the gate table and figure, ``saliency.csv``, ``summary.json``, ``summary.md`` and the
    figures into ``out``; remove the results of an earlier run this one did not redo; print the
    summary table (stdout) and the written paths (stderr)."""
    from aqcf.explain.gates import plot_gates, write_gate_table
    from aqcf.io import write_text_atomic
    from aqcf.visualize.canvas import save_figure
    from aqcf.visualize.maps import plot_feature_maps, plot_saliency

    if gates.recorder is not None:
        write_gate_table(gates.rows, out, context=explained.context_rows)
        plot_gates(gates.recorder, out / "gates.png",
                   title=f"Adaptive gates λ over {gates.summary['pairs']} CT-MRI window pairs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    write_text_atomic(out / SALIENCY_CSV, _csv_text(explained.rows))
    write_text_atomic(out / SUMMARY_JSON, json.dumps(_no_nan(summary), indent=2, allow_nan=False) + "\n")
    markdown = _summary_markdown(summary, band_mm)
    write_text_atomic(out / SUMMARY_MD, markdown)
    written += [SALIENCY_CSV, SUMMARY_JSON, SUMMARY_MD]
    ordered = [m for m in FIGURE_ORDER if m in cases]
    saliency_rows = [row for m in ordered for row in explained.saliency_panels[m]]
    if saliency_rows:
        save_figure(plot_saliency(saliency_rows, title="Tumor-class saliency"), out / SALIENCY_PNG)
        feature_rows = [row for m in ordered for row in explained.feature_panels[m]]
        save_figure(plot_feature_maps(feature_rows, title="Feature maps"), out / FEATURES_PNG)
        written += [SALIENCY_PNG, FEATURES_PNG]
    if gates.summary["pairs"]:
        written += list(GATE_FILES)
    for name in OUTPUT_FILES:  # with --overwrite, results of an earlier run this one did not redo
        if name not in written:
            (out / name).unlink(missing_ok=True)
    print(markdown)
    print(f"wrote {', '.join(str(out / name) for name in written)}", file=sys.stderr)

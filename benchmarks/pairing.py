"""Does a small paired subset help after unpaired training? (the paper's future work 2)

1. Writes paired phantoms with ``aqcf synth --paired``: ``--n-train`` patients for fine-tuning
   (``OUT/paired_train``, seed ``--train-seed``) and ``--n-test`` held-out patients (``OUT/paired_test``,
   another seed), with the demo's difficulty flags (``aqcf.demo.DEMO_PHANTOMS``).
2. Fine-tunes from ``--unpaired-ckpt`` (``aqcf fit --init_from``, fresh optimizer) for ``--steps`` steps
   in two arms layered on the same configs (``--config``, default ``configs/demo.yaml``, then
   ``configs/paired_finetune.yaml``), which differ only in ``data.paired_ratio``:
   ``control`` 0 (the unpaired cohorts only: extra steps alone), ``paired`` 0.5 (the config's).
3. Evaluates the starting checkpoint and each arm's ``last.ckpt`` (the same number of steps) on the
   held-out paired patients: Dice of liver and tumor per modality for unimodal inference (each scan on
   its own, the other stream zero-filled, :class:`~aqcf.inference.predictor.Predictor`, labels on the
   scan's own grid) and for both-modalities inference (:func:`predict_both`: ``forward(ct, mri)`` over a
   sliding window on the patient's preprocessed CT grid, the MRI resampled there; CT scored on its own
   grid, MRI against its label resampled onto the CT grid). Dice is pooled over patients
   (2·Σ|P∩R| / (Σ|P|+Σ|R|)); the per-patient mean is in the JSON.

Writes ``OUT/pairing.json`` and ``OUT/pairing.md``. Example (the demo's checkpoint and phantoms)::

    .venv/bin/python benchmarks/pairing.py --out pairing_out --unpaired-ckpt demo_out/run/checkpoints/best.ckpt \\
        --phantoms demo_out/phantoms --steps 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aqcf.constants import CT, MRI  # noqa: E402
from aqcf.errors import AqcfError  # noqa: E402

ARMS = {"control": "0", "paired": None}  # paired_ratio per arm (None: the config's)
CLASSES = {"liver": (1, 2), "tumor": (2,)}


def predict_both(network, ct: torch.Tensor, mri: torch.Tensor, window, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams' logits of one co-registered pair by one sliding window over both images.

    Args:
        network: ``forward(ct, mri) -> (ct_logits, mri_logits)``.
        ct, mri: (1, X, Y, Z) preprocessed images on one grid.
        window: :class:`~aqcf.inference.predictor.WindowSettings`.
        device: Where the windows run.

    Returns:
        ``(ct_logits, mri_logits)``, each (1, C, X, Y, Z) on the CPU.
    """
    from monai.inferers import sliding_window_inference

    def both(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(network(x[:, :1], x[:, 1:2]), dim=1)

    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.cat([ct, mri])[None].float(), roi_size=window.roi_size, sw_batch_size=window.batch_size,
            predictor=both, overlap=window.overlap, mode=window.mode, sw_device=device, device=torch.device("cpu"),
        )
    classes = logits.shape[1] // 2
    return logits[:, :classes], logits[:, classes:]


def _counts(pred: np.ndarray, ref: np.ndarray) -> dict:
    out = {}
    for name, values in CLASSES.items():
        p, r = np.isin(pred, values), np.isin(ref, values)
        out[name] = [int((p & r).sum()), int(p.sum()), int(r.sum())]
    return out


def evaluate(ckpt: Path, cases: list[dict], device: str = "auto", overlap: float | None = None) -> dict:
    """Dice per inference mode, modality and class of one checkpoint on the paired test patients."""
    from aqcf.data.paired import mri_on_ct_grid
    from aqcf.data.preprocess import preprocess_image, restore_to_original
    from aqcf.inference.predictor import Predictor, argmax_labels

    predictor = Predictor.from_checkpoint(ckpt, device=device, overlap=overlap)
    per_case = []
    for case in cases:
        row = {"id": case["id"]}
        for m in (CT, MRI):
            labels = predictor.segment_file(case[f"{m}_image"], m).labels
            ref = np.asarray(nib.load(case[f"{m}_label"]).dataobj)
            row[f"single/{m}"] = _counts(labels, ref)
        ct, record = preprocess_image(case["ct_image"], predictor.preprocessing[CT])
        grid = (tuple(record["preprocessed_shape"]), np.asarray(record["preprocessed_affine"]))
        mri, mri_ref, _ = mri_on_ct_grid(case["mri_image"], case["mri_label"], grid, predictor.preprocessing[MRI])
        ct_logits, mri_logits = predict_both(predictor.network, ct, torch.from_numpy(mri)[None], predictor.window,
                                             predictor.device)
        ct_labels = restore_to_original(argmax_labels(ct_logits).numpy(), record)
        row[f"both/{CT}"] = _counts(ct_labels, np.asarray(nib.load(case["ct_label"]).dataobj))
        row[f"both/{MRI}"] = _counts(argmax_labels(mri_logits).numpy(), mri_ref)
        per_case.append(row)
    summary = {}
    for key in [k for k in per_case[0] if k != "id"]:
        summary[key] = {}
        for name in CLASSES:
            i, p, r = (sum(row[key][name][j] for row in per_case) for j in range(3))
            dices = [2 * row[key][name][0] / max(row[key][name][1] + row[key][name][2], 1) for row in per_case]
            summary[key][name] = {"pooled_dice": 2 * i / max(p + r, 1), "mean_dice": float(np.mean(dices))}
    return {"checkpoint": str(ckpt), "summary": summary, "cases": per_case}


def _table(results: dict) -> str:
    keys = list(next(iter(results.values()))["summary"])
    head = "| model | " + " | ".join(f"{k.replace('/', ' ').upper()} {c}" for k in keys for c in CLASSES) + " |"
    lines = [head, "|" + "---|" * (1 + len(keys) * len(CLASSES))]
    for name, result in results.items():
        cells = [f"{result['summary'][k][c]['pooled_dice']:.3f}" for k in keys for c in CLASSES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from aqcf.demo import DEMO_PHANTOMS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--unpaired-ckpt", required=True, help="checkpoint of the unpaired run (aqcf fit)")
    p.add_argument("--phantoms", required=True, help="folder holding the unpaired LiTS/ and ATLAS/ cohorts")
    p.add_argument("--steps", type=int, required=True, help="fine-tuning steps of each arm")
    p.add_argument("--config", action="append", help="base config(s) (default configs/demo.yaml); "
                   "configs/paired_finetune.yaml is layered after them")
    p.add_argument("--fit-args", default="", help="extra `aqcf fit` arguments for both arms")
    p.add_argument("--n-train", type=int, default=4, help="paired patients for fine-tuning (default 4)")
    p.add_argument("--n-test", type=int, default=6, help="held-out paired test patients (default 6)")
    p.add_argument("--train-seed", type=int, default=1000, help="synth seed of the training pairs (default 1000)")
    p.add_argument("--test-seed", type=int, default=2000, help="synth seed of the test pairs (default 2000)")
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 48), metavar=("X", "Y", "Z"),
                   help="paired phantom size in voxels (default 128 128 48, the demo's)")
    p.add_argument("--synth-args", default=DEMO_PHANTOMS, help="`aqcf synth` difficulty flags (default the demo's)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap (default the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def main(argv: list[str] | None = None) -> int:
    from aqcf.cli import main as aqcf
    from aqcf.data.phantoms import read_paired
    from aqcf.io import write_json_atomic, write_text_atomic

    args = _parser().parse_args(argv)
    out, phantoms = Path(args.out), Path(args.phantoms)
    for cohort in ("LiTS", "ATLAS"):
        if not (phantoms / cohort).is_dir():
            raise AqcfError(f"{phantoms}: no {cohort}/ folder (give the unpaired phantoms, e.g. demo_out/phantoms)")
    sets = (("paired_train", args.n_train, args.train_seed), ("paired_test", args.n_test, args.test_seed))
    for name, n, seed in sets:
        if not (out / name / "Paired").is_dir():
            code = aqcf(["synth", "--out", str(out / name), "--n-ct", "0", "--n-mri", "0", "--paired", str(n),
                         "--shape", *map(str, args.shape), "--seed", str(seed), *args.synth_args.split(),
                         "--overwrite", "--no-progress"])
            if code:
                raise AqcfError(f"aqcf synth for {name} failed (exit code {code})")
    configs = args.config or [str(REPO / "configs" / "demo.yaml")]
    checkpoints = {"start": Path(args.unpaired_ckpt)}
    for arm, ratio in ARMS.items():
        run = out / arm
        fit = ["fit", *[x for c in configs for x in ("--config", c)],
               "--config", str(REPO / "configs" / "paired_finetune.yaml"), *args.fit_args.split(),
               "--data.ct_root", str(phantoms / "LiTS"), "--data.mri_root", str(phantoms / "ATLAS"),
               "--data.cache_dir", str(out / "cache"), "--data.paired_root", str(out / "paired_train" / "Paired"),
               "--trainer.max_steps", str(args.steps), "--trainer.default_root_dir", str(run),
               "--run_name", f"pairing-{arm}", "--init_from", str(args.unpaired_ckpt), "--overwrite", "true"]
        if ratio is not None:
            fit += ["--data.paired_ratio", ratio]
        print(f"[pairing] fine-tuning arm {arm!r} for {args.steps} steps", flush=True)
        code = aqcf(fit)
        if code:
            raise AqcfError(f"aqcf fit of arm {arm} failed (exit code {code})")
        checkpoints[arm] = run / "checkpoints" / "last.ckpt"
    test = read_paired(out / "paired_test" / "Paired")
    results = {}
    for name, ckpt in checkpoints.items():
        print(f"[pairing] evaluating {name} ({ckpt}) on {len(test)} held-out paired patients", flush=True)
        results[name] = evaluate(ckpt, test, args.device, args.overlap)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    write_json_atomic(out / "pairing.json", {"settings": settings, "results": results})
    table = _table(results)
    text = (
        "# Paired fine-tuning against more unpaired steps\n\n"
        f"Start: `{args.unpaired_ckpt}`; each arm {args.steps} steps from it (fresh AdamW, "
        "configs/paired_finetune.yaml); "
        f"control: paired_ratio 0, paired: the config's ratio. {len(test)} held-out paired patients (seed "
        f"{args.test_seed}), {args.n_train} training pairs (seed {args.train_seed}). Pooled Dice; `SINGLE`: one "
        "modality, the other stream zero-filled; `BOTH`: forward(ct, mri) on the CT grid.\n\n"
        f"{table}\n"
    )
    write_text_atomic(out / "pairing.md", text)
    print(table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AqcfError as err:
        print(f"pairing: error: {err}", file=sys.stderr)
        sys.exit(2)

"""The ``aqcf`` program.

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (:mod:`aqcf.cli.lightning`); every
other verb is an ordinary subcommand whose module exposes ``main(argv) -> int`` and is imported only
when called, so ``aqcf --help`` stays fast.

One error contract for every verb (:mod:`aqcf.errors` states it): argument errors end in the verbs'
parsers, which exit with status 2 themselves; :func:`main` turns an :class:`~aqcf.errors.AqcfError` or an
``OSError`` into the one ``aqcf: error:`` line and exit status 2.
Any other exception is a bug in aqcf and keeps its traceback (exit status 1), so it can be reported.
"""

from __future__ import annotations

import importlib
import sys

from aqcf.errors import AqcfError, ArgumentParser, one_line, os_error_line

__all__ = ["main", "VERBS", "LIGHTNING_VERBS", "ArgumentParser", "os_error_line"]

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")

# verb -> ("module:function", one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "summary": ("aqcf.networks.summary:main", "print the network's layers and parameter count"),
    "demo": ("aqcf.demo:main", "phantom cohorts -> joint training -> held-out test -> report (make demo)"),
    "synth": ("aqcf.data.phantoms:main", "write phantom CT (LiTS layout) and MRI (ATLAS layout) cohorts"),
    "preprocess": ("aqcf.data.preprocess:main", "preprocess a cohort into the cache folder"),
    "figures": ("aqcf.visualize.figures:main", "draw the paper's figures (training curves, qualitative overlays)"),
    "reader-stats": ("aqcf.evaluation.reader_study:main", "reader study table: scores, ICC(2,1), Cohen's kappa"),
    "evaluate": ("aqcf.evaluation.evaluate:main", "Dice, HD95, MSD of predicted masks against references"),
    "report": ("aqcf.evaluation.report:main", "cross-validation tables, Wilcoxon tests, ablation view"),
    "export-nnunet": ("aqcf.data.nnunet_export:main", "a cohort as an nnU-Net v2 raw data set with aqcf's folds"),
    "segment": ("aqcf.inference.segment:main", "segment scans with a checkpoint: masks, liver/tumor measures"),
    "export": ("aqcf.inference.export:main", "a checkpoint's unimodal network as ONNX or TorchScript + its settings"),
    "explain": ("aqcf.explain.run:main", "Grad-CAM(++) tumor saliency + localisation scores, feature maps, gate table"),
}


def _usage() -> str:
    lines = ["usage: aqcf VERB [options]   (aqcf VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {v:<10} LightningCLI: {v} a model from a YAML config (--config)" for v in LIGHTNING_VERBS]
    lines += [f"  {v:<10} {help_}" for v, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def _run_verb(target: str, argv: list[str]) -> int:
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"aqcf {version('aqcf')}")
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        if verb in LIGHTNING_VERBS:
            return _run_verb("aqcf.cli.lightning:run_lightning", [verb, *rest])
        if verb in VERBS:
            return _run_verb(VERBS[verb][0], rest)
        print(f"aqcf: error: unknown verb {verb!r} (see `aqcf --help` for the verbs)", file=sys.stderr)
        return 2
    except AqcfError as err:
        print(f"aqcf: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"aqcf: error: {os_error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``aqcf fit|validate|test|predict``: LightningCLI over :class:`SegmentationModule` and the unpaired data.

Defaults added here so every config gets them: a checkpoint callback (best by mean validation Dice and
``last.ckpt`` in ``<default_root_dir>/checkpoints``), validation overlay pictures, the learning-rate
monitor, the writers of ``test`` results (:class:`~aqcf.evaluation.test_results.TestResultsWriter`) and
``predict`` masks (:class:`~aqcf.inference.writer.PredictionMaskWriter`), atomic checkpoint writes, and a
W&B fallback to offline mode when no API key is configured.

Checked before any work starts (one ``aqcf: error:`` line, exit 2, see :mod:`aqcf.cli`): the run folder,
checkpoint folder and cache folder can be folders; ``--init_from`` (fit only, not with ``--ckpt_path``;
what it loads and what starts anew: docs/training.md, *Fine-tuning from a checkpoint*) passes the same
check; ``--ckpt_path`` (``last`` and ``best`` resolved in
``<run>/checkpoints``) passes :func:`~aqcf.training.checkpoint_io.check_checkpoint`; ``fit`` refuses a
folder holding checkpoints unless resuming or ``--overwrite true``; ``test`` refuses to replace the
results in ``<run>/test`` and ``predict`` the masks in its output folder without ``--overwrite true``.
``fit`` removes the temporary files of checkpoint writes a kill interrupted, and a resumed run that has
already reached ``max_steps`` / ``max_epochs`` says so and trains nothing.
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from aqcf.data.datamodule import UnpairedDataModule
from aqcf.errors import AqcfError, one_line
from aqcf.evaluation.evaluate import METRICS_FILE, SUMMARY_FILE
from aqcf.evaluation.test_results import TestResultsWriter, results_folder
from aqcf.inference.writer import PREDICTIONS_DIR, PredictionMaskWriter
from aqcf.io import check_output, safe_name
from aqcf.models.segmentation import MONITOR, SegmentationModule
from aqcf.networks.aqcfnet import complete_network_config
from aqcf.training.callbacks import ValidationOverlays
from aqcf.training.checkpoint_io import (
    AtomicCheckpointIO,
    check_checkpoint,
    finished_reason,
    normalise_loop_state,
    remove_stale_checkpoint_temporaries,
)
from aqcf.training.timing import StepTimer

__all__ = ["AqcfCLI", "run_lightning", "ensure_wandb_mode"]

# Settings of a run rather than of the trained weights, under `model.`. LightningCLI applies a
# --ckpt_path checkpoint's hyper-parameters over the whole model config; these, where the command line or
# a --config file names them, keep the value given there (`aqcf test --ckpt_path best.ckpt
# --model.sw_overlap 0.5` tests at 0.5). absent_context changes no parameter (docs/model.md).
RUN_SETTINGS = (
    "network.init_args.absent_context",
    "sw_overlap",
    "val_overlap",
    "sw_batch_size",
    "sw_mode",
    "stitch_on_cpu",
    "test_output",
    "test_overlays",
    "compile",
    "compile_mode",
    "compile_backend",
    "check_finite",
)

WANDB_HELP = (
    "W&B: no API key found (WANDB_API_KEY, `wandb login`) and WANDB_MODE is not set: logging offline "
    "to the run folder; upload later with `wandb sync`, or set WANDB_MODE=disabled to turn W&B off"
)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def ensure_wandb_mode() -> str | None:
    """Switch W&B to offline mode, with a message, when it has no API key and no WANDB_MODE.

    Without a key W&B would otherwise stop the run at ``wandb.init``. Returns the mode it set, or None.
    """
    if os.environ.get("WANDB_MODE") or _has_wandb_key():
        return None
    print(f"aqcf: {WANDB_HELP}", file=sys.stderr)
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


class _Parser(LightningArgumentParser):
    """Bad arguments end with one line, ``aqcf: error: ...``, and exit code 2."""

    def error(self, message: str, *args, **kwargs):  # noqa: D401 - argparse's signature
        first = one_line("\n".join(str(message).strip().splitlines()[:3]))
        print(f"aqcf: error: {first}  (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class AqcfCLI(LightningCLI):
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", ["aqcf"])
        parser = _Parser(**kwargs)
        parser.add_argument(
            "-c", "--config", action="config", help="path to a YAML config (may repeat: later files override)"
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
                # always best.ckpt / last.ckpt: fit refuses a folder holding checkpoints unless resuming
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(ValidationOverlays, "overlays")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        # steps/s and the share of time waiting for data, per epoch (aqcf.training.timing)
        parser.add_lightning_class_args(StepTimer, "step_timer")
        # `aqcf predict` writes masks in each scan's original geometry (inactive in fit/validate/test)
        parser.add_lightning_class_args(PredictionMaskWriter, "prediction_writer")
        # `aqcf test` writes per-case metrics and overlays (settings: model.test_output, model.test_overlays)
        parser.add_lightning_class_args(TestResultsWriter, "test_results")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})
        # the sliding window of validation is the training patch
        parser.link_arguments("data.patch_size", "model.patch_size")
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="experiment name; the run folder defaults to runs/<run_name>/fold<k> (run_name defaults to the "
            "last --config file's name)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start afresh even if the run folder already holds checkpoints (they are replaced); test: "
            "replace the results in <run>/test; predict: replace the masks in the predictions folder",
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="fit: start a fresh run from the model weights of this `aqcf fit` checkpoint (strict), without its "
            "optimizer, schedule or step counters (fine-tuning); --ckpt_path resumes a run instead",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the model's hyper-parameters from an existing --ckpt_path file next, with
        # torch.load: a damaged or foreign file must fail here first, with one line
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and Path(ckpt).is_file():
            check_checkpoint(ckpt)
        # and applies them over the model config: keep the run settings the user gave
        self._run_settings = _given_run_settings(self.config[subcommand], args) if ckpt else {}

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _apply_run_settings(config.model, getattr(self, "_run_settings", {}))
        run_name = config.run_name or _config_stem(config) or "aqcf"
        config.run_name = run_name
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(Path("runs") / run_name / f"fold{config.data.fold}")
        root = config.trainer.default_root_dir
        _place_loggers(config.trainer.logger, root, run_name, config.data.fold)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")
        if "wandb" in str(config.trainer.logger).lower():
            ensure_wandb_mode()
        for folder in (root, config.checkpoint.dirpath, config.data.get("cache_dir")):
            if folder is not None:
                check_output(folder, kind="cache")
        if self.subcommand == "fit" and config.get("ckpt_path") is None and not config.get("overwrite"):
            existing = sorted(Path(config.checkpoint.dirpath).glob("*.ckpt"))
            if existing:
                raise AqcfError(
                    f"{config.checkpoint.dirpath} already holds checkpoints ({existing[0].name}, ...): resume with "
                    "--ckpt_path last, start afresh with --overwrite true, or choose another --trainer.default_root_dir"
                )
        self._resume = None
        self._init_from = _check_init_from(self.subcommand, config)
        if self._init_from is not None:  # a checkpoint older than the reading options: build it as trained
            _complete_network(config.model, self._init_from[1]["hyper_parameters"].get("network"))
        ckpt = _resolve_ckpt_path(config.get("ckpt_path"), config.checkpoint)
        if ckpt not in (None, "hpc", "registry"):
            checkpoint = check_checkpoint(ckpt, resume=self.subcommand == "fit")
            config.ckpt_path = ckpt
            _complete_network(config.model, checkpoint["hyper_parameters"].get("network"))
            if self.subcommand == "fit":
                normalise_loop_state(checkpoint)
                self._resume = {key: checkpoint.get(key) for key in ("global_step", "loops")}
        _check_results(self.subcommand, config, ckpt)
        if self.subcommand == "fit" and _first_process():
            removed = remove_stale_checkpoint_temporaries(config.checkpoint.dirpath)
            if removed:
                print(f"aqcf: removed {len(removed)} temporary file(s) of interrupted checkpoint writes from "
                      f"{config.checkpoint.dirpath} ({', '.join(p.name for p in removed[:3])}"
                      f"{', ...' if len(removed) > 3 else ''})", file=sys.stderr)

    def fit(self, **kwargs) -> None:
        """``trainer.fit``, unless the checkpoint resumed holds a finished run."""
        if self._resume is not None:
            reason = finished_reason(self._resume, self.trainer.max_steps, self.trainer.max_epochs)
            if reason is not None:
                print(f"aqcf: {kwargs.get('ckpt_path')}: the run is finished ({reason}); nothing to train "
                      "(raise --trainer.max_epochs or --trainer.max_steps to train further)")
                return
        self.trainer.fit(**kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if getattr(self, "_init_from", None) is not None:
            _load_weights(self.model, *self._init_from)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _complete_network(model_config, trained_network) -> None:
    """Give ``model_config.network`` the reading arguments a checkpoint predates, as it was built."""
    network = model_config.get("network") if model_config is not None else None
    completed = complete_network_config(trained_network)
    if completed is trained_network or network is None or network.get("class_path") != completed["class_path"]:
        return
    for key in set(completed["init_args"]) - set(trained_network.get("init_args") or {}):
        network.init_args[key] = completed["init_args"][key]


def _check_init_from(subcommand: str | None, config) -> tuple[str, dict] | None:
    """``--init_from``: for ``fit`` only, not with ``--ckpt_path``, and an aqcf checkpoint.

    Returns:
        ``(path, checkpoint)`` (read once, memory-mapped), or None without ``--init_from``.
    """
    path = config.get("init_from")
    if path is None:
        return None
    if subcommand != "fit":
        raise AqcfError(f"--init_from is for `aqcf fit` (a fresh run from trained weights), not `aqcf {subcommand}`")
    if config.get("ckpt_path") is not None:
        raise AqcfError(
            "--init_from starts a fresh run from a checkpoint's weights and --ckpt_path resumes a run: give one of them"
        )
    return str(path), check_checkpoint(path)


def _load_weights(model, path: str, checkpoint: dict) -> None:
    """Load ``checkpoint``'s ``state_dict`` into ``model`` (strict); its optimizer and counters are not read."""
    state = checkpoint["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else type(err).__name__
        raise AqcfError(
            f"{path}: its weights do not fit this model's network (another architecture or widths?): {detail}"
        ) from None


def _resolve_ckpt_path(ckpt: str | None, checkpoint) -> str | None:
    """``last`` / ``best`` as files in the checkpoint folder (in a new process Lightning knows no best model)."""
    if ckpt == "last":
        return str(Path(checkpoint.dirpath) / "last.ckpt")
    if ckpt == "best" and checkpoint.filename:
        return str(Path(checkpoint.dirpath) / f"{checkpoint.filename}.ckpt")
    return ckpt


def _check_results(subcommand: str | None, config, ckpt: str | None) -> None:
    """``test`` and ``predict`` replace earlier results only with ``--overwrite true``."""
    overwrite = bool(config.get("overwrite"))
    root = Path(config.trainer.default_root_dir)
    if subcommand == "test":
        folder = results_folder(config.model.get("test_output"), root)
        check_output(folder, inputs=[ckpt], overwrite=overwrite, kind="folder",
                     names=(METRICS_FILE, SUMMARY_FILE), flag="--overwrite true")
    elif subcommand == "predict":
        writer = config.prediction_writer
        suffix = safe_name(writer.get("suffix") or "", "--prediction_writer.suffix")
        folder = writer.get("output_dir") or root / PREDICTIONS_DIR
        check_output(folder, inputs=[ckpt], overwrite=overwrite, kind="folder",
                     names=(f"*{suffix}.nii.gz", f"*{suffix}.json"), flag="--overwrite true")


def _given_run_settings(config, args) -> dict:
    """The :data:`RUN_SETTINGS` named on the command line (``--model.KEY``) or in a ``--config`` file's
    ``model:`` section, with the values parsed from them."""
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    named = {a.split("=", 1)[0].removeprefix("--model.") for a in argv if a.startswith("--model.")}
    for path in config.get("config") or []:
        if path is None:
            continue
        try:
            section = (yaml.safe_load(Path(str(path)).read_text()) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError):  # parsed already: only a vanished file lands here
            continue
        named.update(_dotted_keys(section))
    given = {key: config.model[key] for key in RUN_SETTINGS if key in named and key in config.model}
    if any(key.startswith("network.") for key in given):
        given["network.class_path"] = config.model.network.class_path
    return given


def _apply_run_settings(model_config, given: dict) -> None:
    """Put the run settings :func:`_given_run_settings` found back over a checkpoint's; the network's
    only onto a network of the same class (another class has other arguments)."""
    same_network = model_config.get("network") is not None and (
        model_config.network.get("class_path") == given.get("network.class_path"))
    for key, value in given.items():
        if key.startswith("network.") and (key == "network.class_path" or not same_network):
            continue
        model_config[key] = value


def _dotted_keys(section, prefix: str = "") -> set[str]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a", "a.b", "c"}``."""
    if not isinstance(section, dict):
        return set()
    keys = set()
    for key, value in section.items():
        keys.add(prefix + str(key))
        keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _first_process() -> bool:
    """Rank 0 of a (possibly distributed) launch, or a plain process."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _config_stem(config) -> str | None:
    files = config.get("config") or []
    files = [f for f in files if f is not None]
    return Path(str(files[-1])).stem if files else None


def _place_loggers(loggers, root: str, run_name: str, fold: int) -> None:
    """Loggers whose save_dir is unset or "." write into the run folder; W&B runs are named and grouped."""
    if not isinstance(loggers, list):
        loggers = [loggers]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is None:
            continue
        if init_args.get("save_dir") in (None, ".", ""):
            init_args.save_dir = root
        if "wandb" in str(logger.class_path).lower():
            if init_args.get("name") is None:
                init_args.name = f"{run_name}-fold{fold}"
            # W&B groups the folds of one experiment on the dashboard
            kwargs = dict(logger.get("dict_kwargs") or {})
            kwargs.setdefault("group", run_name)
            logger.dict_kwargs = kwargs


def run_lightning(argv: list[str]) -> int:
    """Entry for ``aqcf fit|validate|test|predict ...``."""
    # called in-process (aqcf demo, tests) argv differs from sys.argv by design
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        AqcfCLI(
            SegmentationModule,
            UnpairedDataModule,
            # from the console script argv is sys.argv[1:]: let LightningCLI read it there (no warning)
            args=None if argv == sys.argv[1:] else argv,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb(exit_code=0)
    return 0


def _finish_wandb(exit_code: int) -> None:
    """Close this verb's W&B run (failed where ``exit_code`` is not 0): a later verb in the same process
    (``aqcf demo``'s test after its fit, a notebook, a loop over folds) starts its own run instead of
    logging into this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)

"""The `nnresume` command line: each command parses its options into settings and calls one library function;
errors become exit codes in one place (`NnresumeGroup.invoke`).

Exit codes (errors.py): 0 done; 1 error (the run could not go on); 2 usage; 3 finished, but some cases failed or are
quarantined; 130 stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM (e.g. a scheduler's time limit).

Size: over 400 lines only because of click's option declarations (about 70 options, most of them nnU-Net's, for
the preprocessing steps and `predict`); the code beside them is short.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

import click

from . import __version__
from .config import (
    DEFAULT_CONFIGURATIONS,
    Paths,
    PreprocessSettings,
    check_budget,
    parse_memory,
    parse_spacing,
)
from .errors import EXIT_CASES_FAILED, EXIT_ERROR, EXIT_OK, NnresumeError

log = logging.getLogger("nnresume")

# nnU-Net's CLI takes several values after one flag (argparse nargs='+'); click takes one per flag.
MULTI_VALUE = {"-d", "-c", "-f", "-overwrite_target_spacing"}


class NnUNetStyleCommand(click.Command):
    """Accepts `-d 1 2` and `-c 2d 3d_fullres` as nnU-Net does, by rewriting them to `-d 1 -d 2`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        current: Optional[str] = None
        for token in args:
            if token in MULTI_VALUE:
                current = token
                out.append(token)
                continue
            if current is not None and not token.startswith("-") and out and out[-1] != current:
                out.extend([current, token])
                continue
            if token.startswith("-") and not _is_number(token):
                current = None
            out.append(token)
        return super().parse_args(ctx, out)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _with_ledgers(datasets: tuple[str, ...], fn: Any, paths: Optional[Paths] = None) -> list[Any]:
    """`fn(layout, ledger)` for each dataset's existing ledger; the ledger is closed whatever happens."""
    from .dataset import layout_for
    from .ledger.repository import Ledger

    paths = paths or Paths.for_reading()
    out = []
    for d in datasets:
        layout = layout_for(d, paths.raw, paths.preprocessed)
        ledger = Ledger.open(str(layout.ledger), create=False)
        try:
            out.append(fn(layout, ledger))
        finally:
            ledger.close()
    return out


def _echo_json(items: list[Any]) -> None:
    click.echo(json.dumps(items[0] if len(items) == 1 else items, indent=2))


class NnresumeGroup(click.Group):
    """Turns an NnresumeError from any command into its message, hint and exit code, and anything unexpected into
    an internal error (exit code 1) whose traceback goes to the debug log, never to the terminal."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NnresumeError as e:
            click.echo(f"nnresume: {e.message}", err=True)
            if e.hint:
                click.echo(f"  hint: {e.hint}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:
            log.error("nnresume: internal error: %s: %s", type(e).__name__, e)
            log.error("  the ledger is consistent; run the same command again to resume. The full traceback is in "
                      "the run's log file (see `nnresume status`).")
            log.debug("traceback", exc_info=True)
            sys.exit(EXIT_ERROR)


@click.group(cls=NnresumeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="nnresume")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages, nnU-Net's own output included.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Resumable, memory-aware preprocessing for nnU-Net v2.

    Uses nnU-Net's own fingerprint extractor, planner and preprocessors, one case at a time, and records every case in
    a SQLite ledger beside the outputs, so that a rerun after any crash redoes only what is missing or changed.
    Paths come from nnUNet_raw and nnUNet_preprocessed, as for nnU-Net.
    """
    from .progress import setup_logging

    setup_logging(verbose)
    ctx.obj = {"verbose": verbose}


def _options(*decorators: Any) -> Any:
    """Several click options as one decorator, in the order --help lists them."""
    def apply(fn: Any) -> Any:
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return apply


# the options of every preprocessing step (nnUNetv2_extract_fingerprint's, and what resuming adds)
_RUN_OPTIONS = _options(
    click.option("-d", "datasets", multiple=True, required=True,
                 help="Dataset id or name (Dataset001_Heart); several allowed: -d 1 2."),
    click.option("-fpe", "fingerprint_extractor", default="DatasetFingerprintExtractor", show_default=True,
                 help="Dataset fingerprint extractor class."),
    click.option("--verify_dataset_integrity", "--verify-dataset-integrity", "verify_dataset_integrity",
                 is_flag=True,
                 help="Run nnU-Net's dataset integrity check first."),
    click.option("-np", "num_workers", type=click.IntRange(min=1), default=None,
                 help="At most this many cases at once. Default: the CPUs this process may use."),
    click.option("-npfp", "num_workers_fingerprint", type=click.IntRange(min=1), default=None,
                 help="At most this many cases at once during the fingerprint stage. Default: -np."),
    click.option("--max-ram", "max_ram", default=None,
                 help="Memory budget for the whole process tree: 28G, 512M, or a fraction of available memory such "
                      "as 0.8. Default: available memory (cgroup-aware) minus a reserve."),
    click.option("--no-pbar", "--no_pbar", "no_pbar", is_flag=True, help="No progress bars (for logs and clusters)."),
    click.option("--retry-quarantined", is_flag=True, help="Try quarantined cases again even if nothing changed."),
    click.option("--grace", "grace_seconds", type=float, default=20.0, show_default=True,
                 help="Seconds running cases get to finish after SIGINT/SIGTERM before they are stopped."),
    click.option("--strict", is_flag=True,
                 help="Fail cases with warnings (NaN read as 0, image and label not aligned, only background) "
                      "instead of preprocessing them as nnU-Net would."),
    click.option("--allow-oversize", is_flag=True,
                 help="Let a case that runs alone go past --max-ram instead of stopping and quarantining it."),
    click.option("--dry-run", is_flag=True, help="Say what would run and why, and change nothing."),
    click.option("--scheduler-address", default=None,
                 help="Run the cases on this Dask scheduler's workers (tcp://HOST:8786); see README, On a cluster."),
    click.option("--scheduler-file", default=None, type=click.Path(dir_okay=False),
                 help="Run the cases on the Dask scheduler that wrote this file (dask scheduler --scheduler-file)."),
)
# nnUNetv2_plan_experiment's options
_PLAN_OPTIONS = _options(
    click.option("-pl", "planner", default="ExperimentPlanner", show_default=True,
                 help="Experiment planner class, e.g. nnUNetPlannerResEncM."),
    click.option("-gpu_memory_target", type=float, default=None, help="GPU memory target for the planner, in GB."),
    click.option("-overwrite_plans_name", default=None, help="Custom plans identifier."),
    click.option("-overwrite_target_spacing", multiple=True, help="Target spacing for 3d_fullres (three numbers)."),
    click.option("-preprocessor_name", default="DefaultPreprocessor", show_default=True,
                 help="Preprocessor class written into the plans."),
    click.option("--replan", is_flag=True, help="Run the planner even if its inputs did not change."),
)


def _run_steps(steps: str, max_ram: Optional[str], no_pbar: bool, dry_run: bool, scheduler_address: Optional[str],
               scheduler_file: Optional[str], overwrite_target_spacing: tuple[str, ...] = (),
               configurations: tuple[str, ...] = (), **options: Any) -> None:
    """The preprocessing steps up to `steps` (fingerprint, plan, preprocess) for the datasets, or their dry run."""
    from .config import MemoryBudget

    paths = Paths.from_environment()
    settings = PreprocessSettings(
        steps=steps, configurations=configurations or DEFAULT_CONFIGURATIONS,
        explicit_configurations=bool(configurations), overwrite_target_spacing=parse_spacing(overwrite_target_spacing),
        max_ram=parse_memory(max_ram) if max_ram else MemoryBudget(), progress_bar=not no_pbar, dry_run=dry_run,
        **options)
    if settings.max_ram.bytes is not None:
        check_budget(settings.max_ram.bytes, settings.max_ram)
    if dry_run:
        from .commands.dryrun import dry_run as run_dry

        for d in settings.datasets:
            click.echo(run_dry(settings, paths, d))
        return
    if scheduler_address and scheduler_file:
        raise click.UsageError("give --scheduler-address or --scheduler-file, not both")
    from .preprocess.run import preprocess_datasets

    sys.exit(preprocess_datasets(settings, paths, scheduler_address, scheduler_file))


@main.command(cls=NnUNetStyleCommand)
@_RUN_OPTIONS
@click.option("-c", "configurations", multiple=True,
              help=f"Configurations to preprocess. Default: {' '.join(DEFAULT_CONFIGURATIONS)}; those the plans do "
                   "not contain are skipped. 3d_cascade_fullres uses 3d_fullres's data.")
@click.option("-plans_name", "plans_name", default=None,
              help="Preprocess against these existing plans (nnUNet_preprocessed/<dataset>/NAME.json), as "
                   "nnUNetv2_preprocess -plans_name does: no planning, and the file is never written.")
@click.option("--no_pp", "--no-pp", "no_pp", is_flag=True,
              help="Fingerprint and plan only, as nnUNetv2_plan_and_preprocess --no_pp (= plan-experiment).")
@_PLAN_OPTIONS
@click.option("--verify-outputs", is_flag=True, help="Also check every finished output's checksum before skipping it.")
def preprocess(plans_name: Optional[str], no_pp: bool, **options: Any) -> None:
    """Fingerprint, plan and preprocess datasets, resuming whatever an earlier run left unfinished
    (nnUNetv2_plan_and_preprocess); with -plans_name, preprocess against existing plans (nnUNetv2_preprocess)."""
    if plans_name is not None:
        planning = {"-pl": options["planner"] != "ExperimentPlanner", "--no_pp": no_pp, "--replan": options["replan"],
                    "-gpu_memory_target": options["gpu_memory_target"] is not None,
                    "-overwrite_plans_name": options["overwrite_plans_name"] is not None,
                    "-overwrite_target_spacing": bool(options["overwrite_target_spacing"]),
                    "-preprocessor_name": options["preprocessor_name"] != "DefaultPreprocessor"}
        given = [flag for flag, on in planning.items() if on]
        if given:
            raise click.UsageError(f"-plans_name preprocesses against existing plans; {', '.join(given)} "
                                   "belong(s) to planning (plan-experiment)")
    _run_steps("plan" if no_pp else "preprocess", plans_name=plans_name, **options)


@main.command("extract-fingerprint", cls=NnUNetStyleCommand)
@_RUN_OPTIONS
def extract_fingerprint(**options: Any) -> None:
    """The fingerprint step alone (nnUNetv2_extract_fingerprint): every case's fingerprint, then
    dataset_fingerprint.json; resumable, and never stale (cases added or changed are analysed)."""
    _run_steps("fingerprint", **options)


@main.command("plan-experiment", cls=NnUNetStyleCommand)
@_RUN_OPTIONS
@_PLAN_OPTIONS
def plan_experiment(**options: Any) -> None:
    """Fingerprint (what is not done yet) and plan (nnUNetv2_plan_experiment; preprocess --no_pp)."""
    _run_steps("plan", **options)


@main.command(cls=NnUNetStyleCommand)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-d", "dataset", default=None, help="Compare with the network this dataset's plans build.")
@click.option("-c", "configuration", default=None, help="Configuration (default: the checkpoint's).")
@click.option("-p", "plans", default=None, help="Plans identifier (default: nnUNetPlans).")
@click.option("-tr", "trainer", default=None, help="The trainer class that is to load it.")
@click.option("--fix", is_flag=True, help="Write a repaired copy beside it (<name>.fixed.pth) when a repair is safe.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def checkpoint(path: str, dataset: Optional[str], configuration: Optional[str], plans: Optional[str],
               trainer: Optional[str], fix: bool, as_json: bool) -> None:
    """What is wrong with an nnU-Net checkpoint (truncated, a wrapper's key prefixes, another network, trainer or
    plans), without training; exit 0 when nnU-Net can load it, 1 when it cannot be read, 3 when problems were
    found."""
    from pathlib import Path

    from .dataset import layout_for
    from .train import checkpoint as doctor

    preprocessed = os.environ.get("nnUNet_preprocessed")
    name = layout_for(dataset, os.environ.get("nnUNet_raw", ""), preprocessed or "").name if dataset else None
    try:
        d = doctor.diagnose(Path(path), Path(preprocessed) if preprocessed else None, name, plans, configuration,
                            trainer)
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(doctor.as_dict(d), indent=1) if as_json else doctor.render(d))
    if fix and d.fixable:
        target = doctor.fix(Path(path))
        click.echo(f"repaired copy written: {target} (the original is unchanged)", err=True)
        sys.exit(EXIT_OK)
    if fix and d.readable and d.problems:
        click.echo("no repair written: " + ("the problems are not prefixes" if d.prefixed else "nothing to repair "
                                            "by renaming keys"), err=True)
    sys.exit(d.exit_code)


@main.command(cls=NnUNetStyleCommand)
@click.option("-i", "input_folder", required=True, type=click.Path(file_okay=False),
              help="Input folder: files named <case>_0000<file ending>, one per channel, as for nnUNetv2_predict.")
@click.option("-o", "output_folder", required=True, type=click.Path(file_okay=False),
              help="Output folder; it also holds the ledger (nnresume.sqlite) and .nnresume/.")
@click.option("-d", "dataset", default=None, help="Dataset id or name of the trained model.")
@click.option("-c", "configuration", default=None, help="Configuration of the trained model, e.g. 3d_fullres.")
@click.option("-f", "folds", multiple=True, help="Folds to use (ensembled): -f 0 1. Default: 0 1 2 3 4.")
@click.option("-tr", "trainer", default="nnUNetTrainer", show_default=True, help="Trainer class of the model.")
@click.option("-p", "plans", default="nnUNetPlans", show_default=True, help="Plans identifier.")
@click.option("-m", "model_folder", default=None, type=click.Path(file_okay=False),
              help="Trained model folder (with fold_X/ subfolders), instead of -d/-tr/-p/-c.")
@click.option("-chk", "checkpoint", default="checkpoint_final.pth", show_default=True, help="Checkpoint file name.")
@click.option("-step_size", "step_size", type=float, default=0.5, show_default=True,
              help="Sliding window step size (at most 1).")
@click.option("--disable_tta", "--disable-tta", "disable_tta", is_flag=True,
              help="No test-time mirroring (faster, less accurate).")
@click.option("--save_probabilities", "--save-probabilities", "save_probabilities", is_flag=True,
              help="Also write the class probabilities (.npz) and properties (.pkl).")
@click.option("-device", "device", default="cuda", show_default=True, type=click.Choice(["cuda", "cpu", "mps"]),
              help="Device the network runs on.")
@click.option("-npp", "num_workers", type=click.IntRange(min=1), default=3, show_default=True,
              help="At most this many cases at once, each read, preprocessed and exported in its worker (the network "
                   "runs in one device process).")
@click.option("-nps", "num_workers_export", type=click.IntRange(min=0), default=3, show_default=True,
              help="Accepted as nnUNetv2_predict's; each case is exported by the worker that preprocessed it.")
@click.option("--verbose", "verbose", is_flag=True, help="nnU-Net's own verbose output, in the run's log.")
@click.option("--max-ram", "max_ram", default=None, help="Memory budget, as for preprocess.")
@click.option("--no-pbar", "--no_pbar", "--disable_progress_bar", "no_pbar", is_flag=True, help="No progress bar.")
@click.option("--retry-quarantined", is_flag=True, help="Try quarantined cases again even if nothing changed.")
@click.option("--grace", "grace_seconds", type=float, default=20.0, show_default=True,
              help="Seconds running cases get to finish after SIGINT/SIGTERM before they are stopped.")
@click.option("--dry-run", is_flag=True, help="Say which cases would be predicted and why, and change nothing.")
def predict(input_folder: str, output_folder: str, dataset: Optional[str], configuration: Optional[str],
            folds: tuple[str, ...], trainer: str, plans: str, model_folder: Optional[str], checkpoint: str,
            step_size: float, disable_tta: bool, save_probabilities: bool, device: str, num_workers: int,
            num_workers_export: int, verbose: bool, max_ram: Optional[str], no_pbar: bool, retry_quarantined: bool,
            grace_seconds: float, dry_run: bool) -> None:
    """Predict every case in -i with a trained model into -o, resuming whatever an earlier run left unfinished.

    nnU-Net's own predictor does the work (preprocessing, sliding window, export), so the files are those
    nnUNetv2_predict writes. A rerun predicts only what is missing, changed, or fails verification.
    """
    from .config import MemoryBudget
    from .predict.model import DEFAULT_FOLDS, PredictSettings

    if model_folder and (dataset or configuration):
        raise click.UsageError("give -m MODEL_FOLDER, or -d and -c, not both")
    if not model_folder and not (dataset and configuration):
        raise click.UsageError("give -d DATASET and -c CONFIGURATION (or -m MODEL_FOLDER)")
    settings = PredictSettings(
        input_folder=input_folder, output_folder=output_folder, dataset=dataset, configuration=configuration,
        trainer=trainer, plans=plans, model_folder=model_folder, folds=folds or DEFAULT_FOLDS, checkpoint=checkpoint,
        step_size=step_size, disable_tta=disable_tta, save_probabilities=save_probabilities, device=device,
        num_workers=num_workers, num_workers_export=num_workers_export, verbose=verbose,
        max_ram=parse_memory(max_ram) if max_ram else MemoryBudget(), progress_bar=not no_pbar, dry_run=dry_run,
        retry_quarantined=retry_quarantined, grace_seconds=grace_seconds)
    if settings.max_ram.bytes is not None:
        check_budget(settings.max_ram.bytes, settings.max_ram)
    if dry_run:
        from .predict.run import dry_run as run_dry

        click.echo(run_dry(settings))
        return
    from .predict.run import predict_cases

    sys.exit(predict_cases(settings))


def _with_prediction_ledgers(folders: tuple[str, ...], fn: Any) -> list[Any]:
    """`fn(layout, ledger)` for each prediction folder's ledger (`-o OUTPUT` of `nnresume predict`)."""
    from pathlib import Path

    from .dataset import DatasetLayout
    from .ledger.repository import Ledger

    out = []
    for folder in folders:
        path = Path(folder).resolve()
        layout = DatasetLayout(name=str(path), raw=path, preprocessed=path)
        if not layout.ledger.is_file():
            raise NnresumeError(f"{path} has no ledger ({layout.ledger.name})",
                                "give the -o folder of an `nnresume predict` run")
        ledger = Ledger.open(str(layout.ledger), create=False)
        try:
            out.append(fn(layout, ledger))
        finally:
            ledger.close()
    return out


def _datasets_or_outputs(datasets: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    if bool(datasets) == bool(outputs):
        raise click.UsageError("give -d DATASET (preprocessing) or -o OUTPUT (a prediction folder)")


@main.command(cls=NnUNetStyleCommand)
@click.option("-d", "datasets", multiple=True, help="Dataset id or name; several allowed.")
@click.option("-o", "outputs", multiple=True, type=click.Path(file_okay=False),
              help="Instead of -d: the output folder of `nnresume predict`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(datasets: tuple[str, ...], outputs: tuple[str, ...], as_json: bool) -> None:
    """What the ledger says: counts per stage and configuration, failures, peak RAM, the last run, progress."""
    from .commands.status import build_status, render_status

    _datasets_or_outputs(datasets, outputs)
    if outputs:
        reports = _with_prediction_ledgers(outputs, lambda layout, ledger: build_status(layout, ledger, "predict"))
    else:
        reports = _with_ledgers(datasets, build_status)
    if as_json:
        _echo_json(reports)
    else:
        click.echo("\n\n".join(render_status(r) for r in reports))


@main.command(cls=NnUNetStyleCommand)
@click.option("-d", "datasets", multiple=True, help="Dataset id or name; several allowed.")
@click.option("-o", "outputs", multiple=True, type=click.Path(file_okay=False),
              help="Instead of -d: the output folder of `nnresume predict`.")
@click.option("--full", is_flag=True, help="Also compare checksums and decode every array and pickle.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--no-pbar", "--no_pbar", "no_pbar", is_flag=True, help="No progress bar.")
def verify(datasets: tuple[str, ...], outputs: tuple[str, ...], full: bool, as_json: bool, no_pbar: bool) -> None:
    """Re-check finished outputs against the ledger; the next preprocess redoes any that fail.

    Exit code 0 when everything matches, 3 when problems were found (and withdrawn from the ledger).
    """
    from .commands.verify import render
    from .commands.verify import verify as run_verify
    from .io.lock import DatasetLock

    _datasets_or_outputs(datasets, outputs)

    def one(layout: Any, ledger: Any) -> Any:
        with DatasetLock(layout.lock, layout.name):  # verify withdraws rows: no run may write meanwhile
            return run_verify(layout, ledger, full, progress=not no_pbar and not as_json, prediction=bool(outputs))

    reports = _with_prediction_ledgers(outputs, one) if outputs else _with_ledgers(datasets, one)
    if as_json:
        _echo_json([r.as_dict() for r in reports])
    else:
        click.echo("\n\n".join(render(r) for r in reports))
    sys.exit(EXIT_CASES_FAILED if any(r.problems for r in reports) else EXIT_OK)


@main.command(cls=NnUNetStyleCommand)
@click.option("-d", "datasets", multiple=True, required=True, help="Dataset id or name; several allowed.")
@click.option("--full", is_flag=True, help="Also read every pixel (NaN, label values) and verify every gzip stream.")
@click.option("-np", "num_workers", type=click.IntRange(min=1), default=None, help="Parallel readers.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--no-pbar", "--no_pbar", "no_pbar", is_flag=True, help="No progress bar.")
def check(datasets: tuple[str, ...], full: bool, num_workers: Optional[int], as_json: bool, no_pbar: bool) -> None:
    """Validate datasets without preprocessing them; report every problem, not only the first.

    Exit code 0 when no errors were found (warnings allowed), 3 when some were.
    """
    from .commands.check import agreement, as_dict, check_datasets, render
    from .dataset import layout_for
    from .execution.system import usable_cpus

    paths = Paths.from_environment()
    layouts = [layout_for(d, paths.raw, paths.preprocessed) for d in datasets]
    results = check_datasets(layouts, paths, full, num_workers or usable_cpus(), not no_pbar and not as_json)
    across = agreement(results)
    if as_json:
        click.echo(json.dumps(as_dict(results, across), indent=2))
    else:
        click.echo(render(results, across))
    failed = any(r.errors for r in results) or any(f.level == "error" for f in across)
    sys.exit(EXIT_CASES_FAILED if failed else EXIT_OK)


@main.command(cls=NnUNetStyleCommand)
@click.option("-d", "dataset", required=True, help="Dataset id or name.")
@click.option("--run", "run_id", type=int, default=None, help="Run number (default: the last preprocess run).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the PNG and HTML (default: <Dataset>/.nnresume/reports).")
def report(dataset: str, run_id: Optional[int], out_dir: Optional[str]) -> None:
    """Draw a run: memory against the budget over time, each case's duration and peak memory (PNG and HTML)."""
    from pathlib import Path

    from .commands.report import write_report

    (files,) = _with_ledgers((dataset,), lambda layout, ledger: write_report(
        layout, ledger, Path(out_dir) if out_dir else layout.work / "reports", run_id))
    click.echo(f"{files.html}\n{files.png}")


@main.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False), default="nnresume-demo", show_default=True,
              help="Where to put the demo's raw and preprocessed folders.")
@click.option("--cases", type=click.IntRange(min=2), default=8, show_default=True, help="Number of cases.")
@click.option("-np", "num_workers", type=click.IntRange(min=1), default=None, help="Cases at once (default: CPUs).")
@click.option("--max-ram", "max_ram", default=None, help="Memory budget, as for preprocess.")
@click.option("--no-pbar", "--no_pbar", "no_pbar", is_flag=True, help="No progress bars.")
def demo(folder: str, cases: int, num_workers: Optional[int], max_ram: Optional[str], no_pbar: bool) -> None:
    """Generate a small synthetic dataset (Dataset999_Demo) and preprocess it, then show its status.

    Uses its own nnUNet_raw and nnUNet_preprocessed inside --dir, whatever the environment says. Run it twice: the
    second run finds everything done and finishes in about a second.
    """
    from pathlib import Path

    from .commands.demo import run_demo
    from .config import MemoryBudget

    settings = PreprocessSettings(datasets=(), num_workers=num_workers,
                                  max_ram=parse_memory(max_ram) if max_ram else MemoryBudget(),
                                  progress_bar=not no_pbar)
    from .commands.status import build_status, render_status

    code, paths, dataset_id = run_demo(Path(folder), cases, settings)
    (status_report,) = _with_ledgers((dataset_id,), build_status, paths)
    click.echo(render_status(status_report))
    click.echo(f"\nTo look further:  export nnUNet_raw={paths.raw} nnUNet_preprocessed={paths.preprocessed}; "
               f"nnresume status -d {dataset_id}")
    sys.exit(code)


if __name__ == "__main__":
    main()

"""The ``dicomops`` command line: each command parses options and calls a flow or library function.

Exit codes: 0 done, 1 a gate failed, 2 bad usage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, SecretStr
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dicomops.config import SCENARIOS, PipelineConfig, SynthConfig, TrainConfig

app = typer.Typer(
    name="dicomops",
    help="Orchestrated MLOps for CT imaging: synthesise, ingest, preprocess, train, export, monitor.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
SectionT = TypeVar("SectionT", bound=BaseModel)
CLASSIFIER: str = TrainConfig.model_fields["model_name"].default  # the config holds the one default


def _flow(name: str, dask_address: str | None = None) -> Any:
    """The Prefect flow `name`, found through the ``dicomops.flows`` entry point: the library
    package never imports the orchestration layer that imports it."""
    from importlib.metadata import entry_points

    _preflight()  # before Prefect is imported: its client reads the retry budget once
    found = entry_points(group="dicomops", name="flows")
    if not found:
        console.print("[red]the flows are not installed[/]: the 'dicomops' entry point group has no 'flows'; "
                      "reinstall the project (make venv, or pip install -e .)")
        raise typer.Exit(2)
    flow = next(iter(found)).load()(name, dask_address)

    def call(**parameters: Any) -> Any:
        from dicomops.errors import (
            RegistryUnavailableError,
            ServerUnreachableError,
            WorkDirLockedError,
        )

        try:
            return _run_despite_lost_api(flow, parameters)
        except (WorkDirLockedError, RegistryUnavailableError, ServerUnreachableError) as err:
            console.print(f"[red]{name} stopped:[/] {escape(str(err))}")
            raise typer.Exit(2) from err

    return call


def _run_despite_lost_api(flow: Any, parameters: dict[str, Any]) -> Any:
    """Call `flow`; the exit code follows the flow body's own result, not Prefect's bookkeeping.

    When the body has returned but Prefect's API is gone before the final state is recorded (the
    ephemeral server stopped or died at the end of a long run), Prefect raises a connection error
    in place of the result. The work is done: warn and return the body's result.
    """
    import functools
    import inspect

    import httpx

    body, finished = flow.fn, []

    @functools.wraps(body)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        finished.append(body(*args, **kwargs))
        return finished[-1]

    # Prefect validates parameters against this signature in this module's namespace: resolve the
    # body's string annotations now, in its own.
    recorded.__signature__ = inspect.signature(body, eval_str=True)  # type: ignore[attr-defined]
    flow.fn = recorded
    try:
        return flow(**parameters)
    except httpx.TransportError as err:
        if not finished:
            raise
        console.print(f"[yellow]warning:[/] the flow finished, but Prefect's API did not record its final "
                      f"state ({type(err).__name__}: {escape(str(err))}); its outputs are complete")
        return finished[-1]
    finally:
        flow.fn = body


# Telemetry switches: Prefect's server heartbeat (which also writes to the ephemeral server's SQLite
# database and shows up as 'database is locked'), Prefect's client analytics, MLflow and GX.
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}


@app.callback()
def _telemetry_off() -> None:
    """Turn telemetry off before any command imports Prefect, MLflow or GX (an explicit setting wins)."""
    import os

    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


def _preflight() -> None:
    """Check the servers the settings point at, within seconds; exit 2 naming the one that is down."""
    from dicomops.config import load_settings
    from dicomops.errors import ServerUnreachableError
    from dicomops.preflight import preflight

    try:
        preflight(load_settings())
    except (ServerUnreachableError, ValueError) as err:
        console.print(f"[red]cannot start:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from err


def _progress(description: str, transient: bool = False) -> Progress:
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=transient)


def _synth_config(patients: int, seed: int, scenario: str, fault_rate: float, matrix: int,
                  slices: int, workers: int) -> SynthConfig:
    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    try:
        return SynthConfig(patients=patients, seed=seed, scenario=scenario,
                           fault_rate=fault_rate, matrix=matrix, slices=slices, workers=workers)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def _pipeline_config(path: Path | None) -> PipelineConfig:
    try:
        return PipelineConfig.from_yaml(path) if path else PipelineConfig()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def _with_overrides(section: SectionT, **overrides: object) -> SectionT:
    """A config section with the options the user gave on the command line, validated. Only the
    fields the section's own config set are carried over: the rest take their defaults again, which
    may depend on an overridden field (``TrainConfig``'s per-architecture defaults)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return section.model_validate(section.model_dump(exclude_unset=True) | given)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


PatientsOpt = Annotated[int, typer.Option(help="Patients (one CT series each).")]
SeedOpt = Annotated[int, typer.Option(help="Seed; the same seed and options give identical files.")]
ScenarioOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(SCENARIOS)}.")]
FaultOpt = Annotated[float, typer.Option(help="Share of series given an injected fault (listed in faults.csv).")]
MatrixOpt = Annotated[int, typer.Option(help="Rows and columns per slice (512 for real size).")]
SlicesOpt = Annotated[int, typer.Option(help="Slices per series.")]
WorkersOpt = Annotated[int, typer.Option(help="Worker processes.")]
_D = SynthConfig()


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Empty or new folder to write the corpus into.")],
    patients: PatientsOpt = _D.patients,
    seed: SeedOpt = _D.seed,
    scenario: ScenarioOpt = _D.scenario,
    fault_rate: FaultOpt = _D.fault_rate,
    matrix: MatrixOpt = _D.matrix,
    slices: SlicesOpt = _D.slices,
    workers: WorkersOpt = _D.workers,
) -> None:
    """Write a synthetic multi-vendor CT corpus with fake PHI, labels, masks and listed faults."""
    from dicomops.synthetic import generate_corpus

    cfg = _synth_config(patients, seed, scenario, fault_rate, matrix, slices, workers)
    with _progress("synthesising series") as bar:
        task = bar.add_task("synth", total=cfg.patients)
        try:
            summary = generate_corpus(out, cfg, progress=lambda d, t: bar.update(task, completed=d))
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
    console.print(f"[green]wrote[/] {summary.files} files in {summary.series} series to {out} "
                  f"({summary.positives} positive, {summary.faults} with faults; vendors "
                  f"{summary.per_vendor})")


@app.command()
def data(
    path: Annotated[Path, typer.Argument(help="Corpus folder tracked by <path>.dvc.")] = Path("data"),
    patients: PatientsOpt = _D.patients,
    seed: SeedOpt = _D.seed,
    fault_rate: FaultOpt = _D.fault_rate,
    strict: Annotated[bool, typer.Option(help="Fail if a regenerated corpus does not match the DVC hash.")] = False,
) -> None:
    """Make sure the demo corpus is present: keep it, pull it from the DVC remote, or regenerate it."""
    from dicomops.versioning import ensure_corpus

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = _synth_config(patients, seed, "baseline", fault_rate, _D.matrix, _D.slices, _D.workers)
    from dicomops.errors import CorpusMismatchError

    try:
        with _progress("generating demo corpus", transient=True) as bar:  # shown only while it runs
            task = bar.add_task("data", total=cfg.patients)
            status = ensure_corpus(path, cfg, strict=strict,
                                   progress=lambda d, t: bar.update(task, completed=d))
    except CorpusMismatchError as err:
        console.print(f"[red]the corpus is not the version its pointer records:[/] {escape(str(err))}")
        raise typer.Exit(1) from err
    except ValueError as err:
        console.print(f"[red]cannot make the corpus:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"corpus {status.path}: {status.source}, md5 {status.md5} ({status.verdict})")


@app.command()
def ingest(
    src: Annotated[Path | None, typer.Argument(
        help="Folder of DICOM files (any layout; non-DICOM files are quarantined). Or --pacs.")] = None,
    pacs: Annotated[str | None, typer.Option(
        help="Take the studies from this PACS instead: Orthanc's root URL, e.g. http://127.0.0.1:8042.",
        show_default=False)] = None,
    work: Annotated[Path | None, typer.Option(help="Work directory (default: DICOMOPS_WORK_DIR or ./work).")] = None,
    max_invalid_fraction: Annotated[float | None, typer.Option(
        help="Fail (exit 1) when a larger share of files is quarantined. Default 0.2.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes for reading and writing.")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its ingest section applies.")] = None,
) -> None:
    """Run the ingest gate: index headers, validate, check geometry, quarantine, de-identify.

    With --pacs URL, one pass of the pacs-watch flow: every study that became stable in the PACS since the last pass is gated, scored by the champion and answered in the PACS (credentials from DICOMOPS_PACS_USER / DICOMOPS_PACS_PASSWORD).

    A study the gate refuses is a verdict recorded in WORK/pacs/studies.csv (exit 0); a PACS that does not answer is exit 2.
    """
    from dicomops.errors import GateFailedError

    if (src is None) == (pacs is None):
        raise typer.BadParameter("give either SRC (a folder) or --pacs URL (a PACS), not both" if src else
                                 "give SRC (a folder of DICOM files) or --pacs URL (Orthanc's root)")
    pipeline = _pipeline_config(config)
    cfg = _with_overrides(pipeline.ingest, max_invalid_fraction=max_invalid_fraction, workers=workers)
    if pacs is not None:
        _ingest_from_pacs(pacs, work, pipeline.model_copy(update={"ingest": cfg}))
        return
    assert src is not None
    if not src.is_dir():
        raise typer.BadParameter(f"{src} is not a folder of DICOM files")
    try:
        # a folder named after a patient: Prefect stores the parameter masked (flows.scope.folder)
        result = _flow("ingest", cfg.dask_address)(src=SecretStr(str(src.resolve())), work=work.resolve() if work else None,
                                                   config=cfg)
    except GateFailedError as err:
        console.print(f"[red]gate failed:[/] {escape(str(err))}")
        raise typer.Exit(1) from err
    console.print(f"[green]ingest finished[/]: {result['accepted_series']} series accepted, "
                  f"{result['quarantined_files']} files quarantined; outputs in {result['work']}/ingest")


def _check_pacs(url: str, credentials: Any) -> None:
    """Raise PacsError unless the Orthanc at `url` answers ``/system`` with `credentials`."""
    from dicomops.pacs.client import CONNECT_TIMEOUT_S, basic_auth_session, translate_errors

    with basic_auth_session(credentials, url) as session, translate_errors("reaching the PACS", url):
        session.get(url + "/system", timeout=(CONNECT_TIMEOUT_S, 10)).raise_for_status()


def _orthanc_root(url: str, option: str) -> str:
    """`url` as Orthanc's root, or a usage error that says what to give. Credentials in it are
    refused and never repeated: the password comes from the environment, and a URL given to a flow
    is stored and shown by Prefect as a parameter."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.query:
        # Nothing of what was given is repeated but an http(s) host: 'user:password@host' parses as a
        # scheme and a path.
        shown = (f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
                 if parts.scheme in ("http", "https") else "a URL that is not http(s)")
        raise typer.BadParameter(f"{option} must be Orthanc's root URL, http(s)://host:port, without credentials "
                                 f"(got {shown!r}{', credentials removed' if '@' in parts.netloc else ''}); the "
                                 "password comes from DICOMOPS_PACS_PASSWORD and the DICOMweb root below it is "
                                 "found by itself")
    return url.rstrip("/")


def _ingest_from_pacs(url: str, work: Path | None, config: PipelineConfig) -> None:
    """One pass of the pacs-watch flow against the Orthanc at `url`; print what happened to the studies."""
    from dicomops.layout import WorkLayout
    from dicomops.pacs.client import PacsError
    from dicomops.pacs.staging import StudyBusyError

    url = _orthanc_root(url, "--pacs")
    credentials = _pacs_credentials_or_exit("cannot ingest from the PACS", "the PACS must be started with the same one")
    try:
        _check_pacs(url, credentials)  # within seconds, before Prefect and MLflow start
        result = _flow("pacs-watch")(orthanc_url=url, work=work.resolve() if work else None,
                                     config=config)
    except (PacsError, StudyBusyError) as err:
        what = "the PACS did not answer as it should" if isinstance(err, PacsError) else "a study stayed held"
        console.print(f"[red]{what}:[/] {escape(str(err))}. No study is recorded half-done: the next pass starts "
                      "where this one stopped", soft_wrap=True)
        raise typer.Exit(2) from err
    ledger = WorkLayout(Path(str(result["work"]))).pacs.ledger
    partly = int(str(result.get("partly_answered", 0)))
    console.print(f"[green]PACS ingest finished[/]: {len(list(result['studies']))} stable studies: "
                  f"{result['ingested']} ingested"
                  f"{f' ({partly} not answered in full: the PACS did not keep every result)' if partly else ''}, "
                  f"{result['refused']} refused by the gate, {result['failed']} failed, "
                  f"{result['duplicate']} "
                  f"already handled; {result['results_stored']} results stored back in the PACS; every study is a "
                  f"row of {escape(str(ledger))}", soft_wrap=True)


@app.command()
def preprocess(
    work: Annotated[Path | None, typer.Option(help="Work directory of an earlier ingest.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (one series each).")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its preprocess section applies.")] = None,
) -> None:
    """Turn accepted, de-identified series into cached 1 mm volumes, image features and 2.5D slabs."""
    cfg = _with_overrides(_pipeline_config(config).preprocess, workers=workers)
    try:
        result = _flow("preprocess", cfg.dask_address)(work=work.resolve() if work else None, config=cfg)
    except (ValueError, FileNotFoundError) as err:  # what to run first, or a version that is not there
        console.print(f"[red]cannot preprocess:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"[green]preprocess finished[/]: {result['computed']} computed, {result['cached']} "
                  f"cached, {result['failed']} failed, {result.get('labels_withheld', 0)} labels withheld (no mask to "
                  f"train with; see failures.csv); outputs in {result['work']}/preprocessed")


@app.command()
def train(
    work: Annotated[Path | None, typer.Option(help="Work directory of an earlier preprocess.")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its train and preprocess sections apply.")] = None,
    leave_one_vendor_out: Annotated[bool | None, typer.Option(
        "--leave-one-vendor-out/--no-leave-one-vendor-out",
        help="Also evaluate on each vendor after training on the others (4 more trainings).")] = None,
    architecture: Annotated[str | None, typer.Option(help=(
        "Network: student (MobileNetV3 Small), student-minimal (no SE, ReLU), teacher (3D ResNet), "
        "resnet-slim, resnet10 or densenet121."))] = None,
    distill_from: Annotated[str | None, typer.Option(help=(
        "Version to distil from, fold by fold: V of the classifier, or MODEL/V as dicomops-ct-nodule-seg/2."))] = None,
    slab_slices: Annotated[int | None, typer.Option(help=(
        "Slices per slab (odd); a 3-D teacher learns from deeper slabs than the student, say 7."))] = None,
) -> None:
    """Four-fold vendor-stratified cross-validation, final model, registry version, promotion gate."""
    cfg = _pipeline_config(config)
    architecture = {"student": "mobilenet-v3-small", "student-minimal": "mobilenet-v3-small-minimal",
                    "teacher": "resnet3d-slim"}.get(architecture or "", architecture)
    train_cfg = _with_overrides(cfg.train, leave_one_vendor_out=leave_one_vendor_out, architecture=architecture,
                                distill_from=distill_from)
    pre_cfg = _with_overrides(cfg.preprocess, slab_slices=slab_slices)
    try:
        result = _flow("train")(work=work.resolve() if work else None, config=train_cfg, preprocess_config=pre_cfg,
                                privacy_config=cfg.ingest.privacy)
    except (ValueError, FileNotFoundError) as err:  # what to run first, or a version that is not there
        console.print(f"[red]cannot train:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"[green]train finished[/]: version {result['version']} of {cfg.train.model_name}, mean CV AUC "
                  f"{result['mean_auc']:.3f}; {'champion' if result['promoted'] else 'challenger, awaiting review'}")
    lovo = result.get("lovo_auc")
    if isinstance(lovo, dict) and lovo:
        console.print("leave one vendor out, AUC: " + ", ".join(f"{v} {a:.3f}" for v, a in lovo.items()))


@app.command()
def segment(
    work: Annotated[Path | None, typer.Option(help="Work directory of an earlier preprocess (and train).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="PipelineConfig YAML; its segment, preprocess and train (folds) sections apply.")] = None,
) -> None:
    """Nodule segmenter: cross-validation in the classifier's folds (FROC/CPM, Dice, kappa per vendor),
    final model, registry version of dicomops-ct-nodule-seg, promotion gate on CPM.

    For more than one process, run dicomops.segmentation.ddp under torchrun (see the README)."""
    from dicomops.tracking.model_card import _f

    cfg = _pipeline_config(config)
    try:
        result = _flow("segment")(work=work.resolve() if work else None, config=cfg.segment,
                                  preprocess_config=cfg.preprocess, train_config=cfg.train,
                                  privacy_config=cfg.ingest.privacy)
    except (ValueError, FileNotFoundError) as err:  # what to run first, or a version that is not there
        console.print(f"[red]cannot train the segmenter:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"[green]segment finished[/]: version {result['version']} of {cfg.segment.model_name}, CPM "
                  f"{result['cpm']:.3f}, Dice (>= 6 mm) {result['dice_ge6']:.3f}, actionable-call AUC "
                  f"{_f(result.get('actionable_auc'))}; "
                  f"{'champion' if result['promoted'] else 'challenger, awaiting review'}")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Model version to make champion.")],
    reviewer: Annotated[str, typer.Option(help="Who decided (recorded on the version).")] = "reviewer",
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = CLASSIFIER,
    note: Annotated[str | None, typer.Option(help="Why (recorded on the version's card).")] = None,
) -> None:
    """A reviewer's decision: make VERSION the champion of the registered model."""
    from dicomops.config import load_settings
    from dicomops.tracking.registry import promote as promote_version

    _preflight()
    try:
        promote_version(load_settings().mlflow_tracking_uri, model_name, version, reviewer, note)
    except Exception as err:
        console.print(f"[red]cannot promote:[/] {err}")
        raise typer.Exit(2) from err
    console.print(f"[green]{model_name} version {version} is now champion[/] (decided by {reviewer})")


@app.command()
def reject(
    version: Annotated[str, typer.Argument(help="Model version to reject.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version and its card).")],
    reviewer: Annotated[str, typer.Option(help="Who decided (recorded on the version).")] = "reviewer",
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = CLASSIFIER,
) -> None:
    """A reviewer's decision: VERSION loses the challenger alias; the reason goes on its page."""
    from dicomops.config import load_settings
    from dicomops.tracking.registry import reject as reject_version

    _preflight()
    try:
        reject_version(load_settings().mlflow_tracking_uri, model_name, version, reviewer, reason)
    except Exception as err:
        console.print(f"[red]cannot reject:[/] {err}")
        raise typer.Exit(2) from err
    console.print(f"{model_name} version {version} rejected by {reviewer}: {reason}")


@app.command()
def compare(
    versions: Annotated[list[str], typer.Argument(help=(
        "Versions to set side by side: V (of --model-name) or MODEL/V, as in 4 5 dicomops-ct-nodule-seg/1."))],
    model_name: Annotated[str, typer.Option(help="Registered model of a bare version number.")] = CLASSIFIER,
    publish: Annotated[bool, typer.Option("--publish/--no-publish", help=(
        "Also write the table on every compared version's page and into its run."))] = True,
) -> None:
    """Versions side by side as their training and export judged them: CV AUC overall and per vendor,
    ONNX Runtime latency and throughput, held-out INT8 AUC (the lightweight models' comparison)."""
    from dicomops.config import load_settings
    from dicomops.tracking import compare as comparing
    from dicomops.tracking.model_card import PAD
    from dicomops.tracking.registry import parse_ref

    _preflight()
    uri = load_settings().mlflow_tracking_uri
    try:
        table = comparing.comparison(uri, [parse_ref(v, model_name) for v in versions])
    except ValueError as err:
        console.print(f"[red]cannot compare:[/] {err}")
        raise typer.Exit(2) from err
    console.print(escape(comparing.markdown(table).replace(PAD, "")), soft_wrap=True)  # padding is for the UI
    if publish:
        comparing.publish(uri, table)
        console.print(f"written on the page of {', '.join(table.version)} (section '{comparing.SECTION}')")


@app.command()
def export(
    work: Annotated[Path | None, typer.Option(help="Work directory of the training (slabs for the checks).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version to export.")] = None,
    alias: Annotated[str | None, typer.Option(help="Export the version holding this alias instead.")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its export section applies.")] = None,
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = CLASSIFIER,
    int8: Annotated[str | None, typer.Option(help=(
        "ptq (post training, static) or qat (quantisation aware training first; then FP32, PTQ and QAT are "
        "also compared on every fold's held out series)."))] = None,
    held_out: Annotated[bool | None, typer.Option("--held-out/--no-held-out", help=(
        "Compare FP32, PTQ and QAT INT8 of the fold models on held-out series."))] = None,
    force: Annotated[bool, typer.Option("--force", help=(
        "Export again even where this version's export is recorded with these settings and its registered "
        "files still match their sha256."))] = False,
) -> None:
    """ONNX with parity checks, INT8, TensorRT engines where possible, and a Triton repository."""
    from dicomops.errors import ExportCheckError

    if version and alias:
        raise typer.BadParameter("give --version or --alias, not both")
    section = _pipeline_config(config).export
    if held_out is None and int8 == "qat" and "int8_held_out" not in section.model_fields_set:
        held_out = True  # QAT is judged on held-out series unless the config says otherwise
    export_cfg = _with_overrides(section, int8=int8, int8_held_out=held_out)
    try:
        result = _flow("export")(work=work.resolve() if work else None, config=export_cfg,
                             model_name=model_name, version=version, alias=alias, force=force)
    except ExportCheckError as err:
        console.print(f"[red]export check failed:[/] {err}")
        raise typer.Exit(1) from err
    except (ValueError, FileNotFoundError) as err:  # what to run first, or a version that is not there
        console.print(f"[red]cannot export:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"[green]export finished[/]: version {result['version']} in {result['folder']}; "
                  f"tensorrt: {escape(str(result['tensorrt']))}; openvino: {escape(str(result.get('openvino', '')))}")


@app.command()
def predict(
    src: Annotated[Path | None, typer.Argument(help="Folder of DICOM studies to score (or use --pacs).")] = None,
    pacs: Annotated[str | None, typer.Option(help="Score PACS studies matching this QIDO-RS query instead "
                                                  "(KEYWORD=VALUE,... or all); SRs go back.")] = None,
    alias: Annotated[str | None, typer.Option(help="Registry alias of the version (default: champion).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version number instead of an alias.")] = None,
    engine: Annotated[str | None, typer.Option(help="auto, ort-fp32, ort-int8, ov-fp32, ov-int8 or tensorrt.")] = None,
    write_back: Annotated[bool | None, typer.Option("--write-back/--no-write-back", help=(
        "Store the results in the PACS (with --pacs); default: the config's serve.write_back (true)."))] = None,
    orthanc_url: Annotated[str | None, typer.Option(help="Orthanc's root (default DICOMOPS_PACS_URL).")] = None,
    work: Annotated[Path | None, typer.Option(help="Work directory (results under predict/).")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its serve section applies.")] = None,
) -> None:
    """Score a folder or PACS studies with a registered model's exported engine (batch inference)."""

    from dicomops.serving.batch import parse_query

    if (src is None) == (pacs is None):
        raise typer.BadParameter("give a folder SRC or --pacs QUERY (one of them)")
    if version is not None and alias is not None:
        raise typer.BadParameter("give --version or --alias, not both")
    if src is not None and not src.is_dir():
        raise typer.BadParameter(f"{src} is not a folder of DICOM files")
    if pacs is not None:
        try:
            parse_query(pacs)  # its mistakes said here, before anything starts; the flow parses it again
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
    query = SecretStr(pacs) if pacs is not None else None  # Prefect stores it masked: it may name a patient
    if orthanc_url is not None:
        orthanc_url = _orthanc_root(orthanc_url, "--orthanc-url")
    if pacs is not None:
        _pacs_credentials_or_exit("cannot predict from the PACS", "then run dicomops predict --pacs again")
    cfg = _pipeline_config(config)
    cfg = cfg.model_copy(update={"serve": _with_overrides(cfg.serve, alias=alias, engine=engine,
                                                          write_back=write_back)})
    from dicomops.pacs.client import PacsError

    try:
        result = _flow("predict")(src=SecretStr(str(src.resolve())) if src else None, pacs_query=query, config=cfg,
                                  version=version, work=work.resolve() if work else None, orthanc_url=orthanc_url)
    except ValueError as err:
        console.print(f"[red]cannot predict:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    except PacsError as err:
        console.print(f"[red]the PACS did not answer as it should:[/] {escape(str(err))}. The studies answered "
                      "before it are recorded; run it again once the PACS answers (results keep their UIDs: "
                      "none is stored twice)", soft_wrap=True)
        raise typer.Exit(2) from err
    if result.get("refused"):  # as `dicomops ingest` on the same folder: a failed gate is exit 1
        console.print(f"[red]gate failed[/]: {escape(str(result['refused']))}; nothing was scored (results in "
                      f"{escape(str(result['results']))})", soft_wrap=True)
        raise typer.Exit(1)
    partly = result.get("studies_partly_answered", 0)
    if partly:
        console.print(f"[yellow]{partly:.0f} studies not answered in full[/]: the PACS did not keep every result; "
                      "their rows in the results say why")
    done = (f"{result['studies_scored']:.0f} studies scored on {escape(str(result['engine']))} "
            f"({escape(str(result['engine_reason']))}); results in {escape(str(result['results']))}; "
            f"MLflow run {result['mlflow_run_id']}")
    refused, failed = result.get("studies_refused", 0), result.get("studies_failed", 0)
    series_failed = result.get("series_failed", 0)
    if refused or failed or series_failed:  # as a failed gate: exit 1, each row says why
        console.print(f"[red]predict finished, not everything was answered[/]: {refused:.0f} studies refused, "
                      f"{failed:.0f} failed, {series_failed:.0f} series not scored, without a result written back "
                      f"or without the segmenter's (their rows in the results say why); {done}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]predict finished[/]: {done}")


@app.command()
def online(
    port: Annotated[int | None, typer.Option(help="HTTP port (default: the config's serve.port, 8300).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface; keep 127.0.0.1 unless a proxy fronts it.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Scoring replicas (more machines: start Ray there and set "
                                                      "RAY_ADDRESS).")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Dynamic batching: most slabs per engine call (1: off).")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="Dynamic batching: longest wait to fill a batch.")] = None,
    alias: Annotated[str | None, typer.Option(help="Registry alias of the version (default: champion).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version number instead of an alias.")] = None,
    engine: Annotated[str | None, typer.Option(help="auto, ort-fp32, ort-int8, ov-fp32, ov-int8 or tensorrt.")] = None,
    redis_port: Annotated[int, typer.Option(help="Start a Redis cache on this loopback port (needs "
                                                 "DICOMOPS_REDIS_PASSWORD) unless DICOMOPS_REDIS_URL "
                                                 "names one.")] = 6390,
    no_redis: Annotated[bool, typer.Option("--no-redis", help="Serve without the cache: every study is "
                                                              "retrieved and preprocessed again.")] = False,
    work: Annotated[Path | None, typer.Option(help="Work directory (the served model's files under serving/).")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its serve section applies.")] = None,
) -> None:
    """Serve a registered model online: HTTP on Ray Serve with dynamic batching, Redis cache of
    preprocessed volumes; studies by reference from the PACS, or pre-cut slabs."""
    import importlib.util
    import os
    import time

    from dicomops.config import load_settings
    from dicomops.errors import RegistryUnavailableError
    from dicomops.serving import ray_app
    from dicomops.serving.champion import resolve, unexported_champion
    from dicomops.serving.online import TOKEN_ENV, ServiceOptions
    from dicomops.stack import STOP_SIGNALS, interrupt_on
    from dicomops.tracking.runs import configure_mlflow

    if version is not None and alias is not None:
        raise typer.BadParameter("give --version or --alias, not both")
    if importlib.util.find_spec("ray") is None:
        console.print("[red]cannot serve:[/] the online service runs on Ray Serve, which this environment lacks: "
                      "pip install -e '.[online]' (make venv installs it)", soft_wrap=True)
        raise typer.Exit(2)
    if not os.environ.get(TOKEN_ENV):
        console.print(f"[red]no token:[/] the service answers only requests that carry one. Make one and give it to "
                      f"the callers: export {TOKEN_ENV}=\"$(python3 -c 'import secrets; "
                      f"print(secrets.token_urlsafe(24))')\"", soft_wrap=True)
        raise typer.Exit(2)
    cfg = _pipeline_config(config)
    serve = _with_overrides(cfg.serve, alias=alias, engine=engine, replicas=replicas, max_batch=max_batch,
                            batch_wait_ms=batch_wait_ms, port=port, host=host)
    _preflight()
    settings = load_settings()
    # The version is settled here, where its absence can be said in a line, not in a replica's log
    # behind Ray's "Deploying application failed"; every replica then serves that one.
    try:
        served = resolve(configure_mlflow(settings.mlflow_tracking_uri), cfg.train.model_name,
                         None if version else serve.alias, version)
    except (ValueError, RegistryUnavailableError) as err:
        console.print(f"[red]cannot serve:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from err
    if (why := unexported_champion(served)) is not None:
        console.print(f"[red]cannot serve:[/] {escape(why)}", soft_wrap=True)
        raise typer.Exit(2)
    options = ServiceOptions(model_name=cfg.train.model_name, alias=None, version=str(served.version),
                             engine=serve.engine, threads=serve.threads, work=Path(work or settings.work_dir).resolve(),
                             staging=settings.pacs_staging,
                             ingest=cfg.ingest.model_copy(update={"workers": serve.gate_workers}), key=b"",
                             tracking_uri=settings.mlflow_tracking_uri, pacs_url=None, cache_ttl_s=serve.cache_ttl_s,
                             http_budget_s=settings.http_budget_s,
                             segmenter_name=cfg.segment.model_name if serve.localise else None,
                             write_seg=serve.write_seg,
                             feedback=cfg.feedback, use_cache=not no_redis)
    scaling = ray_app.Scaling(serve.replicas, serve.max_batch, serve.batch_wait_ms / 1000)
    served_as = f"v{served.version}" if version else f"{serve.alias}: v{served.version}"
    with interrupt_on(STOP_SIGNALS):  # Ctrl-C, SIGTERM, SIGHUP: the first stops it, later ones wait for that
        try:  # a signal while starting: launch stops the Ray and the Redis it started, as on Ctrl-C
            launched = ray_app.launch(options, scaling, serve.host, serve.port, None if no_redis else redis_port,
                                      serve.cache_maxmemory_mb, serve.ready_timeout_s)
        except ray_app.CacheStartError as err:
            hint = " (--redis-port)" if "is in use" in str(err) else ""
            console.print(f"[red]cannot start the cache:[/] {escape(str(err))}{hint}; or serve without it: "
                          "dicomops online --no-redis", soft_wrap=True)
            raise typer.Exit(2) from err
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            console.print(f"[red]cannot serve:[/] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(2) from err
        except KeyboardInterrupt:
            console.print("stopped while starting; what had started is stopped")
            raise typer.Exit(1) from None
        console.print(f"[green]serving[/] {cfg.train.model_name} ({served_as}) at "
                      f"{launched.url}: POST /v1/studies {{\"study_instance_uid\": ...}}, POST /v1/slabs (.npy), POST /v1/feedback; "
                      f"GET /healthz, /readyz, /metrics. Batching: up to {serve.max_batch} slabs, "
                      f"{serve.batch_wait_ms} ms; {serve.replicas} replica(s). Cache: {escape(launched.cache)}. "
                      "Ctrl-C stops it.", soft_wrap=True)
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            launched.stop()
    console.print("online service stopped")


@app.command()
def monitor(
    src: Annotated[Path | None, typer.Argument(help="Folder of new DICOM studies to check for drift.")] = None,
    pacs: Annotated[bool, typer.Option("--pacs", help="Check the clinical inflow instead: the studies pacs-watch "
                                                      "accepted since the last check (once they hold "
                                                      "monitor.min_series series).")] = False,
    work: Annotated[Path | None, typer.Option(help="Work directory (alerts.jsonl, batches, retraining).")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; its monitor section applies.")] = None,
    retrain: Annotated[str | None, typer.Option(help="On drift: subflow (retrain now), event (leave it to the "
                                                     "deployment trigger) or off.")] = None,
) -> None:
    """Drift of a new batch (a folder, or with --pacs the studies pacs-watch accepted) against the
    champion's training data; alert and retrain on drift."""

    cfg = _pipeline_config(config)
    cfg = cfg.model_copy(update={"monitor": _with_overrides(cfg.monitor, retrain=retrain)})
    if (src is None) == (not pacs):
        raise typer.BadParameter("give a folder of DICOM studies or --pacs, not both and not neither")
    if src is not None and not src.is_dir():
        raise typer.BadParameter(f"{src} is not a folder of DICOM files")
    try:
        result = _flow("monitor")(src=SecretStr(str(src.resolve())) if src else None, work=work.resolve() if work else None,
                                  config=cfg, pacs=pacs)
    except ValueError as err:
        console.print(f"[red]cannot monitor:[/] {err}")
        raise typer.Exit(2) from err
    if result["status"] == "waiting":
        console.print(f"waiting: {result['studies']} studies with {result['series']} series accepted by pacs-watch "
                      f"since the last check, fewer than monitor.min_series ({cfg.monitor.min_series})")
        return
    colour = "red" if result["status"] == "drift" else "green"
    moved = result["drifted_columns"]
    console.print(f"[{colour}]{result['status']}[/]: drift share {float(str(result['drift_share'])):.2f}, "
                  f"moved: {', '.join(moved) if isinstance(moved, list) and moved else 'none'}; "
                  f"monitoring run {result['monitoring_run_id']}")
    if result.get("retrain"):
        console.print(f"retrain: {escape(str(result['retrain']))}")


@app.command()
def retrain(
    work: Annotated[Path | None, typer.Option(help="Work directory of the monitored deployment.")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML.")] = None,
) -> None:
    """Retrain on the original corpus plus every monitored batch whose labels.csv has arrived."""
    try:
        result = _flow("retrain")(work=work.resolve() if work else None, config=_pipeline_config(config),
                                  trigger="manual")
    except (ValueError, FileNotFoundError) as err:  # RetrainNotReadyError says what to set
        console.print(f"[red]cannot retrain:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"retrain: {escape(str(result))}")


@app.command()
def feedback(
    work: Annotated[Path | None, typer.Option(help="Work directory the results and the feedback store are in.")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML (feedback: reviewers, rule, thresholds).")] = None,
    pacs: Annotated[bool, typer.Option(help="Read readers' revised reports from the PACS (DICOMOPS_PACS_URL).")] = True,
    simulate: Annotated[int, typer.Option(help="Demo: first store this many simulated readers' judgements of the "
                                               "champion's out-of-fold calls (they join the reviewers).")] = 0,
    disagree: Annotated[float, typer.Option(help="Demo: the share of series each simulated reader labels "
                                                 "against the truth.")] = 0.2,
) -> None:
    """Readers' feedback: collect it from the PACS, resolve labels, measure agreement; retrain when due."""
    cfg = _pipeline_config(config)
    if simulate:
        from dicomops.config import load_settings
        from dicomops.feedback.simulate import reader_ids
        from dicomops.feedback.simulate import simulate as simulate_readers
        from dicomops.tracking.registry import CHAMPION, alias_version
        from dicomops.tracking.runs import configure_mlflow

        where = (work or load_settings().work_dir).resolve()
        champion = alias_version(configure_mlflow(load_settings().mlflow_tracking_uri), cfg.train.model_name, CHAMPION)
        if champion is None:
            console.print(f"[red]no champion of {cfg.train.model_name}[/]: train one first ('make run')")
            raise typer.Exit(2)
        added = simulate_readers(where, cfg.train.model_name, str(champion.version), simulate, disagree)
        cfg = cfg.model_copy(update={"feedback": cfg.feedback.model_copy(
            update={"reviewers": {**cfg.feedback.reviewers, **reader_ids(simulate)}})})
        console.print(f"{simulate} simulated readers judged version {champion.version}: {added} new judgements")
    result = _flow("feedback")(work=work.resolve() if work else None, config=cfg, from_pacs=pacs)
    if result.get("status") == "skipped":
        console.print(f"feedback: skipped, {escape(str(result['reason']))}")
        return
    reason = result.get("retrain_reason")
    console.print(f"feedback run {result['feedback_run_id']}: {result.get('series', 0)} series with a reader's label; "
                  + (f"[red]retrain called for[/]: {escape(str(reason))}" if reason else "no retrain called for"))
    if result.get("retrain"):
        console.print(f"retrain: {escape(str(result['retrain']))}")


@app.command()
def run(
    src: Annotated[Path, typer.Argument(help="Folder of DICOM studies (the demo corpus is data/).")] = Path("data"),
    work: Annotated[Path | None, typer.Option(help="Work directory (default: DICOMOPS_WORK_DIR or ./work).")] = None,
    config: Annotated[Path | None, typer.Option(help="PipelineConfig YAML; defaults apply when absent.")] = None,
) -> None:
    """Run the whole pipeline flow on SRC with the embedded defaults (or --config)."""
    from dicomops.errors import GateFailedError

    cfg = _pipeline_config(config)
    if not src.is_dir():
        raise typer.BadParameter(f"{src} is not a folder; generate one with 'dicomops data {src}'")
    try:
        result = _flow("pipeline")(src=SecretStr(str(src.resolve())), config=cfg, work=work.resolve() if work else None)
    except GateFailedError as err:
        console.print(f"[red]gate failed:[/] {escape(str(err))}")
        raise typer.Exit(1) from err
    except ValueError as err:  # e.g. every series failed preprocessing: the message names the reasons
        console.print(f"[red]the pipeline stopped:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    console.print(f"[green]pipeline finished[/]: {escape(str(result))}")


def _pacs_credentials_or_exit(what: str, instead: str) -> Any:
    """The PACS credentials from the environment; without a password, exit 2 saying how to make one."""
    from dicomops.pacs.client import PASSWORD_ENV, credentials_from_env

    try:
        return credentials_from_env()
    except ValueError as err:
        console.print(f"[red]{what}:[/] {escape(str(err))}. Make one and keep it (it is the PACS's only lock): "
                      f"export {PASSWORD_ENV}=\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')\"; "
                      f"{instead}", soft_wrap=True)
        raise typer.Exit(2) from err


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Prefect server port (bound to --host).")] = 4200,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless a proxy fronts it.")] = "127.0.0.1",
    pool: Annotated[str, typer.Option(help="Process work pool the deployments run on.")] = "dicomops",
    pacs: Annotated[bool, typer.Option(
        "--pacs/--no-pacs",
        help="Run the embedded PACS (Orthanc, DICOMweb; password from DICOMOPS_PACS_PASSWORD) for pacs-watch.")] = True,
    pacs_port: Annotated[int, typer.Option(
        help="The PACS's HTTP port (REST API and DICOMweb); answered for loopback clients only.")] = 8042,
    pacs_storage: Annotated[Path | None, typer.Option(
        envvar="DICOMOPS_PACS_STORAGE",
        help="The PACS's studies, configuration and log (default: pacs/ in the project). PHI: never in WORK.")] = None,
    pacs_stable_age: Annotated[int, typer.Option(
        help="Seconds without a new instance before a study is stable and pacs-watch takes it.")] = 10,
    redis_port: Annotated[int, typer.Option(
        help="Loopback port of the Redis cache pacs-watch fills (started when DICOMOPS_REDIS_PASSWORD is set and "
             "DICOMOPS_REDIS_URL is not).")] = 6390,
) -> None:
    """Run the deployments on this machine: the PACS, a Prefect server, the deployments of prefect.yaml, a worker.

    The PACS (Orthanc with DICOMweb, on loopback) needs DICOMOPS_PACS_PASSWORD; its storage is mode 0700 and ignored by git.

    --no-pacs serves without it: pacs-watch then watches DICOMOPS_PACS_URL if set, or has its schedule paused.
    """
    from dicomops.config import load_settings
    from dicomops.pacs.client import PASSWORD_ENV
    from dicomops.stack import (
        PacsOptions,
        describe_tracking,
        interrupt_on,
        run_until_signal,
        start,
    )

    options = None
    if pacs:
        credentials = _pacs_credentials_or_exit("cannot serve", "or serve without the PACS: dicomops serve --no-pacs")
        options = PacsOptions(credentials, pacs_storage, pacs_port, pacs_stable_age)
    console.print(f"starting {'the PACS on 127.0.0.1:' + str(pacs_port) + ', ' if pacs else ''}the Prefect server on "
                  f"{host}:{port}, registering deployments, starting a worker...")
    with interrupt_on():  # SIGTERM or SIGHUP while starting: start() stops what it started, as on Ctrl-C
        try:
            stack = start(Path.cwd(), host, port, pool, pacs=options, redis_port=redis_port)
        except ValueError as err:
            console.print(f"[red]cannot serve:[/] {escape(str(err))}; or serve without the PACS: --no-pacs",
                          soft_wrap=True)
            raise typer.Exit(2) from err
        except (RuntimeError, TimeoutError) as err:
            hint = " (--pacs-port)" if pacs and f"port {pacs_port} is in use" in str(err) else ""
            console.print(f"[red]cannot serve:[/] {escape(str(err))}{hint}", soft_wrap=True)
            raise typer.Exit(1) from err
        with stack:
            console.print(f"[green]Prefect UI[/]: {stack.ui_url}  (deployments: pipeline (manual), monitor (nightly "
                          "02:00 UTC), monitor-pacs (nightly 02:30 UTC), retrain (automations 'retrain on "
                          "dicomops.drift.detected' and 'retrain on dicomops.feedback.threshold'), pacs-watch (every 60 s, one run "
                          "at a time), feedback (hourly), predict (manual))", soft_wrap=True)
            if stack.pacs is not None:
                console.print(f"[green]PACS (Orthanc)[/]: {stack.pacs.url}  (loopback clients only; user "
                              f"{escape(options.credentials.user if options else '')}, password from {PASSWORD_ENV}; "
                              "DICOM port off: Orthanc 1.10 cannot bind it to loopback)", soft_wrap=True)
                console.print(f"DICOMweb root: {stack.pacs.dicomweb_url}  (send studies with STOW-RS; a study is "
                              f"taken {pacs_stable_age} s after its last instance); studies stored in "
                              f"{escape(str(stack.pacs.data))}", soft_wrap=True)
            console.print(f"pacs-watch watches {escape(stack.pacs_watch)}; volume cache: {escape(stack.cache)}",
                          soft_wrap=True)
            console.print(f"incoming folder: {escape(str(stack.incoming))}: put new DICOM studies there (a labels.csv "
                          "beside them makes the batch part of the next retrain); the monitor checks it nightly at "
                          "02:00 UTC", soft_wrap=True)
            console.print(f"Prefect database: {escape(stack.database)}, the one 'make run' uses: its flow runs show "
                          f"here. While this server runs, 'PREFECT_API_URL={stack.api_url} make run' sends them "
                          "through it instead of a temporary server on the same file", soft_wrap=True)
            console.print(f"MLflow store: {escape(describe_tracking(load_settings().mlflow_tracking_uri))}; its UI: "
                          "bash mlflow/server.sh, then http://127.0.0.1:5000. Ctrl-C or SIGTERM stops everything.",
                          soft_wrap=True)
            reason = run_until_signal(stack)
    console.print(f"stopped ({reason})" if reason.startswith("SIG") else f"[red]{escape(reason)}; stopped the rest[/]")


pacs_app = typer.Typer(name="pacs", help="The clinical side's PACS: a local Orthanc with DICOMweb.",
                       no_args_is_help=True, add_completion=False)
app.add_typer(pacs_app)


@pacs_app.command("start")
def pacs_start(
    storage: Annotated[Path | None, typer.Option(
        envvar="DICOMOPS_PACS_STORAGE",
        help="Folder for Orthanc's database and files, its configuration and log (default: pacs/ in the "
             "project, as for dicomops serve). It holds PHI: never put it in the work directory.")] = None,
    port: Annotated[int, typer.Option(help="HTTP port (REST API and DICOMweb); answered for loopback clients only.")] = 8042,
    stable_age: Annotated[int, typer.Option(
        help="Seconds without a new instance before a study counts as stable (the changes feed reports it then).")] = 10,
    dicom_port: Annotated[int | None, typer.Option(
        help="Also run Orthanc's DICOM server on this port. Orthanc 1.10 binds it on every interface and asks no "
             "password, so anyone who reaches it can store studies: only behind a firewall.")] = None,
    index_url: Annotated[str | None, typer.Option(
        envvar="DICOMOPS_PACS_INDEX_URL",
        help="Keep Orthanc's index in this PostgreSQL database, postgresql://USER@HOST[:PORT]/DATABASE (Debian "
             "package orthanc-postgresql); its password from DICOMOPS_PACS_INDEX_PASSWORD. Default: a SQLite file "
             "beside the DICOM files.")] = None,
) -> None:
    """Run a local Orthanc PACS with DICOMweb in the foreground until Ctrl-C or SIGTERM."""
    import os
    import signal
    import time

    from dicomops.pacs.client import PASSWORD_ENV, credentials_from_env
    from dicomops.pacs.orthanc import INDEX_PASSWORD_ENV, OrthancIndex, start_orthanc
    from dicomops.stack import STOP_SIGNALS, interrupt_on

    try:
        credentials = credentials_from_env()
        index = OrthancIndex.from_url(index_url, os.environ.get(INDEX_PASSWORD_ENV)) if index_url else None
    except ValueError as err:
        console.print(f"[red]cannot start the PACS:[/] {escape(str(err))}")
        raise typer.Exit(2) from err
    folder = (storage or Path.cwd() / "pacs").absolute()  # the same PACS dicomops serve runs
    code = 0
    with interrupt_on((signal.SIGINT, *STOP_SIGNALS)) as interrupts:
        try:
            with start_orthanc(folder, port, credentials, stable_age_s=stable_age, dicom_port=dicom_port,
                               index=index) as pacs:
                console.print(f"[green]PACS (Orthanc)[/]: {pacs.url}  (loopback clients only; user "
                              f"{escape(credentials.user)}, password from {PASSWORD_ENV})", soft_wrap=True)
                console.print(f"DICOMweb root: {pacs.dicomweb_url}", soft_wrap=True)
                console.print(f"studies stored in {escape(str(pacs.data))}; configuration {escape(str(pacs.config))} "
                              f"(mode 0600), log {escape(str(pacs.log))}", soft_wrap=True)
                if index is not None:
                    console.print(f"index in PostgreSQL: database {escape(index.database)} on {escape(index.host)}:"
                                  f"{index.port} as {escape(index.user)}", soft_wrap=True)
                dicom = (f"on port {dicom_port}, every interface, no password" if dicom_port is not None else "off")
                console.print(f"a study is stable after {stable_age} s without a new instance; DICOM server: {dicom}. "
                              "Ctrl-C or SIGTERM stops it.", soft_wrap=True)
                while pacs.process.poll() is None:
                    time.sleep(0.5)
                reason, code = f"Orthanc exited with code {pacs.process.returncode}; see {pacs.log}", 1
        except KeyboardInterrupt:
            reason = signal.Signals(interrupts.received[0]).name if interrupts.received else "SIGINT"
        except ValueError as err:
            console.print(f"[red]cannot start the PACS:[/] {escape(str(err))}")
            raise typer.Exit(2) from err
        except (RuntimeError, TimeoutError) as err:
            console.print(f"[red]the PACS did not start:[/] {escape(str(err))}")
            raise typer.Exit(1) from err
        finally:
            interrupts.armed = False
    console.print(f"stopped ({reason})" if code == 0 else f"[red]{escape(reason)}[/]")
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

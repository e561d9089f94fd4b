"""A registered model version as serving runs it: its exported engine, the preprocessing it was
trained with, its operating point.

The preprocessing comes from the training run itself (``weights/preprocess_config.json``, logged
beside the weights), never from today's defaults, and must agree with the input contract the export
wrote into the ONNX file, so a changed default cannot silently change what a served model sees. The
engine runs the exported files (:mod:`dicomops.serving.engine`). Every file the export registered
is checked against the sha256 it registered before anything runs: the ONNX files, the manifest and
the training's configuration files by the version's tags, every other file (the TensorRT plan, the
Triton repository's copy) by the manifest. A file that is missing or changed, or a version that
was never exported, is refused with the command that exports it again. An export from before some
of these were registered still loads, with a warning naming what could not be checked. Files are
copied once per version into `models_dir` (default: a temporary folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.errors import ExportCheckError
from dicomops.export import onnx_export
from dicomops.export.contract import InputContract
from dicomops.serving.engine import ENGINE_FILES, SHA_TAGS, Engine, EngineKind, choose, open_engine
from dicomops.tracking.registry import CHAMPION, WEIGHTS_ARTIFACT, alias_version, model_version
from dicomops.tracking.runs import configure_mlflow

if TYPE_CHECKING:
    from dicomops.training.scoring import SeriesRule

log = logging.getLogger(__name__)

PREPROCESS_CONFIG, TRAIN_CONFIG = "preprocess_config.json", "train_config.json"
EXPORT_ARTIFACT = "export"
# The sha256 tags `dicomops export` sets (dicomops.export.stage.seal) besides the ONNX files' (SHA_TAGS):
MANIFEST, MANIFEST_SHA_TAG = "manifest.json", "export.manifest.sha256"  # the manifest: every file's sha256
PLAN_SHA_TAG = "export.fp16_plan.sha256"
CONFIG_SHA_TAGS = {PREPROCESS_CONFIG: "export.preprocess_config.sha256", TRAIN_CONFIG: "export.train_config.sha256"}


@dataclass(frozen=True)
class Champion:
    """What scores a study, and what its result says it came from."""

    name: str
    version: str
    run_id: str
    preprocess: PreprocessConfig
    contract: InputContract
    rule: SeriesRule  # how its slice probabilities become the series score, as its training scored them
    engine: Engine
    # The nodule segmenter whose locations and SEG join the results written back to the PACS
    # (a dicomops.serving.segmenter.Segmenter); None: the classifier's answer alone.
    segmenter: Any | None = None
    write_seg: bool = True  # with a segmenter: its SEG joins its SR (serve.write_seg)

    @property
    def threshold(self) -> float:
        return self.contract.threshold

    def describe(self) -> dict[str, Any]:
        """For MLflow, logs and answers: no identifier of any patient."""
        out = {"model": self.name, "version": self.version, "engine": self.engine.choice.kind,
               "engine_reason": self.engine.choice.reason, "threshold": round(self.threshold, 6),
               "series_rule": self.rule.kind}
        if self.segmenter is None:
            return out
        return out | self.segmenter.describe() | {"write_seg": self.write_seg}


def export_command(version: Any) -> str:
    """The command that exports `version` again (it re-exports even where an earlier export of it
    is recorded, when the registered files no longer pass :func:`check_hashes`)."""
    return f"dicomops export --version {version}"


def check_agreement(pre: PreprocessConfig, contract: InputContract, version: Any = None) -> None:
    """The training run's preprocessing and the exported contract must describe the same input, in
    every setting the contract records; a setting an older contract lacks is named in a warning."""
    command = export_command(version) if version is not None else "dicomops export --version N"
    wrong = contract.disagreements(pre)
    if wrong:
        raise ValueError("the training run's preprocessing (weights/preprocess_config.json) disagrees with the "
                         "exported input contract (" + "; ".join(wrong) + "), so the model would see other "
                         f"inputs than it was exported for: restore the run's configuration, then run '{command}'")
    if contract.unrecorded:
        log.warning("the exported input contract of version %s predates %s: the served preprocessing could not be "
                    "checked against them; run '%s' to record them", version, ", ".join(contract.unrecorded), command)


def resolve(client: Any, name: str, alias: str | None, version: str | None) -> Any:
    if version is not None and alias is not None:
        raise ValueError("give one of --version or --alias, not both")
    if version is not None:
        return model_version(client, name, str(version))
    mv = alias_version(client, name, alias or CHAMPION)  # an unreadable registry raises
    if mv is None:
        raise ValueError(f"no version of {name} holds the alias '{alias or CHAMPION}'; train and promote a model "
                         f"first (dicomops train, then dicomops promote VERSION)")
    return mv


def fetch(client: Any, mv: Any, dest: Path, configs: tuple[str, ...] = (PREPROCESS_CONFIG, TRAIN_CONFIG),
          marker: str = MANIFEST, export_hint: str = "", expected: Mapping[str, str | None] | None = None,
          expected_configs: Mapping[str, str] | None = None) -> Path:
    """The version's weights configuration and exported files in `dest` (``weights/<configs>`` and
    ``export/``), downloaded once: into a temporary folder beside it, then renamed into place, so
    two processes loading the same version never read each other's half-written files. `marker`
    is the export's file that is written last (its presence means the export is complete);
    `export_hint` the command that exports the version (default ``dicomops export``). `expected`
    names export files and the sha256 the version's tags give them now (None: the file must be
    there), `expected_configs` the same for the ``weights/`` configuration files: a copy fetched
    before the version was exported again, or changed since, is fetched anew."""
    hint = export_hint or export_command(mv.version)
    if (dest / EXPORT_ARTIFACT / marker).exists():
        if not _outdated(dest / EXPORT_ARTIFACT, expected or {}) and \
                not _outdated(dest / WEIGHTS_ARTIFACT, expected_configs or {}):
            return dest
        log.info("%s version %s in %s differs from its registered export (exported again since, or the copy was "
                 "changed); fetching it anew", mv.name, mv.version, dest.name)
        _remove_aside(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        try:
            (tmp / WEIGHTS_ARTIFACT).mkdir()
            for name in configs:
                with tempfile.TemporaryDirectory(dir=tmp) as one:
                    got = client.download_artifacts(str(mv.run_id), f"{WEIGHTS_ARTIFACT}/{name}", one)
                    os.replace(got, tmp / WEIGHTS_ARTIFACT / name)
        except Exception as err:
            raise ValueError(f"{mv.name} version {mv.version} was trained before its configuration was stored with "
                             f"it ({WEIGHTS_ARTIFACT}/{', '.join(configs)}); retrain it to use it here") from err
        try:
            client.download_artifacts(str(mv.run_id), EXPORT_ARTIFACT, str(tmp))
        except Exception as err:
            raise ValueError(f"{mv.name} version {mv.version} has not been exported; run '{hint}' first") from err
        if not (tmp / EXPORT_ARTIFACT / marker).exists():
            raise ValueError(f"{mv.name} version {mv.version} has no complete export; run '{hint}' again")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process put it there first
            if not (dest / EXPORT_ARTIFACT / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _outdated(folder: Path, expected: Mapping[str, str | None]) -> bool:
    """Whether a fetched export lacks one of the `expected` files or holds another version of one."""
    return any(not (folder / name).is_file() or (sha is not None and onnx_export.sha256(folder / name) != sha)
               for name, sha in expected.items())


def _remove_aside(dest: Path) -> None:
    """Take a fetched copy out of the way at once (a rename), then delete it: a process that has
    its files open keeps reading them, and none finds it half deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}-outdated-", dir=dest.parent))
    with contextlib.suppress(FileNotFoundError):  # another process took it away first
        os.replace(dest, aside / dest.name)
    shutil.rmtree(aside, ignore_errors=True)


def expected_exports(mv: Any) -> dict[str, str | None]:
    """The export files version `mv` serves from, and the manifest, with their registered sha256,
    from its tags; the TensorRT plan of an export that registered no sha256 for it by its presence,
    when the export built one."""
    tags = dict(mv.tags or {})
    expected: dict[str, str | None] = {ENGINE_FILES[kind]: tags[tag] for kind, tag in SHA_TAGS.items() if tags.get(tag)}
    if tags.get(PLAN_SHA_TAG):
        expected[ENGINE_FILES["tensorrt"]] = tags[PLAN_SHA_TAG]
    elif "tensorrt_plan" in tags.get("export.triton", ""):
        expected[ENGINE_FILES["tensorrt"]] = None
    if tags.get(MANIFEST_SHA_TAG):
        expected[MANIFEST] = tags[MANIFEST_SHA_TAG]
    return expected


def expected_configs(mv: Any) -> dict[str, str]:
    """The training's configuration files (``weights/``) and the sha256 the export registered for them."""
    tags = dict(mv.tags or {})
    return {name: tags[tag] for name, tag in CONFIG_SHA_TAGS.items() if tags.get(tag)}


def unexported_champion(mv: Any) -> str | None:
    """Why version `mv` cannot be served (it was never exported), or None when it can."""
    if SHA_TAGS["ort-fp32"] in (mv.tags or {}):
        return None
    return (f"{mv.name} version {mv.version} has not been exported, and studies are scored on the exported engine "
            f"only; run '{export_command(mv.version)}'")


@dataclass(frozen=True)
class Checked:
    """What :func:`check_hashes` found: the export's files whose sha256 matched a registered one
    (paths relative to ``export/``), and the files no registered sha256 covers (relative to the
    version's folder), which an export from before every file was registered leaves."""

    files: frozenset[str]
    unchecked: tuple[str, ...]


def check_hashes(mv: Any, root: Path) -> Checked:
    """Every file version `mv`'s export registered, in its fetched folder `root`, against the sha256
    it registered: the served ONNX files, the TensorRT plan, the manifest and the training's
    configuration files by the version's tags, then every file the manifest lists (the Triton
    repository's copy among them) by the manifest. A file missing or changed raises, naming the
    file, where its sha256 is registered, and the command that exports the version again."""
    tags, command = dict(mv.tags or {}), export_command(mv.version)
    by_tag = {ENGINE_FILES[kind]: tag for kind, tag in SHA_TAGS.items()} | {
        ENGINE_FILES["tensorrt"]: PLAN_SHA_TAG, MANIFEST: MANIFEST_SHA_TAG}
    registered = {f"{EXPORT_ARTIFACT}/{name}": (tags[tag], f"tag {tag}") for name, tag in by_tag.items() if tags.get(tag)}
    registered |= {f"{WEIGHTS_ARTIFACT}/{name}": (sha, f"tag {CONFIG_SHA_TAGS[name]}")
                   for name, sha in expected_configs(mv).items()}
    _check_files(mv, root, registered, command)
    if tags.get(MANIFEST_SHA_TAG):  # checked above: the hashes it lists are the export's
        listed = json.loads((root / EXPORT_ARTIFACT / MANIFEST).read_text()).get("files", {})
        by_manifest = {f"{EXPORT_ARTIFACT}/{name}": (sha, MANIFEST) for name, sha in listed.items()}
        _check_files(mv, root, {k: v for k, v in by_manifest.items() if k not in registered}, command)
        registered = by_manifest | registered
    unchecked = tuple(str(p.relative_to(root)) for p in sorted(root.rglob("*"))
                      if p.is_file() and str(p.relative_to(root)) not in registered
                      and p != root / EXPORT_ARTIFACT / MANIFEST)
    prefix = f"{EXPORT_ARTIFACT}/"
    return Checked(frozenset(p.removeprefix(prefix) for p in registered if p.startswith(prefix)), unchecked)


def _check_files(mv: Any, root: Path, registered: Mapping[str, tuple[str, str]], command: str) -> None:
    for relative, (sha, where) in registered.items():
        path, name = root / relative, relative.removeprefix(f"{EXPORT_ARTIFACT}/")
        if not path.is_file():
            raise ValueError(f"{name} of {mv.name} version {mv.version} is missing from its "
                             f"{'export' if relative.startswith(EXPORT_ARTIFACT) else 'training run'} ({where} says "
                             f"it exists); run '{command}'")
        if onnx_export.sha256(path) != sha:
            raise ValueError(f"{name} of {mv.name} version {mv.version} does not match the sha256 its export "
                             f"registered ({where}): it was changed after the export; run '{command}' to export "
                             "the version again from its training run")


def registered_problem(tracking_uri: str, name: str, version: str) -> str | None:
    """Why the files registered for `version` of `name` would not be served (changed or missing since
    its export, exported before every file was registered, a configuration that disagrees with the
    contract), or None when they pass every check :func:`load_champion` makes. Downloads them into
    a temporary folder."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(tracking_uri)
    try:
        mv = model_version(client, name, version)  # a registry that does not answer raises: nothing to decide
    except ValueError as err:  # no such version (deleted, or another store)
        return str(err)
    if (why := unexported_champion(mv)) is not None:
        return why
    with tempfile.TemporaryDirectory(prefix="dicomops-registered-") as tmp:
        try:
            root = fetch(client, mv, Path(tmp) / "v", expected=expected_exports(mv),
                         expected_configs=expected_configs(mv))
            checked = check_hashes(mv, root)
            if MANIFEST not in checked.files:
                return f"it was exported before every file's sha256 was registered ({', '.join(checked.unchecked)})"
            contract = onnx_export.read_contract(root / EXPORT_ARTIFACT / ENGINE_FILES["ort-fp32"])
            pre = PreprocessConfig.model_validate(json.loads((root / WEIGHTS_ARTIFACT / PREPROCESS_CONFIG).read_text()))
            if contract.unrecorded:
                return f"its input contract predates {', '.join(contract.unrecorded)}"
            check_agreement(pre, contract, mv.version)
        except (ValueError, ExportCheckError, OSError, MlflowException) as err:  # an artifact gone from the store too
            return f"{type(err).__name__}: {err}"
    return None


def load_champion(tracking_uri: str, name: str, alias: str | None = CHAMPION, version: str | None = None,
                  engine: EngineKind = "auto", models_dir: Path | None = None, threads: int = 2) -> Champion:
    """The version of `name` holding `alias` (or number `version`), on its exported engine."""
    client = configure_mlflow(tracking_uri)
    mv = resolve(client, name, None if version is not None else alias, version)
    root = fetch(client, mv, Path(models_dir or tempfile.mkdtemp(prefix="dicomops-models-")) / f"{name}-v{mv.version}",
                 expected=expected_exports(mv), expected_configs=expected_configs(mv))
    checked = check_hashes(mv, root)  # before any file is read, and before TensorRT is asked about
    if checked.unchecked:
        log.warning("%s version %s: %s carry no registered sha256 (an export from before every file's was "
                    "registered, or files an earlier export left), so they are neither checked nor served; run '%s' "
                    "to register them", name, mv.version, ", ".join(checked.unchecked), export_command(mv.version))
    preprocess = PreprocessConfig.model_validate(json.loads((root / WEIGHTS_ARTIFACT / PREPROCESS_CONFIG).read_text()))
    train_raw = json.loads((root / WEIGHTS_ARTIFACT / TRAIN_CONFIG).read_text())
    train = TrainConfig.from_logged(train_raw)
    folder = root / EXPORT_ARTIFACT
    contract = onnx_export.read_contract(folder / ENGINE_FILES["ort-fp32"])
    check_agreement(preprocess, contract, mv.version)
    plan = ENGINE_FILES["tensorrt"]
    if engine == "tensorrt" and (folder / plan).exists() and plan not in checked.files:
        raise ValueError(f"{plan} of {name} version {mv.version} has no registered sha256 (exported before plans "
                         f"were registered), so it is not served; run '{export_command(mv.version)}' on a GPU host, "
                         "or serve with --engine ort-fp32")
    from dicomops.export.quantize import int8_refusal

    if ENGINE_FILES.get(engine) == ENGINE_FILES["ort-int8"] and (why := int8_refusal(mv.tags, engine)):
        raise ValueError(f"{engine} would serve the INT8 file of {name} version {mv.version}, which its export's check "
                         f"refused: {why}")
    choice = choose(engine, set(checked.files))
    served = open_engine(folder, choice, contract, threads)
    from dicomops.training.scoring import SeriesRule

    return Champion(name, str(mv.version), str(mv.run_id), preprocess, contract, SeriesRule.of(train), served)

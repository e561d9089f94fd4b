"""A registered model version as serving runs it: its exported engine, the preprocessing it was
trained with, its operating point.

The preprocessing comes from the training run itself (``weights/preprocess_config.json``, logged
beside the weights), never from today's defaults, and must agree with the input contract the export
wrote into the ONNX file, so a changed default cannot silently change what a served model sees. The
engine runs the exported files (:mod:`dicomops.serving.engine`), checked against the sha256 the
version's tags carry; a version that was never exported is refused with the command that exports it.
Files are copied once per version into `models_dir` (default: a temporary folder).
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
from typing import Any

from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.export import onnx_export
from dicomops.export.contract import InputContract
from dicomops.serving.engine import ENGINE_FILES, SHA_TAGS, Engine, EngineKind, choose, open_engine
from dicomops.tracking.registry import CHAMPION, WEIGHTS_ARTIFACT, alias_version, model_version
from dicomops.tracking.runs import configure_mlflow

log = logging.getLogger(__name__)

PREPROCESS_CONFIG, TRAIN_CONFIG = "preprocess_config.json", "train_config.json"
EXPORT_ARTIFACT = "export"


@dataclass(frozen=True)
class Champion:
    """What scores a study, and what its result says it came from."""

    name: str
    version: str
    run_id: str
    preprocess: PreprocessConfig
    contract: InputContract
    top_k: int
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
               "engine_reason": self.engine.choice.reason, "threshold": round(self.threshold, 6)}
        if self.segmenter is None:
            return out
        return out | self.segmenter.describe() | {"write_seg": self.write_seg}


def check_agreement(pre: PreprocessConfig, contract: InputContract) -> None:
    """The training run's preprocessing and the exported contract must describe the same input."""
    pairs = {"slab_slices/channels": (pre.slab_slices, contract.channels),
             "spacing_mm": (tuple(pre.spacing_mm), tuple(contract.spacing_mm)),
             "window": (pre.window, contract.window), "crop_xy": (pre.crop_xy, contract.crop_xy)}
    wrong = [f"{name}: {a!r} vs {b!r}" for name, (a, b) in pairs.items() if a != b]
    if wrong:
        raise ValueError("the training run's preprocessing disagrees with the exported input contract ("
                         + "; ".join(wrong) + "); re-export the version")


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
          marker: str = "manifest.json", export_hint: str = "", expected: Mapping[str, str | None] | None = None) -> Path:
    """The version's weights configuration and exported files in `dest` (``weights/<configs>`` and
    ``export/``), downloaded once: into a temporary folder beside it, then renamed into place, so
    two processes loading the same version never read each other's half-written files. `marker`
    is the export's file that is written last (its presence means the export is complete);
    `export_hint` the command that exports the version (default ``dicomops export``). `expected`
    names export files and the sha256 the version's tags give them now (None: the file must be
    there): a copy fetched before the version was exported again is fetched anew."""
    hint = export_hint or f"dicomops export --version {mv.version}"
    if (dest / EXPORT_ARTIFACT / marker).exists():
        if not _outdated(dest / EXPORT_ARTIFACT, expected or {}):
            return dest
        log.info("%s version %s was exported again since it was fetched into %s; fetching it anew", mv.name,
                 mv.version, dest.name)
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
    """The export files version `mv` serves from and their registered sha256, from its tags; the
    TensorRT plan (no sha tag) by its presence, when the export built one."""
    tags = dict(mv.tags or {})
    expected: dict[str, str | None] = {ENGINE_FILES[kind]: tags[tag] for kind, tag in SHA_TAGS.items() if tags.get(tag)}
    if "tensorrt_plan" in tags.get("export.triton", ""):
        expected[ENGINE_FILES["tensorrt"]] = None
    return expected


def unexported_champion(mv: Any) -> str | None:
    """Why version `mv` cannot be served (it was never exported), or None when it can."""
    if SHA_TAGS["ort-fp32"] in (mv.tags or {}):
        return None
    return (f"{mv.name} version {mv.version} has not been exported, and studies are scored on the exported engine "
            f"only; run 'dicomops export --version {mv.version}'")


def check_hashes(mv: Any, folder: Path) -> None:
    """Each exported model file against the sha256 the version's tags carry."""
    tags = dict(mv.tags or {})
    for kind, tag in SHA_TAGS.items():
        expected = tags.get(tag)
        path = folder / ENGINE_FILES[kind]
        if expected and path.exists() and onnx_export.sha256(path) != expected:
            raise ValueError(f"{path.name} of {mv.name} version {mv.version} does not match its registered sha256 "
                             f"({tag}); re-export the version")


def load_champion(tracking_uri: str, name: str, alias: str | None = CHAMPION, version: str | None = None,
                  engine: EngineKind = "auto", models_dir: Path | None = None, threads: int = 2) -> Champion:
    """The version of `name` holding `alias` (or number `version`), on its exported engine."""
    client = configure_mlflow(tracking_uri)
    mv = resolve(client, name, None if version is not None else alias, version)
    root = fetch(client, mv, Path(models_dir or tempfile.mkdtemp(prefix="dicomops-models-")) / f"{name}-v{mv.version}",
                 expected=expected_exports(mv))
    preprocess = PreprocessConfig.model_validate(json.loads((root / WEIGHTS_ARTIFACT / PREPROCESS_CONFIG).read_text()))
    train_raw = json.loads((root / WEIGHTS_ARTIFACT / TRAIN_CONFIG).read_text())
    train = TrainConfig.from_logged(train_raw)
    folder = root / EXPORT_ARTIFACT
    check_hashes(mv, folder)
    contract = onnx_export.read_contract(folder / "model.onnx")
    check_agreement(preprocess, contract)
    choice = choose(engine, {p.name for p in folder.iterdir()})
    served = open_engine(folder, choice, contract, threads)
    return Champion(name, str(mv.version), str(mv.run_id), preprocess, contract, train.top_k_slices, served)

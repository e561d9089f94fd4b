"""What a served version runs is what its export registered: every file the export registered (the
engines, the TensorRT plan, the Triton repository's copy, the training's configuration) against its
sha256, every preprocessing setting that changes the network's input against the exported contract,
a missing file named with the command that repairs it, and `dicomops export` that does not skip a
version whose registered files no longer pass these checks.

The export here is a tiny ONNX graph in a folder standing for the artifact store; the version's tags
are written as ``dicomops export`` writes them (a test below checks that it does)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dicomops.config import ExportConfig, PreprocessConfig, TrainConfig
from dicomops.export import onnx_export, tensorrt_engine
from dicomops.export.contract import METADATA_KEY, InputContract
from dicomops.preprocessing.stage import VOLUME_FIELDS
from dicomops.serving import champion

NAME, VERSION = "m", "3"
PRE = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160)
TRAIN = TrainConfig(input_size=32, top_k_slices=3)
CONTRACT = InputContract.from_configs(PRE, TRAIN, 0.5)
# A contract as exports wrote it before it recorded every volume setting.
LEGACY_FIELDS = ("header_window_index", "histogram_equalize", "min_positive_voxels")
LEGACY_CONTRACT = json.dumps({k: v for k, v in json.loads(CONTRACT.to_json()).items() if k not in LEGACY_FIELDS})


def _onnx(path: Path, contract: str, tag: str) -> None:
    """slab (N, 3, 32, 32) → probability (N, 2): enough for a session and a contract."""
    x = helper.make_tensor_value_info("slab", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["slab"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["probability"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx_export.set_metadata(model, {METADATA_KEY: contract, "which": tag})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


class Store:
    """An MLflow client whose run artifacts are a local folder (what `fetch` downloads)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
        source, target = self.root / path, Path(dst) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
        return str(target)


def make_export(root: Path, legacy: bool = False, plan: bool = False) -> tuple[Store, Any]:
    """A registered export in `root` and its version. `legacy`: as exported before every file's
    sha256 and every volume setting were registered."""
    weights, export = root / "weights", root / "export"
    weights.mkdir(parents=True)
    (weights / "preprocess_config.json").write_text(json.dumps(PRE.model_dump(mode="json")))
    (weights / "train_config.json").write_text(json.dumps(TRAIN.model_dump(mode="json") | {"in_channels": 3}))
    contract = LEGACY_CONTRACT if legacy else CONTRACT.to_json()
    _onnx(export / "model.onnx", contract, "fp32")
    _onnx(export / "model.int8.onnx", contract, "int8")
    (export / "model_repository" / NAME / VERSION).mkdir(parents=True)
    shutil.copy(export / "model.onnx", export / "model_repository" / NAME / VERSION / "model.onnx")
    if plan:
        (export / "model.fp16.plan").write_bytes(b"a TensorRT plan built on a GPU")
    files = {str(p.relative_to(export)): onnx_export.sha256(p) for p in sorted(export.rglob("*")) if p.is_file()}
    (export / "manifest.json").write_text(json.dumps({"version": VERSION, "files": files}))
    tags = {"export.onnx.sha256": files["model.onnx"], "export.int8.sha256": files["model.int8.onnx"],
            "export.triton": f"{NAME} (onnxruntime_onnx)" + (f", {NAME}-trt (tensorrt_plan)" if plan else "")}
    if not legacy:
        tags |= {"export.manifest.sha256": onnx_export.sha256(export / "manifest.json"),
                 "export.preprocess_config.sha256": onnx_export.sha256(weights / "preprocess_config.json"),
                 "export.train_config.sha256": onnx_export.sha256(weights / "train_config.json")}
        if plan:
            tags["export.fp16_plan.sha256"] = files["model.fp16.plan"]
    return Store(root), types.SimpleNamespace(name=NAME, version=VERSION, run_id="r", tags=tags)


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`load_champion` over an export made by :func:`make_export` (its store and version)."""

    def use(store: Store, mv: Any) -> None:
        monkeypatch.setattr(champion, "configure_mlflow", lambda uri: store)
        monkeypatch.setattr(champion, "resolve", lambda client, name, alias, version: mv)
        monkeypatch.setattr(champion, "model_version", lambda client, name, version: mv)

    return use


def _load(models: Path, engine: champion.EngineKind = "ort-fp32") -> champion.Champion:
    return champion.load_champion("sqlite:///unused.db", NAME, version=VERSION, engine=engine, models_dir=models)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# Item 2: the contract and the served preprocessing


def test_the_contract_records_every_volume_setting_and_a_disagreement_in_any_is_refused() -> None:
    recorded = json.loads(CONTRACT.to_json())
    assert set(VOLUME_FIELDS) <= set(recorded)
    assert recorded["histogram_equalize"] is False and recorded["header_window_index"] == 0
    custom = InputContract.from_configs(PreprocessConfig(window="custom", window_center=-600, window_width=1500),
                                        TRAIN, 0.5)
    header = InputContract.from_configs(PreprocessConfig(window="header", header_window_index=1), TRAIN, 0.5)
    cases = [(PreprocessConfig(histogram_equalize=True), InputContract.from_configs(PreprocessConfig(), TRAIN, 0.5),
              "histogram_equalize"),
             (PreprocessConfig(window="custom", window_center=-300, window_width=800), custom, "window_center"),
             (PreprocessConfig(window="header", header_window_index=0), header, "header_window_index")]
    for pre, contract, field in cases:
        with pytest.raises(ValueError, match=field):
            champion.check_agreement(pre, contract)
    champion.check_agreement(PreprocessConfig(window="custom", window_center=-600.0, window_width=1500.0), custom)


def test_changed_served_configuration_is_fetched_anew_and_a_changed_registered_one_refused(
        tmp_path: Path, served: Any) -> None:
    store, mv = make_export(tmp_path / "store")
    served(store, mv)
    models = tmp_path / "models"
    assert _load(models).preprocess.histogram_equalize is False
    copy = models / f"{NAME}-v{VERSION}" / "weights" / "preprocess_config.json"
    _edit_json(copy, histogram_equalize=True)  # the served copy edited: fetched again from the store
    assert _load(models).preprocess.histogram_equalize is False
    assert json.loads(copy.read_text())["histogram_equalize"] is False

    # The training run's own file changed after the export, in a setting the contract does not hold
    # (how many slabs make the series score): refused by its sha256 wherever it is fetched.
    _edit_json(store.root / "weights" / "train_config.json", top_k_slices=1)
    with pytest.raises(ValueError, match=r"train_config\.json.*export\.train_config\.sha256") as err:
        _load(tmp_path / "elsewhere")
    assert f"dicomops export --version {VERSION}" in str(err.value)


def test_a_version_exported_before_the_full_contract_loads_with_a_warning_naming_what_was_not_checked(
        tmp_path: Path, served: Any, caplog: pytest.LogCaptureFixture) -> None:
    legacy = InputContract.from_mapping(LEGACY_CONTRACT)
    assert legacy.unrecorded == LEGACY_FIELDS and legacy.completed(PRE) == CONTRACT
    with pytest.raises(ValueError, match="spacing_mm"):  # what it records is still compared
        champion.check_agreement(PRE.model_copy(update={"spacing_mm": (1.0, 1.0, 1.0)}), legacy)
    assert InputContract.from_mapping(legacy.completed(PRE).to_json()).unrecorded == ()  # a re-export records them

    store, mv = make_export(tmp_path / "store", legacy=True)
    served(store, mv)
    with caplog.at_level(logging.WARNING, logger="dicomops.serving.champion"):
        loaded = _load(tmp_path / "models")
    assert loaded.contract.unrecorded == LEGACY_FIELDS
    text = caplog.text
    assert all(field in text for field in LEGACY_FIELDS)
    assert f"model_repository/{NAME}/{VERSION}/model.onnx" in text and "preprocess_config.json" in text
    assert f"dicomops export --version {VERSION}" in text


# Item 7: a file missing from the registered export


@pytest.mark.parametrize(("missing", "engine", "tag"), [("model.int8.onnx", "ort-int8", "export.int8.sha256"),
                                                         ("model.onnx", "ort-fp32", "export.onnx.sha256"),
                                                         ("model.int8.onnx", "ov-int8", "export.int8.sha256"),
                                                         ("model.onnx", "ov-fp32", "export.onnx.sha256")])
def test_a_file_missing_from_the_registered_export_is_named_with_the_command_that_repairs_it(
        tmp_path: Path, served: Any, missing: str, engine: champion.EngineKind, tag: str) -> None:
    store, mv = make_export(tmp_path / "store", legacy=True)  # by its tag alone, too
    (store.root / "export" / missing).unlink()
    served(store, mv)
    with pytest.raises(ValueError) as err:
        _load(tmp_path / "models", engine)
    message = str(err.value)
    assert f"{missing} of {NAME} version {VERSION} is missing from its export" in message
    assert tag in message and f"dicomops export --version {VERSION}" in message


# Item 10: the TensorRT plan and the Triton repository's copy


@pytest.fixture()
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to touch TensorRT fails the test."""

    def touched(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TensorRT was reached before the plan was checked")

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises
    monkeypatch.setattr(tensorrt_engine, "availability", touched)
    monkeypatch.setattr(tensorrt_engine, "Engine", touched)


@pytest.mark.parametrize("engine", ["tensorrt", "auto"])
def test_a_changed_tensorrt_plan_is_refused_before_tensorrt_is_touched(
        tmp_path: Path, served: Any, no_tensorrt: None, engine: champion.EngineKind) -> None:
    store, mv = make_export(tmp_path / "store", plan=True)
    _flip(store.root / "export" / "model.fp16.plan")
    served(store, mv)
    with pytest.raises(ValueError, match=f"model.fp16.plan of {NAME} version {VERSION} does not match") as err:
        _load(tmp_path / "models", engine)
    assert f"dicomops export --version {VERSION}" in str(err.value)


def test_a_changed_triton_copy_is_refused_and_an_unchanged_export_loads(tmp_path: Path, served: Any) -> None:
    store, mv = make_export(tmp_path / "store", plan=True)
    served(store, mv)
    loaded = _load(tmp_path / "models")
    assert loaded.engine.choice.kind == "ort-fp32" and loaded.contract == CONTRACT
    _flip(store.root / "export" / "model_repository" / NAME / VERSION / "model.onnx")
    with pytest.raises(ValueError, match=f"model_repository/{NAME}/{VERSION}/model.onnx of {NAME} version "
                                         f"{VERSION} does not match.*manifest.json"):
        _load(tmp_path / "models2")


def test_the_export_registers_the_sha256_serving_checks(tmp_path: Path) -> None:
    """The tags `dicomops export` sets are the ones the test exports above carry."""
    from dicomops.export import stage

    store, mv = make_export(tmp_path / "store", plan=True)
    folder = store.root / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").unlink()
    configs = {name: onnx_export.sha256(store.root / "weights" / name)
               for name in ("preprocess_config.json", "train_config.json")}
    files, tags = stage.seal(folder, {"version": VERSION}, configs)
    assert files == manifest["files"]
    assert {k: v for k, v in tags.items() if k != "export.manifest.sha256"} == \
        {k: v for k, v in mv.tags.items() if k.endswith(".sha256") and k != "export.manifest.sha256"}
    assert tags["export.manifest.sha256"] == onnx_export.sha256(folder / "manifest.json")
    assert json.loads((folder / "manifest.json").read_text())["weights"] == configs


# Item 6: `dicomops export` does not skip a version whose registered files fail these checks


def test_export_skips_only_while_the_registered_export_passes_the_serving_checks(
        prefect_harness: None, tmp_path: Path, served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.export as export_flow
    from dicomops.export.stage import ExportReport, ModelRef

    store, mv = make_export(tmp_path / "store")
    served(store, mv)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    exports: list[str] = []

    def export_and_check(work: Path, uri: str, ref: ModelRef, cfg: ExportConfig) -> ExportReport:
        exports.append(ref.version)
        folder = Path(work) / "export" / f"v{ref.version}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text("{}")
        metrics = {"export.onnx.parity_max_abs_diff": 0.0, "export.int8.auc_drop": 0.0,
                   "export.ort_fp32.latency_ms_b1": 1.0}
        return ExportReport(ref.version, str(folder), metrics=metrics, tensorrt="skipped (test)")

    monkeypatch.setattr(export_flow, "t", types.SimpleNamespace(
        resolve_version=lambda uri, name, version, alias: ModelRef(NAME, VERSION, "r", CONTRACT),
        export_and_check=export_and_check, attach=lambda uri, ref, report: None))
    work, cfg = tmp_path / "work", ExportConfig()

    def run(**kwargs: Any) -> dict[str, object]:
        return export_flow.export(work=work, config=cfg, model_name=NAME, version=VERSION, **kwargs)

    assert run()["skipped"] is False and run()["skipped"] is True and len(exports) == 1
    onnx_file = store.root / "export" / "model.onnx"
    good = onnx_file.read_bytes()
    _flip(onnx_file)  # damaged in the artifact store after the export
    problems: list[str | None] = []  # what the flow prints, read where it is decided (Prefect's capture of prints varies)
    real_problem = export_flow.registered_problem
    monkeypatch.setattr(export_flow, "registered_problem",
                        lambda uri, ref: problems.append(real_problem(uri, ref)) or problems[-1])
    assert run()["skipped"] is False and len(exports) == 2
    assert "model.onnx of m version 3 does not match" in str(problems[-1])
    onnx_file.write_bytes(good)  # what the re-export's attach puts back
    assert run()["skipped"] is True
    assert run(force=True)["skipped"] is False and len(exports) == 3


# The INT8 file whose series scores failed the export's check (export.int8.series_check)


@pytest.mark.parametrize("engine", ["ort-int8", "ov-int8"])
def test_an_int8_file_whose_series_check_failed_is_refused_and_fp32_still_served(
        tmp_path: Path, served: Any, engine: champion.EngineKind) -> None:
    store, mv = make_export(tmp_path / "store")
    verdict = ("failed: series AUC 0.9910 -> 0.8416 over 30 series, scores moved by up to 0.631; this INT8 engine "
               "refuses the version: serve it with ort-fp32 (or ov-fp32), or export it with --int8 qat")
    mv.tags["export.int8.series_check"] = verdict
    served(store, mv)
    with pytest.raises(ValueError) as err:
        _load(tmp_path / "models", engine)
    assert f"{engine} would serve the INT8 file of {NAME} version {VERSION}" in str(err.value)
    assert verdict in str(err.value)
    assert _load(tmp_path / "models2").engine.choice.kind == "ort-fp32"
    mv.tags["export.int8.series_check"] = verdict.replace("failed", "passed", 1)
    assert _load(tmp_path / "models3", "ort-int8").engine.choice.kind == "ort-int8"


def test_each_int8_engine_is_refused_on_its_own_series_check(tmp_path: Path, served: Any) -> None:
    """ONNX Runtime failed and OpenVINO passed the same file: OpenVINO serves it, ONNX Runtime refuses."""
    store, mv = make_export(tmp_path / "store")
    failed = ("failed: series AUC 0.9700 -> 0.8530 over 30 series, scores moved by up to 0.631; this INT8 engine "
              "refuses the version: serve it with ort-fp32 (or ov-fp32), or export it with --int8 qat")
    mv.tags["export.int8.series_check"] = failed
    mv.tags["export.ov_int8.series_check"] = "passed: series AUC 0.9700 -> 0.9650 over 30 series, scores moved by up to 0.08"
    served(store, mv)
    assert _load(tmp_path / "models", "ov-int8").engine.choice.kind == "ov-int8"
    with pytest.raises(ValueError, match="ort-int8 would serve the INT8 file") as err:
        _load(tmp_path / "models2", "ort-int8")
    assert failed in str(err.value)

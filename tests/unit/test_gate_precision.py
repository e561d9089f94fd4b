"""The promotion gate compares the figures its trainings logged, not the four decimals of the tags
people read; a version it no longer decides reports the decision it holds."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dicomops.config import SegmentConfig, TrainConfig
from dicomops.tracking import registry
from dicomops.tracking.promotion import GATE_SETTINGS, gate_settings, model_settings


def _version(client: MlflowClient, experiment: str, name: str, tags: dict[str, float], logged: bool) -> str:
    """A version whose ``cv.*`` tags are its figures to four decimals, as registration writes them,
    and whose run logged them unrounded (`logged`)."""
    run = client.create_run(experiment)
    if logged:
        for key, value in tags.items():
            client.log_metric(run.info.run_id, key, value)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, f"{value:.4f}")
    return str(mv.version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One SQLite store for the module (making one takes seconds); each test its own model."""
    root = tmp_path_factory.mktemp("gate-precision")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, MlflowClient(uri).create_experiment("gate", artifact_location=(root / "art").as_uri())


def _registry(store: tuple[str, str], name: str, champion: dict[str, float], challenger: dict[str, float],
              logged: bool = True) -> tuple[str, MlflowClient, str]:
    """`name` with a champion (v1, recorded as dicomops records one) and a challenger (v2)."""
    uri, experiment = store
    client = MlflowClient(uri)
    client.create_registered_model(name)
    first = _version(client, experiment, name, champion, logged)
    client.set_registered_model_alias(name, registry.CHAMPION, first)
    client.set_registered_model_tag(name, registry.RECORDED_CHAMPION, first)
    client.set_model_version_tag(name, first, "promotion.decision", "auto-promoted")
    second = _version(client, experiment, name, challenger, logged)
    client.set_registered_model_alias(name, registry.CHALLENGER, second)
    return uri, client, second


def test_a_gain_under_the_margin_is_not_promoted_though_the_rounded_tags_differ_by_more(
        store: tuple[str, str]) -> None:
    # 0.80004 and 0.80496 read 0.8000 and 0.8050 on the version page: 0.0050000000000000044 apart,
    # which passed a 0.005 margin. The real gain is 0.00492.
    uri, client, version = _registry(store, "margin", {"cv.mean_auc": 0.80004, "cv.auc.ge": 0.80004},
                                     {"cv.mean_auc": 0.80496, "cv.auc.ge": 0.80496})
    decision = registry.apply_promotion_gate(uri, "margin", version, margin=0.005, vendor_tolerance=0.02, min_auc=0.8)
    assert not decision.promote and decision.label == "awaiting-review"
    assert "gain +0.0049 not above margin 0.0050" in "; ".join(decision.reasons)
    assert client.get_model_version("margin", version).tags["cv.mean_auc"] == "0.8050"  # the page reads rounded


def test_a_floor_is_judged_on_the_logged_figure_and_a_version_without_one_on_its_tag(store: tuple[str, str]) -> None:
    # The segmenter's Dice floor 0.5: 0.49996 reads 0.5000.
    figures = {"cv.mean_cpm": 0.9, "cv.cpm.ge": 0.9, "cv.dice_ge6": 0.49996, "cv.kappa_series": 0.8}
    floors = {"Dice (nodules >= 6 mm)": ("cv.dice_ge6", 0.5), "series kappa": ("cv.kappa_series", 0.4)}
    for name, logged in (("floor-logged", True), ("floor-tags", False)):
        uri, _, version = _registry(store, name, {**figures, "cv.mean_cpm": 0.8}, figures, logged)
        decision = registry.apply_promotion_gate(uri, name, version, margin=0.005, vendor_tolerance=0.05,
                                                 min_auc=0.8, metric="cpm", floors=floors)
        if logged:
            assert not decision.promote
            assert "Dice (nodules >= 6 mm) 0.5000 is below its floor 0.5000" in decision.reasons
        else:  # registered before its figures were logged: its tags are all there is
            assert decision.promote and "beats champion 0.8000 by +0.1000" in decision.reasons[0]


def test_a_metric_its_tag_was_not_rounded_from_is_not_read_for_it(store: tuple[str, str]) -> None:
    _, client, version = _registry(store, "stray", {"cv.mean_auc": 0.80004}, {"cv.mean_auc": 0.90})
    client.log_metric(client.get_model_version("stray", version).run_id, "cv.mean_auc", 0.5)  # logged since
    assert registry.version_figures(client, client.get_model_version("stray", version)) == {"cv.mean_auc": 0.9}
    assert registry.version_figures(client, client.get_model_version("stray", "1")) == {"cv.mean_auc": 0.80004}


def test_a_version_the_gate_no_longer_decides_reports_the_decision_it_holds(store: tuple[str, str]) -> None:
    uri, client, version = _registry(store, "standing", {"cv.mean_auc": 0.80}, {"cv.mean_auc": 0.90})
    assert registry.apply_promotion_gate(uri, "standing", version, margin=0.005, vendor_tolerance=0.02,
                                         min_auc=0.8).label == "auto-promoted"
    again = registry.apply_promotion_gate(uri, "standing", version, margin=0.5, vendor_tolerance=0.02, min_auc=0.95)
    assert (again.promote, again.label) == (True, "auto-promoted")  # the champion it is, not "awaiting-review"
    assert "not the challenger (auto-promoted)" in again.reasons[0]
    replaced = registry.apply_promotion_gate(uri, "standing", "1", margin=0.0, vendor_tolerance=1.0, min_auc=0.0)
    assert (replaced.promote, replaced.label) == (False, "replaced")  # a champion once, replaced since
    assert client.get_model_version("standing", "1").tags["promotion.replaced_by"] == version


@pytest.mark.parametrize("cfg", [TrainConfig(), SegmentConfig()])
def test_the_gate_settings_are_apart_from_what_a_model_depends_on(cfg: TrainConfig | SegmentConfig) -> None:
    gate, model = gate_settings(cfg), model_settings(cfg)
    assert set(gate) and not set(gate) & set(model)
    assert set(gate) | set(model) == set(cfg.model_dump())
    assert set(gate) <= GATE_SETTINGS and "epochs" in model and "model_name" in model


def test_a_gate_error_or_other_gate_settings_gate_the_registered_version_again() -> None:
    """A gate error (the registry did not answer) was recorded with the settings and never retried:
    every later run with them skipped with "gate-error"."""
    from dicomops.stages import decided_under

    gate = {"min_auc": 0.8, "promotion_margin": 0.005}
    assert decided_under({"gate": gate, "decision": "awaiting-review"}, gate)
    assert not decided_under({"gate": gate, "decision": "gate-error"}, gate)
    assert not decided_under({"gate": {**gate, "min_auc": 0.9}, "decision": "auto-promoted"}, gate)
    assert not decided_under({"decision": "auto-promoted"}, gate)  # a record from before the settings were kept
